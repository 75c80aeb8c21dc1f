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


def _serving(model_dir: Path):
    from megatron_rl.rollout.engine import EmbeddedEngine

    eng = EmbeddedEngine(str(model_dir), seed=0, batch_wait_s=0.002)
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    yield from _serving(tiny_model_dir)


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 over the real Qwen2 vocabulary, with its tokenizer (see qwen_tiny.py)."""
    from qwen_tiny import make_qwen_tiny

    path = tmp_path_factory.mktemp("qwen_tiny")
    make_qwen_tiny(path)
    return path


@pytest.fixture(scope="session")
def echo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The echo model of qwen_tiny.py: repeats its last token (Qwen2 vocabulary and tokenizer)."""
    from qwen_tiny import make_echo_model

    path = tmp_path_factory.mktemp("qwen_echo")
    make_echo_model(path)
    return path


@pytest.fixture(scope="module")
def qwen_engine(qwen_model_dir: Path):
    """An engine serving ``qwen_model_dir``."""
    yield from _serving(qwen_model_dir)


@pytest.fixture(scope="module")
def echo_engine(echo_model_dir: Path):
    """An engine serving the echo model."""
    yield from _serving(echo_model_dir)
