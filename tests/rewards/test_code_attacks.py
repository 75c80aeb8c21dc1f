"""Reward hacks against the code grader (issue 10, items 1-4), on every sandbox backend.

Each attack is a wrong (or answer-free) solution that tries to collect the reward another
way; it must score 0.0 as an ordinary wrong answer (never ``grader_failed``, which the
trainer masks: an attack must not buy its way out of a negative advantage), and its honest
twin -- the same problem solved -- must score 1.0.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_rl.rewards.code import grade_code
from megatron_rl.rewards.code_tests import stdout_matches, values_match
from megatron_rl.rewards.grade import Grade

HUMANEVAL = {"test_code": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n"
                          "    assert candidate([]) == 0\n    assert candidate([5]) == 5\n",
             "entry_point": "total"}
KODCODE = {"test_code": ["from solution import total\n\ndef test_a():\n    assert total([4, 1]) == 5\n",
                         "import solution\n\ndef test_b():\n"
                         "    assert solution.total([-1, 1]) == 0\n"]}
HONEST = "def total(xs):\n    return sum(xs)\n"
WRONG = "def total(xs):\n    return 0\n"


def grade_of(body: str, tests: dict, backend: str, timeout_s: float = 3) -> Grade:
    return grade_code(f"```python\n{body}\n```", tests, timeout_s=timeout_s, backend=backend)


def grade(body: str, tests: dict, backend: str) -> float:
    return grade_of(body, tests, backend).score


def assert_wrong(g: Grade) -> None:
    """0.0, and charged to the candidate (a masked grader failure would reward the attack)."""
    assert g.score == 0.0 and not g.grader_failed, g.reason


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

# A candidate that looks for the hidden tests and solves the problem only if it saw them: a
# leak of the test text anywhere it can reach turns into a 1.0. The needles are built at run
# time so that neither the source nor its compiled constants hold them.
LEAK_HUNT = r"""
import gc, os
NEEDLES = ["".join(["candidate", "([1, 2, 3])"]), "".join(["total", "([4, 1])"])]
BYTES = [n.encode() for n in NEEDLES]

def _has(data):
    return any(b in data for b in BYTES)

def in_my_objects():
    # every string held by a container in this process (the collector tracks containers)
    for obj in gc.get_objects():
        items = obj.values() if type(obj) is dict else obj if type(obj) in (list, tuple) else ()
        for v in items:
            if type(v) is str and not any(v is n for n in NEEDLES) and _has(v.encode("utf-8", "replace")):
                return True
    return False

def scan_pid(pid):
    # cmdline, environ, and every readable mapping of /proc/<pid>/mem, 1 MiB at a time
    for name in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                if _has(f.read()):
                    return True
        except OSError:
            pass
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb", 0)
    except OSError:
        return False
    with mem:
        for line in maps:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            for at in range(lo, hi, 1 << 20) if perms[0] == "r" else ():
                try:
                    mem.seek(at)
                    if _has(mem.read(min(1 << 20, hi - at) + 64)):
                        return True
                except (OSError, ValueError, OverflowError):
                    break
    return False

def in_other_processes():
    me = os.getpid()
    return any(scan_pid(int(p)) for p in os.listdir("/proc") if p.isdigit() and int(p) != me)

def on_disk():
    # the job's files, its scratch directory and the directory above (the host's /tmp is not
    # hidden on plain: see docs/code_grader.md)
    tops = {"/job", os.getcwd(), os.path.dirname(os.getcwd()), os.path.expanduser("~")} - {"/"}
    for top in tops:
        for root, _, files in os.walk(top):
            for name in files:
                try:
                    with open(os.path.join(root, name), "rb") as f:
                        if _has(f.read(1 << 22)):
                            return True
                except OSError:
                    pass
    return False
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
    "read_tests_from_disk": LEAK_HUNT + "def total(xs):\n"
                            "    return sum(xs) if on_disk() else 0\n",
    "read_parent_memory": LEAK_HUNT + "def total(xs):\n"
                          "    return sum(xs) if in_other_processes() else 0\n",
    "walk_own_objects": LEAK_HUNT + "def total(xs):\n    return sum(xs) if in_my_objects() else 0\n",
}


@pytest.mark.parametrize("tests", [HUMANEVAL, KODCODE], ids=["humaneval", "kodcode"])
def test_honest_twin_passes(sandbox_setup, tests):
    assert grade(HONEST, tests, sandbox_setup.backend) == 1.0


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("tests", [HUMANEVAL, KODCODE], ids=["humaneval", "kodcode"])
def test_assert_mode_attack_scores_zero(sandbox_setup, tests, name):
    g = grade_of(ATTACKS[name], tests, sandbox_setup.backend)
    assert_wrong(g)
    if ATTACKS[name].startswith(LEAK_HUNT):
        # the hunt ran to the end and came back empty-handed (not a crash or a timeout)
        assert g.reason.startswith("wrong_answer: test 0: AssertionError"), g.reason


def test_stopping_the_driver_is_the_candidates_fault(sandbox_setup):
    body = WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n"
    g = grade_of(body, HUMANEVAL, sandbox_setup.backend, timeout_s=1)
    assert_wrong(g)
    assert g.tag == "driver_lost"


def test_leak_hunt_finds_what_it_can_reach(tmp_path):
    """Positive control: the hunter does find the tests in a process of its own uid that holds
    them, among its own objects, and on disk -- so its 0.0 in the sandbox means nothing leaked."""
    ns: dict = {}
    exec(LEAK_HUNT, ns)
    holder = subprocess.Popen([sys.executable, "-I", "-c", "import sys\ntests = sys.stdin.readline()\n"
                               "print('held', flush=True)\nsys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(HUMANEVAL["test_code"].replace("\n", " ") + "\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "held"
        assert ns["scan_pid"](holder.pid)
    finally:
        holder.kill()
        holder.wait()
    # A fresh process: finds nothing in itself or its empty directory, then finds what it holds
    # and what lies on disk (this test's own process holds the tests, so it cannot be the probe).
    probe = LEAK_HUNT + ("import sys\nprint(in_my_objects(), on_disk())\nplanted = [sys.stdin.read()]\n"
                         "open('tests.py', 'w').write(planted[0])\nprint(in_my_objects(), on_disk())\n")
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run([sys.executable, "-I", "-c", probe], input=KODCODE["test_code"][0],
                         capture_output=True, text=True, cwd=work, timeout=60,
                         env={"HOME": str(work), "PATH": os.environ["PATH"]})
    assert out.stdout.split() == ["False", "False", "True", "True"], out.stderr


STDIO = {"inputs": ["2 3\n", "10 -4\n"], "outputs": ["5", "6"]}
STDIO_HONEST = "a, b = map(int, input().split())\nprint(a + b)\n"
CALL_ADD = {"fn_name": "add", "inputs": [[2, 3], [10, -4]], "outputs": [5, 6]}
CALL_HONEST = "def add(a, b):\n    return a + b\n"
# Item 4's ways out, for the stdio and call modes (assert mode: ATTACKS above).
WAYS_OUT = {
    "sys_exit_at_import": "import sys\nsys.exit(0)\n",
    "os_exit_at_import": "import os\nos._exit(0)\n",
    "kill_driver": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill_every_process": "import os\ntry:\n    os.kill(-1, 9)\nexcept OSError:\n    pass\n",
    "forge_every_fd": "import os\nfor fd in range(256):\n    try:\n"
                      "        os.write(fd, b'{\"i\": 0, \"status\": \"done\", \"stdout\": \"5\", "
                      "\"payload\": \"5\"}\\n')\n    except OSError:\n        pass\n",
    "monkeypatch_builtins": "import builtins\nbuiltins.print = lambda *a, **k: None\n"
                            "builtins.int = lambda *a: 5\n",
}


@pytest.mark.parametrize("name", sorted(WAYS_OUT))
@pytest.mark.parametrize("mode", ["stdio", "call"])
def test_stdio_and_call_mode_ways_out_score_zero(sandbox_setup, mode, name):
    b = sandbox_setup.backend
    tests, honest = (STDIO, STDIO_HONEST) if mode == "stdio" else (CALL_ADD, CALL_HONEST)
    assert grade(honest, tests, b) == 1.0
    wrong = "print(0)\n" if mode == "stdio" else "def add(a, b):\n    return 0\n"
    assert_wrong(grade_of(WAYS_OUT[name] + wrong, tests, b))


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


@pytest.mark.parametrize("body,ok", [
    ("return 10**18 + 7", True), ("return 1e18", False), ("return float(10**18 + 7)", False),
    ("return 10**18", False)])
def test_call_mode_floats_never_pass_for_integers(sandbox_setup, body, ok):
    tests = {"fn_name": "f", "inputs": [[]], "outputs": [10**18 + 7], "float_tol": 1e-6}
    assert grade(f"def f():\n    {body}\n", tests, sandbox_setup.backend) == float(ok)


def test_float_tolerance_end_to_end_only_where_the_dataset_says(sandbox_setup):
    b = sandbox_setup.backend
    lcb = {"inputs": [""], "outputs": ["0.3333333"]}
    assert grade("print('0.3333333')", lcb, b) == 1.0
    assert grade("print(1 / 3)", lcb, b) == 0.0  # LiveCodeBench: exact decimals
    assert grade("print(1 / 3)", dict(lcb, float_tol=1e-6), b) == 1.0
    assert grade("print(0.3334)", dict(lcb, float_tol=1e-6), b) == 0.0


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
