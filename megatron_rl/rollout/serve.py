"""``python -m megatron_rl.rollout.serve --model HF_DIR --host H --port P``: the embedded server.

Loads the model (fp32, CPU), then serves SGLang's native HTTP API until SIGTERM/SIGINT.
``megatron-rl serve`` delegates here with the same arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-rl serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", "--model-path", dest="model", required=True,
                   help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port to bind (default: 30000)")
    p.add_argument("--max-batch-size", type=int, default=64, help="most sequences decoded together")
    p.add_argument("--seed", type=int, default=None, help="seed of requests that carry no sampling_seed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--return-original-logprob", action="store_true",
                   help="log-probs of the untempered distribution (SGLANG_RETURN_ORIGINAL_LOGPROB=1)")
    p.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from aiohttp import web

    from megatron_rl.rollout.engine import EmbeddedEngine
    from megatron_rl.rollout.http_server import build_app

    engine = EmbeddedEngine(args.model, max_batch_size=args.max_batch_size, seed=args.seed,
                            original_logprobs=args.return_original_logprob)
    logging.getLogger(__name__).info("serving %s on http://%s:%d", args.model, args.host, args.port)
    # handler_cancellation: a client that hangs up cancels its handler, which aborts its jobs.
    web.run_app(build_app(engine), host=args.host, port=args.port, print=None, handler_cancellation=True,
                shutdown_timeout=5.0, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
