"""The RL parquet schema: a round trip through PromptDataset, and every malformed case."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from data_helpers import write_parquet

from megatron_rl.config.data import DataConfig
from megatron_rl.data.prompts import PromptDataset
from megatron_rl.data.template import render_prompt
from megatron_rl.errors import DataError

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def row(prompt: Any = "What is 1+1?", answer: Any = "2", source: Any = "math", **kw: Any) -> dict:
    return {"prompt": prompt, "answer": answer, "data_source": source, **kw}


def test_round_trip_strings_messages_and_extra_info(tmp_path: Path, qwen_tok: Any) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3*3?"}]
    a = write_parquet(tmp_path / "a.parquet", [
        row("What is 1+1?", "2", "math", extra_info={"level": 3, "tags": ["easy"]}),
        row("Name a prime.", "2", "math", extra_info={"level": 1, "tags": []}),
    ])
    b = write_parquet(tmp_path / "b.parquet", [
        row(chat, ["9", "9.0"], "arith", extra_info=json.dumps({"id": "q7"})),
        row(chat, ["9"], "arith", extra_info=None),
    ])
    c = write_parquet(tmp_path / "c.parquet", [row("Say hi.", "hi", "chat")])  # no extra_info
    cfg = DataConfig(train_files=[str(a), str(b), str(c)])
    ds = PromptDataset.from_config(cfg, qwen_tok)
    assert len(ds) == 5 and ds.num_dropped == 0
    got = [ds[i] for i in range(5)]
    assert [p.uid for p in got] == [0, 1, 2, 3, 4]  # file order, then row order
    assert got[0].answer == "2" and got[2].answer == ["9", "9.0"]
    assert got[0].extra_info == {"level": 3, "tags": ["easy"]}
    assert got[2].extra_info == {"id": "q7"} and got[3].extra_info == {} and got[4].extra_info == {}
    assert [p.data_source for p in got] == ["math", "math", "arith", "arith", "chat"]
    assert got[0].prompt_ids == render_prompt(qwen_tok, "What is 1+1?", cfg)
    assert got[2].prompt_ids == render_prompt(qwen_tok, chat, cfg)
    assert qwen_tok.decode(got[2].prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n3*3?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_map_typed_extra_info_and_custom_keys(tmp_path: Path, qwen_tok: Any) -> None:
    schema = pa.schema([("question", pa.string()), ("truth", pa.string()),
                        ("data_source", pa.string()),
                        ("extra_info", pa.map_(pa.string(), pa.int64()))])
    f = write_parquet(tmp_path / "m.parquet", [
        {"question": "1+2?", "truth": "3", "data_source": "m", "extra_info": [("k", 1)]},
    ], schema=schema)
    cfg = DataConfig(train_files=[str(f)], prompt_key="question", answer_key="truth")
    p = PromptDataset.from_config(cfg, qwen_tok)[0]
    assert p.answer == "3" and p.extra_info == {"k": 1}


def _build(tmp_path: Path, tok: Any, rows: list[dict], schema: Any = None, **cfg: Any) -> None:
    f = write_parquet(tmp_path / "bad.parquet", rows, schema=schema)
    PromptDataset.from_config(DataConfig(train_files=[str(f)], **cfg), tok)


GOOD = [row(f"Q{i}?", str(i)) for i in range(4)]
BAD_ROWS = {
    "prompt_int": ([row(prompt=7), row(prompt=8)], "row 0", "`prompt`", "int 7"),
    "prompt_null": ([*GOOD[:3], row(prompt=None)], "row 3", "`prompt`", "null"),
    "prompt_empty": ([row(prompt="  ")], "row 0", "`prompt`", "empty"),
    "answer_null": ([*GOOD[:1], row(answer=None)], "row 1", "`answer`", "null"),
    "answer_int": ([row(answer=4)], "row 0", "`answer`", "int"),
    "source_null": ([*GOOD[:2], row(source=None)], "row 2", "`data_source`", "string"),
    "extra_bad_json": ([row(extra_info="{oops")], "row 0", "`extra_info`", "not JSON"),
    "extra_list_json": ([row(extra_info="[1, 2]")], "row 0", "`extra_info`", "JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_cells_name_file_row_and_column(tmp_path: Path, qwen_tok: Any, case: str) -> None:
    rows, where, column, what = BAD_ROWS[case]
    with pytest.raises(DataError) as e:
        _build(tmp_path, qwen_tok, rows)
    msg = str(e.value)
    assert str(tmp_path / "bad.parquet") in msg and where in msg and column in msg and what in msg
    assert "\n" not in msg  # one paragraph


BAD_MESSAGES = {
    "no_role": ([{"content": "hi"}], "lacks `role`"),
    "no_content": ([{"role": "user"}], "lacks `content`"),
    "tool_role": ([{"role": "tool", "content": "x"}], "role 'tool'"),
    "null_content": ([{"role": "user", "content": None}], "lacks `content` (missing or null"),
    "empty_list": ([], "non-empty list"),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_bad_messages(tmp_path: Path, qwen_tok: Any, case: str) -> None:
    messages, what = BAD_MESSAGES[case]
    ok = [{"role": "user", "content": "fine"}]
    # role/content always present as struct fields: arrow fills the missing ones with null
    with pytest.raises(DataError) as e:
        _build(tmp_path, qwen_tok, [row(ok), row(messages)])
    msg = str(e.value)
    assert "row 1" in msg and "`prompt`" in msg and what in msg, msg


def test_messages_lacking_fields_in_the_struct(tmp_path: Path, qwen_tok: Any) -> None:
    schema = pa.schema([("prompt", pa.list_(pa.struct([("text", pa.string())]))),
                        ("answer", pa.string()), ("data_source", pa.string())])
    with pytest.raises(DataError, match=r"row 0 .*`prompt`: message 0 lacks `role`"):
        _build(tmp_path, qwen_tok, [row([{"text": "hi"}])], schema=schema)


def test_missing_column_names_the_columns_present(tmp_path: Path, qwen_tok: Any) -> None:
    with pytest.raises(DataError) as e:
        _build(tmp_path, qwen_tok, [{"question": "q", "answer": "a", "data_source": "s"}])
    msg = str(e.value)
    assert "`prompt`" in msg and "missing" in msg and "`question`" in msg and "bad.parquet" in msg


def test_empty_file_list_missing_file_not_parquet_zero_rows(tmp_path: Path, qwen_tok: Any) -> None:
    with pytest.raises(DataError, match="file list is empty"):
        PromptDataset.from_config(DataConfig(), qwen_tok)
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataError, match=f"{missing}: no such file"):
        PromptDataset.from_config(DataConfig(), qwen_tok, files=[str(missing)])
    text = tmp_path / "rows.parquet"
    text.write_text('{"prompt": "not parquet"}\n')
    with pytest.raises(DataError, match=f"{text}: not a readable parquet file"):
        PromptDataset.from_config(DataConfig(), qwen_tok, files=[str(text)])
    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string()),
                        ("data_source", pa.string())])
    empty = write_parquet(tmp_path / "empty.parquet", [], schema=schema)
    with pytest.raises(DataError, match=f"{empty}: the file has 0 rows"):
        PromptDataset.from_config(DataConfig(), qwen_tok, files=[str(empty)])


def test_messages_prompt_needs_the_chat_template(tmp_path: Path, qwen_tok: Any) -> None:
    with pytest.raises(DataError, match=r"row 0 .*apply_chat_template` is false"):
        _build(tmp_path, qwen_tok, [row([{"role": "user", "content": "hi"}])],
               apply_chat_template=False)
