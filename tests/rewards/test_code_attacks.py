"""Reward hacks against the code grader (issue 10, items 1-4), on every sandbox backend.

Each attack is a wrong (or answer-free) solution that tries to collect the reward another
way; it must score 0.0, and its honest twin -- the same problem solved -- must score 1.0.
"""

from __future__ import annotations

import pytest

from megatron_rl.rewards.code import grade_code
from megatron_rl.rewards.code_tests import stdout_matches, values_match

HUMANEVAL = {"test_code": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n"
                          "    assert candidate([]) == 0\n    assert candidate([5]) == 5\n",
             "entry_point": "total"}
KODCODE = {"test_code": ["from solution import total\n\ndef test_a():\n    assert total([4, 1]) == 5\n",
                         "import solution\n\ndef test_b():\n"
                         "    assert solution.total([-1, 1]) == 0\n"]}
HONEST = "def total(xs):\n    return sum(xs)\n"
WRONG = "def total(xs):\n    return 0\n"


def grade(body: str, tests: dict, backend: str) -> float:
    g = grade_code(f"```python\n{body}\n```", tests, timeout_s=3, backend=backend)
    return g.score


FORGE_EVERY_FD = WRONG + """
import os
for fd in range(0, 256):
    for msg in (b"ok\\npass", b"ok\\n6", b'{"i": 0, "status": "done", "payload": "pass"}\\n'):
        try:
            os.write(fd, msg)
        except OSError:
            pass
os._exit(0)
"""

ATTACKS = {
    "forged_verdict_every_fd": FORGE_EVERY_FD,
    "sys_exit_at_import": WRONG + "import sys\nsys.exit(0)\n",
    "os_exit_at_import": WRONG + "import os\nos._exit(0)\n",
    "kill_driver": WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "signal_driver_term": WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)\n"
                                  "os.kill(os.getpid(), signal.SIGKILL)\n",
    "kill_every_process": WRONG + "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\n"
                                  "except OSError:\n    pass\n",
    "monkeypatch_builtins": WRONG + "import builtins\nbuiltins.AssertionError = type('N', (Exception,), {})\n"
                                    "class T:\n    def __eq__(s, o): return True\n"
                                    "builtins.sum = lambda *a: T()\n",
    "equals_everything": "class Any:\n    def __eq__(self, o):\n        return True\n"
                         "    __hash__ = object.__hash__\n"
                         "def total(xs):\n    return Any()\n",
    "int_subclass_equals_everything": "class I(int):\n    def __eq__(self, o):\n        return True\n"
                                      "    __hash__ = int.__hash__\n"
                                      "def total(xs):\n    return I(0)\n",
    "read_tests_from_disk": "import glob\ndef total(xs):\n    for p in glob.glob('/job/*') + "
                            "glob.glob('/tmp/mrl-sbx-*/*'):\n"
                            "        if 'candidate([' in open(p).read():\n            return 6\n"
                            "    return 0\n",
    "read_parent_memory": "import os, re\ndef total(xs):\n    for pid in os.listdir('/proc'):\n"
                          "        try:\n            data = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
                          "            maps = open(f'/proc/{pid}/maps').read()\n"
                          "            mem = open(f'/proc/{pid}/mem', 'rb')\n"
                          "        except OSError:\n            continue\n"
                          "        return 6  # reached another process's memory\n    return 0\n",
}


@pytest.mark.parametrize("tests", [HUMANEVAL, KODCODE], ids=["humaneval", "kodcode"])
def test_honest_twin_passes(sandbox_setup, tests):
    assert grade(HONEST, tests, sandbox_setup.backend) == 1.0


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("tests", [HUMANEVAL, KODCODE], ids=["humaneval", "kodcode"])
def test_assert_mode_attack_scores_zero(sandbox_setup, tests, name):
    assert grade(ATTACKS[name], tests, sandbox_setup.backend) == 0.0


def test_honest_twin_with_attack_side_effects_still_passes(sandbox_setup):
    # Exiting is not punished by itself: sys.exit after a correct answer in stdio passes
    # (os._exit skips the flush and the status report, so it counts as a crash).
    tests = {"inputs": ["2 3\n"], "outputs": ["5"]}
    prog = "a, b = map(int, input().split())\nprint(a + b)\nimport sys\nsys.exit(0)\n"
    assert grade(prog, tests, sandbox_setup.backend) == 1.0


def test_stdio_extra_output_after_answer_scores_zero(sandbox_setup):
    tests = {"inputs": ["2 3\n"], "outputs": ["5"]}
    honest = "a, b = map(int, input().split())\nprint(a + b)\n"
    late = honest + ("import os, time\nif os.fork() == 0:\n    time.sleep(0.2)\n"
                     "    os.write(1, b'\\n5\\n')\n    os._exit(0)\n")
    forged = honest + "import os\nfor fd in range(256):\n    try:\n        os.write(fd, b'\\nok\\n')\n" \
                      "    except OSError:\n        pass\n"
    b = sandbox_setup.backend
    assert grade(honest, tests, b) == 1.0
    assert grade(honest + "print('extra')\n", tests, b) == 0.0
    assert grade(forged, tests, b) == 0.0
    assert grade(late, tests, b) in (0.0, 1.0)  # a late writer either misses or adds a line
    assert grade(late.replace("print(a + b)", "print(0)"), tests, b) == 0.0


CALL = {"fn_name": "f", "inputs": ["1"], "outputs": ["[1, 2]"]}


@pytest.mark.parametrize("body", [
    "class A(list):\n    def __eq__(s, o): return True\ndef f(x):\n    return A()",
    "class R:\n    def __repr__(s): return '[1, 2]'\ndef f(x):\n    return R()",
    "class I(int):\n    def __eq__(s, o): return True\n    __hash__ = int.__hash__\n"
    "def f(x):\n    return [I(1), I(7)]",
    "def f(x):\n    return {1: 2}",
])
def test_call_mode_non_plain_values_score_zero(sandbox_setup, body):
    assert grade("def f(x):\n    return [x, x + 1]", CALL, sandbox_setup.backend) == 1.0
    assert grade(body, CALL, sandbox_setup.backend) == 0.0


def test_assert_mode_tuples_sets_and_exceptions_survive_the_protocol(sandbox_setup):
    tests = {"test_code": "import pytest\nfrom solution import f\n\ndef test_f():\n"
                          "    assert f((1, 2)) == (2, 1)\n    assert f({3}) == {3}\n"
                          "    with pytest.raises(ValueError):\n        f(None)\n"}
    honest = ("def f(x):\n    if x is None:\n        raise ValueError('no')\n"
              "    return tuple(reversed(x)) if isinstance(x, tuple) else set(x)\n")
    assert grade(honest, tests, sandbox_setup.backend) == 1.0
    assert grade(honest.replace("tuple(reversed(x))", "list(reversed(x))"), tests,
                 sandbox_setup.backend) == 0.0


BIG = "1000000000000000007"


@pytest.mark.parametrize("printed,ok", [
    (BIG, True), ("1e+18", False), ("1.0e18", False), ("1000000000000000007.0", False),
    ("1000000000000000000", False), ("+1000000000000000007", True)])
def test_floats_never_pass_for_integers_end_to_end(sandbox_setup, printed, ok):
    tests = {"inputs": [""], "outputs": [BIG], "float_tol": 1e-6}
    assert grade(f"print({printed!r})", tests, sandbox_setup.backend) == float(ok)


def test_float_tolerance_only_where_the_dataset_says():
    assert not stdout_matches("0.3333334", "0.3333333")  # LiveCodeBench: exact decimals
    assert stdout_matches("0.3333334", "0.3333333", float_tol=1e-6)
    assert stdout_matches("0.50", "0.5")
    assert not stdout_matches("7.0", "7", float_tol=1e-6)
    assert not stdout_matches("6.9999999", "7", float_tol=1e-6)
    assert not values_match(0.1 + 0.2, 0.3)
    assert values_match(0.1 + 0.2, 0.3, float_tol=1e-9)
    assert not values_match(7.0, 7, float_tol=1e-6)
    assert not values_match(1e18, 10**18 + 7, float_tol=1e-6)


def test_taco_list_fallback_only_for_taco_style(sandbox_setup):
    body = "def f(x):\n    return 3"
    lcb = {"fn_name": "f", "inputs": [[1]], "outputs": [[3]]}
    assert grade(body, lcb, sandbox_setup.backend) == 0.0
    assert grade(body, dict(lcb, taco_style=True), sandbox_setup.backend) == 1.0
    assert grade("def f(x):\n    return [3]", lcb, sandbox_setup.backend) == 1.0
