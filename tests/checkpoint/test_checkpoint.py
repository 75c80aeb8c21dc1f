"""Training checkpoints: exact resume, resharding across TP/PP/DP, keep-last-K, kill -9 during a
save, and one-paragraph errors for missing, damaged or mismatched checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_rl.checkpoint.state import load_checkpoint, save_checkpoint
from megatron_rl.errors import CheckpointError
from tests.checkpoint.conftest import subprocess_env
from tests.helpers.launch import ROOT, torchrun
from tests.helpers.tiny_models import make_tiny_hf

WORKERS = Path(__file__).parent / "workers"


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tp2_run(hf_models, tmp_path_factory):
    """resume.py at TP=2: three steps with saves, then a resume of step 2 in fresh objects."""
    d = tmp_path_factory.mktemp("tp2")
    torchrun(2, WORKERS / "resume.py", hf_models["qwen2"], d / "ckpt", d / "run.pt", timeout=600)
    return d, torch.load(d / "run.pt")


@pytest.mark.slow
def test_resume_is_bit_identical(tp2_run):
    d, rec = tp2_run
    assert same(rec["weights_b2"], rec["weights_2"])  # every value came from the checkpoint
    assert rec["loss_b3"] == rec["losses_a"][2]  # same batch (RNG) on the same weights
    assert same(rec["weights_b3"], rec["weights_a3"])  # same optimizer state (moments, step)
    assert rec["extra_b"] == {"data_pos": 4, "note": "a", "step": 2}
    assert rec["extra_latest"]["step"] == 3 and same(rec["weights_latest"], rec["weights_a3"])


@pytest.mark.slow
def test_keep_last_prunes_older_steps(tp2_run):
    d, _ = tp2_run
    root = d / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert (root / "latest").read_text().strip() == "step_00000003"
    meta = json.loads((root / "step_00000003" / "megatron_rl_meta.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["optimizer"]["format"] == "dp_reshardable"
    assert (root / "step_00000003" / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_resharding_tp2_to_pp2_and_tp1_and_back(tp2_run, hf_models):
    d, rec = tp2_run
    torchrun(2, WORKERS / "reshard.py", hf_models["qwen2"], d / "ckpt", d / "reshard.pt", timeout=600)
    got = torch.load(d / "reshard.pt")
    # Weights reshard from TP=2 to PP=2 without the (dp_reshardable) optimizer state ...
    assert got["extra_pp2"]["step"] == 2 and same(got["weights_pp2_weights_only"], rec["weights_2"])
    # ... whose loading at another layout is refused, in one paragraph.
    msg = got["dp_reshardable_error"]
    assert msg and "tp=2 pp=1" in msg and "tp=1 pp=2" in msg and "\n" not in msg
    # fully_reshardable distributed optimizer ("full") and the non-distributed one ("nd"):
    # TP2 -> PP2 -> TP1 x DP2 -> TP2 keeps weights and optimizer state bit for bit.
    for name, weights_2, loss_3, weights_3 in (
        ("full", rec["weights_2"], rec["losses_a"][2], rec["weights_a3"]),
        ("nd", rec["nd_weights_2"], rec["nd_losses"][2], rec["nd_weights_3"]),
    ):
        for stop in ("pp2", "dp2", "back"):
            assert same(got[f"{name}_weights_{stop}2"], weights_2), (name, stop)
        assert got[f"{name}_loss_back3"] == loss_3, name
        assert same(got[f"{name}_weights_back3"], weights_3), name


# ----------------------------------------------------------------- kill -9 during a save


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(hf_models, tmp_path, world1):
    root, marker = tmp_path / "ckpt", tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, str(WORKERS / "kill_save.py"), str(hf_models["qwen2"]), str(root), str(marker)],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group: the kill takes megatron's writer helpers too
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not marker.exists():
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"worker never reached the publish point (rc={proc.returncode}):\n{err[-4000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    tmp_dir = Path(marker.read_text())
    assert tmp_dir.is_dir() and (tmp_dir / "model").is_dir()  # step 2 was fully written ...
    assert not (root / "step_00000002").exists()  # ... but never published
    assert (root / "latest").read_text().strip() == "step_00000001"

    from tests.checkpoint.workers.common import build, train_step

    _, dims, model, opt = build(hf_models["qwen2"], topo=world1, load_hf=False)
    assert load_checkpoint(root, model, opt) == {"data_pos": 1, "step": 1}
    train_step(model, opt, dims)
    save_checkpoint(root, 2, model, opt, extra={"data_pos": 2}, keep_last=1)  # cleans up
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]


# ----------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def saved(hf_models, tmp_path_factory, world1):
    """A single-process checkpoint of the tiny Qwen2 at step 5 (no optimizer step taken yet),
    a model and optimizer to load into (a failed load may leave them half-written), and the
    saved weights."""
    from tests.checkpoint.workers.common import build, export

    root = tmp_path_factory.mktemp("saved") / "ckpt"
    _, dims, model, opt = build(hf_models["qwen2"], topo=world1)
    save_checkpoint(root, 5, model, opt, extra={"data_pos": 10}, keep_last=0, hf_dir=hf_models["qwen2"])
    return root, model, opt, export(model, dims, world1)


def damaged_copy(saved_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved_root, dst)
    return dst


def assert_one_paragraph(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 900, msg
    return msg


def test_missing_checkpoint_errors(saved, tmp_path):
    root, model, opt, _ = saved
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_checkpoint(tmp_path / "nope", model, opt)
    assert_one_paragraph(e)
    with pytest.raises(CheckpointError, match="holds no checkpoint") as e:
        load_checkpoint(tmp_path, model, opt)  # an empty directory
    assert_one_paragraph(e)
    copy = damaged_copy(root, tmp_path)
    (copy / "step_00000005" / "megatron_rl_meta.json").unlink()
    with pytest.raises(CheckpointError, match="megatron_rl_meta.json") as e:
        load_checkpoint(copy / "step_00000005", model, opt)
    assert_one_paragraph(e)
    (copy / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="step_00000009") as e:
        load_checkpoint(copy, model, opt)
    assert_one_paragraph(e)


def test_truncated_or_corrupt_files_error(saved, tmp_path):
    root, model, opt, _ = saved
    copy = damaged_copy(root, tmp_path) / "step_00000005"
    shard = sorted((copy / "model").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_checkpoint(copy, model, opt)
    assert shard.name in assert_one_paragraph(e)

    copy2 = damaged_copy(root, tmp_path / "b") / "step_00000005"
    meta_file = copy2 / "model" / ".metadata"
    meta_file.write_bytes(b"\0" * meta_file.stat().st_size)  # same size, garbage content
    with pytest.raises(CheckpointError, match="damaged") as e:
        load_checkpoint(copy2, model, opt)
    assert_one_paragraph(e)

    copy3 = damaged_copy(root, tmp_path / "c") / "step_00000005"
    for shard in (copy3 / "model").glob("*.distcp"):  # same sizes, garbage tensor data
        shard.write_bytes(b"\1" * shard.stat().st_size)
    with pytest.raises(CheckpointError, match="damaged") as e:
        load_checkpoint(copy3, model, opt)
    assert "UnpicklingError" in assert_one_paragraph(e)


def test_wrong_model_errors(saved, tmp_path, world1):
    from tests.checkpoint.workers.common import build

    root, _, _, _ = saved
    wider = tmp_path / "wider"
    make_tiny_hf(wider, "qwen2", vocab=1031, ffn=128)
    _, _, model, opt = build(wider, topo=world1, load_hf=False)
    with pytest.raises(CheckpointError, match="shape") as e:
        load_checkpoint(root, model, opt)
    assert "linear_fc" in assert_one_paragraph(e)

    llama = tmp_path / "llama"  # same dims, no QKV bias: saving it and loading into Qwen2 fails
    make_tiny_hf(llama, "llama", vocab=1031)
    _, _, lmodel, lopt = build(llama, topo=world1)
    save_checkpoint(tmp_path / "llama_ckpt", 1, lmodel, lopt, extra={}, keep_last=0)
    _, _, qmodel, qopt = build(saved_hf(saved), topo=world1, load_hf=False)
    with pytest.raises(CheckpointError, match="linear_qkv.bias") as e:
        load_checkpoint(tmp_path / "llama_ckpt", qmodel, qopt)
    assert_one_paragraph(e)


def saved_hf(saved) -> Path:
    return saved[0] / "step_00000005" / "hf"


def test_weights_only_and_extra_round_trip(saved, world1):
    from tests.checkpoint.workers.common import build, export

    root, _, _, weights = saved
    _, dims, fresh, fresh_opt = build(saved_hf(saved), topo=world1, load_hf=False)
    assert load_checkpoint(root, fresh, fresh_opt, load_optimizer=False) == {"data_pos": 10, "step": 5}
    assert same(export(fresh, dims, world1), weights)


def test_save_failures_publish_nothing(saved, tmp_path):
    _, model, _, _ = saved
    root = tmp_path / "ckpt"
    with pytest.raises(TypeError):  # not JSON: refused before anything is written
        save_checkpoint(root, 1, model, None, extra={"x": object()}, keep_last=0)
    assert not root.exists()
    with pytest.raises(CheckpointError, match="publishing") as e:  # an OSError on rank 0
        save_checkpoint(root, 1, model, None, extra={}, keep_last=0, hf_dir=tmp_path / "missing")
    assert_one_paragraph(e)
    assert not (root / "latest").exists() and not (root / "step_00000001").exists()
