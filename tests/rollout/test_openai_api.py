"""OpenAI-compatible endpoints, as SGLang v0.5.4 serves them (entrypoints/openai/).

Shapes from ``protocol.py``: ``text_completion`` / ``chat.completion`` objects with
``choices[i].{index, text | message, logprobs, finish_reason, matched_stop}``, ``usage``
(each prompt counted once, every sample's completion tokens) and ``metadata.weight_version``;
streamed as ``data:`` events ending ``[DONE]``, chat starting each sample with a
``role: assistant`` delta and ending it with a finish chunk. Sampling equals /generate's:
a seeded request gives the same tokens through either door.
"""

import json

from http_helpers import post, post_sse, serve
from qwen_tiny import GENERATION_DEFAULTS


def _template_ids(engine, messages):
    rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return engine.tokenizer.encode(rendered, add_special_tokens=False)


def test_models_and_unknown_model(qwen_engine):
    async def body(session, base):
        async with session.get(base + "/v1/models") as resp:
            models = await resp.json()
        async with session.get(base + "/v1/models/nope") as resp:
            return models, resp.status, await resp.json()
    models, status, missing = serve(qwen_engine, body)
    card = models["data"][0]
    assert models["object"] == "list" and card["id"] == qwen_engine.model_path and card["object"] == "model"
    assert card["max_model_len"] == qwen_engine.context_len
    assert status == 404 and missing["error"]["code"] == "model_not_found"


def test_completion_matches_generate_and_counts_usage(qwen_engine):
    prompt = "Hello world"
    ids = qwen_engine.tokenizer.encode(prompt)
    sampling = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 5, "n": 2, "sampling_seed": 3}

    async def body(session, base):
        native = await post(session, base + "/generate", {"input_ids": ids, "sampling_params": sampling,
                                                          "return_logprob": True})
        oai = await post(session, base + "/v1/completions", {
            "model": "m", "prompt": prompt, "max_tokens": 5, "temperature": 0.9, "top_p": 0.95, "n": 2,
            "seed": 3, "logprobs": 0})
        echo = await post(session, base + "/v1/completions", {"prompt": ids, "max_tokens": 2, "echo": True,
                                                              "logprobs": 0})
        return native, oai, echo
    (_, native), (status, oai), (_, echo) = serve(qwen_engine, body)
    assert status == 200 and oai["object"] == "text_completion" and oai["model"] == "m"
    assert [c["index"] for c in oai["choices"]] == [0, 1]
    assert [c["text"] for c in oai["choices"]] == [r["text"] for r in native]
    assert oai["choices"][0]["logprobs"]["token_logprobs"] == [
        e[0] for e in native[0]["meta_info"]["output_token_logprobs"]]
    assert oai["choices"][0]["finish_reason"] == "length" and oai["choices"][0]["matched_stop"] is None
    assert oai["usage"]["prompt_tokens"] == len(ids) and oai["usage"]["completion_tokens"] == 10
    assert oai["usage"]["total_tokens"] == len(ids) + 10
    assert oai["metadata"] == {"weight_version": qwen_engine.weight_version}
    echoed = echo["choices"][0]
    assert echoed["text"].startswith(prompt)  # the prompt's log-probs come first, the first one null
    assert len(echoed["logprobs"]["token_logprobs"]) == len(ids) + 2 and echoed["logprobs"]["token_logprobs"][0] is None
    assert "".join(echoed["logprobs"]["tokens"]) == echoed["text"]


def test_chat_uses_the_template_and_generation_config_defaults(qwen_engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]}]
    flat = [messages[0], {"role": "user", "content": "What is 2+2?"}]  # text parts joined by a space
    ids = _template_ids(qwen_engine, flat)

    async def body(session, base):
        chat = await post(session, base + "/v1/chat/completions", {
            "messages": messages, "max_tokens": 6, "seed": 9, "logprobs": True})
        native = await post(session, base + "/generate", {"input_ids": ids, "return_logprob": True,
                                                          "sampling_params": {"max_new_tokens": 6, "sampling_seed": 9,
                                                                              **GENERATION_DEFAULTS}})
        return chat, native
    (status, chat), (_, native) = serve(qwen_engine, body)
    assert status == 200 and chat["object"] == "chat.completion", chat
    choice = chat["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == (native["text"] or None)
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == [
        e[0] for e in native["meta_info"]["output_token_logprobs"]]
    token = choice["logprobs"]["content"][0]
    assert token["bytes"] == list(token["token"].encode()) and token["top_logprobs"] == []
    assert chat["usage"]["prompt_tokens"] == len(ids) and chat["usage"]["completion_tokens"] == 6


def test_chat_stream_role_content_finish_usage(qwen_engine):
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1, "n": 2,
               "stream": True, "stream_options": {"include_usage": True}}

    async def body(session, base):
        whole = await post(session, base + "/v1/chat/completions", {**request, "stream": False})
        return whole, await post_sse(session, base + "/v1/chat/completions", request)
    (_, whole), (status, _, events) = serve(qwen_engine, body)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant" and mine[0]["delta"]["content"] == ""
        content = "".join(c["delta"]["content"] or "" for c in mine)
        assert content == (whole["choices"][index]["message"]["content"] or "")
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"]["content"] is None
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_completion_stream_deltas(qwen_engine):
    request = {"prompt": "Hello", "max_tokens": 5, "seed": 4, "logprobs": 0}

    async def body(session, base):
        whole = await post(session, base + "/v1/completions", request)
        return whole, await post_sse(session, base + "/v1/completions", {**request, "stream": True})
    (_, whole), (_, _, events) = serve(qwen_engine, body)
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [lp for c in chunks for lp in c["choices"][0]["logprobs"]["token_logprobs"]] == whole[
        "choices"][0]["logprobs"]["token_logprobs"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c["usage"] is None for c in chunks)


def test_chat_without_max_tokens_fills_the_context(echo_engine):
    messages = [{"role": "user", "content": "Hello"}]

    async def body(session, base):
        return await post(session, base + "/v1/chat/completions", {
            "messages": messages, "ignore_eos": True, "temperature": 0})
    status, reply = serve(echo_engine, body)
    prompt = len(_template_ids(echo_engine, messages))
    assert status == 200 and reply["usage"]["completion_tokens"] == echo_engine.context_len - prompt - 1


BAD = [
    ("/v1/completions", {"prompt": ""}, "Prompt cannot be empty"),
    ("/v1/completions", {"prompt": "a", "logprobs": 2}, "top log-probs"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text only"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
]


def test_bad_openai_requests_get_400(qwen_engine):
    async def body(session, base):
        return [await post(session, base + path, request) for path, request, _ in BAD]
    for (status, reply), (path, request, needle) in zip(serve(qwen_engine, body), BAD):
        assert status == 400 and reply["object"] == "error" and needle in reply["message"], (path, request, reply)


def test_server_info_and_loads_answer_what_clients_read(qwen_engine):
    async def body(session, base):
        out = {}
        for path in ("/get_server_info", "/v1/loads?include=core", "/get_load", "/v1/loads?include=bogus"):
            async with session.get(base + path) as resp:
                out[path] = (resp.status, json.loads(await resp.text()))
        return out
    out = serve(qwen_engine, body)
    status, info = out["/get_server_info"]
    assert status == 200 and info["model_path"] == qwen_engine.model_path and info["version"] == "0.5.4"
    for key, value in {"tp_size": 1, "pp_size": 1, "dp_size": 1, "ep_size": 1, "disaggregation_mode": "null",
                       "context_length": qwen_engine.context_len, "weight_version": qwen_engine.weight_version,
                       "max_running_requests": qwen_engine.max_batch_size}.items():
        assert info[key] == value, key
    assert info["max_total_num_tokens"] > 0 and isinstance(info["internal_states"], list)
    status, loads = out["/v1/loads?include=core"]
    load = loads["loads"][0]
    assert status == 200 and load["dp_rank"] == 0 and load["num_running_reqs"] == load["num_waiting_reqs"] == 0
    assert out["/get_load"][1] == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    assert out["/v1/loads?include=bogus"][0] == 400
