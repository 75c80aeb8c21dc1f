"""The embedded engine's HTTP API (in-process aiohttp server): SGLang reply shapes, 4xx, control."""

import asyncio

import pytest
import torch
from http_helpers import post, serve

from megatron_rl.rollout.client import RolloutClient
from megatron_rl.rollout.types import RolloutRequest, SamplingParams


def test_generate_reply_has_sglang_shape(engine):
    async def body(session, base):
        return await post(session, base + "/generate", {
            "input_ids": [1, 2, 3], "rid": "abc", "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"temperature": 0, "max_new_tokens": 4}})
    status, reply = serve(engine, body)
    assert status == 200 and set(reply) == {"text", "output_ids", "meta_info"}
    meta = reply["meta_info"]
    assert meta["id"] == "abc" and meta["finish_reason"] == {"type": "length", "length": 4}
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (3, 4)
    assert [e[1] for e in meta["output_token_logprobs"]] == reply["output_ids"]
    assert all(e[2] is None and e[0] <= 0 for e in meta["output_token_logprobs"])
    assert [e[1] for e in meta["input_token_logprobs"]] == [1, 2, 3] and meta["input_token_logprobs"][0][0] is None


def test_batched_input_ids_with_n_are_prompt_major(engine):
    async def body(session, base):
        return await post(session, base + "/generate", {
            "input_ids": [[1, 2], [3, 4, 5]], "rid": ["p", "q"], "return_logprob": [True, False],
            "sampling_params": [{"max_new_tokens": 2, "n": 2, "sampling_seed": 1}, {"max_new_tokens": 3, "n": 2}]})
    status, reply = serve(engine, body)
    assert status == 200 and [r["meta_info"]["id"] for r in reply] == ["p-0", "p-1", "q-0", "q-1"]
    assert [len(r["output_ids"]) for r in reply] == [2, 2, 3, 3]
    assert "output_token_logprobs" in reply[0]["meta_info"] and "output_token_logprobs" not in reply[2]["meta_info"]


BAD = [
    (None, b"{not json", "not valid JSON"), (None, b"[1, 2]", "JSON object"),
    ({"sampling_params": {}}, None, "input_ids"), ({"input_ids": []}, None, "non-empty"),
    ({"input_ids": [1, 5000]}, None, "outside"), ({"input_ids": [1, "a"]}, None, "integers"),
    ({"input_ids": [[1], []]}, None, "non-empty"),
    ({"input_ids": [1], "sampling_params": {"top_p": 0}}, None, "top_p"),
    ({"input_ids": [1], "sampling_params": {"temperature": -1}}, None, "temperature"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": -1}}, None, "max_new_tokens"),
    ({"input_ids": [1], "sampling_params": "hot"}, None, "object"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}]}, None, "1 entries for 2 prompts"),
    ({"input_ids": [1], "stream": "yes"}, None, "stream"),
    ({"input_ids": [1], "sampling_params": {"custom_params": 3}}, None, "custom_params"),
    ({"input_ids": [1], "sampling_params": {"skip_special_tokens": "no"}}, None, "skip_special_tokens"),
    ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5}, None, "logprob_start_len"),
    ({"text": "hello"}, None, "tokenizer"),
    ({"input_ids": [1], "return_logprob": True, "top_logprobs_num": 5}, None, "top_logprobs_num"),
]


def test_bad_requests_get_400_and_the_server_keeps_serving(engine):
    async def body(session, base):
        answers = [await post(session, base + "/generate", b, raw) for b, raw, _ in BAD]
        async with session.get(base + "/health_generate") as resp:
            healthy = resp.status
        ok = await post(session, base + "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}})
        return answers, healthy, ok
    answers, healthy, ok = serve(engine, body)
    for (status, reply), (_, _, needle) in zip(answers, BAD):
        assert status == 400, reply
        assert reply["object"] == "error" and reply["code"] == 400 and needle in reply["message"], reply
    assert healthy == 200 and ok[0] == 200


def test_health_answers_during_generation_and_abort_request_aborts(engine):
    async def body(session, base):
        gen = asyncio.ensure_future(post(session, base + "/generate", {
            "input_ids": [1, 2, 3], "rid": "slow", "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}))
        while not engine._running:
            await asyncio.sleep(0.01)
        async with session.get(base + "/health_generate") as resp:
            health, busy = resp.status, not gen.done()
        async with session.post(base + "/abort_request", json={"rid": "slow"}) as resp:
            aborted = resp.status
        return health, busy, aborted, await gen
    health, busy, aborted, (status, reply) = serve(engine, body)
    assert health == 200 and busy and aborted == 200
    assert status == 200 and reply["meta_info"]["finish_reason"]["type"] == "abort"


def test_control_endpoints(engine):
    async def body(session, base):
        out = {}
        for path in ["/flush_cache", "/pause_generation", "/continue_generation", "/release_memory_occupation",
                     "/resume_memory_occupation"]:
            async with session.post(base + path, json={}) as resp:
                out[path] = resp.status
        async with session.get(base + "/get_model_info") as resp:
            out["info"] = await resp.json()
        return out
    out = serve(engine, body)
    assert all(out[p] == 200 for p in out if p.startswith("/"))
    assert out["info"]["is_generation"] is True and out["info"]["weight_version"] == engine.weight_version


def test_rollout_client_samples_and_scores(engine, tiny_model_dir):
    seqs = [[3, 1, 4, 1, 5], [9, 2, 6]]

    async def body(session, base):
        async with RolloutClient([base]) as client:
            requests = [RolloutRequest(f"r{i}", s, SamplingParams(temperature=0, max_new_tokens=3, n=2),
                                       metadata={"row": i}) for i, s in enumerate(seqs)]
            return await client.generate(requests), await client.score(seqs)
    samples, scores = serve(engine, body)
    assert [(s.request_id, s.sample_index) for s in samples] == [("r0", 0), ("r0", 1), ("r1", 0), ("r1", 1)]
    assert all(len(s.response_ids) == len(s.response_logprobs) == 3 and s.finish_reason == "length" for s in samples)
    assert samples[2].metadata == {"row": 1} and samples[0].attempts == 1 and samples[0].server_url
    for seq, got in zip(seqs, scores):
        with torch.no_grad():
            logp = torch.log_softmax(engine.model(torch.tensor([seq])).logits[0], -1)
        assert got == pytest.approx([logp[t - 1, seq[t]].item() for t in range(1, len(seq))], abs=1e-5)
