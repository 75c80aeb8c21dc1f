"""Fixtures of the checkpoint tests: tiny HF models per family, a one-process megatron world."""

from __future__ import annotations

import os

import pytest

from tests.helpers.tiny_models import make_tiny_hf

FAMILIES = {  # name: (family, make_tiny_hf keywords): GQA everywhere, vocabulary 1031 (odd)
    "qwen2": ("qwen2", {"tie": False}),  # QKV bias
    "llama_tied": ("llama", {"tie": True}),
    "qwen3": ("qwen3", {"tie": False}),  # q/k norms
}
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (family, kw) in FAMILIES.items():
        make_tiny_hf(root / name, family, vocab=1031, **kw)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def world1():
    """A single-process megatron world (gloo) for in-process loads; torn down afterwards."""
    from megatron_rl.config.parallel import ParallelConfig
    from megatron_rl.parallel.topology import Topology

    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    topo = Topology.initialize(ParallelConfig(), seed=1234)
    yield topo
    Topology.destroy()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def subprocess_env() -> dict:
    """The environment for a worker started without torchrun: no leftover rendezvous vars."""
    from tests.helpers.launch import ROOT

    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env
