"""The batch invariance deterministic mode stands on, checked on this torch build's CPU kernels.

If a torch or MKL update breaks one of these, deterministic mode's batched decode would give a
request different bits in different batches: these tests say which assumption failed.
"""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import one_torch_thread

from megatron_rl.rollout import rowwise
from megatron_rl.rollout.batching import Rows, merge
from megatron_rl.rollout.layout import to_decode_layout


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.mark.parametrize("out_features,in_features", [(128, 64), (1536, 512), (896, 4864), (32000, 512)])
def test_column_major_linear_rows_do_not_depend_on_the_other_rows(out_features, in_features):
    g = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=g).t().contiguous().t()  # column-major
    x = torch.randn(40, in_features, generator=g)
    alone = torch.nn.functional.linear(x[:2], weight)[0]  # a lone row is computed as the first of two
    for rows in (2, 3, 8, 17, 33, 40):
        perm = torch.randperm(40, generator=g)[:rows]
        perm[torch.randint(rows, (1,), generator=g)] = 0  # row 0 somewhere in the batch
        out = torch.nn.functional.linear(x[perm], weight)
        assert torch.equal(out[(perm == 0).nonzero()[0, 0]], alone), rows


def _model(hidden: int, layers: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=2000, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    to_decode_layout(model)
    rowwise.pad_single_rows(model)
    model.set_attn_implementation(rowwise.register())
    return model


def _prefill(model, prompt: list[int]) -> Rows:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    n = len(prompt)
    return Rows([prompt], cache, torch.ones(1, n, dtype=torch.long), torch.tensor([[n]]),
                out.logits[:, -1:].argmax(-1))


def _decode(model, rows: Rows, steps: int) -> list[torch.Tensor]:
    """Greedy decode steps of the batch; the logits of every step [B, V]."""
    logits = []
    for _ in range(steps):
        mask_BT = torch.cat([rows.mask_BT, torch.ones(len(rows.jobs), 1, dtype=torch.long)], dim=1)
        with rowwise.rows_of(mask_BT.sum(dim=1).tolist()):
            out = model(input_ids=rows.next_B1, attention_mask=mask_BT, position_ids=rows.pos_B1,
                        past_key_values=rows.cache, use_cache=True)
        rows.mask_BT, rows.pos_B1 = mask_BT, rows.pos_B1 + 1
        logits.append(out.logits[:, -1].clone())
        rows.next_B1 = logits[-1].argmax(-1, keepdim=True)
    return logits


@pytest.mark.parametrize("hidden,layers", [(64, 2), (256, 3)])
def test_a_row_decodes_to_the_same_bits_alone_and_in_left_padded_batches(hidden, layers):
    model = _model(hidden, layers)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 2000, (n,), generator=g).tolist() for n in (10, 17, 5, 33, 3, 12, 1, 21)]
    with torch.no_grad():
        alone = _decode(model, _prefill(model, prompts[0]), 5)
        for others, where in (([1], 0), ([2, 3], 1), ([1, 2, 3, 4, 5, 6, 7], 3), ([6], 1)):
            parts = [_prefill(model, prompts[o]) for o in others]
            parts.insert(where, _prefill(model, prompts[0]))
            rows = parts[0]
            for part in parts[1:]:
                rows = merge(rows, part)
            batched = _decode(model, rows, 5)
            for step, (a, b) in enumerate(zip(alone, batched)):
                assert torch.equal(a[0], b[where]), (others, where, step, float((a[0] - b[where]).abs().max()))


def test_outside_rows_of_it_is_plain_sdpa():
    model = _model(64, 1)
    ref = _model(64, 1)
    ref.set_attn_implementation("sdpa")
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           ref(input_ids=ids, attention_mask=mask).logits)
