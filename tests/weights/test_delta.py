"""Delta encoding (pure), TP-shard writing into flat HF buckets (pure), and bucket planning."""

import numpy as np
import pytest
import torch

from megatron_rl.models.hf_config import ModelDims
from megatron_rl.weights import delta as D
from megatron_rl.weights import mapping as M
from megatron_rl.weights.buckets import HFEntry, hf_views, write_hf_from_shards


def changed_copy(old: torch.Tensor, frac: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    new = old.clone()
    mask = torch.rand(old.numel(), generator=g) < frac
    new[mask] = torch.randn(int(mask.sum()), generator=g).to(old.dtype)
    return new


@pytest.mark.parametrize("frac,kind", [(0.001, "indices"), (0.05, "bitmask"), (0.5, "bitmask"), (1.0, "dense")])
def test_delta_round_trip_is_bit_exact_and_picks_the_smallest_encoding(frac, kind):
    old = torch.randn(4099, dtype=torch.float32).to(torch.bfloat16)
    new = changed_copy(old, frac)
    enc, k, payload, _ = D.encode(new.view(torch.uint8), old.view(torch.uint8), 2)
    assert enc == kind
    changed = (new.view(torch.int16) != old.view(torch.int16)).numpy()
    mask_bytes = int((np.packbits(changed, bitorder="little") != 0).sum())
    assert k == changed.sum() and payload.numel() == min(D.encoded_sizes(old.numel(), k, 2, mask_bytes).values())
    algo = D.checksum_algos()[0]
    split = [1000, 3099]
    sums = tuple(D.checksum(t, algo) for t in new.split(split))
    header = D.DeltaHeader.from_json(D.DeltaHeader(enc, k, payload.numel(), algo, sums).to_json(), 2)
    targets = [t.float().clone() for t in old.split(split)]  # the server holds fp32 copies
    assert D.apply(targets, torch.bfloat16, header, payload) == []
    assert torch.equal(torch.cat(targets).to(torch.bfloat16).view(torch.int16), new.view(torch.int16))


def test_corrupted_or_misapplied_delta_fails_the_checksum():
    old = torch.randn(5000).to(torch.bfloat16)
    new = changed_copy(old, 0.01)
    enc, k, payload, _ = D.encode(new.view(torch.uint8), old.view(torch.uint8), 2)
    assert enc != "dense"
    algo = D.checksum_algos()[0]
    sums = (D.checksum(new[:2000], algo), D.checksum(new[2000:], algo))
    header = D.DeltaHeader(enc, k, payload.numel(), algo, sums)
    flipped = payload.clone()
    flipped[-1] ^= 0x10  # a value byte of the last changed element (in the second tensor)
    targets = [t.float().clone() for t in old.split([2000, 3000])]
    assert D.apply(targets, torch.bfloat16, header, flipped) == [1]
    stale = changed_copy(old, 0.5, seed=3)  # right delta, wrong base (e.g. a restarted server)
    targets = [t.float().clone() for t in stale.split([2000, 3000])]
    assert D.apply(targets, torch.bfloat16, header, payload) == [0, 1]


def test_malformed_delta_headers_and_payloads_are_refused():
    with pytest.raises(ValueError, match="encoding"):
        D.DeltaHeader.from_json({"encoding": "zip", "changed": 1, "payload_bytes": 1, "checksum_algo": "crc32",
                                 "checksums": ["0"]}, 1)
    with pytest.raises(ValueError, match="one per tensor"):
        D.DeltaHeader.from_json({"encoding": "indices", "changed": 1, "payload_bytes": 1, "checksum_algo": "crc32",
                                 "checksums": []}, 1)
    with pytest.raises(ValueError, match="not available"):
        D.DeltaHeader.from_json({"encoding": "indices", "changed": 1, "payload_bytes": 1, "checksum_algo": "md5",
                                 "checksums": ["0"]}, 1)
    header = D.DeltaHeader("indices", 2, 12, "crc32", ("0",))
    bad = torch.zeros(12, dtype=torch.uint8)  # 2 int32 indices (8 bytes), 2 bf16 values
    bad[:8].view(torch.int32).copy_(torch.tensor([5, 1]))  # not increasing
    with pytest.raises(ValueError, match="strictly increasing"):
        D.decode(header, bad, 10, 2)
    with pytest.raises(ValueError, match=r"payload of 8 bytes .*\(expected 12\)"):
        D.decode(header, bad[:8], 10, 2)
    # A bitmask marking element 11 of a 10-element bucket: level 1 (byte 1 non-zero), the mask byte, a value.
    past = torch.zeros(18, dtype=torch.uint8)
    past[0], past[8] = 0b10, 0b1000
    header = D.DeltaHeader("bitmask", 1, 18, "crc32", ("0",))
    with pytest.raises(ValueError, match="past the bucket"):
        D.decode(header, past, 10, 2)
    with pytest.raises(ValueError, match="past the bucket"):
        D.apply([torch.zeros(10)], torch.bfloat16, header, past)


DIMS = ModelDims(family="qwen2", architecture="Qwen2ForCausalLM", num_layers=2, hidden_size=16, num_heads=4,
                 num_kv_heads=2, head_dim=4, ffn_hidden_size=24, vocab_size=37, max_position_embeddings=64,
                 rope_theta=1e4, rms_eps=1e-6, tie_word_embeddings=False, qkv_bias=True, qk_norm=False)


@pytest.mark.parametrize("tp", [1, 2])
def test_shards_write_the_same_hf_tensors_as_unshard_then_split(tp):
    layer_rules, global_rules = M.rules_for(DIMS, te=False)
    padded = 40  # vocabulary padded to a multiple of tp * 4 here
    for rule in layer_rules + global_rules:
        hf = [n.format(i=0) for n in rule.hf]
        shapes = {"model.embed_tokens.weight": (37, 16), "lm_head.weight": (37, 16), "model.norm.weight": (16,)}
        full_shape = {"qkv": (32, 16), "gate_up": (48, 16)}.get(rule.merge)  # qkv: (4 + 2 * 2) heads * 4
        if rule.merge == "single":
            full_shape = shapes.get(hf[0]) or {"column": (16, 16), "row": (16, 24)}.get(rule.kind, (16,))
        if rule.merge == "qkv" and rule.mcore.endswith("bias"):
            full_shape = (32,)
        full = torch.randn(full_shape)
        want = M.split_hf(rule, full, DIMS)
        shards = [M.shard(rule.kind, full, r, tp, padded) for r in range(tp)]
        entries, offset = [], 0
        for name, t in zip(hf, want):
            entries.append(HFEntry(name, tuple(t.shape), offset, t.numel() * 4))
            offset += t.numel() * 4
        flat = torch.zeros(offset, dtype=torch.uint8)
        dst = hf_views(flat, torch.float32, entries)
        write_hf_from_shards(rule, shards, DIMS, dst)
        for d, w in zip(dst, want):
            assert torch.equal(d, w), rule.mcore
