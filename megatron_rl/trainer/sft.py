"""``megatron-rl sft``: supervised fine-tuning on chat parquet with the RL trainer's actor.

Loss: the mean negative log-likelihood of assistant tokens over the whole step (tokens of
every micro-batch and data-parallel rank count once). Micro-batches by token budget,
balanced over DP ranks (``batching``), checkpoints, exact resume and SIGTERM handling as
``megatron-rl train``; the checkpoint (or the HF export at the end) is a valid
``model.path`` for an RL stage.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from megatron_rl.actor.forward import MicroBatch
from megatron_rl.config.run import RunConfig, to_dict
from megatron_rl.trainer import steps
from megatron_rl.trainer.batching import dp_shares, group_rows
from megatron_rl.trainer.dist_utils import any_rank, broadcast, on_rank0
from megatron_rl.trainer.loop import StopRequested
from megatron_rl.trainer.memory import phase_peak
from megatron_rl.trainer.resume import find_start
from megatron_rl.trainer.session import build_actor, check_world, load_start, torch_threads

log = logging.getLogger("megatron_rl.sft")


def sft_micro_batches(examples: list[tuple[list[int], list[int]]], *, dp: int, dp_rank: int, max_tokens: int,
                      micro_batch_size: int, pad_multiple: int) -> tuple[list[MicroBatch], int]:
    """This DP rank's micro-batches of (input_ids, loss_mask) pairs; also its real token count."""
    lengths = [len(ids) for ids, _ in examples]
    share = dp_shares(lengths, dp)[dp_rank]
    idle = not share
    mine = share or [0]  # an idle rank trains a fully masked row
    mbs = []
    for g in group_rows([lengths[i] for i in mine], max_tokens=max_tokens, micro_batch_size=micro_batch_size,
                        pad_multiple=pad_multiple):
        rows = [mine[j] for j in g]
        width = -(-max(lengths[i] for i in rows) // pad_multiple) * pad_multiple
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width)
        for r, i in enumerate(rows):
            ids, m = examples[i]
            tokens[r, :len(ids)] = torch.tensor(ids)
            if not idle:  # column t predicts token t+1
                mask[r, :len(ids) - 1] = torch.tensor(m[1:], dtype=torch.float32)
        mbs.append(MicroBatch(tokens_BS=tokens, loss_mask_BS=mask))
    return mbs, 0 if idle else sum(lengths[i] for i in mine)


def nll_loss(norm):
    def loss_fn(logp, ent, mb):
        valid = mb.loss_mask_BS.bool()
        loss = -torch.where(valid, logp, 0.0).sum() / max(norm.num_tokens, 1.0)
        return loss, {"sft/nll": loss.detach(), "sft/tokens": valid.sum().float()}
    return loss_fn


def sft(cfg: RunConfig) -> int:
    from megatron_rl import algos
    from megatron_rl.actor.model import resolve_model_dir
    from megatron_rl.checkpoint.state import save_checkpoint
    from megatron_rl.models.hf_config import read_dims
    from megatron_rl.parallel.topology import Topology
    from megatron_rl.trainer.export import export_hf_dir
    from megatron_rl.trainer.loop import quiet_libraries

    torch_threads(cfg)
    quiet_libraries()
    check_world(cfg)
    topo = Topology.initialize(cfg.parallel, seed=cfg.seed)
    try:
        start = on_rank0(lambda: find_start(cfg))
        hf_dir = on_rank0(lambda: str(resolve_model_dir(cfg.model.path)))
        dims = read_dims(hf_dir)
        actor = build_actor(cfg, topo, dims)
        start_step, extra = load_start(cfg, actor, start, topo, dims)
        stream, logger = None, None

        def open_data():
            nonlocal stream, logger
            from megatron_rl.config.run import dump_config
            from megatron_rl.data.prompts import PromptStream
            from megatron_rl.data.sft import SFTDataset
            from megatron_rl.data.template import load_tokenizer
            from megatron_rl.trainer.logger import RunLogger

            out = Path(cfg.logging.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(dump_config(cfg))
            data = SFTDataset.from_config(cfg.data, load_tokenizer(hf_dir), cfg.sft.max_len)
            stream = PromptStream(data, seed=cfg.seed, shuffle=cfg.data.shuffle)
            if extra.get("data") and extra.get("data_files") == list(cfg.data.train_files):
                stream.load_state_dict(extra["data"])
            logger = RunLogger(cfg.logging, out, total_steps=cfg.train.num_steps, start_step=start_step,
                               config_dict=to_dict(cfg))
            log.info("SFT data: %d transcripts (%d dropped over sft.max_len=%d)", len(data), data.num_dropped,
                     cfg.sft.max_len)

        on_rank0(open_data)
        stop = StopRequested()
        last_saved = start_step

        def save(done: int) -> None:
            nonlocal last_saved
            if cfg.checkpoint.dir:
                save_checkpoint(cfg.checkpoint.dir, done, actor.model, actor.optimizer,
                                extra={"data": stream.state_dict() if stream else None,
                                       "data_files": list(cfg.data.train_files)},
                                keep_last=cfg.checkpoint.keep_last, hf_dir=hf_dir,
                                optimizer_format=cfg.checkpoint.optimizer_format)
                last_saved = done

        for step in range(start_step, cfg.train.num_steps):
            t0 = time.perf_counter()
            batch = broadcast([(e.input_ids, e.loss_mask) for e in stream.take(cfg.sft.batch_size)]
                              if topo.rank == 0 else None)
            mbs, real = sft_micro_batches(batch, dp=topo.dp, dp_rank=topo.dp_rank,
                                          max_tokens=cfg.train.max_tokens_per_microbatch,
                                          micro_batch_size=cfg.train.micro_batch_size, pad_multiple=steps.pad_multiple(cfg))
            norm = algos.build_normalizer([mb.loss_mask_BS for mb in mbs], 1, topo.dp_group if topo.dp > 1 else None)
            lr = steps.learning_rate(cfg.optimizer, step, cfg.train.num_steps)
            steps.set_lr(actor.optimizer, lr)
            mem: dict[str, float] = {}
            with phase_peak("train", mem, topo.device):
                res = actor.train_step(mbs, nll_loss(norm), temperature=1.0)
            if cfg.checkpoint.dir and (step + 1) % cfg.checkpoint.save_every == 0:
                save(step + 1)
            if logger is not None:
                seconds = time.perf_counter() - t0
                logger.step(step, {"sft/nll": res.metrics["sft/nll"], "sft/tokens": res.metrics["sft/tokens"],
                                   "actor/grad_norm": res.grad_norm, "optimizer/lr": lr, "time/step": seconds,
                                   "perf/tokens_per_s": real * topo.dp / max(seconds, 1e-9), **mem}, [])
            if any_rank(stop.flag):
                save(step + 1)
                return 0
        if cfg.train.num_steps > last_saved:
            save(cfg.train.num_steps)
        if cfg.checkpoint.export_hf:
            export_hf_dir(actor.model[0], dims, topo, Path(cfg.logging.output_dir) / "hf", Path(hf_dir))
        if logger is not None:
            logger.close()
        return 0
    finally:
        Topology.destroy()
