"""``megatron-rl serve --model HF_DIR --host H --port P``: the embedded server.

Loads the model (fp32, CPU), then serves SGLang's native HTTP API until SIGTERM/SIGINT.
``add_arguments`` is the one list of options: the ``megatron-rl serve`` subcommand and
``python -m megatron_rl.rollout.serve`` both build their parsers from it. Nothing heavy is
imported at module level, so ``megatron-rl --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = "Serve a Hugging Face causal LM on CPU behind SGLang's native HTTP API (embedded engine)."


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", "--model-path", dest="model", required=True,
                   help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port to bind (default: 30000)")
    p.add_argument("--max-batch-size", type=int, default=64, help="most sequences decoded together")
    p.add_argument("--chunked-prefill-size", type=int, default=512,
                   help="most prompt tokens (rows x columns) fed per scheduler step, between decode steps")
    p.add_argument("--seed", type=int, default=None, help="seed of requests that carry no sampling_seed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--deterministic", "--enable-deterministic-inference", dest="deterministic",
                   action="store_true",
                   help="requests with sampling_seed give bit-identical tokens and log-probs whatever "
                        "else is batched (seeded requests decode in a batch-invariant batch; with "
                        "a row-major --weight-layout each runs unbatched)")
    p.add_argument("--return-original-logprob", action="store_true",
                   help="log-probs of the untempered distribution (SGLANG_RETURN_ORIGINAL_LOGPROB=1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and compute: float32 (log-probs closest to an fp32 trainer's) or bfloat16 "
                        "(as SGLang serves on GPUs: half the bytes per decode step, weight syncs of bf16 "
                        "trainers are plain copies)")
    p.add_argument("--weight-layout", choices=("auto", "transposed", "hf"), default="auto",
                   help="memory order of linear weights: transposed (column-major: faster float32 decoding, "
                        "slower weight loads), hf (as stored by Hugging Face), or auto: transposed for "
                        "float32 or --deterministic, hf for bfloat16; values and names are the same")
    p.add_argument("--weight-shm-dir", default=None,
                   help="directory (e.g. under /dev/shm) whose files /update_weights_from_tensor may name with "
                        "load_format shared_memory (colocated weight sync); unset = that format is refused")
    p.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="megatron-rl serve", description=DESCRIPTION))


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (aiohttp's run_app turns both into a clean shutdown)."""
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # setLevel, not basicConfig(level=): `megatron-rl` (its -v included) may have configured logging first.
    logging.getLogger().setLevel("DEBUG" if getattr(args, "verbose", False) else args.log_level.upper())
    import torch
    from aiohttp import web

    from megatron_rl.rollout.engine import EmbeddedEngine
    from megatron_rl.rollout.http_server import build_app
    from megatron_rl.rollout.layout import DTYPES, wants_transposed

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    engine = EmbeddedEngine(args.model, max_batch_size=args.max_batch_size, seed=args.seed,
                            original_logprobs=args.return_original_logprob, deterministic=args.deterministic,
                            chunked_prefill_size=args.chunked_prefill_size, dtype=dtype,
                            transposed_weights=wants_transposed(args.weight_layout, dtype, args.deterministic))
    engine.weight_shm_dir = args.weight_shm_dir
    logging.getLogger(__name__).info("serving %s on http://%s:%d (%s, %s weights, deterministic=%s)", args.model,
                                     args.host, args.port, args.dtype,
                                     "column-major" if engine.transposed else "row-major", args.deterministic)
    # handler_cancellation: a client that hangs up cancels its handler, which aborts its jobs.
    web.run_app(build_app(engine), host=args.host, port=args.port, print=None, handler_cancellation=True,
                shutdown_timeout=5.0, access_log=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
