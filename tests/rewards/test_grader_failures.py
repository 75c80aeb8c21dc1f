"""Grader failures are not wrong answers (issue 10, item 9).

A sandbox that fails to start, a grader that crashes and a grader that times out (not the
candidate's test) must come back from the reward pool as ``grader_error`` grades
(``Grade.grader_failed``), which the trainer masks out of the loss and the group baselines;
whatever the candidate does (killing its driver included) stays an ordinary 0.0.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
import time

import psutil
import pytest

import megatron_rl.rewards.code as code_mod
import megatron_rl.rewards.sandbox as sandbox_mod
import megatron_rl.rewards.sandbox_setup as setup_mod
from megatron_rl.config.run import load_config
from megatron_rl.rewards import RewardItem, RewardPool
from megatron_rl.rewards.code import grade_code
from megatron_rl.rewards.grade import Grade
from megatron_rl.rewards.worker import WorkerProcess
from megatron_rl.trainer import steps
from megatron_rl.trainer.samples import ScoredSample

ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD_TESTS = {"inputs": ["1 2", "3 4"], "outputs": ["3", "7"]}
WRONG_ADD = "```python\nprint(0)\n```"
KILL_DRIVER = "```python\nimport os\nos.kill(os.getppid(), 9)\n```"
CHECK = {"test_code": "def check(candidate):\n    assert candidate(2) == 4\n", "entry_point": "sq"}
SQ = "```python\ndef sq(x):\n    return x * x\n```"


def assert_grader_failure(g: Grade, *words: str) -> None:
    assert g.score == 0.0 and g.grader_failed, g.reason
    for w in words:
        assert w in g.reason, g.reason


def broken_driver(tmp_path, patch: tuple[str, str]) -> str:
    src = open(sandbox_mod._DRIVER_SRC, encoding="utf-8").read()
    assert patch[0] in src
    path = tmp_path / "driver.py"
    path.write_text(src.replace(*patch))
    return str(path)


@pytest.mark.parametrize("how", ["interpreter_missing", "interpreter_not_python",
                                 "driver_cannot_run", "bwrap_missing", "bwrap_broken"])
@pytest.mark.parametrize("tests,response", [(ADD_TESTS, ADD), (CHECK, SQ)], ids=["stdio", "assert"])
def test_sandbox_that_fails_to_start_is_a_grader_failure(sandbox_setup, footprint, monkeypatch,
                                                         tmp_path, how, tests, response):
    setup = sandbox_setup
    if how.startswith("bwrap") and setup.backend != "bwrap":
        pytest.skip("breaks bwrap itself")
    if how == "interpreter_missing":
        setup = dataclasses.replace(setup, python="/nonexistent/python3")
    elif how == "interpreter_not_python":
        setup = dataclasses.replace(setup, python=shutil.which("false") or "/bin/false")
    elif how == "driver_cannot_run":
        monkeypatch.setattr(sandbox_mod, "_DRIVER_SRC",
                            broken_driver(tmp_path, ("import json\n", "import json(\n")))
    elif how == "bwrap_missing":
        monkeypatch.setattr(setup_mod, "BWRAP_BIN", str(tmp_path / "bwrap"))
    else:
        fake = tmp_path / "bwrap"
        fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.setattr(setup_mod, "BWRAP_BIN", str(fake))
    monkeypatch.setattr(code_mod, "detect", lambda backend: setup)
    g = grade_code(response, tests, timeout_s=2)
    assert_grader_failure(g, "sandbox", setup.backend)
    footprint.assert_restored()


@pytest.mark.parametrize("tests,response", [(ADD_TESTS, ADD), (CHECK, SQ)], ids=["stdio", "assert"])
def test_driver_that_fails_itself_is_a_grader_failure(sandbox_setup, footprint, monkeypatch,
                                                      tmp_path, tests, response):
    bug = ("def _run_test(job, i):\n", "def _run_test(job, i):\n    raise RuntimeError('driver bug')\n")
    monkeypatch.setattr(sandbox_mod, "_DRIVER_SRC", broken_driver(tmp_path, bug))
    g = grade_code(response, tests, timeout_s=2, backend=sandbox_setup.backend)
    assert_grader_failure(g, "driver bug")
    footprint.assert_restored()


def test_what_the_candidate_does_to_its_driver_stays_its_own_fault(sandbox_setup):
    g = grade_code(KILL_DRIVER, ADD_TESTS, timeout_s=2, backend=sandbox_setup.backend)
    assert g.score == 0.0 and not g.grader_failed and g.tag == "driver_lost"
    assert grade_code(ADD, ADD_TESTS, timeout_s=2, backend=sandbox_setup.backend).score == 1.0


@pytest.mark.parametrize("broken", [False, True], ids=["bwrap_missing", "bwrap_broken"])
def test_pool_reports_a_sandbox_that_cannot_start(monkeypatch, tmp_path, broken):
    # The worker process inherits this PATH: it finds no bwrap, or one that cannot start.
    if broken:
        fake = tmp_path / "bwrap"
        fake.write_text("#!/bin/sh\nexit 1\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with RewardPool(num_workers=1, code_backend="bwrap") as pool:
        grades = pool.grade_batch([RewardItem("code", ADD, ADD_TESTS)] * 2)
    for g in grades:
        assert_grader_failure(g, "bwrap")


def _worker_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "megatron_rl.rewards._worker_main" in " ".join(p.cmdline())}


SLOW = "```python\nimport time\ntime.sleep(3)\nprint(3)\n```"


class TightPool(RewardPool):
    """A pool whose deadline on the grader itself is shorter than grading SLOW takes (the
    candidate sleeps well within its own time limit); other items keep the usual deadline."""

    def _call_args(self, item):
        args, kwargs, deadline = super()._call_args(item)
        return args, kwargs, 1.0 if item.response == SLOW else deadline


def test_pool_reports_a_grader_crash(caplog):
    with RewardPool(num_workers=1, code_timeout_s=6.0) as pool:
        before = _worker_pids()
        fut = pool.submit(RewardItem("code", SLOW, ADD_TESTS))
        deadline = time.monotonic() + 60
        while not (_worker_pids() - before) and time.monotonic() < deadline:
            time.sleep(0.05)
        (pid,) = _worker_pids() - before
        time.sleep(1.0)  # mid-grade: the candidate sleeps in its sandbox
        os.kill(pid, signal.SIGKILL)
        crashed = fut.result()
        after = pool.grade_batch([RewardItem("code", ADD, ADD_TESTS)])  # a fresh worker grades
    assert_grader_failure(crashed, "worker crashed")
    assert after[0].score == 1.0
    assert "grade unknown" in caplog.text


def test_pool_reports_a_grader_timeout():
    # The pool's deadline on the grader ran out while the candidate was still within its own
    # 6 s: the grader's timeout. The candidate's own timeout is an ordinary 0.0 (test_reward_pool).
    with TightPool(num_workers=1, code_timeout_s=6.0) as pool:
        g, after = pool.grade_batch([RewardItem("code", SLOW, ADD_TESTS), RewardItem("code", ADD, ADD_TESTS)])
    assert_grader_failure(g, "timeout after 1s")
    assert after.score == 1.0


def test_a_worker_killed_mid_grade_leaves_no_sandbox_files():
    w = WorkerProcess()
    try:
        assert w.call("megatron_rl.rewards.grade:fail", ("start",), {}, 60)[0]
        tmp = w.tmp_dir
        assert tmp is not None
        seen: list[str] = []
        watcher = threading.Thread(target=lambda: (time.sleep(0.7), seen.extend(os.listdir(tmp))))
        watcher.start()
        ok, why = w.call("megatron_rl.rewards.code:grade_code", (SLOW, ADD_TESTS), {"timeout_s": 6.0}, 1.5)
        watcher.join()
        assert not ok and why.startswith("timeout")
        assert any(name.startswith("mrl-sbx-") for name in seen)  # the sandbox lived there
        assert os.listdir(tmp) == []
    finally:
        w.close()
    assert not os.path.exists(tmp)


def _samples(grades: list[Grade]) -> list[ScoredSample]:
    return [ScoredSample(uid=0, group=0, sample_index=i, prompt_ids=[1, 2], response_ids=[7, 7],
                         rollout_logprobs=[-0.5, -0.5], finish_reason="stop", data_source="code",
                         score=g.score, reward=g.score, grade_tag=g.reason)
            for i, g in enumerate(grades)]


def test_trainer_masks_what_the_pool_reports_as_grader_failures():
    items = [RewardItem("code", ADD, ADD_TESTS), RewardItem("code", WRONG_ADD, ADD_TESTS),
             RewardItem("code", KILL_DRIVER, ADD_TESTS),
             RewardItem("code", ADD, {"inputs": ["1"]}),  # malformed tests: not gradable
             RewardItem("code", SLOW, ADD_TESTS)]  # the grader's deadline runs out
    with TightPool(num_workers=1) as pool:
        grades = pool.grade_batch(items)
    assert [g.grader_failed for g in grades] == [False, False, False, True, True]
    cfg = load_config(None, ["reward.max_failed_share=0.4"])
    samples = _samples(grades)
    metrics = steps.shape(cfg, samples)
    assert [s.trainable for s in samples] == [True, True, True, False, False]
    assert metrics["reward/grader_failed"] == 2
    adv = steps.advantages(cfg, samples)
    assert adv[3] == adv[4] == 0.0
    assert adv[0] > 0 > adv[1] and adv[1] == pytest.approx(adv[2])  # killing the driver is wrong
    with pytest.raises(steps.GraderError, match="2 of 5 samples"):
        steps.shape(load_config(None, ["reward.max_failed_share=0.25"]), _samples(grades))

