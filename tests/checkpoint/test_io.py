"""The filesystem rules of a checkpoint root, without torch: publish, `latest`, pruning,
leftovers of killed saves, and the size manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_rl.checkpoint import io
from megatron_rl.errors import CheckpointError


def fake_save(root: Path, step: int, payload: bytes = b"x" * 10, keep_last: int = 0) -> Path:
    """What save_checkpoint does on rank 0, with one file standing in for the tensors."""
    final = root / io.step_dir_name(step)
    tmp = io.tmp_dir_for(final, io.new_nonce())
    root.mkdir(parents=True, exist_ok=True)
    io.remove_stale_tmp(root)
    (tmp / "model").mkdir(parents=True)
    (tmp / "model" / "data.bin").write_bytes(payload)
    io.write_meta(tmp, {"kind": "training", "step": step})
    io.publish(tmp, final)
    io.point_latest(root, final)
    io.prune(root, keep_last)
    return final


def test_publish_points_latest_and_prunes(tmp_path):
    for step in (1, 2, 3, 4):
        fake_save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert io.resolve(tmp_path) == tmp_path / "step_00000004"
    assert io.resolve(tmp_path / "step_00000003") == tmp_path / "step_00000003"
    meta = io.read_meta(tmp_path / "step_00000004")
    assert meta["files"] == {"model/data.bin": 10} and meta["format_version"] == io.FORMAT_VERSION


def test_keep_last_zero_keeps_all_and_latest_is_never_pruned(tmp_path):
    for step in (1, 2, 3):
        fake_save(tmp_path, step)
    assert len(io.list_steps(tmp_path)) == 3
    io.point_latest(tmp_path, tmp_path / "step_00000001")  # e.g. resumed from an older step
    io.prune(tmp_path, 1)
    assert [p.name for _, p in io.list_steps(tmp_path)] == ["step_00000001", "step_00000003"]


def test_leftovers_of_a_killed_save_are_ignored_then_cleaned(tmp_path):
    fake_save(tmp_path, 1)
    dead = tmp_path / "step_00000002.tmp-dead"
    (dead / "model").mkdir(parents=True)
    (dead / "model" / "data.bin").write_bytes(b"partial")
    assert io.resolve(tmp_path) == tmp_path / "step_00000001"
    assert [s for s, _ in io.list_steps(tmp_path)] == [1]
    fake_save(tmp_path, 2)
    assert not dead.exists() and io.resolve(tmp_path) == tmp_path / "step_00000002"


def test_resave_of_the_same_step_replaces_it_and_a_kill_between_renames_is_repaired(tmp_path):
    fake_save(tmp_path, 3, payload=b"old")
    fake_save(tmp_path, 3, payload=b"new!")
    assert (tmp_path / "step_00000003" / "model" / "data.bin").read_bytes() == b"new!"
    # Killed after moving the old directory aside, before the new one was renamed in:
    (tmp_path / "step_00000003").rename(tmp_path / "step_00000003.replaced-abcd")
    io.remove_stale_tmp(tmp_path)
    assert (tmp_path / "step_00000003" / "model" / "data.bin").read_bytes() == b"new!"


def test_size_manifest_finds_truncation_and_missing_files(tmp_path):
    step = fake_save(tmp_path, 1)
    meta = io.read_meta(step)
    io.verify_files(step, meta)
    (step / "model" / "data.bin").write_bytes(b"x" * 4)
    with pytest.raises(CheckpointError, match="4 bytes, 10 were written"):
        io.verify_files(step, meta)
    (step / "model" / "data.bin").unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        io.verify_files(step, meta)
    io.verify_files(step, meta, subdirs=("hf",))  # only the named parts are checked


@pytest.mark.parametrize("damage", ["garbage", "other_json", "newer"])
def test_bad_meta_or_pointer_is_a_checkpoint_error(tmp_path, damage):
    step = fake_save(tmp_path, 1)
    meta_path = step / io.META_NAME
    if damage == "garbage":
        meta_path.write_text("{not json")
    elif damage == "other_json":
        meta_path.write_text(json.dumps({"hello": 1}))
    else:
        meta_path.write_text(json.dumps({"format": "megatron-rl", "format_version": 99, "files": {}}))
    with pytest.raises(CheckpointError) as e:
        io.read_meta(step)
    assert "\n" not in str(e.value)
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="corrupt"):
        io.resolve(tmp_path)
