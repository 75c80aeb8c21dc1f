"""Partial rollouts on the embedded engine: a request paused in place mid-generation, new
weights loaded by each transport, and the request finished under them, its KV cache kept; the
weight version of every output token in ``meta_info``; an aborted running request's partial
output.

The pause is taken by the per-token hook at the k-th token (in the scheduler thread, before
the next forward), so exactly k tokens come from the old weights whatever the machine's speed."""

import asyncio
import math
import os
import sys
import threading

import pytest
import torch
from http_helpers import post, serve

from megatron_rl.rollout.client import RolloutClient
from megatron_rl.rollout.engine import EmbeddedEngine
from megatron_rl.weights.sync import sync_weights

PROMPT = [11, 22, 33, 44]
K, N = 5, 12  # tokens under the old weights, tokens in all
WAIT = 60


@pytest.fixture
def fresh(tiny_model_dir):
    """An engine of its own: these tests change its weights."""
    eng = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.002)
    try:
        yield eng
    finally:
        eng.shutdown()


class InPlace:
    """The rollout client as a weight receiver that pauses in place and keeps the cache (the
    trainer's partial-rollout receiver); records how many tokens the job had at each load."""

    def __init__(self, client, job_tokens):
        self.client, self.job_tokens, self.seen = client, job_tokens, []

    def __getattr__(self, name):
        return getattr(self.client, name)

    async def pause_generation(self):
        await self.client.pause_generation(mode="in_place")

    async def flush_cache(self):
        return None

    async def _loading(self, name, *args, **kwargs):
        self.seen.append(self.job_tokens())
        return await getattr(self.client, name)(*args, **kwargs)

    async def update_weights_from_disk(self, *args, **kwargs):
        return await self._loading("update_weights_from_disk", *args, **kwargs)

    async def update_weights_from_tensor(self, *args, **kwargs):
        return await self._loading("update_weights_from_tensor", *args, **kwargs)

    async def update_weights_from_distributed(self, *args, **kwargs):
        return await self._loading("update_weights_from_distributed", *args, **kwargs)


def pause_at(engine, k, jobs):
    """A token hook that pauses generation in place once the job has ``k`` tokens."""
    def hook(job, token, logprob):
        if not jobs:
            jobs.append(job)
        if len(job.output_ids) == k:
            engine.pause("in_place")
    return hook


def hooked_submit(engine, monkeypatch, k):
    """Requests sent over HTTP get the pausing hook; returns the list their job lands in."""
    jobs, submit = [], engine.submit

    def hooked(*args, on_token=None, **kwargs):
        pause = pause_at(engine, k, jobs)

        def both(job, token, logprob):
            if on_token is not None:
                on_token(job, token, logprob)
            pause(job, token, logprob)
        return submit(*args, on_token=both, **kwargs)

    monkeypatch.setattr(engine, "submit", hooked)
    return jobs


async def paused_job(session, base, jobs, k):
    """Start the greedy request and wait until the hook has paused it at ``k`` tokens."""
    gen = asyncio.ensure_future(post(session, base + "/generate", {
        "input_ids": PROMPT, "rid": "partial", "return_logprob": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": N, "ignore_eos": True}}))
    while not (jobs and len(jobs[0].output_ids) >= k):
        assert not gen.done(), gen.result()
        await asyncio.sleep(0.005)
    return gen


def zero_norm_weights(engine):
    """The served weights with the final norm zeroed: every logit 0, so greedy picks token 0
    with log-prob -log(V) whatever the KV cache holds: tokens after the sync are unmistakable."""
    named = {n: t.clone() for n, t in engine.model.state_dict().items()}
    named["model.norm.weight"].zero_()
    return list(named.items())


SENDER = """
import asyncio, sys, torch
from transformers import AutoModelForCausalLM
from megatron_rl.rollout.client import RolloutClient
from megatron_rl.weights.sync import DistributedSender, sync_weights

class InPlace:  # pause in place, keep the cache (the trainer's partial-rollout receiver)
    def __init__(self, client): self.client = client
    def __getattr__(self, name): return getattr(self.client, name)
    async def pause_generation(self): await self.client.pause_generation(mode="in_place")
    async def flush_cache(self): return None

async def main(url, model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    async with RolloutClient([url]) as client:
        sender = await DistributedSender.connect(client, group_name="partial", timeout_s=60)
        try:
            await sync_weights(model.state_dict().items(), InPlace(client), transport="distributed",
                               bucket_bytes=32 << 10, sender=sender, flattened=True, weight_version="v2")
        finally:
            await sender.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
"""The trainer's end of the distributed transport, in a process of its own (one process
cannot hold both ranks of a named group): it sends the zero-norm weights, paused in place."""


async def _send_from_child(base, model_dir):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SENDER, base, str(model_dir), env=_env(),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, out.decode()[-3000:]


def _env():
    launcher = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"}
    return {**{k: v for k, v in os.environ.items() if k not in launcher}, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("transport", ["tensor", "disk", pytest.param("distributed", marks=pytest.mark.slow)])
def test_paused_request_finishes_under_new_weights_with_per_token_versions(fresh, monkeypatch, tmp_path, transport,
                                                                          tiny_model_dir):
    (reference,) = fresh.submit(PROMPT, _greedy(fresh), rid="ref")
    old_ids = reference.result(timeout=WAIT).output_ids
    jobs = hooked_submit(fresh, monkeypatch, K)
    new_weights = zero_norm_weights(fresh)

    async def body(session, base):
        gen = await paused_job(session, base, jobs, K)
        if transport == "distributed":
            receiver = InPlace(None, lambda: len(jobs[0].output_ids))
            receiver.seen.append(len(jobs[0].output_ids))  # paused by the hook: no forward runs until continue
            await _send_from_child(base, tiny_model_dir)
        else:
            async with RolloutClient([base]) as client:
                receiver = InPlace(client, lambda: len(jobs[0].output_ids))
                await sync_weights(new_weights, receiver, transport=transport, bucket_bytes=32 << 10,
                                   disk_dir=tmp_path / "w", weight_version="v2")
        return receiver.seen, await gen

    seen, (status, reply) = serve(fresh, body)
    assert status == 200 and seen and set(seen) == {K}  # every bucket landed while the job sat at K tokens
    meta = reply["meta_info"]
    assert meta["output_token_weight_versions"] == ["default"] * K + ["v2"] * (N - K)
    assert meta["weight_version"] == "v2" and meta["finish_reason"] == {"type": "length", "length": N}
    assert reply["output_ids"][:K] == old_ids[:K] and reply["output_ids"][K:] == [0] * (N - K)
    logprobs = [entry[0] for entry in meta["output_token_logprobs"]]
    assert logprobs[K:] == pytest.approx([-math.log(fresh.vocab_size)] * (N - K), abs=1e-5)


def test_resumed_request_keeps_its_kv_cache_from_the_old_weights(fresh, tiny_model_dir, tmp_path):
    """After the update the old prefix's KV is kept, not recomputed (SGLang's behaviour)."""
    from helpers.tiny_models import make_tiny_hf
    from rollout_helpers import TINY
    from transformers import AutoModelForCausalLM

    new_model = make_tiny_hf(tmp_path / "new", seed=4, **TINY).eval()
    old_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    jobs, paused = [], threading.Event()
    hook = pause_at(fresh, K, jobs)
    (future,) = fresh.submit(PROMPT, _greedy(fresh), rid="kv", return_logprob=True,
                             on_token=lambda job, t, lp: (hook(job, t, lp), len(job.output_ids) == K and paused.set()))
    assert paused.wait(WAIT)
    fresh.load_weights(new_model.state_dict().items())
    fresh.weight_version = "v2"
    fresh.resume()
    job = future.result(timeout=WAIT)
    assert job.output_versions == ["default"] * K + ["v2"] * (N - K)

    with torch.no_grad():  # by hand: the old weights' cache of the prefix, then the new model on it
        prefix = PROMPT + job.output_ids[:K - 1]
        cache = old_model(torch.tensor([prefix]), use_cache=True).past_key_values
        want_ids, want_logprobs, fed = [], [], job.output_ids[K - 1]
        for step in range(N - K):
            logits = new_model(torch.tensor([[fed]]), position_ids=torch.tensor([[len(prefix) + step]]),
                               past_key_values=cache, use_cache=True).logits[0, -1]
            fed = int(logits.argmax())
            want_ids.append(fed)
            want_logprobs.append(float(torch.log_softmax(logits, -1)[fed]))
        recomputed = new_model(torch.tensor([PROMPT + job.output_ids[:K]])).logits[0, -1]
    assert job.output_ids[K:] == want_ids
    assert job.output_logprobs[K:] == pytest.approx(want_logprobs, abs=1e-5)
    recomputed_logprob = float(torch.log_softmax(recomputed, -1)[job.output_ids[K]])
    assert abs(recomputed_logprob - job.output_logprobs[K]) > 1e-4  # the check above tells kept from recomputed


def test_abort_of_a_running_request_returns_its_partial_output(fresh, monkeypatch):
    jobs = hooked_submit(fresh, monkeypatch, K)

    async def body(session, base):
        gen = await paused_job(session, base, jobs, K)
        status, _ = await post(session, base + "/abort_request", {"rid": "partial"})
        return status, await gen

    abort_status, (status, reply) = serve(fresh, body)
    fresh.resume()
    meta = reply["meta_info"]
    assert abort_status == 200 and status == 200 and meta["finish_reason"]["type"] == "abort"
    assert len(reply["output_ids"]) == len(meta["output_token_logprobs"]) == K == meta["completion_tokens"]
    assert reply["output_ids"] == [entry[1] for entry in meta["output_token_logprobs"]]
    assert meta["output_token_weight_versions"] == ["default"] * K


def _greedy(engine):
    from megatron_rl.rollout.sampling import parse_sampling_params

    return parse_sampling_params({"temperature": 0, "max_new_tokens": N, "ignore_eos": True}, engine.vocab_size)
