"""Shared by the launch tests (not the Slurm-cluster ones): a tiny CPU recipe and the CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.trainer.conftest import build_tiny, sections
from tests.trainer.helpers import CLI, ROOT, env, write_recipe

__all__ = ["CLI", "ROOT", "cli", "tiny_model", "tiny_recipe"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny Qwen2, its tokenizer and arithmetic prompts (the trainer tests' own)."""
    return build_tiny(tmp_path_factory.mktemp("tiny_launch"))


def tiny_recipe(tiny: Path, run: Path, **over) -> Path:
    """configs/tiny_cpu.yaml on the tiny model: 2 steps, a checkpoint each, tp=2 (two processes)."""
    tree = sections(tiny, run, parallel={"tp": 2}, train={"num_steps": 2}, **over)
    return write_recipe(run.parent / f"{run.name}.yaml", **tree)


def cli(*args, timeout: float = 600, cwd: Path = ROOT, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`megatron-rl ARGS` as a user types it (launcher variables stripped from the environment)."""
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**env(), **(extra_env or {})}, cwd=cwd)
