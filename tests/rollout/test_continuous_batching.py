"""Continuous batching in the embedded engine: newcomers join the running batch, finished rows
leave at once, long prompts are fed in chunks between decode steps, and a row's output does
not depend on when it joined (up to float rounding; bit-exactness is deterministic mode's job).

Event order is observed through the per-token hook (it runs in the scheduler thread between
steps), so the assertions hold whatever the machine's speed."""

import threading

import pytest
import torch

from megatron_rl.rollout.batching import Prefill
from megatron_rl.rollout.engine import EmbeddedEngine
from megatron_rl.rollout.sampling import parse_sampling_params

WAIT = 60
LONG = [11, 22, 33, 44]
NEWCOMER = [5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26]


@pytest.fixture(scope="module")
def chunked(tiny_model_dir):
    """An engine whose prefill forwards hold at most 4 tokens (rows x columns)."""
    eng = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.002, chunked_prefill_size=4)
    try:
        yield eng
    finally:
        eng.shutdown()


def greedy(engine, n, **extra):
    return parse_sampling_params({"temperature": 0, "max_new_tokens": n, "ignore_eos": True, **extra},
                                 engine.vocab_size)


def alone(engine, prompt, n, **kw):
    (future,) = engine.submit(prompt, greedy(engine, n), rid=f"alone-{len(prompt)}-{n}", return_logprob=True, **kw)
    return future.result(timeout=WAIT)


def reference_logprobs(engine, prompt, output):
    """Log-probs of ``output`` after ``prompt`` from one plain forward of the whole sequence."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt + output])).logits[0]
    steps = torch.log_softmax(logits[len(prompt) - 1:-1].float(), -1)
    return steps.gather(1, torch.tensor(output)[:, None]).squeeze(1)


def join_while_running(engine, newcomer_prompt, newcomer_tokens, join_at=5, long_tokens=80):
    """Submit a newcomer from the long job's hook at its ``join_at``-th token; returns
    (long job, newcomer job, long's token count at the newcomer's submission / first token / finish)."""
    marks, futures, longs = {}, [], []

    def on_newcomer(job, token, logprob):
        marks.setdefault("first", len(longs[0].output_ids))
        if len(job.output_ids) == newcomer_tokens:
            marks["finish"] = len(longs[0].output_ids)

    def on_long(job, token, logprob):
        if len(job.output_ids) == join_at:
            longs.append(job)
            marks["submit"] = join_at
            futures.extend(engine.submit(newcomer_prompt, greedy(engine, newcomer_tokens), rid="newcomer",
                                         return_logprob=True, on_token=on_newcomer))

    (long_future,) = engine.submit(LONG, greedy(engine, long_tokens), rid="long", return_logprob=True,
                                   on_token=on_long)
    long_job = long_future.result(timeout=WAIT)
    return long_job, futures[0].result(timeout=WAIT), marks


def test_a_newcomer_joins_the_running_batch_and_leaves_before_it_ends(engine):
    long_job, new, marks = join_while_running(engine, [7, 8, 9], 6)
    # prefilled at the next scheduler step (its first token comes before long's next one), then
    # decoded in long's batch, one token each per step, and gone at once after its last
    assert marks["first"] == marks["submit"]
    assert marks["finish"] == marks["first"] + 5 < len(long_job.output_ids) == 80
    assert new.output_ids == alone(engine, [7, 8, 9], 6).output_ids
    assert long_job.output_ids == alone(engine, LONG, 80).output_ids
    for job, prompt in ((new, [7, 8, 9]), (long_job, LONG)):
        assert torch.allclose(torch.tensor(job.output_logprobs), reference_logprobs(engine, prompt, job.output_ids),
                              atol=1e-5)


def test_a_long_prompt_is_fed_in_chunks_while_the_batch_keeps_decoding(chunked):
    long_job, new, marks = join_while_running(chunked, NEWCOMER, 4)
    # 20 prompt tokens, 4 per forward: 5 chunks, one per scheduler step, and the running batch
    # decodes a token after each of the first 4 (the 5th chunk's step samples the newcomer first)
    assert marks["first"] - marks["submit"] == 4
    assert new.output_ids == alone(chunked, NEWCOMER, 4).output_ids
    assert torch.allclose(torch.tensor(new.output_logprobs), reference_logprobs(chunked, NEWCOMER, new.output_ids),
                          atol=1e-5)


def test_chunked_prefill_scores_the_prompt_like_one_forward(chunked):
    (future,) = chunked.submit(NEWCOMER, greedy(chunked, 0), rid="score", return_logprob=True, logprob_start_len=0)
    job = future.result(timeout=WAIT)
    with torch.no_grad():
        logp = torch.log_softmax(chunked.model(torch.tensor([NEWCOMER])).logits[0].float(), -1)
    expected = [logp[t - 1, NEWCOMER[t]].item() for t in range(1, len(NEWCOMER))]
    assert job.input_logprobs[0] is None and job.input_logprobs[1:] == pytest.approx(expected, abs=1e-5)


def test_many_requests_of_mixed_lengths_all_finish_with_their_own_lengths(chunked):
    prompts = [[(7 * i + k) % 999 + 1 for k in range(1 + i % 9)] for i in range(12)]
    lengths = [3 + (5 * i) % 17 for i in range(12)]
    futures = []
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        futures += chunked.submit(p, greedy(chunked, n), rid=f"m{i}", return_logprob=True)
    jobs = [f.result(timeout=WAIT) for f in futures]
    assert [len(j.output_ids) for j in jobs] == lengths
    for job, p in zip(jobs, prompts):
        assert job.output_ids == alone(chunked, p, len(job.output_ids)).output_ids


def test_aborting_a_newcomer_mid_prefill_keeps_the_rest_running(chunked):
    started = threading.Event()
    (long_future,) = chunked.submit(LONG, greedy(chunked, 60), rid="keep",
                                    on_token=lambda job, t, lp: started.set())
    assert started.wait(WAIT)
    (gone,) = chunked.submit(NEWCOMER, greedy(chunked, 5), rid="gone")
    chunked.abort("gone")
    assert gone.result(timeout=WAIT).finish["type"] == "abort"
    assert long_future.result(timeout=WAIT).finish == {"type": "length", "length": 60}


def test_prefill_chunks_respect_the_token_budget():
    class J:
        def __init__(self, n):
            self.prompt, self.return_logprob, self.logprob_start_len = list(range(1, n + 1)), False, -1

    pre = Prefill.of([J(3), J(10)])
    assert pre.width == 10 and pre.mask_BL.sum().item() == 13
    assert pre.next_chunk(8) == (0, 4)  # 2 rows x 4 columns
    pre.fed = 8
    assert pre.next_chunk(8) == (8, 10) and pre.next_chunk(1) == (8, 9)  # at least one column


def test_models_without_mergeable_caches_fall_back_to_batches_that_start_together(tmp_path):
    """Sliding-window layers keep state a left-padded merge would break: newcomers wait."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_rl.rollout.batching import mergeable

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_sliding_window=True, sliding_window=64, max_window_layers=0)
    Qwen2ForCausalLM(cfg).save_pretrained(str(tmp_path))
    eng = EmbeddedEngine(str(tmp_path), seed=0, batch_wait_s=0.002)
    try:
        assert not mergeable(eng.model.config)
        long_job, new, marks = join_while_running(eng, [7, 8, 9], 6, long_tokens=30)
        assert marks["first"] == 30  # started once the running batch had ended
        assert new.output_ids == alone(eng, [7, 8, 9], 6).output_ids
    finally:
        eng.shutdown()
