"""Measure one training step's peak memory on the demo model (run as a script by
``test_demo_peak.py``; prints one JSON line).

Peak = the tensors that live across steps (fp32 weights, gradients, Adam m and v: 16 B/param)
+ the step's transient peak, read as the rise of this process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) above its RSS before the step. The step: forward over ``rows x cols``
tokens, full-vocabulary log-softmax in fp32, backward, AdamW; one warm-up step first so that
gradients and optimizer state already exist, as in a run after its first step.
"""

import json
import sys

import torch


def _kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(model_dir: str, rows: int, cols: int) -> None:
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    torch.set_num_threads(1)
    model = build_model(model_dir, build_tokenizer(model_dir))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (rows, cols))

    def step() -> None:
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        (-logp[..., :1].mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()
    base = _kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    transient = _kib("VmHWM:") - base
    state = 16 * sum(p.numel() for p in model.parameters())
    print(json.dumps({"state_bytes": state, "transient_bytes": transient, "peak_bytes": state + transient}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
