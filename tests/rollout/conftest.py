"""Rollout test fixtures: a tiny random Qwen2 on disk and an in-process engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from helpers.tiny_models import make_tiny_hf  # noqa: E402
from rollout_helpers import TINY  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2ForCausalLM (vocab 1000, hidden 64, 2 layers) saved with seed 0."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    make_tiny_hf(path, seed=0, **TINY)
    return path


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    from megatron_rl.rollout.engine import EmbeddedEngine

    eng = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.002)
    try:
        yield eng
    finally:
        eng.shutdown()
