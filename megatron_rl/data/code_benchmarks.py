"""Code benchmark records (LiveCodeBench, HumanEval+, KodCode) as code-grader rows.

Every row's ``answer`` is the JSON text of the test dict ``rewards.code_tests`` reads, checked
by that parser at conversion time, so a file that converts is a file the grader can grade:

* LiveCodeBench (``data.lcb`` for the layout): public then private tests, as LiveCodeBench
  runs them; ``stdin`` tests as ``{"inputs", "outputs"}``, ``functional`` (LeetCode, starter
  code ``class Solution``) as ``{"fn_name", "inputs", "outputs"}``. Comparison is exact
  (LiveCodeBench's rule) unless ``--float-tol`` is given.
* HumanEval+: evalplus/humanevalplus on Hugging Face (``task_id``, ``prompt``,
  ``canonical_solution``, ``entry_point``, ``test``: a ``check(candidate)`` with the base and
  plus inputs and expected results inlined) as ``{"test_code", "entry_point"}``. EvalPlus's own
  release (``base_input``/``plus_input``, no expected outputs) is refused with the reason.
* KodCode (KodCode/KodCode-V1, KodCode-Light-RL-10K): ``question``, ``test`` (``test_code`` in
  early revisions: pytest functions importing ``from solution import f``), ``test_info``
  (``function_name``, ``function_declaration``) as ``{"test_code"}``. The grader calls each
  top-level ``test*`` function with no arguments, so problems whose tests take pytest fixtures
  or parameters, sit in classes, or are absent are skipped and counted (they would score a
  correct program 0, or any program 1). ``from solution import *`` is rewritten to name the
  functions (the grader's ``solution`` module resolves names on demand).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from megatron_rl.data.convert import Fail, deepcoder_prompt, first_field, text_field
from megatron_rl.data.lcb import LCB_SOURCE, contest_date, decode_test_list
from megatron_rl.data.options import Options, Skip
from megatron_rl.errors import DataError
from megatron_rl.rewards.code_tests import parse_tests

_STAR_IMPORT = re.compile(r"^from\s+solution\s+import\s+\*\s*$", re.M)
_ANY_SOLUTION_IMPORT = re.compile(r"^\s*(from\s+solution\s+import|import\s+solution)\b", re.M)
CODE_TAIL = "Put the complete solution in one ```python code block at the end."


def checked_tests(tests: dict[str, Any], fail: Fail) -> str:
    """The grader's view of ``tests`` must parse; returned as the answer's JSON text."""
    try:
        parse_tests(tests)
    except DataError as e:
        raise fail(f"the tests do not parse for the code grader ({e})",
                   "Drop the problem or repair its tests.") from None
    return json.dumps(tests)


def _required(rec: Any, key: str, fail: Fail) -> str:
    """A field every record must have, as non-empty text."""
    return text_field(first_field(rec, (key,), fail)[1], key, fail)


def _row(content: str, tests: str, source: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": [{"role": "user", "content": content}], "answer": tests,
            "data_source": source, "extra_info": json.dumps(extra, default=str)}


def lcb_row(rec: Any, index: int, fail: Fail, options: Options) -> dict[str, Any] | Skip:
    """One LiveCodeBench record (``data.lcb``) as a row; outside the date window it is a Skip."""
    _, raw_date = first_field(rec, ("contest_date",), fail)
    date = contest_date(raw_date, fail)
    if options.start is not None and date < options.start:
        return Skip("before --start-date")
    if options.end is not None and date > options.end:
        return Skip("after --end-date")
    content = _required(rec, "question_content", fail)
    metadata = rec.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata.strip() else {}
        except ValueError as e:
            raise fail(f"`metadata` is not JSON ({e})",
                       "Give the dataset's records as published.") from None
    if not isinstance(metadata, dict):
        raise fail("`metadata` is not an object", "Give the dataset's records as published.")
    public = decode_test_list(first_field(rec, ("public_test_cases",), fail)[1], "public_test_cases",
                              fail)
    private = decode_test_list(rec.get("private_test_cases") or [], "private_test_cases", fail)
    cases = public + private
    if not cases:
        raise fail("the problem has no tests", "Drop the problem.")
    if not all(isinstance(t, dict) and {"input", "output", "testtype"} <= t.keys() for t in cases):
        raise fail("a test is not an object with `input`, `output` and `testtype`",
                   "Give the dataset's records as published.")
    kinds = {t["testtype"] for t in cases}
    if not kinds <= {"stdin", "functional"} or len(kinds) != 1:
        raise fail(f"tests of types {sorted(map(str, kinds))}; expected all `stdin` or all "
                   "`functional`", "Give the dataset's records as published.")
    fn_name = metadata.get("func_name") if kinds == {"functional"} else None
    if kinds == {"functional"} and not fn_name:
        raise fail("functional tests but no `func_name` in `metadata`",
                   "Give the dataset's records as published.")
    tests: dict[str, Any] = {"inputs": [t["input"] for t in cases],
                             "outputs": [t["output"] for t in cases]}
    if fn_name:
        tests["fn_name"] = fn_name
    if options.float_tol is not None:
        tests["float_tol"] = options.float_tol
    starter = rec.get("starter_code") or None
    extra = {"index": index, **{k: rec.get(k) for k in ("question_id", "question_title", "platform",
                                                         "contest_id", "difficulty")},
             "contest_date": date.isoformat(), "public_tests": len(public), "private_tests": len(private),
             **({"starter_code": starter} if starter else {})}
    return _row(deepcoder_prompt(content, starter, fn_name), checked_tests(tests, fail), LCB_SOURCE, extra)


def humaneval_prompt(prompt: str, entry_point: str) -> str:
    """The user message of a HumanEval+ problem: the signature and docstring to complete."""
    return (f"Complete the following Python function.\n\n```python\n{prompt.rstrip()}\n```\n\n"
            f"Write the whole program: `{entry_point}` with the imports and any helper functions it "
            f"needs. {CODE_TAIL}")


def humanevalplus_row(rec: Any, index: int, fail: Fail, options: Options) -> dict[str, Any]:
    """One HumanEval+ record as a row."""
    if isinstance(rec, dict) and rec.get("test") is None and "plus_input" in rec:
        raise fail("this is EvalPlus's release layout (`base_input`/`plus_input` without expected "
                   "outputs, which EvalPlus computes by running the reference solution)",
                   "Give the Hugging Face dataset evalplus/humanevalplus (its `test` field holds "
                   "the inputs and expected results).")
    prompt, entry, test = (_required(rec, k, fail) for k in ("prompt", "entry_point", "test"))
    try:
        defined = {n.name for n in ast.parse(test).body if isinstance(n, ast.FunctionDef)}
    except SyntaxError as e:
        raise fail(f"`test` is not Python ({e})", "Give the dataset's records as published.") from None
    if "check" not in defined:
        raise fail("`test` defines no `check(candidate)`",
                   "Give the evalplus/humanevalplus records as published.")
    extra = {"index": index, "task_id": rec.get("task_id"), "entry_point": entry}
    if isinstance(rec.get("canonical_solution"), str):
        extra["reference_solution"] = prompt + rec["canonical_solution"]
    tests = checked_tests({"test_code": [test], "entry_point": entry}, fail)
    return _row(humaneval_prompt(prompt, entry), tests, "humanevalplus", extra)


def _kodcode_names(rec: dict[str, Any]) -> list[str]:
    info = rec.get("test_info") or []
    names = [t["function_name"] for t in info if isinstance(t, dict) and t.get("function_name")]
    if not names and isinstance(rec.get("test_entry_point"), str) and rec["test_entry_point"]:
        names = [rec["test_entry_point"]]
    return names


def unrunnable_tests(test: str) -> str | None:
    """Why the grader could not run these pytest-style tests faithfully (None: it can)."""
    try:
        body = ast.parse(test).body
    except SyntaxError:
        return "tests that are not valid Python"
    if any(isinstance(n, ast.ClassDef) and n.name.startswith("Test") for n in body):
        return "tests in classes"
    tests = [n for n in body
             if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test")]
    for fn in tests:
        a = fn.args
        if fn.decorator_list or a.args or a.posonlyargs or a.kwonlyargs or a.vararg or a.kwarg:
            return "tests taking pytest fixtures or parameters"
    if not tests and not any(isinstance(n, ast.Assert) for n in body):
        return "no test functions"
    return None


def kodcode_row(rec: Any, index: int, fail: Fail, options: Options) -> dict[str, Any] | Skip:
    """One KodCode record as a row (a Skip when the grader could not run its tests)."""
    question = _required(rec, "question", fail)
    key, test = first_field(rec, ("test", "test_code"), fail)
    test = text_field(test, key, fail)
    names = _kodcode_names(rec)
    if _STAR_IMPORT.search(test) or not _ANY_SOLUTION_IMPORT.search(test):
        if not names:
            raise fail("the tests do not name what they import from `solution`, and `test_info` "
                       "gives no function name", "Give the dataset's records as published.")
        imports = f"from solution import {', '.join(names)}"
        test = _STAR_IMPORT.sub(imports, test) if _STAR_IMPORT.search(test) else f"{imports}\n{test}"
    if (reason := unrunnable_tests(test)) is not None:
        return Skip(reason)
    info = [t for t in rec.get("test_info") or [] if isinstance(t, dict)]
    declaration = (info[0].get("function_declaration") or "").strip() if info else ""
    parts = [question.rstrip()]
    if names:
        parts.append(f"Your code must define `{declaration or names[0]}`; the tests import it "
                     f"with `from solution import {', '.join(names)}`.")
    parts.append(CODE_TAIL)
    kept = ("question_id", "subset", "style", "gpt_difficulty")
    extra = {"index": index, **{k: rec[k] for k in kept if rec.get(k) is not None}, "function_names": names}
    if isinstance(rec.get("solution"), str):
        extra["reference_solution"] = rec["solution"]
    return _row("\n\n".join(parts), checked_tests({"test_code": [test]}, fail), "kodcode", extra)
