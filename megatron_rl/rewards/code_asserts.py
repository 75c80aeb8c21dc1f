"""Assert-based tests run in the trusted grader, calling the candidate over the value protocol.

The test code (HumanEval ``check(candidate)``, KodCode ``from solution import f`` with
``test_*`` functions, bare asserts) is dataset data, so it runs here, in the grader's own
process, never in the sandbox. Every name it takes from the candidate is a proxy: calling
it sends ``{"call": name, "args": ...}`` to the sandbox driver, which runs the candidate's
function in a fresh fork and returns the result as tagged plain data (``_sandbox_driver.
_encode``). The candidate therefore has no channel that carries a verdict: the most it can
send back is a value, decoded here into built-in lists, tuples, dicts, sets, numbers and
strings, which the test's own ``==`` then compares. Exiting, signalling the driver,
patching its builtins or writing to any descriptor can only lose the call.
"""

from __future__ import annotations

import builtins
import json
import sys
import types
from typing import Any

from megatron_rl.rewards.sandbox import SandboxRun


class CandidateFailed(BaseException):
    """The candidate's call did not return a value (timeout, crash, lost driver, ...).

    A BaseException so that test code catching ``Exception`` cannot turn it into a pass."""


class DriverFailed(BaseException):
    """The sandbox driver reported its own failure: a grader failure, not the candidate's."""


def encode(x: Any) -> Any:
    """Arguments to the sandbox, in the driver's tagged format; TypeError for non-data."""
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list:
        return [encode(v) for v in x]
    if t in (tuple, set, frozenset):
        return {"__t": t.__name__, "v": [encode(v) for v in x]}
    if t is dict:
        return {"__t": "dict", "v": [[encode(k), encode(v)] for k, v in x.items()]}
    raise TypeError(f"assert test passes a {t.__name__} to the candidate; only plain data "
                    "crosses into the sandbox")


def decode(x: Any) -> Any:
    """A value from the sandbox as exact built-ins; anything malformed raises ValueError."""
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is list:
        return [decode(v) for v in x]
    if type(x) is dict and set(x) == {"__t", "v"} and type(x["v"]) is list:
        kind, items = x["__t"], x["v"]
        if kind == "dict":
            if not all(type(kv) is list and len(kv) == 2 for kv in items):
                raise ValueError("malformed dict")
            return {decode(k): decode(v) for k, v in items}
        ctor = {"tuple": tuple, "set": set, "frozenset": frozenset}.get(kind)
        if ctor is not None:
            return ctor(decode(v) for v in items)
    raise ValueError("not a tagged value")


class _Remote:
    """A candidate function seen from the test code."""

    def __init__(self, run: SandboxRun, name: str, timeout_s: float) -> None:
        self._run, self._name, self._timeout_s = run, name, timeout_s
        self.__name__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError("keyword arguments to the candidate are not supported")
        request = {"call": self._name, "args": encode(list(args))}
        rec = self._run.run_test(request, self._timeout_s)
        status = rec.get("status")
        if status == "driver_error":
            raise DriverFailed(rec.get("detail", "")[-300:])
        if status == "error":
            _reraise(rec.get("detail", ""))
        if status != "done":
            raise CandidateFailed(f"{status}: {rec.get('detail', '')}".rstrip())
        try:
            return decode(json.loads(rec.get("payload", "")))
        except (ValueError, TypeError, KeyError) as e:
            raise CandidateFailed(f"bad_value: {e}") from None


def _reraise(detail: str) -> None:
    """Re-raise a built-in exception by name (tests may expect ``ValueError``); anything else
    ends the test. Only the type name crosses over, never an object."""
    last = detail.strip().rsplit("\n", 1)[-1]
    name, _, msg = last.partition(":")
    exc = getattr(builtins, name.strip(), None)
    if (isinstance(exc, type) and issubclass(exc, Exception)
            and not issubclass(exc, (AssertionError, StopIteration, StopAsyncIteration))):
        raise exc(msg.strip())
    raise CandidateFailed(f"runtime_error: {detail[-300:]}")


class _SolutionModule(types.ModuleType):
    """``import solution`` / ``from solution import f`` inside the test code."""

    def __init__(self, run: SandboxRun, timeout_s: float) -> None:
        super().__init__("solution")
        self._run, self._timeout_s = run, timeout_s

    def __getattr__(self, name: str) -> _Remote:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Remote(self._run, name, self._timeout_s)


def run_assert_test(run: SandboxRun, test_code: str, entry_point: str | None,
                    timeout_s: float) -> None:
    """Run one assert test; returns on a pass, raises AssertionError (or any exception of
    the test) on a failure, CandidateFailed when the candidate returned no value and
    DriverFailed when the sandbox itself failed."""
    module = _SolutionModule(run, timeout_s)
    ns: dict[str, Any] = {"__name__": "__tests__", "__builtins__": builtins}
    if entry_point:
        ns[entry_point] = _Remote(run, entry_point, timeout_s)
    saved = sys.modules.get("solution")
    sys.modules["solution"] = module
    try:
        exec(compile(test_code, "<tests>", "exec"), ns)
        if entry_point and callable(ns.get("check")):
            ns["check"](ns[entry_point])
        for name, obj in list(ns.items()):
            code_obj = getattr(obj, "__code__", None)
            if name.startswith("test") and code_obj is not None and code_obj.co_filename == "<tests>":
                obj()
    finally:
        if saved is None:
            sys.modules.pop("solution", None)
        else:
            sys.modules["solution"] = saved
