"""Embedded engine: SGLang's sampling semantics, checked against the model's own forward pass."""

import threading
import time

import pytest
import torch

from megatron_rl.rollout.sampling import BadRequest, parse_sampling_params

PROMPT = [11, 22, 33, 44]
WAIT = 60


def run(engine, prompt=PROMPT, rid="r", return_logprob=True, logprob_start_len=-1, **sampling):
    params = parse_sampling_params(sampling, engine.vocab_size)
    futures = engine.submit(prompt, params, rid=rid, return_logprob=return_logprob,
                            logprob_start_len=logprob_start_len)
    return [f.result(timeout=WAIT) for f in futures]


def full_logits(engine, ids):
    with torch.no_grad():
        return engine.model(torch.tensor([ids])).logits[0].float()


def test_greedy_is_argmax_and_logprobs_are_log_softmax(engine):
    (job,) = run(engine, temperature=0, max_new_tokens=6)
    logits = full_logits(engine, PROMPT + job.output_ids)
    steps = logits[len(PROMPT) - 1:-1]
    assert job.output_ids == steps.argmax(-1).tolist()
    expected = torch.log_softmax(steps, -1).gather(1, torch.tensor(job.output_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(job.output_logprobs), expected, atol=1e-5)
    assert job.finish == {"type": "length", "length": 6}


def test_sampled_logprobs_follow_sglang_temperature_convention(engine):
    (job,) = run(engine, temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=5, sampling_seed=3)
    steps = full_logits(engine, PROMPT + job.output_ids)[len(PROMPT) - 1:-1]
    # log softmax(logits / T) over the full vocabulary: top-k / top-p do not renormalise it.
    expected = torch.log_softmax(steps / 0.7, -1).gather(1, torch.tensor(job.output_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(job.output_logprobs), expected, atol=1e-5)


def test_top_k_1_and_tiny_top_p_are_deterministic_and_greedy(engine):
    (greedy,) = run(engine, temperature=0, max_new_tokens=8)
    runs = [run(engine, temperature=1.3, top_k=1, max_new_tokens=8)[0].output_ids for _ in range(2)]
    assert runs[0] == runs[1] == greedy.output_ids
    assert run(engine, temperature=1.0, top_p=1e-9, max_new_tokens=8)[0].output_ids == greedy.output_ids


def test_stop_token_ids_stop_with_matched_token(engine):
    (free,) = run(engine, temperature=0, max_new_tokens=8)
    stop = free.output_ids[2]
    (job,) = run(engine, temperature=0, max_new_tokens=8, stop_token_ids=[stop])
    first = free.output_ids.index(stop)
    assert job.output_ids == free.output_ids[:first + 1]  # the stop token is kept, as SGLang does
    assert job.finish == {"type": "stop", "matched": stop}
    assert len(job.output_logprobs) == len(job.output_ids)


def test_eos_stops_unless_ignore_eos(engine):
    (free,) = run(engine, temperature=0, max_new_tokens=6)
    eos = free.output_ids[1]
    saved = engine.eos_ids
    engine.eos_ids = {eos}
    try:
        (job,) = run(engine, temperature=0, max_new_tokens=6)
        (ignoring,) = run(engine, temperature=0, max_new_tokens=6, ignore_eos=True)
    finally:
        engine.eos_ids = saved
    assert job.finish == {"type": "stop", "matched": eos} and job.output_ids[-1] == eos
    assert ignoring.output_ids == free.output_ids and ignoring.finish["type"] == "length"


def test_max_new_tokens_gives_length_and_zero_scores_only(engine):
    (job,) = run(engine, temperature=1.0, max_new_tokens=3, sampling_seed=1)
    assert len(job.output_ids) == 3 and job.finish == {"type": "length", "length": 3}
    (score,) = run(engine, max_new_tokens=0, logprob_start_len=0)
    assert score.output_ids == [] and score.finish == {"type": "length", "length": 0}
    logp = torch.log_softmax(full_logits(engine, PROMPT), -1)
    expected = [logp[t - 1, PROMPT[t]].item() for t in range(1, len(PROMPT))]
    assert score.input_logprobs[0] is None
    assert score.input_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    (tail,) = run(engine, max_new_tokens=0, logprob_start_len=2)
    assert tail.input_logprobs == pytest.approx(expected[1:], abs=1e-5)


def test_n_copies_share_the_seed_as_in_sglang(engine):
    jobs = run(engine, temperature=1.0, max_new_tokens=12, n=4, sampling_seed=7, rid="g")
    assert [j.rid for j in jobs] == ["g-0", "g-1", "g-2", "g-3"]
    # SGLang copies one sampling_params to the n copies and draws from (seed, position): the
    # copies are the same sample. Different samples need one request per seed (the trainer's way).
    assert len({tuple(j.output_ids) for j in jobs}) == 1
    again = run(engine, temperature=1.0, max_new_tokens=12, n=4, sampling_seed=7)
    assert [j.output_ids for j in again] == [j.output_ids for j in jobs]
    seeds = [run(engine, temperature=1.0, max_new_tokens=12, sampling_seed=s)[0].output_ids for s in (8, 9, 10)]
    assert len({tuple(o) for o in [jobs[0].output_ids, *seeds]}) == 4


def test_batched_prompts_of_different_lengths_match_single(engine):
    prompts = [[5], [7, 8, 9, 10, 11, 12, 13], [100, 200, 300]]
    alone = [run(engine, prompt=p, temperature=0, max_new_tokens=5)[0].output_ids for p in prompts]
    params = parse_sampling_params({"temperature": 0, "max_new_tokens": 5}, engine.vocab_size)
    futures = [f for i, p in enumerate(prompts) for f in engine.submit(p, params, rid=f"b{i}")]
    assert [f.result(timeout=WAIT).output_ids for f in futures] == alone


@pytest.mark.parametrize("sampling, prompt, needle", [
    ({"top_p": 0.0}, PROMPT, "top_p"), ({"temperature": -1}, PROMPT, "temperature"),
    ({"max_new_tokens": -2}, PROMPT, "max_new_tokens"), ({"top_k": 0}, PROMPT, "top_k"),
    ({"frequency_penalty": 0.5}, PROMPT, "not supported"), ({"bogus": 1}, PROMPT, "Unknown"),
    ({"stop_token_ids": [5000]}, PROMPT, "stop_token_ids"), ({"n": "2"}, PROMPT, "integer"),
    ({}, [1, 1000], "outside"), ({}, [], "empty"), ({"max_new_tokens": 250}, list(range(10)), "context"),
    ({"stop": ["x"]}, PROMPT, "tokenizer"), ({"sampling_seed": 2**31}, PROMPT, "int32"),
])
def test_bad_requests_are_refused(engine, sampling, prompt, needle):
    with pytest.raises(BadRequest, match=needle):
        run(engine, prompt=prompt, **sampling)


def _start_long(engine, rid):
    params = parse_sampling_params({"temperature": 1.0, "max_new_tokens": 200, "sampling_seed": 0}, engine.vocab_size)
    (future,) = engine.submit(PROMPT, params, rid=rid)
    deadline = time.time() + WAIT
    while not engine._running and time.time() < deadline:
        time.sleep(0.01)
    return future


def test_abort_request_ends_a_running_generation(engine):
    future = _start_long(engine, "long")
    assert engine.abort("long") == 1
    job = future.result(timeout=WAIT)
    assert job.finish["type"] == "abort" and len(job.output_ids) < 200


def test_pause_in_place_then_continue_finishes_normally(engine):
    future = _start_long(engine, "paused")
    engine.pause("in_place")
    (job,) = engine._running
    time.sleep(0.1)
    frozen = len(job.output_ids)
    time.sleep(0.3)
    assert not future.done() and len(job.output_ids) == frozen  # no step runs while paused
    resumer = threading.Timer(0.2, engine.resume)
    resumer.start()
    job = future.result(timeout=WAIT)
    assert job.finish == {"type": "length", "length": 200}
    aborted = _start_long(engine, "to-abort")
    engine.pause("abort")
    assert aborted.result(timeout=WAIT).finish["type"] == "abort"
    engine.resume()


def test_on_token_hook_sees_every_token_before_the_future_completes(engine):
    seen, done_at_call = [], []

    def hook(job, token, logprob):
        seen.append((job.rid, token, logprob))
        done_at_call.append(job.done.done())

    params = parse_sampling_params({"temperature": 1.0, "max_new_tokens": 7, "n": 2, "sampling_seed": 5},
                                   engine.vocab_size)
    futures = engine.submit(PROMPT, params, rid="hooked", return_logprob=True, on_token=hook)
    jobs = [f.result(timeout=WAIT) for f in futures]
    for job in jobs:
        assert [(t, lp) for r, t, lp in seen if r == job.rid] == list(zip(job.output_ids, job.output_logprobs))
        assert job.output_versions == [engine.weight_version] * 7 and job.weight_version == engine.weight_version
    assert not any(done_at_call)


def test_a_failing_hook_is_dropped_and_generation_goes_on(engine):
    calls = []

    def bad(job, token, logprob):
        calls.append(token)
        raise RuntimeError("listener bug")

    params = parse_sampling_params({"temperature": 0, "max_new_tokens": 5}, engine.vocab_size)
    (future,) = engine.submit(PROMPT, params, rid="bad-hook", on_token=bad)
    job = future.result(timeout=WAIT)
    assert len(calls) == 1 and len(job.output_ids) == 5 and job.finish["type"] == "length"
