"""DeepScaleR / DeepCoder JSON to parquet, through the functions and the `megatron-rl data` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from megatron_rl.config.data import DataConfig
from megatron_rl.data.convert import DEEPSCALER_SUFFIX, convert
from megatron_rl.data.prompts import PromptDataset
from megatron_rl.errors import DataError
from megatron_rl.rewards.code_tests import parse_tests

CLI = str(Path(sys.executable).parent / "megatron-rl")
MATH = [{"problem": "What is 1+1?", "answer": "2", "solution": "1+1=2."},
        {"problem": "Solve $x^2=4$, x>0.", "answer": "2"},
        {"problem": "Half of 7?", "answer": 3.5},
        {"problem": "What is 10/2?", "answer": "5", "solution": None}]


def _jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_deepscaler_round_trip(tmp_path: Path, qwen_tok: Any, fmt: str) -> None:
    src = tmp_path / f"math.{fmt}"
    if fmt == "json":
        src.write_text(json.dumps(MATH, indent=1))
    else:
        _jsonl(src, MATH)
    out = tmp_path / "math.parquet"
    assert convert("deepscaler", str(src), str(out), row_group_size=3) == 4
    f = pq.ParquetFile(out)
    assert f.metadata.num_row_groups == 2  # 3 + 1 rows
    rows = f.read_row_group(0).to_pylist() + f.read_row_group(1).to_pylist()
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 1+1?" + DEEPSCALER_SUFFIX}]
    assert DEEPSCALER_SUFFIX == " Let's think step by step and output the final answer within \\boxed{}."
    assert [r["answer"] for r in rows] == ["2", "2", "3.5", "5"]
    assert {r["data_source"] for r in rows} == {"deepscaler"}
    assert json.loads(rows[0]["extra_info"]) == {"index": 0, "solution": "1+1=2."}
    assert json.loads(rows[3]["extra_info"]) == {"index": 3}
    ds = PromptDataset.from_config(DataConfig(train_files=[str(out)]), qwen_tok)
    assert len(ds) == 4 and ds[2].extra_info == {"index": 2}


CODE = [
    {  # LiveCodeBench functional: list tests, function name in the metadata (JSON text)
        "problem": "Return the sum of a list.", "source": "lcbv5",
        "tests": json.dumps([{"input": "[1, 2]", "output": "3", "testtype": "functional"}]),
        "metadata": json.dumps({"func_name": "total"}),
        "starter_code": "class Solution:\n    def total(self, xs):\n        ",
    },
    {  # TACO: a dict of inputs/outputs, stdin
        "problem": "Print a+b.", "source": "taco",
        "tests": {"inputs": ["1 2\n"], "outputs": ["3\n"]},
    },
    {  # PrimeIntellect stdin tests, no source field
        "problem": "Echo the input.",
        "tests": [{"type": "stdin_stdout", "input": "x\n", "output": "x\n"},
                  {"type": "stdin_stdout", "input": "y\n", "output": "y\n"}],
    },
]


def test_deepcoder_rows_feed_the_code_grader(tmp_path: Path) -> None:
    out = tmp_path / "code.parquet"
    assert convert("deepcoder", str(_jsonl(tmp_path / "code.jsonl", CODE)), str(out)) == 3
    rows = pq.ParquetFile(out).read_row_group(0).to_pylist()
    assert [r["data_source"] for r in rows] == ["lcbv5", "taco", "deepcoder"]
    specs = [parse_tests(r["answer"]) for r in rows]  # what the reward will do with them
    assert (specs[0].mode, specs[0].fn_name, len(specs[0])) == ("call", "total", 1)
    assert (specs[1].mode, specs[1].inputs, specs[1].expected) == ("stdio", ["1 2\n"], ["3\n"])
    assert (specs[2].mode, len(specs[2])) == ("stdio", 2)
    first = rows[0]["prompt"][0]
    assert first["role"] == "user" and first["content"].startswith("Return the sum of a list.")
    assert "```python\nclass Solution:\n    def total(self, xs):\n```" in first["content"]
    assert "`total`" in first["content"]
    assert "standard input" in rows[1]["prompt"][0]["content"]
    assert json.loads(rows[0]["extra_info"])["metadata"] == {"func_name": "total"}


BAD = {
    "bad_json_line": ('{"problem": "a", "answer": "1"}\n{"problem": \n', "line 2", "not valid JSON"),
    "missing_answer": (json.dumps([{"problem": "a", "answer": "1"}, {"problem": "b"}]),
                       "item 1 (0-based)", "`answer` is missing"),
    "not_an_object": ('[{"problem": "a", "answer": "1"}, 7]', "item 1 (0-based)",
                      "expected a JSON object"),
    "list_problem": ('{"problem": ["a"], "answer": "1"}\n', "line 1", "`problem` is a list"),
    "empty_answer": ('{"problem": "a", "answer": " "}\n', "line 1", "`answer` is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_deepscaler_bad_input(tmp_path: Path, case: str) -> None:
    text, where, what = BAD[case]
    src = tmp_path / "in.json"
    src.write_text(text)
    out = tmp_path / "out.parquet"
    with pytest.raises(DataError) as e:
        convert("deepscaler", str(src), str(out))
    msg = str(e.value)
    assert msg.startswith(f"{src}, {where}: ") and what in msg and "\n" not in msg, msg
    assert list(tmp_path.iterdir()) == [src]  # no output, no leftover temporary file


@pytest.mark.parametrize("record, what", [
    ({"problem": "p", "tests": []}, "non-empty list or object"),
    ({"problem": "p", "tests": "[oops"}, "`tests` is a string but not JSON"),
    ({"problem": "p", "tests": [{"input": "1", "output": "1", "testtype": "functional"}]},
     "no function name"),
    ({"problem": "p", "tests": [{"input": "1", "output": "1", "testtype": "functional", "fn_name": "f"},
                                {"input": "1", "output": "1"}]}, "mixes"),
    ({"problem": "p", "tests": {"inputs": ["1"], "outputs": []}}, "equal, non-empty"),
])
def test_deepcoder_bad_tests(tmp_path: Path, record: dict, what: str) -> None:
    src = _jsonl(tmp_path / "code.jsonl", [CODE[1], record])
    with pytest.raises(DataError, match=rf"code.jsonl, line 2: .*{what}"):
        convert("deepcoder", str(src), str(tmp_path / "out.parquet"))


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        convert("deepscaler", str(tmp_path / "gone.json"), str(tmp_path / "o.parquet"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records found"):
        convert("deepscaler", str(tmp_path / "empty.jsonl"), str(tmp_path / "o.parquet"))
    assert not (tmp_path / "o.parquet").exists()


def test_cli_converts_and_exits_2_with_one_paragraph(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", MATH)
    out = tmp_path / "OUT.parquet"
    done = subprocess.run([CLI, "data", "deepscaler", str(src), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert pq.ParquetFile(out).metadata.num_rows == 4 and "wrote 4 deepscaler rows" in done.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n')
    done = subprocess.run([CLI, "data", "deepscaler", str(bad), str(tmp_path / "x.parquet")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"megatron-rl data: error: {bad}, line 2: field `answer`")
    coder = _jsonl(tmp_path / "code.jsonl", CODE[1:])
    done = subprocess.run([CLI, "data", "deepcoder", str(coder), str(tmp_path / "c.parquet"),
                           "--source", "mine", "--row-group-size", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    f = pq.ParquetFile(tmp_path / "c.parquet")
    assert f.metadata.num_row_groups == 2
    assert f.read_row_group(1, columns=["data_source"]).column(0).to_pylist() == ["mine"]
