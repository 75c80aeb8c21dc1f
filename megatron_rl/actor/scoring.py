"""Score token sequences with the Megatron actor: ``megatron-rl logprobs``.

Reads JSONL lines ``{"input_ids": [...]}`` and writes ``{"logprobs": [...]}`` lines in the
same order: entry i-1 is log p(token i | tokens < i), so one fewer than the ids. Runs under
torchrun with any TP/PP/CP layout; rank 0 writes the output (atomically: a temporary file,
then rename, so a crash never leaves half a file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_rl.actor.forward import MicroBatch
from megatron_rl.config.model import ModelConfig
from megatron_rl.config.parallel import ParallelConfig
from megatron_rl.errors import DataError


@dataclass
class ScoreArgs:
    model: str
    """HF model directory, or a megatron-rl checkpoint directory."""
    input: str
    output: str
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False
    batch_size: int = 8
    """Sequences per micro-batch."""
    dtype: str = "float32"
    temperature: float = 1.0


def read_sequences(path: str | Path, vocab_size: int | None = None) -> list[list[int]]:
    """Validated ``input_ids`` lists, one per line; each bad line is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Input `{path}` does not exist: pass a JSONL file of {{\"input_ids\": [...]}} lines.")
    seqs: list[list[int]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids = json.loads(line)["input_ids"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"`{path}` line {n} is not a JSON object with an `input_ids` list: {line[:80]!r}.") from None
        if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise DataError(f"`{path}` line {n}: `input_ids` must be a list of at least 2 integers.")
        if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
            raise DataError(f"`{path}` line {n} has token ids outside [0, {vocab_size}) of this model's vocabulary.")
        seqs.append(ids)
    if not seqs:
        raise DataError(f"`{path}` holds no sequences.")
    return seqs


def make_microbatches(seqs: list[list[int]], batch_size: int, multiple: int, min_count: int) -> tuple[list[MicroBatch], list[list[int]]]:
    """Right-padded micro-batches (length a multiple of ``multiple``), and the seq indices of each.

    Every micro-batch has the same padded length: pipeline stages exchange one shape.
    At least ``min_count`` micro-batches (pp stages), padding with dummy rows if needed.
    """
    longest = max(len(s) for s in seqs)
    length = -(-longest // multiple) * multiple
    groups = [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]
    while len(groups) < min_count:
        groups.append([])
    mbs = []
    for g in groups:
        rows = [seqs[i] for i in g] or [[0, 0]]
        tokens = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length)
        for r, ids in enumerate(rows):
            tokens[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids) - 1] = 1.0
        mbs.append(MicroBatch(tokens_BS=tokens, loss_mask_BS=mask))
    # Uneven last group: pad to batch_size rows so every micro-batch has one shape.
    b = max(m.tokens_BS.shape[0] for m in mbs)
    for i, m in enumerate(mbs):
        if m.tokens_BS.shape[0] < b:
            extra = b - m.tokens_BS.shape[0]
            mbs[i] = MicroBatch(tokens_BS=torch.cat([m.tokens_BS, m.tokens_BS.new_zeros(extra, length)]),
                                loss_mask_BS=torch.cat([m.loss_mask_BS, m.loss_mask_BS.new_zeros(extra, length)]))
    return mbs, groups


def score(args: ScoreArgs) -> int:
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.model import build_model, load_model_weights, resolve_model_dir
    from megatron_rl.models.hf_config import read_dims
    from megatron_rl.parallel.topology import Topology

    par = ParallelConfig(tp=args.tp, pp=args.pp, cp=args.cp, sp=args.sp, num_microbatches=args.pp,
                         distributed_optimizer=False)
    model_cfg = ModelConfig(path=args.model, dtype=args.dtype)  # type: ignore[arg-type]
    hf_dir = resolve_model_dir(args.model)
    dims = read_dims(hf_dir)
    seqs = read_sequences(args.input, dims.vocab_size)  # fail on bad data before any process group
    topo = Topology.initialize(par)
    model = build_model(dims, par, model_cfg, topo, ddp=False)
    load_model_weights(model, args.model, dims, par, model_cfg, topo)
    actor = Actor(model, dims, topo)
    multiple = 2 * args.cp * (args.tp if args.sp else 1)
    mbs, groups = make_microbatches(seqs, args.batch_size, multiple, args.pp)
    outs = actor.logprobs(mbs, temperature=args.temperature)
    if topo.rank == 0:
        lines: list[str | None] = [None] * len(seqs)
        for out, g in zip(outs, groups):
            for r, i in enumerate(g):
                lines[i] = json.dumps({"logprobs": out["logp"][r, : len(seqs[i]) - 1].tolist()})
        tmp = f"{args.output}.tmp-{os.getpid()}"
        Path(tmp).write_text("\n".join(lines) + "\n")  # type: ignore[arg-type]
        os.replace(tmp, args.output)
    Topology.destroy()
    return 0
