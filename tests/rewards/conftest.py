"""Fixtures for the reward tests: sandbox backends, and a check that nothing is left behind."""

from __future__ import annotations

import glob
import os
import shutil

import psutil
import pytest

from megatron_rl.rewards.sandbox_setup import SandboxSetup, detect

BACKENDS = ["bwrap", "plain"]
_THROWAWAY_UID_MIN = 3_000_000_000


def setup_for(backend: str) -> SandboxSetup:
    """The resolved backend, or skip when this machine cannot provide it."""
    if backend == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed")
    try:
        return detect(backend)
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(params=BACKENDS)
def sandbox_setup(request: pytest.FixtureRequest) -> SandboxSetup:
    return setup_for(request.param)


def sandbox_processes() -> list[psutil.Process]:
    """Live processes of a throw-away sandbox uid, anywhere on the machine (zombies hold
    no memory and are left for init to reap)."""
    found = []
    for p in psutil.process_iter(["uids", "status"]):
        uids = p.info["uids"]
        if uids is not None and uids.real >= _THROWAWAY_UID_MIN:
            if p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


class Footprint:
    """Our process tree (pids and memory) and sandbox directories, to compare later."""

    def __init__(self) -> None:
        me = psutil.Process()
        self.children = {c.pid for c in me.children(recursive=True)}
        self.rss = self._tree_rss(me)
        self.dirs = set(glob.glob("/tmp/mrl-sbx-*"))

    @staticmethod
    def _tree_rss(me: psutil.Process) -> int:
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def assert_restored(self, rss_slack: int = 64 << 20) -> None:
        """No new descendants or sandbox-uid processes, no new sandbox dirs, memory back."""
        me = psutil.Process()
        extra = {c.pid for c in me.children(recursive=True)} - self.children
        assert not extra, f"processes left behind: {extra}"
        assert not sandbox_processes(), "processes still running as a sandbox uid"
        assert set(glob.glob("/tmp/mrl-sbx-*")) <= self.dirs, "sandbox directory left behind"
        assert self._tree_rss(me) <= self.rss + rss_slack, "memory not back to baseline"
        assert os.getpid() == me.pid


@pytest.fixture
def footprint() -> Footprint:
    return Footprint()
