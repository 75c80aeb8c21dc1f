"""Rows in the training schema written to parquet, atomically.

Columns: ``prompt`` (list of {role, content}), ``answer`` (string), ``data_source`` (string),
``extra_info`` (JSON object text, since metadata differs row to row). Rows are written in row
groups of ``row_group_size`` as they come (a reader decodes one group at a time), into a
temporary file renamed into place at the end, so a conversion that fails never leaves a
half-written file behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from megatron_rl.errors import DataError


def row_schema() -> Any:
    """The arrow schema of a converted file (pyarrow imported on use)."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([("prompt", pa.list_(message)), ("answer", pa.string()),
                      ("data_source", pa.string()), ("extra_info", pa.string())])


def write_rows(rows: Iterable[dict[str, Any]], out_path: str, row_group_size: int,
               empty_error: str | Callable[[], str]) -> int:
    """Write ``rows`` to ``out_path``; the number written. Nothing written raises
    ``DataError(empty_error)`` (called first when a function) and leaves no file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = row_schema()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    n, batch = 0, []
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for row in rows:
                batch.append(row)
                n += 1
                if len(batch) == row_group_size:
                    writer.write_table(pa.Table.from_pylist(batch, schema), row_group_size=row_group_size)
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema), row_group_size=row_group_size)
        if n == 0:
            raise DataError(empty_error() if callable(empty_error) else empty_error)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return n
