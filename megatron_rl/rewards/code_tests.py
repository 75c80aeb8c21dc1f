"""Test-case formats for the code reward, and how outputs are compared.

Three formats, told apart by their keys:

* stdin/stdout (LiveCodeBench, TACO, Codeforces): ``{"inputs": [str], "outputs": [str]}``.
* call-based (LeetCode / LCB functional, TACO ``fn_name``):
  ``{"fn_name": str, "inputs": [...], "outputs": [...]}``. An input is either a list of
  arguments or LCB's string of one JSON value per line; an output is a value, a JSON
  string, or TACO's one-element list around the value.
* assert-based (HumanEval+, KodCode): ``{"test_code": str | [str], "entry_point": str?}``;
  each string is one test: asserts at top level, ``test_*`` functions, or HumanEval's
  ``check(candidate)`` called with ``entry_point``.

``tests`` may also be the JSON text of such a dict (datasets often store it that way).
Output comparison follows LiveCodeBench's stdio grader (whole output stripped, then line by
line, token by token, numbers compared as decimals so "0.50" equals "0.5") and additionally
accepts floats within 1e-6 (absolute or relative), as Codeforces checkers do; integers
must match exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from megatron_rl.errors import DataError

FLOAT_TOL = 1e-6


@dataclass(frozen=True)
class TestSpec:
    """A problem's tests, normalised: ``inputs[i]`` goes to the sandbox, ``expected[i]`` not."""

    mode: str  # "stdio" | "call" | "assert"
    inputs: list[Any]
    expected: list[Any]
    fn_name: str | None = None
    test_code: list[str] | None = None
    entry_point: str | None = None

    def __len__(self) -> int:
        return len(self.test_code) if self.mode == "assert" and self.test_code else len(self.inputs)


def parse_tests(tests: dict[str, Any] | str) -> TestSpec:
    """Normalise a test dict (or its JSON text); raises DataError when malformed."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError as e:
            raise DataError(f"code tests are a string but not JSON ({e}); store the test "
                            "dict itself or its JSON text.") from e
    if not isinstance(tests, dict):
        raise DataError(f"code tests must be a dict, got {type(tests).__name__}.")
    if "test_code" in tests:
        code = tests["test_code"]
        codes = [code] if isinstance(code, str) else list(code)
        if not codes or not all(isinstance(c, str) for c in codes):
            raise DataError("code tests: 'test_code' must be a non-empty string or list of strings.")
        return TestSpec("assert", [], [], test_code=codes, entry_point=tests.get("entry_point"))
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise DataError("code tests need 'inputs' and 'outputs' lists of equal length (or "
                        f"'test_code'); got keys {sorted(tests)}.")
    if not inputs:
        raise DataError("code tests have no test cases; drop the problem or add tests.")
    fn_name = tests.get("fn_name")
    if fn_name:
        return TestSpec("call", [_call_args(x) for x in inputs],
                        [_json_or_raw(y) for y in outputs], fn_name=str(fn_name))
    return TestSpec("stdio", [_as_text(x) for x in inputs], [_as_text(y) for y in outputs])


def _as_text(x: Any) -> str:
    # TACO sometimes stores an input or output as a list of lines.
    return "\n".join(map(str, x)) if isinstance(x, list) else str(x)


def _call_args(x: Any) -> list[Any]:
    if isinstance(x, list):
        return x
    if isinstance(x, str):
        try:
            return [json.loads(line) for line in x.split("\n") if line.strip()]
        except ValueError as e:
            raise DataError(f"call-based test input is not one JSON value per line: {x[:80]!r}") from e
    return [x]


def _json_or_raw(y: Any) -> Any:
    if isinstance(y, str):
        try:
            return json.loads(y)
        except ValueError:
            return y
    return y


def stdout_matches(got: str, expected: str) -> bool:
    """LiveCodeBench-style comparison of a program's output with the expected output."""
    got_lines = _lines(got)
    exp_lines = _lines(expected)
    if len(got_lines) != len(exp_lines):
        return False
    for g, e in zip(got_lines, exp_lines):
        if g == e:
            continue
        g_tok, e_tok = g.split(), e.split()
        if len(g_tok) != len(e_tok) or not all(map(_tokens_equal, g_tok, e_tok)):
            return False
    return True


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\r\n", "\n").strip().split("\n")]


def _tokens_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        da, db = Decimal(a), Decimal(b)
    except InvalidOperation:
        return False
    if not (da.is_finite() and db.is_finite()):
        return False
    if da == db:
        return True
    # Tolerance only for float-looking tokens: two long integers differing in the last
    # digit are different answers even though they are relatively close.
    if _is_integer_token(a) and _is_integer_token(b):
        return False
    return abs(da - db) <= Decimal(FLOAT_TOL) * max(Decimal(1), abs(db))


def _is_integer_token(t: str) -> bool:
    return not any(c in t for c in ".eE")


def values_match(got: Any, expected: Any) -> bool:
    """Call-based comparison: equal values (tuples as lists), floats within FLOAT_TOL,
    or TACO's one-element list around the expected value."""
    if _values_equal(got, expected):
        return True
    return isinstance(expected, list) and len(expected) == 1 and _values_equal(got, expected[0])


def _values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            return math.isclose(a, b, rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)
        return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_values_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
    if isinstance(a, bool) != isinstance(b, bool):
        return False  # LeetCode prints 1 and true differently
    return bool(a == b)
