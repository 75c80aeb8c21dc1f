"""RewardPool, the registry, and the layer rule for megatron_rl.rewards."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from megatron_rl.errors import ConfigError, UserError
from megatron_rl.rewards import RewardItem, RewardPool, get_reward_fn, sandbox_protections

REWARDS_DIR = pathlib.Path(__file__).resolve().parents[2] / "megatron_rl" / "rewards"
ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD_TESTS = {"inputs": ["1 2", "3 4"], "outputs": ["3", "7"]}


def test_score_batch_in_order_with_failures_as_zero(caplog):
    items = [
        RewardItem("math", "</think>\\boxed{4}", "4"),
        RewardItem("code", ADD, ADD_TESTS),
        RewardItem("math", "</think>\\boxed{5}", "4"),
        RewardItem("code", ADD, {"inputs": ["1"]}),  # malformed tests: logged, 0.0
        RewardItem("code", "```python\nwhile True: pass\n```", ADD_TESTS),
        RewardItem("poetry", "x", "y"),
        RewardItem("math", "</think>\\boxed{\\frac{1}{2}}", ["0.5"]),
    ]
    with RewardPool(num_workers=2, max_queue=2, code_timeout_s=1.0) as pool:
        grades = pool.grade_batch(items)
    assert [g.score for g in grades] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert grades[3].reason.startswith("grader_error: grader error: DataError")
    assert grades[4].reason == "timeout: test 0"
    assert "failed to grade" in caplog.text


def test_bounded_queue_blocks_the_producer():
    pool = RewardPool(num_workers=1, max_queue=1, code_timeout_s=2.0)
    slow = RewardItem("code", "```python\nimport time\ntime.sleep(1.5)\n```", {"inputs": [""], "outputs": [""]})
    try:
        first = pool.submit(slow)  # taken by the worker thread
        time.sleep(0.2)
        pool.submit(slow)  # fills the queue
        blocked = threading.Event()

        def third() -> None:
            pool.submit(slow)
            blocked.set()

        t = threading.Thread(target=third, daemon=True)
        t.start()
        assert not blocked.wait(0.5), "submit should wait while the queue is full"
        first.result()
        t.join(30)
        assert blocked.is_set()
    finally:
        pool.close()


def test_registry():
    assert get_reward_fn("math")("</think>\\boxed{7}", "7") == 1.0
    assert get_reward_fn("code")(ADD, ADD_TESTS, timeout_s=3.0) == 1.0
    with pytest.raises(ConfigError, match="registered rewards are math, code"):
        get_reward_fn("poetry")
    assert issubclass(ConfigError, UserError)


def test_protections_are_reported():
    prot = sandbox_protections()
    text = prot.describe()
    assert text.startswith(prot.backend) and "+wall_timeout" in text and "+rlimits" in text
    if prot.backend == "bwrap":
        assert "+network_isolated" in text and "+pid_namespace" in text


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layer_rule_no_torch_and_no_other_megatron_rl():
    for path in REWARDS_DIR.glob("*.py"):
        for name in _imports(path):
            assert not name.startswith("torch"), f"{path.name} imports {name}"
            if name.startswith("megatron_rl"):
                assert name.startswith(("megatron_rl.rewards", "megatron_rl.errors")), (
                    f"{path.name} imports {name}")


def test_importing_rewards_loads_no_torch_or_sympy():
    code = ("import sys, megatron_rl.rewards\n"
            "print(any(m in sys.modules for m in ('torch', 'sympy', 'math_verify')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pool_passes_the_thinking_format_to_the_math_grader():
    from megatron_rl.rewards import RewardItem, RewardPool

    items = [RewardItem("math", "so \\boxed{2}", "2"), RewardItem("math", "hmm</think> \\boxed{2}", "2")]
    with RewardPool(1, require_think_close=True) as pool:
        assert pool.score_batch(items) == [0.0, 1.0]  # unfinished reasoning pays nothing
    with RewardPool(1) as pool:
        assert pool.score_batch(items) == [1.0, 1.0]
