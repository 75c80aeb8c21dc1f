"""``megatron-rl plan`` as the user types it, on every recipe in configs/."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "megatron-rl")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}


def _run(*args: str) -> subprocess.CompletedProcess:
    """The command as the user types it (launcher variables stripped by ``env``)."""
    return subprocess.run([CLI, "plan", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env())


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    """The tiny recipes size the model ``make demo`` writes under runs/demo/, absent on a fresh
    clone: the same model (``megatron_rl.demo.tiny``), built into a temporary directory."""
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("demo-model")
    build_model(out, build_tokenizer(out), seed=0)
    return out


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_plan_runs_on_every_recipe(recipe, demo_model):
    overrides = [f"model.path={demo_model}"] if recipe.startswith("tiny_") else []
    r = _run(f"configs/{recipe}", "--json", *overrides)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out["fits"], bool) and out["per_gpu_gib"] > 0
    assert {"weights", "grads_fp32", "optimizer", "activations", "logits_fused", "logits_unfused",
            "rollout_reserved"} <= set(out["breakdown"])


def test_plan_printout_names_the_fix():
    r = _run("configs/deepcoder_14b_32k.yaml", "parallel.tp=1", "parallel.cp=1", "parallel.dp=32",
             "parallel.sp=false", "rollout.max_new_tokens=65536", "train.max_tokens_per_microbatch=67584")
    assert r.returncode == 0, r.stderr
    assert "DOES NOT FIT" in r.stdout and "smallest fix: parallel." in r.stdout


def test_bad_gpu_is_a_clear_error():
    r = _run("configs/deepcoder_14b_32k.yaml", "--gpu", "v100")
    assert r.returncode == 2 and "unknown --gpu 'v100'" in r.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    r = _run("configs/tiny_cpu.yaml", f"model.path={tmp_path / 'nowhere'}")
    assert r.returncode == 2 and "no config.json there" in r.stderr and "--model NAME" in r.stderr
