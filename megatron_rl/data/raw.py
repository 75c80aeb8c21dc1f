"""Raw public dataset files as a stream of records, whatever form they were downloaded in.

Benchmarks ship as JSON lists (DeepScaleR's test sets), JSON Lines (LiveCodeBench's
``test*.jsonl``, MATH-500's ``test.jsonl``), gzip-compressed JSON Lines (EvalPlus releases) or
parquet (Hugging Face's auto-converted ``data/*.parquet``). The form is told from the content,
not the name: the parquet magic ``PAR1``, the gzip magic ``1f 8b``, else text whose first
non-blank character is ``[`` (a JSON list, loaded whole) or anything else (JSON Lines, streamed,
blank lines skipped). Each record comes with its location for error messages: ``line 7``,
``item 6 (0-based)`` or ``row 6 (0-based)``.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from typing import IO, Any

from megatron_rl.errors import DataError

PARQUET_BATCH = 256  # rows decoded at a time: code benchmarks carry megabytes of tests per row


def read_records(path: str) -> Iterator[tuple[str, Any]]:
    """(location, record) of each record of ``path``; DataError names the file and the place."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        raise DataError(f"{path}: {what}. Give the path of the downloaded JSON, JSONL or parquet file.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1":
        yield from _parquet_records(path)
        return
    packed = magic[:2] == b"\x1f\x8b"
    try:
        with _open_text(path, packed) as f:
            head = f.read(4096).lstrip()[:1]
        with _open_text(path, packed) as f:
            yield from _json_records(path, f, as_list=head == "[")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}). Give the JSON, JSONL or parquet file as "
                        "downloaded.") from e
    except (OSError, EOFError) as e:  # a truncated or damaged gzip stream
        raise DataError(f"{path}: cannot be read ({e}). Download the file again.") from e


def _open_text(path: str, packed: bool) -> IO[str]:
    if packed:
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _json_records(path: str, f: IO[str], as_list: bool) -> Iterator[tuple[str, Any]]:
    if as_list:
        try:
            items = json.load(f)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e}). Fix the file or download it again.") from e
        for i, rec in enumerate(items):
            yield f"item {i} (0-based)", rec
        return
    for n, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e}). The input must be a JSON "
                            "list of objects or JSON Lines (one object per line).") from e
        yield f"line {n}", rec


def _parquet_records(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        row = 0
        for batch in f.iter_batches(batch_size=PARQUET_BATCH):
            for rec in batch.to_pylist():
                yield f"row {row} (0-based)", rec
                row += 1
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}). Download it again.") from e
