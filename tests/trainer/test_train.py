"""`megatron-rl train` end to end on CPU: the console script, as users run it."""

from __future__ import annotations

import json

import pytest

from tests.trainer.conftest import sections
from tests.trainer.helpers import metrics, one_paragraph, run, run_patched, write_recipe


def test_train_writes_metrics_checkpoints_samples_and_hf_export(tiny, tmp_path):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", **sections(tiny, run_dir, eval={
        "files": [str(tiny / "eval.parquet")], "n_samples": 2, "temperature": 0.0, "max_new_tokens": 8,
        "pass_k": [1, 2]}, logging={"output_dir": str(run_dir), "wandb_project": "tiny", "wandb_mode": "offline"},
        rollout={"colocate": True}))  # release/resume around training: no-ops on CPU, same driver path
    proc = run(["train", recipe], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward/mean", "reward/accuracy", "reward/arithmetic/accuracy", "response/length_mean",
                "response/clip_ratio", "actor/entropy_mean", "actor/grad_norm", "optimizer/lr",
                "mismatch/abs_logp_diff_max", "mismatch/kl_k3", "mismatch/ratio_p95", "actor/clipfrac_high"):
        assert key in rows[0], key
    assert all(r["mismatch/abs_logp_diff_max"] < 1e-4 for r in rows)  # the gate's own check held
    assert rows[0]["data/prompts_dropped"] == 0 and rows[0]["data/epoch"] == 0
    timed = metrics(run_dir, drop_timings=False)[0]
    assert {"time/generate", "time/train", "time/sync", "perf/generated_tokens_per_s", "perf/padding_frac"} <= set(timed)
    assert (run_dir / "ckpt" / "latest").read_text().strip() == "step_00000003"
    assert (run_dir / "config.yaml").exists() and (run_dir / "train.log").exists()
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 3
    ev = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert ev[-1]["step"] == 3 and "eval/pass@2" in ev[-1] and ev[-1]["eval/problems"] == 6
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    AutoTokenizer.from_pretrained(run_dir / "hf")
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # offline: no network needed
    plot = run(["plot", run_dir])
    assert plot.returncode == 0 and (run_dir / "curves.png").stat().st_size > 1000, plot.stderr


@pytest.mark.parametrize("case", ["missing_column", "wrong_type", "empty_file", "all_over_limit"])
def test_bad_data_is_one_paragraph_error(tiny, tmp_path, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    over = {}
    if case == "missing_column":
        pq.write_table(pa.table({"prompt": ["1+1"], "data_source": ["arithmetic"]}), bad)
    elif case == "wrong_type":
        pq.write_table(pa.table({"prompt": [17], "answer": ["2"], "data_source": ["arithmetic"]}), bad)
    elif case == "empty_file":
        pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string()),
                                 "data_source": pa.array([], pa.string())}), bad)
    else:
        bad = tiny / "train.parquet"
        over = {"max_prompt_len": 2}
    sec = sections(tiny, tmp_path / "run", data={"train_files": [str(bad)], **over})
    proc = run(["train", write_recipe(tmp_path / "r.yaml", **sec)], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = one_paragraph(proc.stderr)
    assert str(bad) in msg or bad.name in msg
    if case == "missing_column":
        assert "answer" in msg
    if case == "all_over_limit":
        assert "max_prompt_len" in msg


def test_config_typo_is_refused_before_anything_starts(tiny, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", **sections(tiny, tmp_path / "run"))
    proc = run(["train", recipe, "rollout.n_sample=4"], timeout=120)
    assert proc.returncode == 2 and "n_samples" in one_paragraph(proc.stderr)
    assert not (tmp_path / "run").exists()


def test_grader_failures_are_masked_and_counted_not_fatal(tiny, tmp_path):
    # A 1 ms grading deadline kills every reward worker mid-grade (the pool replaces it).
    run_dir = tmp_path / "run"
    sec = sections(tiny, run_dir, reward={"timeout_s": 0.001, "max_failed_share": 1.0}, train={"num_steps": 1})
    proc = run(["train", write_recipe(tmp_path / "r.yaml", **sec)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = metrics(run_dir)
    assert row["reward/grader_failed"] == 4 and row["train/masked_samples"] == 4
    assert row["actor/loss"] == 0.0  # nothing trained on unknown grades
    # Above the share (default 0.25), a broken grader stops the run instead of skewing it.
    sec["reward"]["max_failed_share"] = 0.25
    sec["logging"]["output_dir"] = str(tmp_path / "run2")
    sec["checkpoint"]["dir"] = str(tmp_path / "run2" / "ckpt")
    proc = run(["train", write_recipe(tmp_path / "r2.yaml", **sec)], timeout=300)
    assert proc.returncode == 2 and "could not be graded" in one_paragraph(proc.stderr)


def test_broken_weight_mapping_trips_the_mismatch_gate_on_the_first_step(tiny, tmp_path):
    """A sync that sends one tensor wrong: the engine no longer serves the trainer's weights."""
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", **sections(tiny, run_dir))
    script = (  # the recipe's distributed transport fills ActorSync's flat buckets (weights/buckets.py)
        "import sys, megatron_rl.weights.stage_sync as ss\n"
        "from megatron_rl.weights.buckets import hf_views\n"
        "orig = ss.fill_bucket\n"
        "def broken(spec, params, dims, group, flat, scratch):\n"
        "    orig(spec, params, dims, group, flat, scratch)\n"
        "    for e, t in zip(spec.entries, hf_views(flat, spec.dtype, spec.entries)):\n"
        "        if e.name == 'model.norm.weight':\n"
        "            t.mul_(1.5)\n"
        "ss.fill_bucket = broken\n")
    proc = run_patched(script, ["train", recipe])
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = one_paragraph(proc.stderr)
    assert "Step 0" in msg and "weights in the engine are not the trainer's" in msg
    assert not (run_dir / "ckpt" / "latest").exists()  # nothing was trained or saved
