"""``stream: true`` on /generate, as SGLang v0.5.4 streams it (entrypoints/http_server.py).

SSE events ``data: {json}`` + blank line, ending ``data: [DONE]``; per chunk: ``text``
cumulative, ``output_ids`` only the new ids, ``meta_info.output_token_logprobs`` cumulative,
``finish_reason`` null until the last chunk (which alone has ``e2e_latency``); several
samples interleave and carry ``index``. The streamed result equals the non-streamed one.
"""

import asyncio

from http_helpers import post, post_sse, serve
from qwen_tiny import EOS


def _request(**extra):
    body = {"input_ids": [9707, 1879], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "sampling_seed": 11, "temperature": 0.8}}
    body.update(extra)
    return body


def test_stream_chunks_add_up_to_the_non_streamed_reply(qwen_engine):
    async def body(session, base):
        whole = await post(session, base + "/generate", _request())
        streamed = await post_sse(session, base + "/generate", _request(stream=True))
        return whole, streamed
    (status, whole), (sse_status, ctype, events) = serve(qwen_engine, body)
    assert status == sse_status == 200 and ctype.startswith("text/event-stream")
    assert events[-1] == "[DONE]" and len(events) == 1 + 6  # a chunk per token
    chunks = events[:-1]
    assert all("index" not in c for c in chunks)  # one prompt, n = 1
    assert [t for c in chunks for t in c["output_ids"]] == whole["output_ids"]  # deltas
    assert all(len(c["output_ids"]) == 1 for c in chunks)
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == [1, 2, 3, 4, 5, 6]
    for i, c in enumerate(chunks):  # log-probs cumulative, text cumulative
        assert c["meta_info"]["output_token_logprobs"] == whole["meta_info"]["output_token_logprobs"][:i + 1]
        assert whole["text"].startswith(c["text"])
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * 5
    last = chunks[-1]
    assert last["text"] == whole["text"] and last["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]
    assert "e2e_latency" in last["meta_info"] and all("e2e_latency" not in c["meta_info"] for c in chunks[:-1])


def test_stream_of_a_batch_with_n_interleaves_indexed_samples(qwen_engine):
    request = {"input_ids": [[9707], [1879, 0]], "stream": True,
               "sampling_params": [{"max_new_tokens": 3, "n": 2, "sampling_seed": 5}, {"max_new_tokens": 2}]}

    async def body(session, base):
        return await post_sse(session, base + "/generate", request)
    status, _, events = serve(qwen_engine, body)
    assert status == 200 and events[-1] == "[DONE]"
    by_index: dict[int, list] = {}
    for chunk in events[:-1]:
        by_index.setdefault(chunk["index"], []).append(chunk)
    assert sorted(by_index) == [0, 1, 2]  # prompt-major: p0s0, p0s1, p1s0
    assert [len(by_index[i]) for i in range(3)] == [3, 3, 2]
    assert all(c["meta_info"]["finish_reason"] for c in (by_index[0][-1], by_index[1][-1], by_index[2][-1]))
    # n copies share the seed (SGLang's n): identical samples
    assert [c["output_ids"] for c in by_index[0]] == [c["output_ids"] for c in by_index[1]]


def test_stream_does_not_send_a_stop_string_it_will_trim(echo_engine):
    world = [1879]  # " world": the echo model repeats it
    request = {"input_ids": world, "stream": True,
               "sampling_params": {"max_new_tokens": 5, "stop": ["world world"]}}

    async def body(session, base):
        return await post_sse(session, base + "/generate", request)
    _, _, events = serve(echo_engine, body)
    chunks = events[:-1]
    # after " world" the output may be the start of "world world": held back; then matched and trimmed
    assert len(chunks) == 1 and chunks[0]["text"] == " " and chunks[0]["output_ids"] == world * 2
    assert chunks[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": "world world"}


def test_stream_of_a_refused_request_is_a_400_and_a_hang_up_aborts(echo_engine):
    async def body(session, base):
        refused = await post(session, base + "/generate", {"input_ids": [1], "stream": True,
                                                           "sampling_params": {"top_p": 7}})
        async with session.post(base + "/generate", json={
                "input_ids": [9707], "stream": True, "rid": "gone",
                "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}) as resp:
            await resp.content.readuntil(b"\n\n")  # the first chunk arrived: it is running
            job = echo_engine._running[0]
            await post(session, base + "/pause_generation", {"mode": "in_place"})  # hold it there
        while not job.done.done():  # the hang-up cancels the handler, which aborts the job
            await asyncio.sleep(0.02)
        await post(session, base + "/continue_generation", {})
        return refused, job
    (status, reply), job = serve(echo_engine, body)
    assert status == 400 and "top_p" in reply["message"]
    assert job.rid == "gone" and job.finish["type"] == "abort" and len(job.output_ids) < 200


def test_stream_keeps_special_tokens_when_asked(echo_engine):
    eos = echo_engine.tokenizer.convert_tokens_to_ids(EOS)
    request = {"input_ids": [eos], "stream": True, "sampling_params": {
        "max_new_tokens": 2, "ignore_eos": True, "skip_special_tokens": False}}

    async def body(session, base):
        return await post_sse(session, base + "/generate", request)
    _, _, events = serve(echo_engine, body)
    assert [c["text"] for c in events[:-1]] == [EOS, EOS + EOS]


def test_stream_never_sends_a_stop_token_it_trims(echo_engine):
    eos = echo_engine.tokenizer.convert_tokens_to_ids(EOS)
    requests = [  # (request, the one chunk's text): the stop token / EOS is trimmed, never streamed first
        ({"input_ids": [1879], "sampling_params": {"stop_token_ids": [1879], "max_new_tokens": 4}}, ""),
        ({"input_ids": [eos], "sampling_params": {"skip_special_tokens": False}}, ""),
        ({"input_ids": [eos], "sampling_params": {"skip_special_tokens": False, "no_stop_trim": True}}, EOS),
    ]

    async def body(session, base):
        return [await post_sse(session, base + "/generate", {**r, "stream": True}) for r, _ in requests]
    for (_, _, events), (request, text) in zip(serve(echo_engine, body), requests):
        assert [c["text"] for c in events[:-1]] == [text], request
        assert events[-2]["meta_info"]["finish_reason"]["type"] == "stop"
