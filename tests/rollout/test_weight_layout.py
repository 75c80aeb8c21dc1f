"""The engine's transposed weight layout: same values and names, same outputs, loads of every kind land."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import greedy

from megatron_rl.rollout.layout import (
    TransposingCopier,
    is_transposed,
    to_decode_layout,
    wants_transposed,
)


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def test_decode_layout_keeps_values_names_and_ties(tiny_model_dir):
    ref, model = _hf(tiny_model_dir), _hf(tiny_model_dir)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    names = to_decode_layout(model)
    assert "lm_head" in names and any(n.endswith("mlp.down_proj") for n in names)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    state, ref_state = model.state_dict(), ref.state_dict()
    assert state.keys() == ref_state.keys()
    for name, t in state.items():
        assert torch.equal(t, ref_state[name]), name
        assert is_transposed(t) == (t.dim() == 2 and (name.endswith("proj.weight") or name == "lm_head.weight"
                                                      or (tied and name == "model.embed_tokens.weight"))), name
    ids = torch.tensor([[5, 17, 301, 2, 999, 44]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    assert to_decode_layout(model) == names  # idempotent: already transposed weights stay as they are


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(37, 53), (2 * TransposingCopier.BLOCK_ROWS + 88, 24)])
def test_transposing_copy_is_exact_for_both_layouts(dtype, target_dtype, rows, cols):
    src = torch.randn(rows, cols).to(dtype)  # the second shape spans several blocks, the last one short
    copier = TransposingCopier()
    transposed = torch.empty(cols, rows, dtype=target_dtype).t()
    plain = torch.empty(rows, cols, dtype=target_dtype)
    assert is_transposed(transposed) and not is_transposed(plain)
    for target in (transposed, plain):
        copier.copy_into(target, src)
        assert torch.equal(target, src.to(target_dtype))
    small = torch.randn(3, 4).to(dtype)  # a smaller tensor reuses the scratch buffer
    target = torch.empty(4, 3, dtype=target_dtype).t()
    copier.copy_into(target, small)
    assert torch.equal(target, small.to(target_dtype))


def test_auto_layout_is_column_major_for_float32_or_deterministic_and_row_major_for_bf16():
    assert wants_transposed("auto", torch.float32, False) and wants_transposed("auto", torch.bfloat16, True)
    assert not wants_transposed("auto", torch.bfloat16, False)
    assert wants_transposed("transposed", torch.bfloat16, False) and not wants_transposed("hf", torch.float32, True)
    with pytest.raises(ValueError, match="weight layout 'column'"):
        wants_transposed("column", torch.float32, False)


def test_a_bf16_engine_matches_transformers_in_bf16_and_loads_bf16_weights_without_rounding(tiny_model_dir):
    """serve --dtype bfloat16: the model runs in bf16 (as SGLang serves); a bf16 sync lands bit for bit."""
    from transformers import AutoModelForCausalLM

    from megatron_rl.rollout.engine import EmbeddedEngine
    from megatron_rl.rollout.server_info import server_info_body

    engine = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.001, dtype=torch.bfloat16,
                            transposed_weights=False)
    try:
        assert {t.dtype for t in engine.model.state_dict().values()} == {torch.bfloat16}
        assert server_info_body(engine, "127.0.0.1:1")["dtype"] == "bfloat16"
        ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).eval()
        prompt = [3, 14, 15, 92, 65]
        ids, logprobs = greedy(engine, prompt)
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        assert ids == want.sequences[0, len(prompt):].tolist()
        ref_lp = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(want.logits, ids)]
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_lp), rtol=0, atol=2e-2)
        g = torch.Generator().manual_seed(1)
        by_storage: dict[int, torch.Tensor] = {}
        new = {n: by_storage.setdefault(t.data_ptr(), (t.float() + 0.05 * torch.randn(t.shape, generator=g)).bfloat16())
               for n, t in engine.model.state_dict().items()}
        assert engine.load_weights(new.items()) == len(new)
        for name, t in engine.model.state_dict().items():
            assert torch.equal(t, new[name]), name
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        EmbeddedEngine(str(tiny_model_dir), dtype=torch.float16)


def test_engines_of_both_layouts_generate_alike_and_load_alike(tiny_model_dir):
    from megatron_rl.rollout.engine import EmbeddedEngine

    fast = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.001)
    plain = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.001, transposed_weights=False)
    try:
        assert fast.transposed and not plain.transposed
        assert is_transposed(fast.model.lm_head.weight) and not is_transposed(plain.model.lm_head.weight)
        prompt = [3, 14, 15, 92, 65]
        ids_f, lp_f = greedy(fast, prompt)
        ids_p, lp_p = greedy(plain, prompt)
        assert ids_f == ids_p
        torch.testing.assert_close(torch.tensor(lp_f), torch.tensor(lp_p), rtol=0, atol=1e-5)
        # New weights in bf16 (the wire dtype of a sync) land with the same values in both layouts.
        g = torch.Generator().manual_seed(1)
        by_storage: dict[int, torch.Tensor] = {}  # tied names (embedding = LM head) get one value
        new = {n: by_storage.setdefault(t.data_ptr(), (t + 0.05 * torch.randn(t.shape, generator=g)).bfloat16())
               for n, t in plain.model.state_dict().items()}
        assert fast.load_weights(new.items()) == plain.load_weights(new.items()) == len(new)
        for name, t in fast.model.state_dict().items():
            assert torch.equal(t, new[name].float()), name
        assert greedy(fast, prompt)[0] == greedy(plain, prompt)[0]
    finally:
        fast.shutdown()
        plain.shutdown()
