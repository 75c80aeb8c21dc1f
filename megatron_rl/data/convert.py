"""Public datasets (DeepScaleR, DeepCoder JSON) to the training parquet schema (``megatron_rl.data``).

Input: a JSON list of objects, JSON Lines, or either gzip-compressed, or parquet
(``data.raw``); a JSON list is loaded whole (DeepScaleR's 40k problems are ~30 MB). Output:
the schema's four columns (``data.writer``), written atomically in row groups.

DeepCoder tests come in three shapes (TACO's ``{"inputs", "outputs", "fn_name"?}``,
LiveCodeBench's ``[{"input", "output", "testtype"}]`` with ``fn_name`` in the metadata,
PrimeIntellect's ``[{"input", "output", "type", "fn_name"?}]``); they are normalised to the
dict the code grader reads (``megatron_rl.rewards.code_tests``) and stored as its JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from megatron_rl.data.raw import read_records
from megatron_rl.data.writer import write_rows
from megatron_rl.errors import DataError

DEEPSCALER_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
DEEPSCALER_ROW_GROUP = 1024
DEEPCODER_ROW_GROUP = 128  # tests can run to megabytes per problem; a reader decodes a group whole
Fail = Callable[[str, str], DataError]


def _field(rec: Any, key: str, fail: Fail, required: bool = True) -> Any:
    if not isinstance(rec, dict):
        raise fail(f"expected a JSON object, got {type(rec).__name__}",
                   "Every record must be an object such as {\"problem\": ..., \"answer\": ...}.")
    value = rec.get(key)
    if value is None and required:
        raise fail(f"field `{key}` is missing or null (fields present: {sorted(rec)})",
                   f"Give every record the field `{key}`.")
    return value


def first_field(rec: Any, keys: tuple[str, ...], fail: Fail) -> tuple[str, Any]:
    """(key, value) of the first of ``keys`` the record has (not null)."""
    if not isinstance(rec, dict):
        raise fail(f"expected a JSON object, got {type(rec).__name__}",
                   "Every record must be an object such as {\"problem\": ..., \"answer\": ...}.")
    for key in keys:
        if rec.get(key) is not None:
            return key, rec[key]
    raise fail(f"none of the fields {', '.join(f'`{k}`' for k in keys)} is present (fields: "
               f"{sorted(rec)})", "Give the benchmark's file as published (see `megatron-rl data "
               "--help`), or rename the field.")


def text_field(value: Any, key: str, fail: Fail) -> str:
    """A record field as non-empty text (numbers accepted as written)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise fail(f"field `{key}` is a {type(value).__name__}, not text", f"Store `{key}` as a string.")
    text = str(value)
    if not text.strip():
        raise fail(f"field `{key}` is empty", "Drop the record or fill the field in.")
    return text


def deepscaler_row(rec: Any, index: int, fail: Fail) -> dict[str, Any]:
    """One DeepScaleR record {"problem", "answer", "solution"?} as a schema row."""
    problem = text_field(_field(rec, "problem", fail), "problem", fail)
    answer = text_field(_field(rec, "answer", fail), "answer", fail)
    extra: dict[str, Any] = {"index": index}
    if rec.get("solution") is not None:
        extra["solution"] = rec["solution"]
    return {"prompt": [{"role": "user", "content": problem + DEEPSCALER_SUFFIX}],
            "answer": answer, "data_source": "deepscaler", "extra_info": json.dumps(extra)}


def _json_value(value: Any, key: str, fail: Fail) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as e:
            raise fail(f"field `{key}` is a string but not JSON ({e})",
                       f"Store `{key}` as JSON or its JSON text.") from e
    return value


def normalize_tests(tests: Any, metadata: dict[str, Any], fail: Fail) -> dict[str, Any]:
    """DeepCoder tests (any of the three shapes, module docstring) as the grader's dict."""
    tests = _json_value(tests, "tests", fail)
    fn_name = metadata.get("func_name") or metadata.get("fn_name")
    if isinstance(tests, dict):
        if "test_code" in tests:
            return tests
        ins, outs = tests.get("inputs"), tests.get("outputs")
        if isinstance(ins, list) and isinstance(outs, list) and ins and len(ins) == len(outs):
            name = tests.get("fn_name") or fn_name
            return {"inputs": ins, "outputs": outs, **({"fn_name": name} if name else {})}
        raise fail(f"`tests` is an object without equal, non-empty `inputs`/`outputs` lists "
                   f"(keys: {sorted(tests)})", "Drop the problem or repair its tests.")
    if not isinstance(tests, list) or not tests:
        raise fail(f"`tests` must be a non-empty list or object, got {type(tests).__name__}",
                   "Drop the problem or repair its tests.")
    kinds = set()
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise fail(f"test {i} is not an object with `input` and `output`",
                       "Drop the problem or repair its tests.")
        kind = t.get("testtype") or t.get("type") or "stdin"
        kinds.add("call" if kind in ("functional", "function_call") else "stdio")
        fn_name = t.get("fn_name") or fn_name
    if len(kinds) > 1:
        raise fail("`tests` mixes function-call and stdin/stdout tests",
                   "Split the problem or drop the tests of one kind.")
    out: dict[str, Any] = {"inputs": [t["input"] for t in tests],
                           "outputs": [t["output"] for t in tests]}
    if kinds == {"call"}:
        if not fn_name:
            raise fail("function-call tests but no function name (`fn_name` in a test, or "
                       "`func_name` in `metadata`)", "Add the function name to the metadata.")
        out["fn_name"] = fn_name
    return out


def deepcoder_prompt(problem: str, starter: str | None, fn_name: str | None) -> str:
    """The user message of a code problem: statement, starter code, what to answer with."""
    parts = [problem.rstrip()]
    if starter and starter.strip():
        parts.append(f"Start from this code:\n```python\n{starter.rstrip()}\n```")
    if fn_name:
        parts.append(f"Implement `{fn_name}` in Python; the tests call it directly.")
    else:
        parts.append("Write a Python program that reads from standard input and writes the "
                     "answer to standard output.")
    parts.append("Put the complete solution in one ```python code block at the end.")
    return "\n\n".join(parts)


def deepcoder_row(rec: Any, index: int, fail: Fail, source: str) -> dict[str, Any]:
    """One DeepCoder record {"problem", "tests", "metadata"?, "starter_code"?} as a schema row."""
    problem = text_field(_field(rec, "problem", fail), "problem", fail)
    metadata = _json_value(rec.get("metadata"), "metadata", fail) or {}
    if not isinstance(metadata, dict):
        raise fail(f"`metadata` must be an object, got {type(metadata).__name__}",
                   "Store metadata as a JSON object (or drop it).")
    tests = normalize_tests(_field(rec, "tests", fail), metadata, fail)
    starter = rec.get("starter_code") or metadata.get("starter_code")
    if starter is not None and not isinstance(starter, str):
        raise fail(f"`starter_code` is a {type(starter).__name__}", "Store starter code as text.")
    own = rec.get("data_source") or rec.get("source")
    extra = {"index": index, "metadata": metadata, **({"starter_code": starter} if starter else {})}
    return {"prompt": [{"role": "user", "content": deepcoder_prompt(problem, starter,
                                                                      tests.get("fn_name"))}],
            "answer": json.dumps(tests), "data_source": own if isinstance(own, str) and own else source,
            "extra_info": json.dumps(extra)}


def convert(kind: str, in_path: str, out_path: str, row_group_size: int | None = None,
            source: str = "deepcoder") -> int:
    """Convert ``in_path`` (``kind`` "deepscaler" or "deepcoder") to ``out_path``; rows written."""
    if kind not in ("deepscaler", "deepcoder"):
        raise ValueError(f"unknown dataset kind {kind!r}")
    size = row_group_size or (DEEPSCALER_ROW_GROUP if kind == "deepscaler" else DEEPCODER_ROW_GROUP)

    def rows() -> Iterator[dict[str, Any]]:
        for n, (loc, rec) in enumerate(read_records(in_path)):
            fail = located(in_path, loc)
            yield deepscaler_row(rec, n, fail) if kind == "deepscaler" else deepcoder_row(rec, n, fail, source)

    return write_rows(rows(), out_path, size,
                      f"{in_path}: no records found, so nothing was written. Check that this is the "
                      "downloaded dataset (a JSON list or JSON Lines).")


def located(path: str, loc: str) -> Fail:
    """A ``Fail`` for the record at ``loc`` of ``path``: "PATH, line 7: problem. fix"."""
    def fail(problem: str, fix: str) -> DataError:
        return DataError(f"{path}, {loc}: {problem}. {fix}")
    return fail
