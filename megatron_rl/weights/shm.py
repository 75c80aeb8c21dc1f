"""Shared-memory buckets for colocated weight sync (trainer and server on one node, CPU).

The trainer's stage leader owns a few fixed files in a directory on a RAM file system
(``/dev/shm/...``), maps them once and writes each bucket into one; the server, told that
directory at launch (``serve --weight-shm-dir``), maps the file a request names and copies
its bytes into its parameters. So a bucket costs one write by the trainer and one read by
the server, and nothing crosses a socket but a small JSON handle.

A handle is data, never code: ``{"name": file name, "nbytes": bytes used, "names": [...],
"dtypes": [...], "shapes": [...], "delta": header or null, "persistent": bool}``.

*Zero copy* (``persistent``): the trainer keeps one file per bucket for the link's life; a
server whose parameters have the wire dtype and row-major layout maps those files shared and
makes them its parameters' storage (``SharedMaps``), so later syncs are the trainer's writes
alone, made while generation is paused. A copy into such a parameter by any other load gives
it private storage first, so it never changes another server mapping the same file.

The server accepts bare file names only (no separators), resolves them inside its directory
and refuses anything else (symlinks out of it included), so a request cannot make it read
other files.
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
    """``count`` files of ``nbytes`` each under ``directory``, mapped read-write as uint8 tensors.

    The creator owns the files (``close`` removes them). Other processes of the same node map
    them with ``attach``; once every user has mapped them the owner may ``unlink`` the names
    early, so the memory goes back to the system when the last process exits, even one killed
    with SIGKILL.
    """

    def __init__(self, directory: str | Path, nbytes: int, *, count: int = 2, tag: str = "w",
                 names: list[str] | None = None):
        self.directory = Path(directory)
        self.nbytes, self.owner = max(nbytes, 1), names is None
        self._maps: list[mmap.mmap] = []
        self.tensors: list[torch.Tensor] = []
        if self.owner:
            self.directory.mkdir(parents=True, exist_ok=True)
            check_free_space(self.directory, self.nbytes * count)
            token = secrets.token_hex(4)
            names = [f"{tag}-{os.getpid()}-{token}-{i}" for i in range(count)]
        self.names = list(names)  # type: ignore[arg-type]
        for name in self.names:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL if self.owner else os.O_RDWR
            fd = os.open(self.directory / name, flags, 0o600)
            try:
                if self.owner:
                    os.ftruncate(fd, self.nbytes)
                elif os.fstat(fd).st_size < self.nbytes:
                    raise ValueError(f"shared-memory file {name} is shorter than {self.nbytes} bytes")
                mm = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            self._maps.append(mm)
            t = torch.frombuffer(mm, dtype=torch.uint8)
            if self.owner:
                t.fill_(0)  # touch every page now: the first sync should not pay the page faults
            self.tensors.append(t)

    @classmethod
    def attach(cls, directory: str | Path, names: list[str], nbytes: int) -> ShmSlots:
        """Map files another process of this node created (read-write); ``close`` leaves them."""
        return cls(directory, nbytes, names=names)

    def unlink(self) -> None:
        """Remove the files' names; the mappings (this process's and others') stay valid."""
        for name in self.names:
            (self.directory / name).unlink(missing_ok=True)

    def close(self) -> None:
        self.tensors.clear()  # the tensors pin the maps: drop them before closing
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a view still alive somewhere: the map goes with it
                pass
        self._maps.clear()
        if self.owner:
            self.unlink()


def check_free_space(directory: str | Path, nbytes: int) -> None:
    """Raise ``OSError`` (with the numbers) unless ``directory``'s file system has ``nbytes`` free.

    A RAM file system that is too small (Docker gives containers a 64 MiB /dev/shm) lets the
    files be created and sized, then kills the process with SIGBUS on the first page it cannot
    back, so the space is checked before any file is made."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise OSError(f"{directory} has {free / 2**20:.0f} MiB free, weight-sync buckets need {nbytes / 2**20:.0f} MiB "
                      "(in a container, give it more shared memory, e.g. `docker run --shm-size=8g`, or lower "
                      "`rollout.bucket_size_mb`)")


def handle(name: str, nbytes: int, names: list[str], dtypes: list[str], shapes: list[list[int]],
           delta: dict[str, Any] | None, persistent: bool = False) -> dict[str, Any]:
    """The JSON handle of one bucket written into the shared file ``name``. ``persistent``: the
    file holds this bucket for the link's life, so a server may map it as its weights."""
    return {"name": name, "nbytes": nbytes, "names": names, "dtypes": dtypes, "shapes": shapes, "delta": delta,
            "persistent": persistent}


class SharedMaps:
    """Receiver of persistent buckets (zero-copy sync): each file mapped once, shared and
    writable, so its tensors can be a server's parameters and the trainer's later writes land
    in them. A file replaced under the same name (another inode or size) is mapped anew."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}

    def map(self, root: str | Path, name: Any, nbytes: Any) -> torch.Tensor:
        path = _checked_path(root, name, nbytes)
        st = os.stat(path)
        if st.st_size < nbytes:
            raise ValueError(f"{name!r} holds {st.st_size} bytes, the request says {nbytes}")
        key = (st.st_ino, st.st_size)
        hit = self._maps.get(name)
        if hit is None or hit[0] != key:
            fd = os.open(path, os.O_RDWR)
            try:
                mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            hit = (key, torch.frombuffer(mm, dtype=torch.uint8))
            self._maps[name] = hit
        return hit[1][:nbytes]

    def keep(self, names: set[str]) -> None:
        """Forget the other files (their memory goes once no parameter uses it)."""
        for name in [n for n in self._maps if n not in names]:
            del self._maps[name]


def _checked_path(root: str | Path, name: Any, nbytes: Any) -> Path:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"shared-memory file name {name!r} must be a bare file name (letters, digits, '._-')")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative integer, got {nbytes!r}")
    base = Path(root).resolve()
    path = (base / name).resolve()
    if path.parent != base or not path.is_file():
        raise ValueError(f"{name!r} is not a file in the server's weight directory {str(base)!r}")
    return path


def map_shared_file(root: str | Path, name: Any, nbytes: Any) -> torch.Tensor:
    """Receiver: the first ``nbytes`` of file ``name`` inside ``root``, mapped (private, copy-on-write).

    ValueError for a name that is not a bare file name, a path that leaves ``root``, a missing
    file or one shorter than ``nbytes``.
    """
    path = _checked_path(root, name, nbytes)
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < nbytes:
            raise ValueError(f"{name!r} holds {size} bytes, the request says {nbytes}")
        mm = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.uint8)
