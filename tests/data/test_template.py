"""Chat templates: Qwen2 (the tokenizer's own), the shipped R1-Distill fallback, raw prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from data_helpers import R1_BOS, R1_EOS

from megatron_rl.config.data import DataConfig
from megatron_rl.data.template import (
    ChatRenderer,
    end_of_turn_ids,
    load_tokenizer,
    render_prompt,
    stop_token_ids,
)
from megatron_rl.errors import DataError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\n2 and 2 make 4.\n</think>\n\nIt is 4."},
    {"role": "user", "content": "And 3+3?"},
]


def test_string_prompt_is_one_user_message(qwen_tok: Any) -> None:
    cfg = DataConfig()
    ids = render_prompt(qwen_tok, "What is 2+2?", cfg)
    assert ids == render_prompt(qwen_tok, [{"role": "user", "content": "What is 2+2?"}], cfg)
    assert qwen_tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    # the same ids the tokenizer's own apply_chat_template(tokenize=True) gives
    own = qwen_tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == list(own)


def test_r1_fallback_when_the_tokenizer_has_no_template(r1_tok: Any) -> None:
    ids = render_prompt(r1_tok, CHAT, DataConfig())
    bos = r1_tok.convert_tokens_to_ids(R1_BOS)
    assert ids[0] == bos and ids.count(bos) == 1  # the template's BOS, not a second one
    assert r1_tok.decode(ids) == (
        f"{R1_BOS}Be brief.<｜User｜>What is 2+2?<｜Assistant｜>It is 4.{R1_EOS}"
        "<｜User｜>And 3+3?<｜Assistant｜><think>\n")  # earlier reasoning stripped


def test_r1_template_keeps_the_final_turns_reasoning(r1_tok: Any) -> None:
    renderer = ChatRenderer(r1_tok, DataConfig())
    text = renderer.render(CHAT[:3], add_generation_prompt=False)
    assert text.endswith(f"<｜Assistant｜>{CHAT[2]['content']}{R1_EOS}")
    assert text.startswith(f"{R1_BOS}Be brief.<｜User｜>")


def test_named_and_file_templates_override_the_tokenizers(qwen_tok: Any, tmp_path: Path) -> None:
    ids = render_prompt(qwen_tok, "hi", DataConfig(chat_template="deepseek_r1_distill"))
    assert qwen_tok.decode(ids) == f"{R1_BOS}<｜User｜>hi<｜Assistant｜><think>\n"
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:{% endif %}")
    ids = render_prompt(qwen_tok, "hi", DataConfig(chat_template=str(jinja)))
    assert qwen_tok.decode(ids) == "user: hi\nassistant:"
    with pytest.raises(DataError, match="no such chat template file"):
        render_prompt(qwen_tok, "hi", DataConfig(chat_template=str(tmp_path / "gone.jinja")))
    with pytest.raises(DataError, match="expected a path ending in .jinja"):
        render_prompt(qwen_tok, "hi", DataConfig(chat_template="chatml"))


def test_raw_prompts_get_the_tokenizers_bos_once(qwen_tok: Any, r1_tok: Any) -> None:
    raw = DataConfig(apply_chat_template=False)
    assert render_prompt(qwen_tok, "Hello world", raw) == [9707, 1879]  # Qwen2: no BOS
    bos = r1_tok.convert_tokens_to_ids(R1_BOS)
    assert render_prompt(r1_tok, "Hello world", raw) == [bos, 9707, 1879]
    assert render_prompt(r1_tok, f"{R1_BOS}Hello world", raw) == [bos, 9707, 1879]


def test_end_of_turn_and_stop_tokens(qwen_tok: Any, r1_tok: Any) -> None:
    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(qwen_tok, DataConfig()) == [im_end]
    assert stop_token_ids(qwen_tok, DataConfig()) == [im_end]  # also the EOS
    eos = r1_tok.convert_tokens_to_ids(R1_EOS)
    assert end_of_turn_ids(r1_tok, DataConfig()) == [eos]
    assert stop_token_ids(r1_tok, DataConfig(apply_chat_template=False)) == [eos]


def test_load_tokenizer_errors(tmp_path: Path, qwen_dir: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot be loaded"):
        load_tokenizer(str(broken))
