"""The Python parts of ``tools/gpu_check.sh`` (run on a CUDA machine; see that script).

``parity``: a random Qwen2-0.5B-shaped model (bf16 safetensors) scored by
``megatron-rl logprobs`` in fp32 and bf16 (the Megatron actor on CUDA: NCCL, the Triton
output-layer kernel) against Hugging Face's forward in fp32 and bf16 on the same GPU.
Prints max and mean |delta log-prob| of each against HF fp32; exits 1 when the actor in
fp32 is off by more than 1e-3 or the actor in bf16 is more than twice as far from HF fp32
as HF's own bf16 forward is (the bf16 noise floor).

``e2e``: ``megatron-rl sft`` then ``megatron-rl train`` on the demo's tiny model and
addition problems (shortened), the actor on the GPU, one embedded rollout server; prints
per-step time, reward and the mismatch gate's figure from ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "megatron-rl")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sh(*args: str) -> float:
    """Run a megatron-rl command from the repository root; seconds taken."""
    print("$ megatron-rl " + " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run([CLI, *args], check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="4"))
    return time.time() - t0


def hf_logprobs(model_dir: Path, seqs: list[list[int]], dtype) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEVICE).eval()
    out = []
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids], device=DEVICE)
            logp = torch.log_softmax(model(x).logits[0].float(), dim=-1)
            out.append(logp[:-1].gather(1, x[0, 1:, None])[:, 0].tolist())
    del model
    return out


def deltas(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    import torch

    d = torch.cat([(torch.tensor(x) - torch.tensor(y)).abs() for x, y in zip(a, b)])
    return d.max().item(), d.mean().item()


def parity(run: Path, small: bool) -> int:
    """``small``: a 2-layer model on whatever device there is (a dry run of this script on CPU)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1024) if small else \
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936)
    cfg = Qwen2Config(**dims, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6,
                      rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(run / "model")
    del model
    gen = torch.Generator().manual_seed(1)
    lengths = [256, 512, 1024, 384, 768, 1024, 640, 300]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    (run / "in.jsonl").write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    ours = {}
    for dtype in ("float32", "bfloat16"):
        secs = sh("logprobs", "--model", str(run / "model"), "--input", str(run / "in.jsonl"),
                  "--output", str(run / f"out_{dtype}.jsonl"), "--dtype", dtype)
        lines = (run / f"out_{dtype}.jsonl").read_text().splitlines()
        ours[dtype] = [json.loads(line)["logprobs"] for line in lines]
        print(f"megatron-rl logprobs --dtype {dtype}: {secs:.1f} s (process start and model load included)")
    ref32 = hf_logprobs(run / "model", seqs, torch.float32)
    ref16 = hf_logprobs(run / "model", seqs, torch.bfloat16)
    rows = {"actor fp32": deltas(ours["float32"], ref32), "actor bf16": deltas(ours["bfloat16"], ref32),
            "HF bf16": deltas(ref16, ref32)}
    print(f"{'vs HF fp32 (' + str(sum(lengths)) + ' tokens)':<32} {'max |d|':>10} {'mean |d|':>10}")
    for name, (mx, mean) in rows.items():
        print(f"{name:<32} {mx:>10.2e} {mean:>10.2e}")
    ok = rows["actor fp32"][0] <= 1e-3 and rows["actor bf16"][1] <= 2 * rows["HF bf16"][1]
    print("parity:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def e2e(run: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from megatron_rl.data import synthetic
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    shutil.rmtree(run, ignore_errors=True)
    tok = build_tokenizer(run / "model")
    build_model(run / "model", tok, seed=0)
    data = run / "data"
    data.mkdir(parents=True)
    synthetic.write_sft_parquet(data / "sft.parquet", 4000, seed=0)
    synthetic.write_arithmetic_parquet(data / "train.parquet", 1000, seed=1, carry_frac=0.5)
    synthetic.write_arithmetic_parquet(data / "heldout.parquet", 64, seed=2, split="heldout", carry_frac=0.5)
    rel = run.relative_to(ROOT) if run.is_absolute() else run
    sft_s = sh("sft", "configs/tiny_sft.yaml", f"model.path={rel}/model", f"data.train_files=[{rel}/data/sft.parquet]",
               "train.num_steps=150", "checkpoint.save_every=150", f"checkpoint.dir={rel}/sft/ckpt",
               f"logging.output_dir={rel}/sft")
    rl_s = sh("train", "configs/tiny_cpu.yaml", f"model.path={rel}/sft/hf", f"data.train_files=[{rel}/data/train.parquet]",
              f"eval.files=[{rel}/data/heldout.parquet]", "train.num_steps=8", "eval.every_steps=4",
              "checkpoint.save_every=4", f"checkpoint.dir={rel}/rl/ckpt", f"logging.output_dir={rel}/rl")
    print(f"sft 150 steps: {sft_s:.1f} s; train 8 steps: {rl_s:.1f} s (process start included)")
    for line in (run / "rl" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        keys = ["step", "time/step", "time/generate", "time/train", "time/sync", "reward/mean",
                "mismatch/abs_logp_diff_mean", "mismatch/abs_logp_diff_max", "perf/train_tokens_per_s"]
        print(json.dumps({k: float(f"{m[k]:.4g}") if isinstance(m[k], float) else m[k] for k in keys if k in m}))
    for line in (run / "rl" / "eval.jsonl").read_text().splitlines():
        print(line)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["parity", "e2e"])
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--small", action="store_true", help="parity on a 2-layer model (a CPU dry run)")
    args = p.parse_args()
    return parity(args.dir, args.small) if args.what == "parity" else e2e(args.dir)


if __name__ == "__main__":
    raise SystemExit(main())
