"""SGLang's text rules (v0.5.4 detokenizer): skip_special_tokens, no_stop_trim, incremental release.

Written from SGLang's documented sampling parameters (``skip_special_tokens`` default true,
``no_stop_trim`` default false: "Don't trim stop words or EOS token from the generated
text") and its detokenizer: the matched stop token is dropped before decoding, text is cut
where a matched stop string starts, ``output_ids`` keep everything. Unit cases use the real
Qwen2 BPE; HTTP cases use the echo model (it repeats its last prompt token).
"""

import pytest
from http_helpers import post, serve
from qwen_tiny import EOS, qwen_tokenizer

from megatron_rl.rollout.detokenize import (
    IncrementalText,
    TextOptions,
    final_text,
    trim_matched_stop,
)


@pytest.fixture(scope="module")
def tok():
    return qwen_tokenizer()


def test_trim_matched_stop_follows_sglang():
    stop_token = {"type": "stop", "matched": 7}
    assert trim_matched_stop([1, 2, 7], stop_token, no_stop_trim=False) == [1, 2]
    assert trim_matched_stop([1, 2, 7], stop_token, no_stop_trim=True) == [1, 2, 7]
    assert trim_matched_stop("a STOP b", {"type": "stop", "matched": "STOP"}, False) == "a "
    assert trim_matched_stop("a STOP b", {"type": "stop", "matched": "STOP"}, True) == "a STOP b"
    assert trim_matched_stop([1, 2], {"type": "length", "length": 2}, False) == [1, 2]
    assert trim_matched_stop([1, 0], {"type": "stop", "matched": 0}, False) == [1, 0]  # falsy: kept, as SGLang
    assert trim_matched_stop("x", None, False) == "x"


def test_final_text_special_tokens_and_stop_trim(tok):
    eos = tok.convert_tokens_to_ids(EOS)
    ids = tok.encode("Hello world") + [eos]
    by_eos = {"type": "stop", "matched": eos}
    cases = [  # (options, finish, text)
        (TextOptions(), by_eos, "Hello world"),
        (TextOptions(skip_special_tokens=False), by_eos, "Hello world"),  # trimmed, not skipped
        (TextOptions(skip_special_tokens=False, no_stop_trim=True), by_eos, "Hello world" + EOS),
        (TextOptions(no_stop_trim=True), by_eos, "Hello world"),  # kept, then skipped as special
        (TextOptions(skip_special_tokens=False), {"type": "length", "length": 3}, "Hello world" + EOS),
        (TextOptions(), {"type": "stop", "matched": " wor"}, "Hello"),
        (TextOptions(no_stop_trim=True), {"type": "stop", "matched": " wor"}, "Hello world"),
    ]
    for options, finish, text in cases:
        assert final_text(tok, [1, 2], ids, finish, options) == text, (options, finish)


def test_incremental_release_holds_incomplete_utf8_and_never_retracts(tok):
    ids = tok.encode("ab 龘 c")  # 龘 is two byte-level tokens, each alone an invalid UTF-8 sequence
    state, texts = IncrementalText(tok, tok.encode("prompt"), TextOptions()), []
    for count in range(1, len(ids) + 1):
        texts.append(state.update(ids[:count], {"type": "length"} if count == len(ids) else None))
    assert all("\ufffd" not in t for t in texts)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # released text only grows
    assert texts[-1] == "ab 龘 c" == tok.decode(ids)


def test_stream_holds_back_a_possible_stop_prefix(tok):
    ids = tok.encode(" world world world")
    state = IncrementalText(tok, [], TextOptions(stop=("world world",)))
    assert not state.may_stream(ids[:1])  # " world" may begin "world world"
    assert state.may_stream(tok.encode(" ok"))
    assert IncrementalText(tok, [], TextOptions(stream_interval=2)).may_stream(ids[:1])  # 1 % 2 == 1
    assert not IncrementalText(tok, [], TextOptions(stream_interval=2)).may_stream(ids[:2])


def _generate(engine, bodies):
    async def body(session, base):
        return [await post(session, base + "/generate", b) for b in bodies]
    return serve(engine, body)


def test_http_text_rules_on_eos_stop_tokens_and_stop_strings(echo_engine, tok):
    eos, world = tok.convert_tokens_to_ids(EOS), tok.encode(" world")[0]
    ends_eos, ends_world = tok.encode("x") + [eos], tok.encode("Hello world")
    cases = [  # (prompt, sampling_params, output_ids, finish matched, text)
        (ends_eos, {}, [eos], eos, ""),
        (ends_eos, {"skip_special_tokens": False}, [eos], eos, ""),
        (ends_eos, {"skip_special_tokens": False, "no_stop_trim": True}, [eos], eos, EOS),
        (ends_eos, {"ignore_eos": True, "max_new_tokens": 2, "skip_special_tokens": False}, [eos, eos], None,
         EOS + EOS),
        (ends_world, {"stop_token_ids": [world]}, [world], world, ""),
        (ends_world, {"stop_token_ids": [world], "no_stop_trim": True}, [world], world, " world"),
        (ends_world, {"stop": ["world world"]}, [world, world], "world world", " "),
        (ends_world, {"stop": "world world", "no_stop_trim": True}, [world, world], "world world", " world world"),
        (ends_world, {"max_new_tokens": 2, "custom_params": {"return_top_p_token_ids": True}}, [world, world],
         None, " world world"),
    ]
    bodies = [{"input_ids": prompt, "sampling_params": {"max_new_tokens": 4, **params}, "stream": False}
              for prompt, params, *_ in cases]
    for (status, reply), (_, params, ids, matched, text) in zip(_generate(echo_engine, bodies), cases):
        assert status == 200, reply
        assert reply["output_ids"] == ids and reply["text"] == text, params
        assert reply["meta_info"]["finish_reason"].get("matched") == matched, params


def test_return_text_in_logprobs_decodes_each_token(echo_engine, tok):
    world = tok.encode(" world")
    body = {"input_ids": tok.encode("Hello") + world, "return_logprob": True, "logprob_start_len": 0,
            "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 2}}
    [(status, reply)] = _generate(echo_engine, [body])
    assert status == 200
    assert [e[2] for e in reply["meta_info"]["output_token_logprobs"]] == [" world", " world"]
    assert [e[2] for e in reply["meta_info"]["input_token_logprobs"]] == ["Hello", " world"]
    [(_, plain)] = _generate(echo_engine, [{**body, "return_text_in_logprobs": False}])
    assert all(e[2] is None for e in plain["meta_info"]["output_token_logprobs"])
