"""``megatron-rl convert``: the converters behind a subcommand (parsing only; see ``convert``).

    megatron-rl convert hf-to-mcore --hf DIR --out DIR [--tp T] [--pp P]
    megatron-rl convert mcore-to-hf --ckpt DIR --out DIR [--max-shard-size 5GB]

Both run in one process, without torchrun. ``UserError``s propagate to the CLI's handler.
"""

from __future__ import annotations

import argparse
import re

from megatron_rl.errors import UserError

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / ``123456`` -> bytes (decimal units, as transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"`--max-shard-size {text}` is not a size; write e.g. 5GB, 500MB or 2GiB.")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="convert weights between Hugging Face and megatron checkpoints",
        description="Offline weight conversion, in one process (no torchrun). A megatron checkpoint "
                    "written here loads at any TP/PP; --tp/--pp only check that the layout you plan "
                    "to train with can split the model.")
    sub = p.add_subparsers(dest="convert_command", required=True)
    h = sub.add_parser("hf-to-mcore", help="HF folder -> megatron distributed checkpoint",
                       description="Write a megatron distributed checkpoint (torch_dist) of an HF "
                                   "model, with its config and tokenizer under hf/.")
    h.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    h.add_argument("--out", required=True, help="new checkpoint folder (must not exist or be empty)")
    h.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate for (default 1)")
    h.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate for (default 1)")
    m = sub.add_parser("mcore-to-hf", help="megatron checkpoint -> HF folder (safetensors)",
                       description="Write an HF folder (config, safetensors shards + index, tokenizer) "
                                   "from a converted checkpoint, a training step folder, or a "
                                   "checkpoint root (follows `latest`). Streams layer by layer.")
    m.add_argument("--ckpt", required=True, help="checkpoint folder or checkpoint root")
    m.add_argument("--out", required=True, help="new HF folder (must not exist or be empty)")
    m.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p.set_defaults(run=run_convert)
    return p


add_parser = add_convert_parser  # the CLI's registry convention (megatron_rl.cli.main)


def run_convert(args: argparse.Namespace) -> int:
    from megatron_rl.checkpoint.convert import convert_hf_to_mcore, convert_mcore_to_hf

    if args.convert_command == "hf-to-mcore":
        out = convert_hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp)
        print(f"wrote megatron checkpoint {out} (loads at any TP/PP; checked for tp={args.tp} pp={args.pp})")
    else:
        out = convert_mcore_to_hf(args.ckpt, args.out, max_shard_bytes=parse_size(args.max_shard_size))
        print(f"wrote HF model {out}")
    return 0
