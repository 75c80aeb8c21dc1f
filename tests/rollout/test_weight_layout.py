"""The engine's transposed weight layout: same values and names, same outputs, loads of every kind land."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.rollout.layout import TransposingCopier, is_transposed, to_decode_layout
from megatron_rl.rollout.sampling import parse_sampling_params


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(37, 53), (2 * TransposingCopier.BLOCK_ROWS + 88, 24)])
def test_transposing_copy_is_exact_for_both_layouts(dtype, rows, cols):
    src = torch.randn(rows, cols).to(dtype)  # the second shape spans three blocks, the last one short
    copier = TransposingCopier()
    transposed, plain = torch.empty(cols, rows).t(), torch.empty(rows, cols)
    assert is_transposed(transposed) and not is_transposed(plain)
    for target in (transposed, plain):
        copier.copy_into(target, src)
        assert torch.equal(target, src.float())
    small = torch.randn(3, 4).to(dtype)  # a smaller tensor reuses the scratch buffer
    target = torch.empty(4, 3).t()
    copier.copy_into(target, small)
    assert torch.equal(target, small.float())


def _greedy(engine, prompt, n=8):
    params = parse_sampling_params({"temperature": 0, "max_new_tokens": n}, engine.vocab_size)
    (fut,) = engine.submit(prompt, params, rid=f"g{len(prompt)}", return_logprob=True)
    job = fut.result(timeout=60)
    return job.output_ids, job.output_logprobs


def test_engines_of_both_layouts_generate_alike_and_load_alike(tiny_model_dir):
    from megatron_rl.rollout.engine import EmbeddedEngine

    fast = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.001)
    plain = EmbeddedEngine(str(tiny_model_dir), seed=0, batch_wait_s=0.001, transposed_weights=False)
    try:
        assert fast.transposed and not plain.transposed
        assert is_transposed(fast.model.lm_head.weight) and not is_transposed(plain.model.lm_head.weight)
        prompt = [3, 14, 15, 92, 65]
        ids_f, lp_f = _greedy(fast, prompt)
        ids_p, lp_p = _greedy(plain, prompt)
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
        assert _greedy(fast, prompt)[0] == _greedy(plain, prompt)[0]
    finally:
        fast.shutdown()
        plain.shutdown()
