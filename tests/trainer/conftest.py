"""A tiny model with its tokenizer, arithmetic prompts and held-out problems, built once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def build_tiny(root: Path) -> Path:
    """Into ``root``: hf/ (a random tiny Qwen2 and its tokenizer), train.parquet, eval.parquet."""
    from megatron_rl.data.synthetic import write_arithmetic_parquet
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    tok = build_tokenizer(root / "hf")
    build_model(root / "hf", tok, seed=0, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)
    write_arithmetic_parquet(root / "train.parquet", 48, seed=1)
    write_arithmetic_parquet(root / "eval.parquet", 6, seed=2, split="heldout")
    return root


def sections(tiny: Path, run: Path, **over) -> dict:
    """Recipe sections for a short CPU run on the tiny model (tests override what they need)."""
    base = {
        "model": {"path": str(tiny / "hf")},
        "parallel": {"tp": 1},
        "train": {"num_steps": 3, "prompts_per_step": 2, "mini_batch_prompts": 2},
        "rollout": {"n_samples": 2, "max_new_tokens": 8, "temperature": 1.0, "deterministic": True,
                    "health_timeout_s": 120},
        "data": {"train_files": [str(tiny / "train.parquet")], "max_prompt_len": 32},
        "eval": {"files": [], "at_start": False, "every_steps": 0},
        "checkpoint": {"dir": str(run / "ckpt"), "save_every": 1},
        "logging": {"output_dir": str(run), "log_samples": 1},
    }
    for key, value in over.items():
        base.setdefault(key, {}).update(value)
    return base
