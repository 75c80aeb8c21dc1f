"""Code benchmark files in their public layouts, converted through `megatron-rl data NAME` and
graded by the real code grader (a correct program scores 1.0, a wrong one 0.0).

LiveCodeBench's private tests are written here the way the dataset stores them (the tests'
JSON text pickled, zlib-compressed, base64-encoded); a pickle that would run code when
unpickled is refused, and shown not to run.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import pytest
from test_benchmarks import read_rows, run_cli, write_raw

from megatron_rl.data.lcb import RELEASE_FILES
from megatron_rl.eval.problems import load_problems
from megatron_rl.rewards.code import grade_code
from megatron_rl.trainer.generate import grader_kind


def lcb_pack(tests: list[dict[str, str]]) -> str:
    """Private tests as code_generation_lite stores them."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def lcb_record(qid: str, date: str, content: str, public: list, private: list, func: str | None = None,
               starter: str = "", packed: bool = True) -> dict[str, Any]:
    return {"question_title": qid.upper(), "question_content": content, "platform": "leetcode" if func else "atcoder",
            "question_id": qid, "contest_id": "c1", "contest_date": date, "starter_code": starter,
            "difficulty": "easy", "public_test_cases": json.dumps(public),
            "private_test_cases": lcb_pack(private) if packed else json.dumps(private),
            "metadata": json.dumps({"func_name": func} if func else {})}


def stdin(i: str, o: str) -> dict[str, str]:
    return {"input": i, "output": o, "testtype": "stdin"}


def call(i: str, o: str) -> dict[str, str]:
    return {"input": i, "output": o, "testtype": "functional"}


ADD = "Read a and b; print a+b."
STARTER = "class Solution:\n    def maxSum(self, nums: List[int], k: int) -> int:\n        "
LCB_FILES = {  # one record per increment file, dates around DeepCoder's window
    "test.jsonl": [lcb_record("abc1_a", "2024-07-31T00:00:00", "Print the input.", [stdin("x\n", "x\n")],
                              [stdin("y\n", "y\n")], packed=False)],
    "test2.jsonl": [lcb_record("abc2_a", "2024-08-01T00:00:00", ADD, [stdin("1 2\n", "3\n")],
                               [stdin("10 -3\n", "7\n"), stdin("0 0\n", "0\n")]),
                    lcb_record("3001", "2024-09-15T00:00:00", "Sum of the k largest numbers.",
                               [call("[1, 5, 3]\n2", "8")], [call("[4]\n1", "4"), call("[2, 2, 9]\n3", "13")],
                               func="maxSum", starter=STARTER)],
    "test3.jsonl": [lcb_record("abc3_a", "2025-02-01T00:00:00", "Print 1.", [stdin("", "1\n")], []),
                    lcb_record("abc3_b", "2025-02-01T12:00:00", "Print 2.", [stdin("", "2\n")], []),
                    lcb_record("abc4_a", "2025-03-01T00:00:00", "Print 3.", [stdin("", "3\n")], [])],
}
ADD_OK = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD_WRONG = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"
MAXSUM_OK = ("```python\nfrom typing import List\nclass Solution:\n    def maxSum(self, nums: List[int], k: int) -> int:\n"
             "        return sum(sorted(nums)[-k:])\n```")
MAXSUM_WRONG = MAXSUM_OK.replace("[-k:]", "[:k]")


def lcb_dir(tmp_path: Path) -> Path:
    d = tmp_path / "code_generation_lite"
    d.mkdir()
    for name, recs in LCB_FILES.items():
        write_raw(d / name, recs, "jsonl")
    return d


def test_livecodebench_release_and_window_graded(tmp_path: Path) -> None:
    out = tmp_path / "lcb.parquet"
    done = run_cli("data", "livecodebench", "--input", str(lcb_dir(tmp_path)), "--release-version", "release_v3",
                   "--start-date", "2024-08-01", "--end-date", "2025-02-01", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"wrote 3 livecodebench rows to {out}\n"
                           "skipped 2 (after --end-date), 1 (before --start-date)\n"), done.stdout
    rows = read_rows(out)
    assert [r["extra_info"]["question_id"] for r in rows] == ["abc2_a", "3001", "abc3_a"]
    assert {r["data_source"] for r in rows} == {"livecodebench"} and grader_kind("livecodebench", "none") == "code"
    add, maxsum = rows[0], rows[1]
    assert json.loads(add["answer"]) == {"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7\n", "0\n"]}
    assert json.loads(maxsum["answer"]) == {"inputs": ["[1, 5, 3]\n2", "[4]\n1", "[2, 2, 9]\n3"],
                                            "outputs": ["8", "4", "13"], "fn_name": "maxSum"}
    assert add["prompt"][0]["content"].startswith(ADD) and "standard input" in add["prompt"][0]["content"]
    assert STARTER.rstrip() in maxsum["prompt"][0]["content"] and "`maxSum`" in maxsum["prompt"][0]["content"]
    assert maxsum["extra_info"]["index"] == 1
    assert (maxsum["extra_info"]["public_tests"], maxsum["extra_info"]["private_tests"]) == (1, 2)
    assert maxsum["extra_info"]["contest_date"] == "2024-09-15T00:00:00"
    problems = load_problems([str(out)])  # what `megatron-rl eval` reads
    assert [(p.dataset, p.data_source, p.answer) for p in problems] == [("lcb", "livecodebench", r["answer"]) for r in rows]
    for row, ok, wrong in ((add, ADD_OK, ADD_WRONG), (maxsum, MAXSUM_OK, MAXSUM_WRONG)):
        assert grade_code(ok, row["answer"], timeout_s=5).score == 1.0
        assert grade_code(wrong, row["answer"], timeout_s=5).score == 0.0


def test_livecodebench_versions_tolerance_and_files(tmp_path: Path) -> None:
    d = lcb_dir(tmp_path)
    out = tmp_path / "v2.parquet"
    done = run_cli("data", "livecodebench", "--input", str(d), "--release-version", "release_v2",
                   "--float-tol", "1e-6", "--output", str(out))
    assert done.returncode == 0 and done.stdout == f"wrote 3 livecodebench rows to {out}\n", done.stderr
    assert [json.loads(r["answer"])["float_tol"] for r in read_rows(out)] == [1e-6] * 3
    done = run_cli("data", "livecodebench", "--input", str(d / "test3.jsonl"), "--release-version", "v3",
                   "--output", str(out))
    assert done.returncode == 0 and done.stdout.startswith("wrote 3 "), done.stderr
    assert RELEASE_FILES["v4_v5"] == ("test4.jsonl", "test5.jsonl")
    assert RELEASE_FILES["release_v6"][-1] == "test6.jsonl"


class _RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_livecodebench_refuses_a_pickle_that_is_not_a_string(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    rec = lcb_record("evil", "2024-09-01T00:00:00", ADD, [stdin("1 2\n", "3\n")], [])
    rec["private_test_cases"] = base64.b64encode(zlib.compress(pickle.dumps(_RunsCode(marker)))).decode()
    src = write_raw(tmp_path / "test5.jsonl", [rec], "jsonl")
    done = run_cli("data", "livecodebench", "--input", str(src), "--output", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"{src}, line 1: `private_test_cases` is compressed pickle data, and it was refused: it holds " \
           "the opcode" in done.stderr and "never unpickled" in done.stderr
    assert not marker.exists() and not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize("args, what", [
    (["--release-version", "release_v2"], "is test.jsonl, test2.jsonl, but the input lacks test2.jsonl"),
    (["--release-version", "v9"], "is not a LiveCodeBench release"),
    (["--start-date", "2024/08/01"], "--start-date '2024/08/01' is not a date"),
    (["--start-date", "2025-01-01", "--end-date", "2024-01-01"], "is after --end-date"),
])
def test_livecodebench_bad_options(tmp_path: Path, args: list[str], what: str) -> None:
    src = lcb_dir(tmp_path) / "test.jsonl"
    done = run_cli("data", "livecodebench", "--input", str(src), *args, "--output", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and what in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_livecodebench_mixed_tests_are_malformed(tmp_path: Path) -> None:
    rec = lcb_record("mix", "2024-09-01T00:00:00", ADD, [stdin("1 2\n", "3\n")], [call("[1]", "1")], func="f")
    src = write_raw(tmp_path / "t.jsonl", [rec], "jsonl")
    done = run_cli("data", "livecodebench", "--input", str(src), "--output", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and "line 1: tests of types ['functional', 'stdin']" in done.stderr, done.stderr


HE_PROMPT = ('from typing import List\n\n\ndef below_zero(operations: List[int]) -> bool:\n'
             '    """True when the running balance, starting at 0, ever drops below 0."""\n')
HE_SOLUTION = "    total = 0\n    for op in operations:\n        total += op\n        if total < 0:\n" \
              "            return True\n    return False\n"
HE_TEST = '''
import numpy as np

def assertion(out, exp, atol):
    if atol == 0:
        assert out == exp
    else:
        assert np.isclose(out, exp, atol=atol)

def check(candidate):
    inputs = [[[]], [[1, 2, -4, 5]], [[1, 2, -3]], [[-1]]]
    results = [False, True, False, True]
    for i, (inp, exp) in enumerate(zip(inputs, results)):
        assertion(candidate(*inp), exp, 0)
'''


def test_humanevalplus_parquet_graded(tmp_path: Path) -> None:
    rec = {"task_id": "HumanEval/3", "prompt": HE_PROMPT, "canonical_solution": HE_SOLUTION,
           "entry_point": "below_zero", "test": HE_TEST}
    src = write_raw(tmp_path / "test-00000-of-00001.parquet", [rec], "parquet")
    out = tmp_path / "humanevalplus.parquet"
    done = run_cli("data", "humanevalplus", "--input", str(src), "--output", str(out))
    assert done.returncode == 0 and done.stdout.startswith(f"wrote 1 humanevalplus rows to {out}\n"), done.stderr
    (row,) = read_rows(out)
    assert row["data_source"] == "humanevalplus" and grader_kind("humanevalplus", "none") == "code"
    assert json.loads(row["answer"]) == {"test_code": [HE_TEST], "entry_point": "below_zero"}
    assert f"```python\n{HE_PROMPT.rstrip()}\n```" in row["prompt"][0]["content"]
    assert row["extra_info"] == {"index": 0, "task_id": "HumanEval/3", "entry_point": "below_zero",
                                 "reference_solution": HE_PROMPT + HE_SOLUTION}
    ok = f"```python\n{HE_PROMPT}{HE_SOLUTION}```"
    assert grade_code(ok, row["answer"], timeout_s=5).score == 1.0
    assert grade_code(ok.replace("total < 0", "total <= 0"), row["answer"], timeout_s=5).score == 0.0


def test_humanevalplus_release_layout_is_refused(tmp_path: Path) -> None:
    rec = {"task_id": "HumanEval/3", "prompt": HE_PROMPT, "entry_point": "below_zero",
           "canonical_solution": HE_SOLUTION, "base_input": [[[1]]], "plus_input": [[[2]]], "atol": 0}
    src = write_raw(tmp_path / "HumanEvalPlus.jsonl", [rec], "jsonl")
    done = run_cli("data", "humanevalplus", "--input", str(src), "--output", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and "EvalPlus's release layout" in done.stderr, done.stderr
    assert "evalplus/humanevalplus" in done.stderr and done.stderr.count("\n") == 1


def kodcode(qid: str, name: str, test: str) -> dict[str, Any]:
    return {"version": "v1.0", "style": "instruct", "subset": "Leetcode", "question_id": qid,
            "question": f"Write `{name}(nums, target)`: is there a pair summing to target?",
            "solution": f"def {name}(nums, target):\n    return any(target - x in nums[i + 1:] "
                        "for i, x in enumerate(nums))\n", "test": test,
            "test_info": [{"function_name": name, "parameter_list": "(nums, target)",
                           "function_declaration": f"def {name}(nums, target):", "docstring": None}],
            "gpt_difficulty": "easy", "gpt_pass_percentage": 0.9}


KODCODE = [
    kodcode("Leetcode_1", "has_pair", "from solution import has_pair\n\ndef test_found():\n"
            "    assert has_pair([1, 2, 3], 5) is True\n\ndef test_missing():\n    assert has_pair([1], 2) is False\n"),
    kodcode("Leetcode_2", "pair_in", "from solution import *\n\ndef test_star():\n    assert pair_in([4, 4], 8)\n"),
    kodcode("Leetcode_3", "f", "import pytest\nfrom solution import f\n\ndef test_out(capsys):\n    f([], 1)\n"),
    kodcode("Leetcode_4", "g", "from solution import g\n\nclass TestG:\n    def test_a(self):\n"
            "        assert g([1], 1) is False\n"),
]


def test_kodcode_graded_and_unrunnable_tests_skipped(tmp_path: Path) -> None:
    src = write_raw(tmp_path / "train.parquet", KODCODE, "parquet")
    out = tmp_path / "kodcode.parquet"
    done = run_cli("data", "kodcode", "--input", str(src), "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"wrote 2 kodcode rows to {out}\nskipped 1 (tests in classes), "
                           "1 (tests taking pytest fixtures or parameters)\n"), done.stdout
    rows = read_rows(out)
    assert [r["data_source"] for r in rows] == ["kodcode"] * 2 and grader_kind("kodcode", "none") == "code"
    assert json.loads(rows[0]["answer"]) == {"test_code": [KODCODE[0]["test"]]}
    assert json.loads(rows[1]["answer"])["test_code"][0].startswith("from solution import pair_in\n")
    assert "`def has_pair(nums, target):`" in rows[0]["prompt"][0]["content"]
    assert rows[1]["extra_info"]["function_names"] == ["pair_in"]
    for row, rec in zip(rows, KODCODE):
        ok = f"```python\n{rec['solution']}```"
        assert grade_code(ok, row["answer"], timeout_s=5).score == 1.0
        assert grade_code(ok.replace("any(", "all("), row["answer"], timeout_s=5).score == 0.0


def test_livecodebench_directory_without_the_release_files(tmp_path: Path) -> None:
    d = lcb_dir(tmp_path)
    done = run_cli("data", "livecodebench", "--input", str(d), "--release-version", "release_v5",
                   "--output", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and f"{d}: test4.jsonl, test5.jsonl missing (LiveCodeBench release_v5 is " \
                                    "test.jsonl, test2.jsonl, test3.jsonl, test4.jsonl, test5.jsonl)" in done.stderr
    (tmp_path / "empty").mkdir()
    done = run_cli("data", "livecodebench", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and "no test*.jsonl file in this directory" in done.stderr, done.stderr


@pytest.mark.parametrize("name, rec, what", [
    ("humanevalplus", {"task_id": "HumanEval/3", "prompt": HE_PROMPT, "entry_point": "below_zero",
                       "test": "assert True\n"}, "`test` defines no `check(candidate)`"),
    ("humanevalplus", {"task_id": "HumanEval/3", "prompt": HE_PROMPT, "test": HE_TEST},
     "none of the fields `entry_point` is present"),
    ("kodcode", {"question": "q", "test": "def test_a():\n    assert f(1)\n"},
     "the tests do not name what they import from `solution`"),
    ("kodcode", {"test": "from solution import f\n"}, "none of the fields `question` is present"),
])
def test_malformed_code_input_is_one_paragraph(tmp_path: Path, name: str, rec: dict, what: str) -> None:
    src = write_raw(tmp_path / "raw.jsonl", [rec], "jsonl")
    done = run_cli("data", name, "--input", str(src), "--output", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and done.stderr.startswith(f"megatron-rl data: error: {src}, line 1: "), done.stderr
    assert what in done.stderr and done.stderr.count("\n") == 1
