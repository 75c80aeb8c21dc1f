"""Issue 13 item 6, on CPU: the planner's figure for the demo model is within 25% of the peak
memory one of its training steps reaches.

What the planner predicts on CPU: weights + fp32 gradients + optimizer state + activations of
the longest micro-batch + unfused logits (a plain torch step computes the full logits), with no
GPU overhead and no rollout reservation. What is measured (``peak_step.py``): the demo's model
(``megatron_rl/demo/tiny.py``) trained one step, in fp32, on the recipe's token budget
(``configs/tiny_cpu.yaml``: 2048 tokens per micro-batch, 40-token samples), with a plain torch
step rather than the Megatron actor, whose process also holds the rollout engine and gloo
buffers that the planner does not model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rl.config.run import load_config
from megatron_rl.plan import plan, resolve_dims

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_demo_peak_within_25_percent(tmp_path):
    model_dir = tmp_path / "model"
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [f"model.path={model_dir}"])
    sample = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    rows = cfg.train.max_tokens_per_microbatch // sample
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                              "LOCAL_RANK")}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("peak_step.py")), str(model_dir),
                        str(rows), str(sample)], capture_output=True, text=True, timeout=300, env=env | {
                            "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    measured = json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"]

    dims, _ = resolve_dims(str(model_dir))
    b = plan(cfg, dims, fused=False).breakdown
    predicted = sum(b[k] for k in ("weights", "grads_fp32", "optimizer", "activations", "logits")) * 1024**3
    assert predicted == pytest.approx(measured, rel=0.25), (predicted / 2**20, measured / 2**20)
