"""Shared-memory buckets for colocated weight sync (trainer and server on one node, CPU).

The trainer's stage leader owns a few fixed files in a directory on a RAM file system
(``/dev/shm/...``), maps them once and writes each bucket into one; the server, told that
directory at launch (``serve --weight-shm-dir``), maps the file a request names and copies
its bytes into its parameters. So a bucket costs one write by the trainer and one read by
the server, and nothing crosses a socket but a small JSON handle.

A handle is data, never code: ``{"name": file name, "nbytes": bytes used, "names": [...],
"dtypes": [...], "shapes": [...], "delta": header or null}``. The server accepts bare file
names only (no separators), resolves them inside its directory and refuses anything else
(symlinks out of it included), so a request cannot make it read other files.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from pathlib import Path
from typing import Any

import torch

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
DEFAULT_ROOT = "/dev/shm"


class ShmSlots:
    """``count`` files of ``nbytes`` each under ``directory``, mapped read-write as uint8 tensors."""

    def __init__(self, directory: str | Path, nbytes: int, *, count: int = 2, tag: str = "w"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(4)
        self.names = [f"{tag}-{os.getpid()}-{token}-{i}" for i in range(count)]
        self._maps: list[mmap.mmap] = []
        self.tensors: list[torch.Tensor] = []
        for name in self.names:
            fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, max(nbytes, 1))
                mm = mmap.mmap(fd, max(nbytes, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            self._maps.append(mm)
            t = torch.frombuffer(mm, dtype=torch.uint8)
            t.fill_(0)  # touch every page now: the first sync should not pay the page faults
            self.tensors.append(t)

    def close(self) -> None:
        self.tensors.clear()  # the tensors pin the maps: drop them before closing
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a view still alive somewhere: the map goes with it
                pass
        self._maps.clear()
        for name in self.names:
            (self.directory / name).unlink(missing_ok=True)


def handle(name: str, nbytes: int, names: list[str], dtypes: list[str], shapes: list[list[int]],
           delta: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON handle of one bucket written into the shared file ``name``."""
    return {"name": name, "nbytes": nbytes, "names": names, "dtypes": dtypes, "shapes": shapes, "delta": delta}


def map_shared_file(root: str | Path, name: Any, nbytes: Any) -> torch.Tensor:
    """Receiver: the first ``nbytes`` of file ``name`` inside ``root``, mapped (private, copy-on-write).

    ValueError for a name that is not a bare file name, a path that leaves ``root``, a missing
    file or one shorter than ``nbytes``.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"shared-memory file name {name!r} must be a bare file name (letters, digits, '._-')")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative integer, got {nbytes!r}")
    base = Path(root).resolve()
    path = (base / name).resolve()
    if path.parent != base or not path.is_file():
        raise ValueError(f"{name!r} is not a file in the server's weight directory {str(base)!r}")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < nbytes:
            raise ValueError(f"{name!r} holds {size} bytes, the request says {nbytes}")
        mm = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.uint8)
