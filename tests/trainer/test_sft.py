"""`megatron-rl sft`: assistant-token NLL falls, checkpoints resume, and the result seeds RL."""

from __future__ import annotations

import pytest

from tests.trainer.conftest import sections
from tests.trainer.helpers import metrics, run, write_recipe

pytestmark = pytest.mark.slow


def test_sft_learns_checkpoints_exports_and_is_a_model_path_for_rl(tiny, tmp_path):
    from megatron_rl.data.synthetic import write_sft_parquet

    data = write_sft_parquet(tmp_path / "sft.parquet", 64, seed=3)
    sft_dir = tmp_path / "sft"
    sec = sections(tiny, sft_dir, data={"train_files": [str(data)]}, train={"num_steps": 6},
                   optimizer={"lr": 3e-3}, sft={"batch_size": 16, "max_len": 32},
                   checkpoint={"save_every": 3})
    recipe = write_recipe(tmp_path / "sft.yaml", **sec)
    proc = run(["sft", recipe])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(sft_dir)
    assert [r["step"] for r in rows] == list(range(6))
    assert rows[-1]["sft/nll"] < 0.8 * rows[0]["sft/nll"]
    assert rows[0]["sft/tokens"] > 0
    assert (sft_dir / "ckpt" / "latest").read_text().strip() == "step_00000006"
    assert (sft_dir / "hf" / "model.safetensors").exists()
    # The same command again: nothing left to do, nothing rewritten.
    again = run(["sft", recipe])
    assert again.returncode == 0 and metrics(sft_dir) == rows
    # The SFT checkpoint (a Megatron checkpoint, no HF weights) as an RL stage's model.
    rl_dir = tmp_path / "rl"
    rl = write_recipe(tmp_path / "rl.yaml", **sections(tiny, rl_dir, model={"path": str(sft_dir / "ckpt")},
                                                       train={"num_steps": 1}))
    proc = run(["train", rl])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = metrics(rl_dir)
    assert row["mismatch/abs_logp_diff_max"] < 1e-4  # servers booted from its export, then synced
