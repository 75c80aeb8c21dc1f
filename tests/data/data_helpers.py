"""Helpers shared by the data tests (imported by name; conftest.py holds the fixtures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Written for these tests in the Qwen2 format: a default system turn, <|im_start|>role\n
# content<|im_end|>\n per message, generation prompt <|im_start|>assistant\n.
QWEN2_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_SPECIALS = [R1_BOS, R1_EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]


def write_parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int | None = None,
                  schema: Any = None) -> Path:
    """Rows to a parquet file with small row groups, for row-group-level tests."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
