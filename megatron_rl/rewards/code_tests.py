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
line, token by token, numbers compared as exact decimals so "0.50" equals "0.5"). An
expected integer token is matched only by an integer token of the same value ("1e+18" and
"7.0" never pass for an integer). Two optional per-dataset keys of the test dict relax this,
both off by default (LiveCodeBench semantics):

* ``"float_tol": 1e-6`` -- non-integer expected numbers (and float return values) accept an
  absolute or relative error up to this, as Codeforces checkers do;
* ``"taco_style": true`` -- a call-based expected value ``[v]`` also accepts ``v`` (TACO
  wraps return values in a one-element list).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from megatron_rl.errors import DataError

FLOAT_TOL = 1e-6
"""A usual ``float_tol`` for datasets graded by Codeforces-style checkers (opt-in)."""
_INT_TOKEN = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class TestSpec:
    """A problem's tests, normalised: ``inputs[i]`` goes to the sandbox, ``expected[i]`` not."""

    mode: str  # "stdio" | "call" | "assert"
    inputs: list[Any]
    expected: list[Any]
    fn_name: str | None = None
    test_code: list[str] | None = None
    entry_point: str | None = None
    float_tol: float | None = None
    taco_style: bool = False

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
    opts = _options(tests)
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
                        [_json_or_raw(y) for y in outputs], fn_name=str(fn_name), **opts)
    return TestSpec("stdio", [_as_text(x) for x in inputs], [_as_text(y) for y in outputs], **opts)


def _options(tests: dict[str, Any]) -> dict[str, Any]:
    tol = tests.get("float_tol")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not 0 <= tol < 1):
        raise DataError(f"code tests: 'float_tol' must be a number in [0, 1), got {tol!r}.")
    taco = tests.get("taco_style", False)
    if not isinstance(taco, bool):
        raise DataError(f"code tests: 'taco_style' must be true or false, got {taco!r}.")
    return {"float_tol": None if tol is None else float(tol), "taco_style": taco}


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


def stdout_matches(got: str, expected: str, float_tol: float | None = None) -> bool:
    """LiveCodeBench-style comparison of a program's output with the expected output;
    ``float_tol`` (None: exact) applies to non-integer expected numbers only."""
    got_lines = _lines(got)
    exp_lines = _lines(expected)
    if len(got_lines) != len(exp_lines):
        return False
    for g, e in zip(got_lines, exp_lines):
        if g == e:
            continue
        g_tok, e_tok = g.split(), e.split()
        if len(g_tok) != len(e_tok) or not all(
                _tokens_equal(a, b, float_tol) for a, b in zip(g_tok, e_tok)):
            return False
    return True


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\r\n", "\n").strip().split("\n")]


def _tokens_equal(a: str, b: str, float_tol: float | None) -> bool:
    if a == b:
        return True
    if _INT_TOKEN.fullmatch(b):  # an integer answer: only the same integer passes
        return _INT_TOKEN.fullmatch(a) is not None and int(a) == int(b)
    try:
        da, db = Decimal(a), Decimal(b)
    except InvalidOperation:
        return False
    if not (da.is_finite() and db.is_finite()):
        return False
    if da == db:
        return True
    if float_tol is None:
        return False
    return abs(da - db) <= Decimal(float_tol) * max(Decimal(1), abs(db))


def values_match(got: Any, expected: Any, float_tol: float | None = None,
                 taco_style: bool = False) -> bool:
    """Call-based comparison of JSON values (tuples arrive as lists): equal, or floats
    within ``float_tol`` when set, or (``taco_style``) TACO's one-element list around the
    expected value."""
    if _values_equal(got, expected, float_tol):
        return True
    return (taco_style and isinstance(expected, list) and len(expected) == 1
            and _values_equal(got, expected[0], float_tol))


def _values_equal(a: Any, b: Any, tol: float | None) -> bool:
    if type(a) is float or type(b) is float:
        if all(type(v) in (int, float) for v in (a, b)):
            if type(b) is int:  # an integer answer: only that integer
                return type(a) is int and a == b
            if tol is None:
                return a == b
            return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
        return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_values_equal(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_values_equal(a[k], b[k], tol) for k in a)
    if isinstance(a, bool) != isinstance(b, bool):
        return False  # LeetCode prints 1 and true differently
    return bool(a == b)
