"""Hugging Face model folders: streamed, sharded safetensors writing and the non-weight files.

``SafetensorsShardWriter`` takes tensors one at a time and writes a shard as soon as the next
tensor would not fit, so memory holds at most one shard (``max_shard_bytes``) of tensors,
whatever the model size. It writes the safetensors format itself (8-byte little-endian
header length, JSON header, raw little-endian bytes) straight from each tensor's memory:
``safetensors.torch.save_file`` would first copy a whole shard into Python ``bytes``.
Files are named as ``save_pretrained`` names them: ``model.safetensors`` for one shard, else
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

_ST_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt",
                   ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # save_pretrained's default "5GB"


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write_all(f, data, chunk: int = 64 << 20) -> None:
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        part = view[start:start + chunk]
        while part:
            part = part[f.write(part):]


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors code")
        n = tensor_nbytes(t)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8 bytes
    # Unbuffered: Python's BufferedWriter handed one huge memoryview was ~6x slower here.
    with open(path, "wb", buffering=0) as f:
        _write_all(f, struct.pack("<Q", len(raw)) + raw)
        for _, t in tensors:
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                _write_all(f, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        os.fsync(f.fileno())


class SafetensorsShardWriter:
    """Write ``(name, tensor)`` pairs into shards of at most ``max_shard_bytes`` (one tensor
    larger than that gets a shard of its own). Call ``close()`` to name the files and write
    the index; until then shards carry provisional names."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be > 0")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        n = tensor_nbytes(tensor)
        if self._pending and self._pending_bytes + n > self.max_shard_bytes:
            self._flush()
        self._pending.append((name, tensor))
        self._pending_bytes += n
        self.total_bytes += n

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors.partial"
        _write_safetensors(path, self._pending)
        self._shards.append((path, [n for n, _ in self._pending]))
        self._pending, self._pending_bytes = [], 0

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names, write the index if sharded."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final = [self.out_dir / "model.safetensors"]
        else:
            final = [self.out_dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (tmp, names), dst in zip(self._shards, final):
            os.replace(tmp, dst)
            weight_map.update({n: dst.name for n in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the top-level non-weight files of an HF folder (config, generation config,
    tokenizer, chat template, README) from ``src`` to ``dst``; returns the names copied."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith(".") and not is_weight_file(p.name):
            shutil.copyfile(p, dst / p.name)
            copied.append(p.name)
    return copied
