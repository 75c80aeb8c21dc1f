"""Measure batch invariance and throughput of the embedded engine (a script, not a test).

    .venv/bin/python tests/rollout/determinism_probe.py [--part exact|speed|all] [--deterministic]

exact: one prompt's logits computed alone vs inside left-padded batches of other prompts
(the engine's prefill and decode shapes), compared bit for bit; then the engine itself: one
seeded request alone vs amid 7 concurrent requests of other lengths (tokens and log-probs).
speed: completion tokens/s of seeded requests, 1 / 8 / 32 concurrent, in process, one torch
thread. Both on tests/helpers/tiny_models.make_tiny_hf models with hidden 64 (2 layers) and
hidden 256 (6 layers). Prints plain lines; the numbers go into docs/embedded_engine.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.tiny_models import make_tiny_hf  # noqa: E402

MODELS = {
    "h64": dict(vocab=1000, layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, tie=True),
    "h256": dict(vocab=1000, layers=6, hidden=256, heads=4, kv_heads=2, ffn=512, tie=True),
}
PROMPT = [11, 22, 33, 44, 55]
OTHERS = [[7], [3, 9, 27], list(range(100, 117)), [5, 6], list(range(200, 212)),
          list(range(300, 330)), [900, 901, 902, 903]]


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _logits(model, prompts: list[list[int]], row: int, steps: int) -> list[torch.Tensor]:
    """Greedy-decode the batch like the engine; the last-position logits of ``row`` per step."""
    ids, mask, pos = _left_pad(prompts)
    out = []
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        pos = pos[:, -1:]
        for _ in range(steps):
            last = res.logits[:, -1, :]
            out.append(last[row].clone())
            nxt = last.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
            pos = pos + 1
            res = model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                        past_key_values=res.past_key_values, use_cache=True)
    return out


def exact_forward(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    alone = _logits(model, [PROMPT], 0, 8)
    layouts = {"alone again": [PROMPT], "first of 8": [PROMPT, *OTHERS], "last of 8": [*OTHERS, PROMPT],
               "with 1 longer": [PROMPT, OTHERS[5]], "with 1 shorter": [OTHERS[0], PROMPT],
               "8 copies": [PROMPT] * 8}
    for name, prompts in layouts.items():
        got = _logits(model, prompts, prompts.index(PROMPT), 8)
        equal = sum(torch.equal(a, b) for a, b in zip(alone, got))
        diff = max(float((a - b).abs().max()) for a, b in zip(alone, got))
        print(f"  forward {name:15s}: {equal}/8 steps bitwise equal, max |diff| {diff:.3g}")


def _engine(model_dir: Path, deterministic: bool):
    from megatron_rl.rollout.engine import EmbeddedEngine

    kw = {"deterministic": True} if deterministic else {}
    return EmbeddedEngine(str(model_dir), seed=0, **kw)


def _submit(engine, prompt: list[int], seed: int | None, tokens: int, rid: str):
    from megatron_rl.rollout.sampling import parse_sampling_params

    raw = {"temperature": 1.0, "max_new_tokens": tokens, "ignore_eos": True}
    if seed is not None:
        raw["sampling_seed"] = seed
    return engine.submit(prompt, parse_sampling_params(raw, engine.vocab_size), rid=rid, return_logprob=True)


def exact_engine(model_dir: Path, deterministic: bool) -> None:
    engine = _engine(model_dir, deterministic)
    try:
        (alone,) = [f.result(60) for f in _submit(engine, PROMPT, 1234, 24, "alone")]
        for label, seeded in (("seeded others", True), ("unseeded others", False)):
            futures = [f for i, p in enumerate(OTHERS[:3]) for f in _submit(engine, p, i if seeded else None, 30, f"o{i}")]
            (mine,) = _submit(engine, PROMPT, 1234, 24, "mine")
            futures += [f for i, p in enumerate(OTHERS[3:]) for f in _submit(engine, p, 9 + i if seeded else None, 20, f"p{i}")]
            job = mine.result(60)
            [f.result(60) for f in futures]
            same_tokens = job.output_ids == alone.output_ids
            lp_equal = sum(a == b for a, b in zip(job.output_logprobs, alone.output_logprobs))
            diff = max(abs(a - b) for a, b in zip(job.output_logprobs, alone.output_logprobs))
            print(f"  engine amid 7 {label:15s}: tokens equal {same_tokens}, log-probs bitwise equal "
                  f"{lp_equal}/{len(alone.output_logprobs)}, max |diff| {diff:.3g}")
    finally:
        engine.shutdown()


def speed(model_dir: Path, deterministic: bool, tokens: int = 64, repeats: int = 3) -> None:
    engine = _engine(model_dir, deterministic)
    try:
        _submit(engine, PROMPT, 0, 4, "warm")[0].result(60)
        for conc in (1, 8, 32):
            rates = []
            for _ in range(repeats):
                start = time.perf_counter()
                futures = [f for i in range(conc) for f in _submit(engine, [1 + i, 2, 3, 4 + i % 5], i, tokens, f"s{i}")]
                done = sum(len(f.result(600).output_ids) for f in futures)
                rates.append(done / (time.perf_counter() - start))
            print(f"  speed {conc:2d} concurrent seeded: {sorted(rates)[len(rates) // 2]:8.1f} tokens/s "
                  f"(median of {repeats}, {tokens} tokens each)")
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="all", choices=["exact", "speed", "all"])
    parser.add_argument("--deterministic", action="store_true", help="EmbeddedEngine(deterministic=True)")
    parser.add_argument("--models", default="h64,h256")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared CPU: 2-thread regions wait for descheduled workers
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = Path(tmp) / name
            make_tiny_hf(path, seed=0, **MODELS[name])
            print(f"{name} (deterministic={args.deterministic}):")
            if args.part in ("exact", "all"):
                exact_forward(path)
                exact_engine(path, args.deterministic)
            if args.part in ("speed", "all"):
                speed(path, args.deterministic)


if __name__ == "__main__":
    main()
