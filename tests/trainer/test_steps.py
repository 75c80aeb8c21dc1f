"""Pure parts of the RL step: micro-batching, DP shares, shaping, advantages, metrics, gate."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.config.run import load_config
from megatron_rl.trainer import steps
from megatron_rl.trainer.batching import dp_shares, group_rows, pack
from megatron_rl.trainer.gate import MismatchError, check_gate, step_mismatch
from megatron_rl.trainer.generate import grader_kind, sample_seed
from megatron_rl.trainer.metrics import eval_metrics, pass_at_k, sample_metrics
from megatron_rl.trainer.samples import ScoredSample


def sample(group, index, prompt_len, resp_len, score=0.0, tag="", finish="stop", source="arithmetic"):
    return ScoredSample(uid=group, group=group, sample_index=index, prompt_ids=list(range(1, prompt_len + 1)),
                        response_ids=[7] * resp_len, rollout_logprobs=[-0.5] * resp_len, finish_reason=finish,
                        data_source=source, score=score, reward=score, grade_tag=tag)


def test_dp_shares_balance_tokens_and_cover_every_sample_once():
    lengths = [100, 90, 10, 10, 10, 10, 50, 40]
    shares = dp_shares(lengths, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= 10
    assert dp_shares(lengths, 2) == shares  # deterministic


def test_group_rows_respects_token_budget_and_sorts_by_length():
    lengths = [5, 30, 6, 29, 7, 31]
    groups = group_rows(lengths, max_tokens=64, micro_batch_size=1, pad_multiple=1)
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 64
    assert [sorted(lengths[i] for i in g) for g in groups][0] == [5, 6, 7]
    assert sorted(i for g in groups for i in g) == list(range(6))
    by_count = group_rows(lengths, max_tokens=0, micro_batch_size=2, pad_multiple=1)
    assert [len(g) for g in by_count] == [2, 2, 2]


def test_pack_aligns_response_tokens_and_pads_for_cp():
    s = [sample(0, 0, 3, 2), sample(0, 1, 4, 5)]
    packed = pack(s, [1.0, -1.0], dp=1, dp_rank=0, max_tokens=0, micro_batch_size=2, pad_multiple=4)
    (mb,) = packed.micro_batches
    assert mb.tokens_BS.shape == (2, 12)  # 9 -> 12
    # row of sample 0: prompt 3 tokens, response at positions 3,4 -> predicted at columns 2,3
    row = packed.rows[0].index(0)
    assert mb.loss_mask_BS[row].tolist()[:6] == [0, 0, 1, 1, 0, 0]
    assert mb.adv_BS[row, 2].item() == 1.0 and mb.rollout_logp_BS[row, 3].item() == -0.5
    assert packed.real_tokens == 14


def test_pack_gives_an_idle_dp_rank_one_masked_row():
    packed = pack([sample(0, 0, 3, 2)], [1.0], dp=2, dp_rank=1, max_tokens=0, micro_batch_size=1)
    assert len(packed.micro_batches) == 1 and packed.micro_batches[0].loss_mask_BS.sum() == 0


def test_pack_uniform_shape_for_pipeline_parallel():
    s = [sample(0, i, 3, n) for i, n in enumerate([1, 8, 2, 9])]
    packed = pack(s, [0.0] * 4, dp=1, dp_rank=0, max_tokens=24, micro_batch_size=1, uniform_shape=True)
    assert len({tuple(mb.tokens_BS.shape) for mb in packed.micro_batches}) == 1


def test_shape_masks_grader_failures_and_overlong_and_leaves_them_out_of_baselines():
    cfg = load_config(None, ["algorithm.overlong_filter=true", "rollout.max_new_tokens=4", "reward.max_failed_share=0.5"])
    s = [sample(0, 0, 2, 2, 1.0), sample(0, 1, 2, 2, 0.0, tag="grader_error: boom"),
         sample(0, 2, 2, 4, 0.0, finish="length"), sample(0, 3, 2, 2, 0.0)]
    metrics = steps.shape(cfg, s)
    assert [x.trainable for x in s] == [True, False, False, True]
    assert metrics["reward/grader_failed"] == 1 and metrics["overlong/filtered"] == 1
    adv = steps.advantages(cfg, s)
    assert adv[1] == 0.0
    # baseline over the 3 known grades (1, 0, 0): the failed sample does not pull it down
    known = torch.tensor([1.0, 0.0, 0.0])
    want = ((known - known.mean()) / (known.std() + 1e-6)).tolist()
    assert adv[0] == pytest.approx(want[0], rel=1e-4) and adv[3] == pytest.approx(want[2], rel=1e-4)


def test_mini_batches_split_groups_into_updates():
    cfg = load_config(None, ["train.prompts_per_step=4", "train.mini_batch_prompts=2"])
    s = [sample(g, i, 2, 2) for g in range(4) for i in range(2)]
    parts = steps.mini_batches(cfg, s)
    assert len(parts) == 2 and sorted(i for p in parts for i in p) == list(range(8))
    assert {s[i].group for i in parts[0]} == {0, 1}


def test_learning_rate_schedule_is_a_function_of_the_update():
    cfg = load_config(None, ["optimizer.lr=1.0", "optimizer.warmup_steps=2", "optimizer.schedule=cosine",
                             "optimizer.min_lr=0.0"])
    lrs = [steps.learning_rate(cfg.optimizer, u, 10) for u in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0 and lrs[-1] < 0.1


def test_seeds_differ_per_sample_and_are_stable():
    seeds = {sample_seed(1, 3, 0, 17, i) for i in range(8)}
    assert len(seeds) == 8 and sample_seed(1, 3, 0, 17, 0) == sample_seed(1, 3, 0, 17, 0)


def test_grader_kind_by_data_source():
    assert grader_kind("deepcoder", "math") == "code" and grader_kind("taco", "math") == "code"
    assert grader_kind("deepscaler", "code") == "math" and grader_kind("mystery", "code") == "code"


def test_metrics_per_source_and_pass_at_k():
    s = [sample(0, 0, 2, 3, 1.0, source="a"), sample(0, 1, 2, 5, 0.0, source="a", finish="length"),
         sample(1, 0, 2, 1, 1.0, source="b")]
    m = sample_metrics(s, 5)
    assert m["reward/accuracy"] == pytest.approx(2 / 3) and m["reward/a/accuracy"] == 0.5
    assert m["response/clip_ratio"] == pytest.approx(1 / 3) and m["response/length_max"] == 5
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 4) == 1.0
    e = eval_metrics([[s[0], s[1]], [s[2]]], [1])
    assert e["eval/accuracy"] == pytest.approx(0.75) and e["eval/b/accuracy"] == 1.0


def test_gate_fires_on_a_mismatch_and_passes_equal_logprobs():
    s = [sample(0, 0, 3, 4)]
    packed = pack(s, [0.0], dp=1, dp_rank=0, max_tokens=0, micro_batch_size=1)
    mb = packed.micro_batches[0]
    same = step_mismatch([mb.rollout_logp_BS.clone()], [mb])
    assert same["mismatch/abs_logp_diff_max"] == 0.0 and same["mismatch/ratio_mean"] == pytest.approx(1.0)
    check_gate(same, dtype="float32", threshold=-1, step=0, version="step0")
    off = step_mismatch([mb.rollout_logp_BS + 0.01 * mb.loss_mask_BS], [mb])
    with pytest.raises(MismatchError, match="weights in the engine are not"):
        check_gate(off, dtype="float32", threshold=-1, step=0, version="step0")
    check_gate(off, dtype="bfloat16", threshold=-1, step=0, version="step0")  # 16-bit: mean 0.01 < 0.05
    check_gate(off, dtype="float32", threshold=0, step=0, version="step0")  # 0 disables
    # One rare token off by 1.3e-4 (a sharp fp32 model) is numerics, not wrong weights.
    spike = mb.rollout_logp_BS.clone()
    spike[0, 2] += 1.3e-4
    check_gate(step_mismatch([spike], [mb]), dtype="float32", threshold=-1, step=0, version="step0")


def test_length_finished_samples_score_as_the_recipe_says():
    cfg = load_config(None, ["reward.length_finished_score=0.0", "rollout.max_new_tokens=4"])
    s = [sample(0, 0, 2, 4, 1.0, finish="length"), sample(0, 1, 2, 2, 1.0)]
    steps.shape(cfg, s)
    assert [x.score for x in s] == [0.0, 1.0] and [x.reward for x in s] == [0.0, 1.0]
    default = [sample(0, 0, 2, 4, 1.0, finish="length")]
    steps.shape(load_config(None, ["rollout.max_new_tokens=4"]), default)
    assert default[0].score == 1.0
