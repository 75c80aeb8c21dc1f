"""Issue 13 item 6, on CPU: the planner's figure for the demo model is within 25% of the peak
memory its training reaches when the demo trains.

The demo's RL job (`megatron-rl train configs/tiny_cpu.yaml`, the model `make demo` builds,
random weights here) runs three steps as the user runs it. Each step's metrics row holds what
the trainer measured of its training phase (``trainer/memory.py``): ``mem/state_gib``, the
bytes of the parameters, gradient buffers and optimizer state, and ``mem/train_rss_rise_gib``,
the phase's peak RSS above its RSS at entry (activations, logits, temporaries). Their sum is
compared with the planner's training figure less its constant GPU overhead (CUDA context,
NCCL buffers), which a CPU run does not have. Steps after the first are used: the first also
allocates the optimizer state.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rl.config.run import load_config
from megatron_rl.plan import plan, resolve_dims
from megatron_rl.trainer.memory import GIB, cpu_peak_supported

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "megatron-rl")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


@pytest.mark.slow
@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs and VmHWM")
def test_demo_peak_within_25_percent(tmp_path):
    from megatron_rl.data.synthetic import write_arithmetic_parquet
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    model, run = tmp_path / "model", tmp_path / "run"
    build_model(model, build_tokenizer(model), seed=0)  # the demo's model, as `make demo` builds it
    write_arithmetic_parquet(tmp_path / "train.parquet", 64, seed=1)
    overrides = [f"model.path={model}", f"data.train_files=[{tmp_path / 'train.parquet'}]", "eval.files=[]",
                 "eval.at_start=false", "train.num_steps=3", f"checkpoint.dir={run / 'ckpt'}",
                 f"logging.output_dir={run}", "checkpoint.export_hf=false"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    r = subprocess.run([CLI, "train", "configs/tiny_cpu.yaml", *overrides], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    measured = max((row["mem/state_gib"] + row["mem/train_rss_rise_gib"]) * GIB for row in rows[1:])
    assert 8e6 < rows[-1]["mem/state_gib"] * GIB < 32e6  # ~1M parameters x 16 B: the counter sees them

    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", overrides)
    b = plan(cfg, resolve_dims(str(model))[0]).breakdown
    predicted = (b["train_phase"] - b["overhead"]) * GIB
    assert predicted == pytest.approx(measured, rel=0.25), (predicted / 2**20, measured / 2**20)
