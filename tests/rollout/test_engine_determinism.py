"""Deterministic mode: a seeded request's tokens and log-probs do not depend on its batch.

What exact resume of an RL run needs: the same request (prompt, sampling params with
``sampling_seed``) returns bit-identical output ids and log-probs alone, amid concurrent
requests of other lengths and kinds, and from a restarted server with the same weights.
"""

import asyncio
import json
import time
import urllib.request

import pytest
import torch
from rollout_helpers import one_torch_thread

from megatron_rl.config.rollout import RolloutConfig
from megatron_rl.rollout.client import RolloutClient
from megatron_rl.rollout.sampling import parse_sampling_params
from megatron_rl.rollout.servers import ServerManager
from megatron_rl.rollout.types import RolloutRequest, SamplingParams

MINE = ([11, 22, 33, 44, 55], {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 16, "sampling_seed": 1234})
OTHERS = [  # 7 requests of other lengths and kinds: seeded, unseeded, greedy, top-k, n > 1
    ([7], {"max_new_tokens": 20, "sampling_seed": 1}),
    ([3, 9, 27], {"max_new_tokens": 6}),
    (list(range(100, 117)), {"temperature": 0, "max_new_tokens": 10}),
    ([5, 6], {"top_k": 20, "max_new_tokens": 24, "sampling_seed": 2}),
    (list(range(200, 230)), {"max_new_tokens": 5, "n": 2}),
    ([900, 901, 902, 903], {"temperature": 1.3, "max_new_tokens": 12, "sampling_seed": 1234}),
    ([42] * 9, {"max_new_tokens": 9, "sampling_seed": 77}),
]
WAIT = 120


@pytest.fixture(scope="module", params=["transposed", "hf", "transposed-bf16"])
def det_engine(tiny_model_dir, request):
    """Both weight layouts: seeded rows decode together (transposed) or one by one (hf); and a
    bf16 engine (serve --dtype bfloat16 --deterministic keeps the column-major layout)."""
    from megatron_rl.rollout.engine import EmbeddedEngine

    with one_torch_thread():
        eng = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.05, deterministic=True,
                             transposed_weights=request.param.startswith("transposed"),
                             dtype=torch.bfloat16 if request.param.endswith("bf16") else torch.float32)
        try:
            yield eng
        finally:
            eng.shutdown()


def submit(engine, prompt, sampling, rid):
    params = parse_sampling_params({"ignore_eos": True, **sampling}, engine.vocab_size)
    return engine.submit(prompt, params, rid=rid, return_logprob=True)


def result(futures):
    return [(f.result(timeout=WAIT).output_ids, f.result(timeout=WAIT).output_logprobs) for f in futures]


def amid_others(engine, where: int):
    """MINE submitted at index ``where`` among OTHERS, all inside one batching window."""
    requests = list(OTHERS)
    requests.insert(where, MINE)
    futures = [submit(engine, p, s, f"r{i}") for i, (p, s) in enumerate(requests)]
    outputs = [result(f) for f in futures]
    return outputs[where][0]


def test_seeded_request_is_bit_identical_alone_and_amid_other_requests(det_engine):
    (alone,) = result(submit(det_engine, *MINE, "alone"))
    assert len(alone[0]) == 16
    for where in (0, len(OTHERS)):
        assert amid_others(det_engine, where) == alone  # exact: ids and float log-probs
    # Arriving while another batch runs: MINE waits, then shares the next batch with others.
    running = [submit(det_engine, p, s, f"run{i}") for i, (p, s) in enumerate(OTHERS[:3])]
    deadline = time.monotonic() + WAIT
    while not det_engine._running and time.monotonic() < deadline:
        time.sleep(0.001)
    later = [submit(det_engine, p, s, f"later{i}") for i, (p, s) in enumerate(OTHERS[3:])]
    assert result(submit(det_engine, *MINE, "late-mine"))[0] == alone
    [result(f) for f in running + later]


def test_seeded_rows_decode_in_one_batch_with_the_transposed_layout(det_engine):
    """The speed half of the contract: seeded jobs share decode forwards (``rowwise``), not one each."""
    seen: list[tuple[int, int]] = []  # (seeded row groups, rows in the largest), read in the scheduler thread

    def hook(job, token, logprob):
        seen.append((len(det_engine._solos), max((len(r.jobs) for r in det_engine._solos), default=0)))

    seeded = [(p, s) for p, s in [MINE, *OTHERS] if "sampling_seed" in s]
    futures = []
    for i, (prompt, sampling) in enumerate(seeded):
        params = parse_sampling_params({"ignore_eos": True, **sampling}, det_engine.vocab_size)
        futures += det_engine.submit(prompt, params, rid=f"hook{i}", on_token=hook)
    [f.result(timeout=WAIT) for f in futures]
    groups, widest = max(g for g, _ in seen), max(w for _, w in seen)
    if det_engine.transposed:
        assert groups == 1 and widest == len(seeded)
    else:
        assert groups == len(seeded) and widest == 1


def test_n_copies_of_a_seeded_request_are_identical_and_equal_to_n_1(det_engine):
    prompt, sampling = MINE
    copies = result(submit(det_engine, prompt, {**sampling, "n": 4}, "copies"))
    (single,) = result(submit(det_engine, prompt, sampling, "single"))
    assert copies == [single] * 4


def test_unseeded_requests_and_other_seeds_still_differ(det_engine):
    prompt, sampling = MINE
    unseeded = {k: v for k, v in sampling.items() if k != "sampling_seed"}
    outs = [result(submit(det_engine, prompt, unseeded, f"u{i}"))[0][0] for i in range(3)]
    assert len({tuple(o) for o in outs}) == 3
    seeded = [result(submit(det_engine, prompt, {**sampling, "sampling_seed": s}, f"s{s}"))[0][0] for s in range(3)]
    assert len({tuple(o) for o in seeded}) == 3


def _requests(tag: str, with_others: bool) -> list[RolloutRequest]:
    def req(i, prompt, sampling):
        sp = SamplingParams(temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0),
                            top_k=sampling.get("top_k", -1), max_new_tokens=sampling["max_new_tokens"],
                            n=sampling.get("n", 1), seed=sampling.get("sampling_seed"), ignore_eos=True)
        return RolloutRequest(f"{tag}-{i}", list(prompt), sp)

    chosen = [MINE, *OTHERS] if with_others else [MINE]
    return [req(i, p, s) for i, (p, s) in enumerate(chosen)]


async def _generate(urls, requests):
    async with RolloutClient(urls) as client:
        return await client.generate(requests)


@pytest.mark.slow
def test_seeded_request_survives_a_server_restart(tiny_model_dir, tmp_path):
    """Two launches through ServerManager (`megatron-rl serve --deterministic`), same weights."""
    cfg = RolloutConfig(base_port=0, health_timeout_s=120, deterministic=True)
    outputs = []
    for launch in range(2):
        with ServerManager(cfg, str(tiny_model_dir), log_dir=tmp_path / f"logs{launch}",
                           extra_args=["--threads", "1"]) as manager:
            with urllib.request.urlopen(manager.urls[0] + "/get_server_info", timeout=30) as resp:
                assert json.loads(resp.read())["enable_deterministic_inference"] is True
            alone = asyncio.run(_generate(manager.urls, _requests(f"a{launch}", False)))
            crowd = asyncio.run(_generate(manager.urls, _requests(f"c{launch}", True)))
        outputs += [(s.response_ids, s.response_logprobs) for s in (alone[0], crowd[0])]
    assert len(outputs[0][0]) == 16 and outputs == [outputs[0]] * 4


def test_seeded_long_prompt_fed_in_chunks_is_bit_identical_amid_others(tiny_model_dir):
    """Chunked prefill: a seeded prompt longer than a chunk is fed in the same chunks from position 0
    whatever else waits or runs, so its bits do not change either."""
    from megatron_rl.rollout.engine import EmbeddedEngine

    with one_torch_thread():
        eng = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.05, deterministic=True,
                             chunked_prefill_size=6)
        try:
            long_mine = (list(range(300, 323)), MINE[1])
            (alone,) = result(submit(eng, *long_mine, "alone"))
            crowd = [submit(eng, p, s, f"c{i}") for i, (p, s) in enumerate(OTHERS[:4])]
            (amid,) = result(submit(eng, *long_mine, "amid"))
            [result(f) for f in crowd]
            assert amid == alone and len(alone[0]) == 16
        finally:
            eng.shutdown()


def test_a_model_without_pluggable_attention_falls_back_to_one_row_per_job(tiny_model_dir, monkeypatch, caplog):
    from transformers import PreTrainedModel

    from megatron_rl.rollout.engine import EmbeddedEngine

    def refuse(self, name):
        raise ValueError(f"{type(self).__name__} does not support {name}")

    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation", refuse)
    with one_torch_thread():
        eng = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.05, deterministic=True)
        try:
            assert not eng._rowwise and "one row per forward" in caplog.text
            (alone,) = result(submit(eng, *MINE, "alone"))
            assert amid_others(eng, 0) == alone
        finally:
            eng.shutdown()
