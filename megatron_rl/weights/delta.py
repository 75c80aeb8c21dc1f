"""Delta weight sync: encode only the elements of a flat bucket that changed since the last sync.

After one optimizer step at RL learning rates most bf16 weights round to the same value, so a
bucket is sent as (positions, new values) of the changed elements. Positions are encoded as
``indices`` (int32/int64, one per changed element) or a ``bitmask`` (one bit per element),
whichever is smaller, or the bucket goes ``dense`` (every byte) when that is smaller still.
Elements are compared as integers of their width, so NaN payloads and -0.0 compare exactly.

Every delta carries a checksum of each tensor's full new bytes: the receiver recomputes it
on its weights after applying the delta (cast back to the sender's dtype, exact for values
that came from that dtype) and refuses the update on a mismatch with a message holding
``MISMATCH_MARKER``, so a lost or corrupted delta (or one applied on other weights than the
sender's last sync) is reported, never silently kept; the sender then sends that bucket in
full.

Payload layout (uint8, little endian), N elements of E bytes, K changed:
- ``dense``: the N*E bytes of the bucket;
- ``indices``: K int32 indices (int64 when N >= 2**31), padded to 8 bytes, then K values;
- ``bitmask``: ceil(N / 8) bytes (bit i of byte j is element 8j + i), padded to 8, then K values.

Legend: N = elements in the bucket, K = changed elements, E = element size in bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Encoding = Literal["dense", "indices", "bitmask"]
ENCODINGS: tuple[str, ...] = ("dense", "indices", "bitmask")
MISMATCH_MARKER = "weight checksum mismatch"
"""Text the receiver puts in its refusal when a tensor's checksum fails after a delta."""
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def checksum_algos() -> tuple[str, ...]:
    """Checksums this process can compute: xxh3_64 (fast, if ``xxhash`` is installed) and crc32."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return ("crc32",)
    return ("xxh3_64", "crc32")


def checksum(data: torch.Tensor, algo: str) -> str:
    """Hex checksum of a CPU tensor's bytes (any dtype, contiguous)."""
    buf = memoryview(data.detach().contiguous().view(-1).view(torch.uint8).numpy())
    if algo == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64_hexdigest(buf)
    if algo == "crc32":
        return f"{zlib.crc32(buf):08x}"
    raise ValueError(f"unknown checksum algorithm {algo!r}; this process knows {checksum_algos()}")


@dataclass(frozen=True)
class DeltaHeader:
    """What a receiver needs, besides the bucket's names/dtypes/shapes, to decode a payload."""

    encoding: Encoding
    changed: int
    """K: elements that differ from the previous sync (all N for dense)."""
    payload_bytes: int
    checksum_algo: str
    checksums: tuple[str, ...]
    """One per tensor of the bucket: of the tensor's full new bytes."""

    def to_json(self) -> dict[str, Any]:
        return {"encoding": self.encoding, "changed": self.changed, "payload_bytes": self.payload_bytes,
                "checksum_algo": self.checksum_algo, "checksums": list(self.checksums)}

    @classmethod
    def from_json(cls, body: Any, num_tensors: int) -> DeltaHeader:
        """Validate a request's ``delta`` object; ValueError names what is wrong."""
        if not isinstance(body, dict):
            raise ValueError(f"delta must be an object, got {type(body).__name__}")
        missing = [k for k in ("encoding", "changed", "payload_bytes", "checksum_algo", "checksums") if k not in body]
        if missing:
            raise ValueError(f"delta lacks {missing}")
        if body["encoding"] not in ENCODINGS:
            raise ValueError(f"delta.encoding {body['encoding']!r} is not one of {ENCODINGS}")
        for key in ("changed", "payload_bytes"):
            if not isinstance(body[key], int) or isinstance(body[key], bool) or body[key] < 0:
                raise ValueError(f"delta.{key} must be a non-negative integer, got {body[key]!r}")
        sums = body["checksums"]
        if not isinstance(sums, list) or len(sums) != num_tensors or not all(isinstance(s, str) for s in sums):
            raise ValueError(f"delta.checksums must be a list of {num_tensors} strings (one per tensor)")
        if body["checksum_algo"] not in checksum_algos():
            raise ValueError(f"delta.checksum_algo {body['checksum_algo']!r} is not available here "
                             f"(have {checksum_algos()}; xxh3_64 needs the xxhash package)")
        return cls(body["encoding"], body["changed"], body["payload_bytes"], body["checksum_algo"], tuple(sums))


def as_words(flat: torch.Tensor, elem_size: int) -> torch.Tensor:
    """A uint8 bucket viewed as integers of ``elem_size`` bytes (N,)."""
    if elem_size not in _INT_OF_SIZE:
        raise ValueError(f"no integer type of {elem_size} bytes")
    return flat.view(_INT_OF_SIZE[elem_size])


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def encoded_sizes(n: int, k: int, elem_size: int) -> dict[str, int]:
    """Payload bytes of each encoding for N elements of E bytes with K changed."""
    isz = torch.empty((), dtype=_index_dtype(n)).element_size()
    return {"dense": n * elem_size, "indices": _pad8(k * isz) + k * elem_size,
            "bitmask": _pad8((n + 7) // 8) + k * elem_size}


def encode(new: torch.Tensor, old: torch.Tensor, elem_size: int) -> tuple[Encoding, int, torch.Tensor, torch.Tensor | None]:
    """(encoding, K, payload uint8, changed indices (K,) or None for dense) turning ``old`` into
    ``new`` (both uint8 (N*E,), same size)."""
    if new.numel() != old.numel():
        raise ValueError(f"bucket sizes differ: new {new.numel()} bytes, old {old.numel()}")
    new_w, old_w = as_words(new, elem_size), as_words(old, elem_size)
    n = new_w.numel()
    changed_N = new_w != old_w
    idx_K = changed_N.nonzero().squeeze(1)
    k = idx_K.numel()
    sizes = encoded_sizes(n, k, elem_size)
    kind: Encoding = min(sizes, key=lambda e: (sizes[e], ENCODINGS.index(e)))  # type: ignore[assignment]
    if kind == "dense":
        return kind, n, new, None
    out = torch.empty(sizes[kind], dtype=torch.uint8)
    head = sizes[kind] - k * elem_size
    if kind == "indices":
        isz = torch.empty((), dtype=_index_dtype(n)).element_size()
        out[:k * isz].view(_index_dtype(n)).copy_(idx_K)
    else:
        bits_N8 = torch.zeros(_pad8(n), dtype=torch.uint8)
        bits_N8[:n] = changed_N
        packed = (bits_N8.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)
        out[:packed.numel()] = packed
    out[head:].view(new_w.dtype).copy_(new_w[idx_K])
    return kind, k, out, idx_K


def decode(header: DeltaHeader, payload: torch.Tensor, n: int, elem_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64 (K,), values (K,) as E-byte integers) of a non-dense payload; ValueError if malformed."""
    k = header.changed
    sizes = encoded_sizes(n, k, elem_size)
    if header.encoding == "dense" or payload.numel() != sizes[header.encoding]:
        raise ValueError(f"{header.encoding} payload of {payload.numel()} bytes for {n} elements with {k} "
                         f"changed (expected {sizes.get(header.encoding)})")
    head = sizes[header.encoding] - k * elem_size
    values_K = as_words(payload[head:], elem_size)
    if header.encoding == "indices":
        idx_K = payload[:k * torch.empty((), dtype=_index_dtype(n)).element_size()].view(_index_dtype(n)).long()
        if k and (int(idx_K.min()) < 0 or int(idx_K.max()) >= n or bool((idx_K[1:] <= idx_K[:-1]).any())):
            raise ValueError(f"delta indices must be strictly increasing in [0, {n})")
    else:
        packed = payload[:(n + 7) // 8]
        bits_N = ((packed.unsqueeze(1) & _BITS) != 0).view(-1)[:n]
        idx_K = bits_N.nonzero().squeeze(1)
        if idx_K.numel() != k:
            raise ValueError(f"delta bitmask marks {idx_K.numel()} elements, header says {k}")
    return idx_K, values_K


def tensor_ranges(numels: Sequence[int]) -> list[tuple[int, int]]:
    """Element ranges [start, stop) of consecutive tensors in a bucket."""
    out, start = [], 0
    for numel in numels:
        out.append((start, start + numel))
        start += numel
    return out


def apply(targets: Sequence[torch.Tensor], dtype: torch.dtype, header: DeltaHeader, payload: torch.Tensor) -> list[int]:
    """Apply a delta payload to a bucket's tensors in place; return the positions whose checksum fails.

    ``targets`` are the receiver's tensors in bucket order (contiguous, any dtype that holds
    ``dtype``'s values exactly, e.g. fp32 for bf16); ``payload`` is uint8. ValueError if the
    payload does not match the header.
    """
    elem_size = torch.empty((), dtype=dtype).element_size()
    numels = [t.numel() for t in targets]
    n = sum(numels)
    if header.encoding == "dense":
        if payload.numel() != n * elem_size:
            raise ValueError(f"dense payload of {payload.numel()} bytes for {n} elements of {elem_size} bytes")
        values_N = payload.view(dtype)
        for t, (a, b) in zip(targets, tensor_ranges(numels)):
            t.view(-1).copy_(values_N[a:b])
    else:
        idx_K, values_K = decode(header, payload, n, elem_size)
        values_K = values_K.view(dtype)
        bounds = torch.searchsorted(idx_K, torch.tensor([a for a, _ in tensor_ranges(numels)] + [n]))
        for i, (t, (a, _)) in enumerate(zip(targets, tensor_ranges(numels))):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi > lo:
                t.view(-1)[idx_K[lo:hi] - a] = values_K[lo:hi].to(t.dtype)
    return [i for i, t in enumerate(targets)
            if checksum(t if t.dtype == dtype else t.to(dtype), header.checksum_algo) != header.checksums[i]]
