"""Filesystem side of checkpoints: atomic publish, the `latest` pointer, pruning, integrity.

A checkpoint root looks like::

    root/
      latest                   one line: the name of the newest complete step directory
      step_00000012/           complete (only complete directories ever carry this name)
      step_00000016.tmp-3f9a/  a save in progress, or one killed mid-write (ignored, cleaned)

A save writes everything into ``step_XXXXXXXX.tmp-<nonce>/``, fsyncs every file and the
directory, renames it to ``step_XXXXXXXX/`` (atomic on POSIX), fsyncs the root, and only then
replaces ``latest`` (temporary file + ``os.replace``). A process killed at any point therefore
leaves ``latest`` naming a complete checkpoint. Every directory this module publishes holds a
``megatron_rl_meta.json`` whose ``files`` entry lists each file's size, so a truncated or
missing file is found before any tensor is read.

Nothing here imports torch: the functions are plain file operations, run by one rank.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from megatron_rl.errors import CheckpointError

META_NAME = "megatron_rl_meta.json"
LATEST_NAME = "latest"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_MARK = ".tmp-"
_REPLACED_MARK = ".replaced-"


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


def new_nonce() -> str:
    return secrets.token_hex(4)


def tmp_dir_for(final: Path, nonce: str) -> Path:
    return final.with_name(f"{final.name}{_TMP_MARK}{nonce}")


# ----------------------------------------------------------------- durability


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and then every directory, deepest first."""
    dirs: list[Path] = []
    for cur, _subdirs, files in os.walk(root):
        dirs.append(Path(cur))
        for f in files:
            _fsync_path(Path(cur) / f)
    for d in reversed(dirs):
        _fsync_path(d, directory=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{new_nonce()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent, directory=True)


# ----------------------------------------------------------------- manifest


def file_sizes(root: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``root`` except the meta file itself."""
    out: dict[str, int] = {}
    for cur, _subdirs, files in os.walk(root):
        for f in files:
            p = Path(cur) / f
            rel = p.relative_to(root).as_posix()
            if rel != META_NAME:
                out[rel] = p.stat().st_size
    return dict(sorted(out.items()))


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write the meta file last: it lists the sizes of every other file in the directory."""
    meta = {"format": "megatron-rl", "format_version": FORMAT_VERSION, **meta,
            "files": file_sizes(directory)}
    write_text_atomic(directory / META_NAME, json.dumps(meta, indent=1, sort_keys=False) + "\n")


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_NAME
    if not path.is_file():
        raise CheckpointError(
            f"`{directory}` is not a megatron-rl checkpoint: it has no `{META_NAME}`. Point at a "
            "directory written by `megatron-rl convert hf-to-mcore` or by training (a `step_XXXXXXXX/` "
            "folder, or the checkpoint root holding `latest`); a folder whose save was interrupted "
            "never gets this file."
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"`{path}` is corrupt ({e}); the checkpoint cannot be trusted, "
                              "use an earlier one.") from None
    if meta.get("format") != "megatron-rl" or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"`{path}` is not a megatron-rl checkpoint description.")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"`{directory}` was written by a newer megatron-rl (format {meta['format_version']}, "
            f"this one reads up to {FORMAT_VERSION}); upgrade megatron-rl to load it."
        )
    return meta


def verify_files(directory: Path, meta: dict[str, Any], subdirs: tuple[str, ...] = ()) -> None:
    """Every file the manifest lists (under ``subdirs`` when given) exists with its size."""
    problems = []
    for rel, size in meta["files"].items():
        if subdirs and not any(rel == s or rel.startswith(s + "/") for s in subdirs):
            continue
        p = directory / rel
        if not p.is_file():
            problems.append(f"`{rel}` is missing")
        elif p.stat().st_size != size:
            problems.append(f"`{rel}` has {p.stat().st_size} bytes, {size} were written")
        if len(problems) >= 3:
            break
    if problems:
        raise CheckpointError(
            f"Checkpoint `{directory}` is damaged: {'; '.join(problems)}. It was changed or "
            "truncated after it was saved (a partial copy, a full disk); resume from an earlier "
            "checkpoint or copy it again."
        )


# ----------------------------------------------------------------- the checkpoint root


def list_steps(root: Path) -> list[tuple[int, Path]]:
    """Complete step directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def read_latest(root: Path) -> Path | None:
    """The directory ``root/latest`` names, or None when there is no pointer."""
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _STEP_RE.match(name):
        raise CheckpointError(f"`{pointer}` is corrupt (it holds {name[:60]!r}, not a step directory "
                              "name); delete it or point at a `step_XXXXXXXX/` directory directly.")
    return root / name


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written ``tmp`` directory visible as ``final``, durably."""
    fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. right after a resume): replace it
        old = final.with_name(f"{final.name}{_REPLACED_MARK}{new_nonce()}")
        os.rename(final, old)  # a kill right here is repaired by `remove_stale_tmp`
        os.rename(tmp, final)
        _fsync_path(final.parent, directory=True)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(final.parent, directory=True)


def point_latest(root: Path, final: Path) -> None:
    write_text_atomic(root / LATEST_NAME, final.name + "\n")


def remove_stale_tmp(root: Path, keep: Path | None = None) -> None:
    """Delete leftovers of killed saves (``*.tmp-*``) except ``keep``; restore a replaced step."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if _REPLACED_MARK in p.name and p.is_dir():
            final = root / p.name.split(_REPLACED_MARK)[0]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:  # killed between the two renames of `publish`: put the old one back
                os.rename(p, final)
        elif _TMP_MARK in p.name and p != keep:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete steps (0 keeps all); never `latest`'s."""
    if keep_last <= 0:
        return []
    latest = read_latest(root)
    steps = list_steps(root)
    doomed = [p for _, p in steps[:-keep_last] if p != latest]
    for p in doomed:
        # Rename first so a kill mid-delete leaves a *.tmp-* leftover, never half a step dir.
        trash = tmp_dir_for(p, "del-" + new_nonce())
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def resolve(path_or_root: str | Path) -> Path:
    """A checkpoint directory from a root (follows `latest`), a step directory or a converted one."""
    path = Path(path_or_root)
    if not path.exists():
        raise CheckpointError(f"Checkpoint path `{path}` does not exist; check the path (a "
                              "checkpoint root, a `step_XXXXXXXX/` folder or a converted checkpoint).")
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint path `{path}` is a file; give the checkpoint directory.")
    if (path / META_NAME).is_file():
        return path
    latest = read_latest(path)
    if latest is not None:
        if not latest.is_dir():
            raise CheckpointError(
                f"`{path / LATEST_NAME}` names `{latest.name}`, which does not exist (deleted or "
                f"moved); point at one of {[p.name for _, p in list_steps(path)][-3:] or 'no steps'}.")
        return latest
    steps = list_steps(path)
    if steps:
        return steps[-1][1]
    raise CheckpointError(
        f"`{path}` holds no checkpoint: no `{META_NAME}`, no `{LATEST_NAME}` pointer and no "
        "`step_XXXXXXXX/` directory. Point at a checkpoint root, a step directory, or the output "
        "of `megatron-rl convert hf-to-mcore`."
    )
