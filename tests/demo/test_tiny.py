"""The demo's tokenizer, tiny model and synthetic arithmetic data (fast, CPU)."""

import pytest

from megatron_rl.data import synthetic as syn
from megatron_rl.demo.tiny import BOXED_TOKEN, build_model, build_tokenizer
from megatron_rl.rewards.math import compute_score


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_tokenizer_round_trip_and_specials(tok):
    text = "Add 48+75 = ?\n\\boxed{123} x-y*(z/2)"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids).count(BOXED_TOKEN) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    assert tok.unk_token_id not in ids
    assert len(tok) < 128


def test_chat_template(tok, tok_dir):
    import json

    assert "chat_template" in json.loads((tok_dir / "tokenizer_config.json").read_text())
    msgs = [{"role": "user", "content": "3+4"}]
    assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == "<|im_start|>user\n3+4<|im_end|>\n<|im_start|>assistant\n")
    full = msgs + [{"role": "assistant", "content": "\\boxed{7}"}]
    text = tok.apply_chat_template(full, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n\\boxed{7}<|im_end|>\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_model_builds_and_generates(tok, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    build_model(tmp_path, tok, seed=0, hidden=32, layers=2, heads=2, kv_heads=2, ffn=64)
    assert (tmp_path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size >= len(tok) and model.config.vocab_size % 2 == 0
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "1+2"}],
                                                add_generation_prompt=True, return_dict=False)])
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 3
    with pytest.raises(ValueError):
        build_model(tmp_path / "bad", tok, heads=3, kv_heads=1)


def test_rows_schema_and_grader():
    rows = syn.arithmetic_rows(20, seed=3)
    for row in rows:
        assert set(row) == {"prompt", "answer", "data_source", "extra_info"}
        assert row["data_source"] == "arithmetic"
        [msg] = row["prompt"]
        assert msg["role"] == "user"
        a, b = map(int, msg["content"].split("+"))
        assert row["answer"] == str(a + b)
        assert row["extra_info"]["carry"] == (a % 10 + b % 10 >= 10)
    a, b = 48, 75
    assert compute_score(syn.response_text(a + b), str(a + b)) == 1.0
    assert compute_score(syn.response_text(a + b - 10), str(a + b)) == 0.0
    assert compute_score(str(a + b), str(a + b)) == 0.0  # no box, no credit


def test_sft_rows_are_sloppy_only_on_carries():
    rows = syn.sft_rows(400, seed=0, forget_carry=0.6)
    wrong = 0
    for row in rows:
        user, assistant = row["messages"]
        a, b = map(int, user["content"].split("+"))
        said = int(assistant["content"][len("\\boxed{"):-1])
        assert said == a + b or (syn.carries(a, b) and said == a + b - 10)
        wrong += said != a + b
    assert 0.3 < wrong / len(rows) < 0.6  # ~0.7 carrying x 0.6 forgotten


def test_train_and_heldout_disjoint_and_deterministic(tmp_path):
    import pyarrow.parquet as pq

    def keys(rows):
        return {r["prompt"][0]["content"] for r in rows}

    train = syn.arithmetic_rows(3000, seed=0)
    held = syn.arithmetic_rows(200, seed=1, split="heldout")
    sft = syn.sft_rows(3000, seed=0)
    assert not keys(train) & keys(held)
    assert not {r["messages"][0]["content"] for r in sft} & keys(held)
    assert len(keys(held)) == 200  # held-out rows are unique
    assert syn.arithmetic_rows(50, seed=5) == syn.arithmetic_rows(50, seed=5)
    assert 0.55 < sum(r["extra_info"]["carry"] for r in train) / len(train) < 0.85
    path = syn.write_arithmetic_parquet(tmp_path / "held.parquet", 10, 1, split="heldout")
    assert pq.read_table(path).to_pylist() == syn.arithmetic_rows(10, 1, split="heldout")
