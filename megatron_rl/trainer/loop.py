"""``megatron-rl train``: the RL step as named phases (one rollout batch per step).

    generate -> reward -> shape -> log-probs -> advantages -> train -> sync -> checkpoint/eval -> metrics

Rank 0 generates and grades (``generate``), every rank receives the scored samples, each
data-parallel rank trains on its own share (``batching``), and the actor's new weights go
to the rollout servers before the next step. A stop signal (SIGTERM, or SIGUSR1 from
Slurm before a time limit) finishes the current step, checkpoints and exits 0.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import defaultdict
from contextlib import contextmanager

from megatron_rl import algos
from megatron_rl.config.run import RunConfig, to_dict
from megatron_rl.errors import RolloutError, UserError
from megatron_rl.trainer import steps
from megatron_rl.trainer.batching import pack
from megatron_rl.trainer.dist_utils import any_rank, broadcast, on_rank0
from megatron_rl.trainer.gate import check_gate, step_mismatch
from megatron_rl.trainer.memory import GIB, phase_peak, state_bytes
from megatron_rl.trainer.metrics import eval_metrics, sample_metrics
from megatron_rl.trainer.pipeline import Batch, RolloutPipeline, staleness_metrics
from megatron_rl.trainer.session import Session, open_session

log = logging.getLogger("megatron_rl.train")
EVAL_STEP_SEED = 1 << 30  # eval seeds do not depend on the training step: same draws every time


class InPlacePause:
    """The rollout client as a weight receiver for partial rollouts: generation is paused in
    place (running requests keep their state and continue on the new weights) and the prefix
    cache is not flushed (it holds those requests' KV; SGLang refuses a flush while requests
    run). New prompts may then reuse prefix KV computed by the older weights."""

    def __init__(self, client) -> None:
        self.client = client

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    async def pause_generation(self) -> None:
        await self.client.pause_generation(mode="in_place")

    async def flush_cache(self) -> None:
        return None


class StopRequested:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the end of the step and exits 0."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        log.warning("received %s: finishing this step, then checkpointing and exiting", signal.Signals(signum).name)
        self.flag = True


class Trainer:
    def __init__(self, s: Session):
        self.s, self.cfg = s, s.cfg
        self.timings: dict[str, float] = defaultdict(float)
        self.sync_totals: dict[str, float] = defaultdict(float)  # rank 0: this step's weight syncs
        self.logger = None
        self.last_saved = s.start_step
        self.sample_log: list[dict] = []
        self.updated = False  # whether the current step has changed the weights yet
        self.stale = False  # whether this step's samples came from older weights (async modes)
        self.pipeline: RolloutPipeline | None = None  # rank 0, rollout.mode one_step_off / async
        self.producing = False  # every rank: whether the pipeline was started (async modes)
        # Rank 0: batches generated before a checkpoint and not yet trained (a resumed async run).
        self.buffered: dict[int, Batch] = {}
        if s.rank0:
            for d in s.extra.get("rollout_buffer") or []:
                b = Batch.from_json(d)
                self.buffered[b.step] = b

    @contextmanager
    def phase(self, step: int, name: str):
        if self.logger is not None:
            self.logger.phase(step, name)
        t0 = time.perf_counter()
        yield
        self.timings[f"time/{name}"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        s, cfg = self.s, self.cfg
        stop = StopRequested()
        if s.rank0:
            from megatron_rl.trainer.logger import RunLogger

            self.logger = RunLogger(cfg.logging, s.out_dir, total_steps=cfg.train.num_steps, start_step=s.start_step,
                                    config_dict=to_dict(cfg))
        try:
            self.sync(s.start_step)  # the servers serve exactly the trainer's weights from step one
            if cfg.eval.at_start and s.start_step == 0 and cfg.eval.files:
                self.evaluate(0)
            if cfg.rollout.mode != "sync":
                self.start_pipeline()
            for step in range(s.start_step, cfg.train.num_steps):
                self.timings.clear()
                self.sync_totals.clear()
                t0 = time.perf_counter()
                self.updated = False
                try:
                    metrics = self.train_step(step)
                except UserError:
                    # No server left, a broken grader, the mismatch gate: when nothing of this
                    # step was applied, the last completed step is what we keep (then stop).
                    # After an update (a sync that failed) the previous checkpoint stays: a
                    # resume redoes this step from it, exactly.
                    if cfg.checkpoint.dir and step > self.last_saved and not self.updated:
                        self.save(step)
                    raise
                metrics["time/step"] = time.perf_counter() - t0
                if self.logger is not None:
                    self.logger.step(step, metrics, self.sample_log)
                # After the step's row is written: a checkpoint never covers a step whose row a
                # kill could lose (a resume drops the rows past its checkpoint and redoes them).
                self.checkpoint_and_evaluate(step)
                if any_rank(stop.flag):
                    self.save(step + 1)
                    log.warning("stopped by signal after step %d; checkpoint saved", step + 1) if s.rank0 else None
                    return 0
            self.stop_pipeline()
            if cfg.train.num_steps > self.last_saved:
                self.save(cfg.train.num_steps)
            if cfg.eval.files:
                self.evaluate(cfg.train.num_steps)
            if cfg.checkpoint.export_hf:
                from megatron_rl.trainer.export import export_hf_dir

                out = export_hf_dir(s.actor.model[0], s.dims, s.topo, s.out_dir / "hf", s.hf_dir)
                log.info("Hugging Face export: %s", out) if s.rank0 else None
            return 0
        finally:
            if self.logger is not None:
                self.logger.close()

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        with self.phase(step, "generate"):  # + reward: graded as samples arrive
            groups, gen_metrics = self.generate(step)
        if self.producing:
            with self.phase(step, "sync"):
                # The servers are idle now if the producer waits for this step's weights: with
                # one_step_off, step t+1's batch is generated with exactly these while we train.
                self.try_sync(step)
        samples = [x for g in groups for x in g]
        with self.phase(step, "shape"):
            metrics = {**gen_metrics, **steps.shape(cfg, samples), **sample_metrics(samples, cfg.rollout.max_new_tokens)}
            adv = steps.advantages(cfg, samples)
        self.sample_log = [{"data_source": x.data_source, "reward": x.reward, "finish": x.finish_reason,
                            "prompt_len": len(x.prompt_ids), "weight_version": x.weight_version,
                            "response": x.extra.get("text", "")}
                           for x in samples[: cfg.logging.log_samples]]
        self.server_memory("release")  # colocated: the actor gets the GPU memory back
        metrics.update(self.train_updates(step, samples, adv))
        with self.phase(step, "sync"):
            if self.producing:
                self.try_sync(step + 1)  # only while the producer waits for these weights
            else:
                self.s.drop_dead_servers()  # lost mid-step: the client already re-sent their requests
                self.server_memory("resume", ["weights"])
                self.sync(step + 1)
                self.server_memory("resume", ["kv_cache"])
        metrics.update(self.timings)
        metrics.update(self.sync_metrics())
        gen_tokens = sum(len(x.response_ids) for x in samples)
        gen_time = metrics.get("time/generate_batch", self.timings["time/generate"])
        metrics["perf/generated_tokens_per_s"] = gen_tokens / max(gen_time, 1e-9)
        return metrics

    def checkpoint_and_evaluate(self, step: int) -> None:
        cfg = self.cfg
        if cfg.checkpoint.dir and (step + 1) % cfg.checkpoint.save_every == 0:
            with self.phase(step, "checkpoint"):
                self.save(step + 1)
        if cfg.eval.files and cfg.eval.every_steps and (step + 1) % cfg.eval.every_steps == 0 \
                and step + 1 < cfg.train.num_steps:
            with self.phase(step, "evaluate"):
                self.evaluate(step + 1)

    def server_memory(self, action: str, tags: list[str] | None = None) -> None:
        """Colocated servers (``rollout.colocate``): release all their memory while the actor
        trains; take the weights' memory back before the sync and the KV cache's after it
        (SGLang's memory-saver tags), so both never hold the GPU at once."""
        s = self.s
        if not self.cfg.rollout.colocate:
            return
        client = s.client

        def call() -> None:
            if action == "release":
                s.run(client.release_memory_occupation(tags))
            else:
                s.run(client.resume_memory_occupation(tags))

        on_rank0(call)

    async def generate_batch(self, step: int) -> tuple[list, dict[str, float]]:
        """Rank 0, on the loop thread: one step's groups and generation metrics."""
        from megatron_rl.trainer.generate import Generator

        s = self.s
        out = await Generator(self.cfg, s.client, s.pool, s.tokenizer).step(s.stream, step)
        out.metrics["data/epoch"] = float(s.stream.epoch)
        out.metrics["data/prompts_dropped"] = float(s.stream.dataset.num_dropped)
        return out.groups, out.metrics

    def generate(self, step: int):
        """Rank 0 generates and grades (or takes the batch generated ahead); every rank gets the
        groups (or the error that stopped it)."""
        s = self.s
        result = None
        if s.rank0:
            try:
                batch = self.buffered.pop(step, None)
                if batch is None and self.pipeline is not None:
                    batch = s.run(self.pipeline.take(step))
                    if batch.error is not None:
                        raise RolloutError(batch.error)
                if batch is None:
                    groups, metrics = s.run(self.generate_batch(step))
                    batch = Batch(step, groups, metrics, version=step)
                metrics = {**batch.metrics, **staleness_metrics(step, batch.version, batch.groups)}
                if batch.seconds:  # generated ahead: time/generate is only what the trainer waited
                    metrics["time/generate_batch"] = batch.seconds
                result = ("ok", batch.groups, metrics)
            except RolloutError as e:
                result = ("rollout_error", str(e), None)
        result = broadcast(result)
        if result[0] == "rollout_error":
            raise RolloutError(f"{result[1]} The run keeps its state after step {step} and stops; start the "
                               "same command again once servers are back (it resumes from there).")
        self.stale = result[2]["rollout/staleness_max"] > 0
        return result[1], result[2]

    # ------------------------------------------------------------------ generation ahead
    def start_pipeline(self) -> None:
        s, cfg = self.s, self.cfg
        self.producing = True
        if not s.rank0:
            return
        first = max([s.start_step - 1, *self.buffered]) + 1
        self.pipeline = RolloutPipeline(self.generate_batch, next_step=first, num_steps=cfg.train.num_steps,
                                        staleness=cfg.rollout.staleness, server_version=s.start_step,
                                        partial=cfg.rollout.partial)
        s.run(self.pipeline.start())

    def stop_pipeline(self) -> None:
        """No more generation ahead (the last step is trained); holds and syncs still work."""
        if self.pipeline is not None:
            self.s.run(self.pipeline.stop())

    def try_sync(self, version: int) -> bool:
        """Collective: push the trainer's weights (``version``) to the servers if they are
        between batches and older; True when synced."""
        s, p = self.s, self.pipeline
        claimed = False
        if s.rank0 and p is not None:
            claimed = s.run(p.claim_idle(version))
        if not broadcast(claimed):
            return False
        synced = False
        try:
            self.s.drop_dead_servers()
            self.sync(version, in_place=self.cfg.rollout.partial)
            synced = True
        finally:
            if s.rank0 and p is not None:
                s.run(p.release(version if synced else None))
        return True

    def train_updates(self, step: int, samples, adv) -> dict[str, float]:
        """Old log-probs of every update's samples under the pre-step weights (a forward pass
        only when ``steps.needs_logprob_pass``), the mismatch gate, then the updates."""
        s, cfg, topo = self.s, self.cfg, self.s.topo
        parts = steps.mini_batches(cfg, samples)
        if not parts:
            return {"train/updates": 0.0}
        temperature = cfg.rollout.temperature
        updates_per_step = cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
        separate_pass = steps.needs_logprob_pass(cfg, updates_per_step) or len(parts) > 1
        packs = []
        with self.phase(step, "logprobs"):
            for idx in parts:
                packed = pack([samples[i] for i in idx], [adv[i] for i in idx], dp=topo.dp, dp_rank=topo.dp_rank,
                              max_tokens=cfg.train.max_tokens_per_microbatch,
                              micro_batch_size=cfg.train.micro_batch_size, pad_multiple=steps.pad_multiple(cfg),
                              uniform_shape=cfg.parallel.pp > 1)
                if separate_pass:
                    outs = s.actor.logprobs(packed.micro_batches, temperature=temperature)
                    for mb, out in zip(packed.micro_batches, outs):
                        mb.old_logp_BS = out["logp"]
                if s.ref_actor is not None:
                    refs = s.ref_actor.logprobs(packed.micro_batches, temperature=temperature)
                    for mb, out in zip(packed.micro_batches, refs):
                        mb.ref_logp_BS = out["logp"]
                packs.append(packed)
        metrics: dict[str, float] = {}
        if separate_pass:  # every step follows a sync (the previous step's, or start-up's): gate it
            metrics = self.gate(step, [mb for p in packs for mb in p.micro_batches], "old_logp_BS")
        totals: dict[str, float] = defaultdict(float)
        with self.phase(step, "train"), phase_peak("train", totals, topo.device):
            for u, packed in enumerate(packs):
                for mb in packed.micro_batches:
                    if mb.old_logp_BS is not None:
                        corr = algos.correct_mismatch(cfg.algorithm, mb.old_logp_BS, mb.rollout_logp_BS,
                                                      mb.loss_mask_BS)
                        mb.loss_mask_BS, mb.weight_BS = corr.mask_BT.float(), corr.weight_BT
                norm = algos.build_normalizer([mb.loss_mask_BS for mb in packed.micro_batches], cfg.rollout.max_new_tokens,
                                              topo.dp_group if topo.dp > 1 else None)
                update = step * updates_per_step + u
                lr = steps.learning_rate(cfg.optimizer, update, cfg.train.num_steps * updates_per_step)
                steps.set_lr(s.actor.optimizer, lr)
                grads = s.actor.forward_backward(packed.micro_batches, steps.build_loss(cfg, norm),
                                                 temperature=temperature, with_entropy=True)
                if not separate_pass:  # the gate on the training forward's log-probs, before any update
                    try:
                        metrics = self.gate(step, packed.micro_batches, "train_logp_BS")
                    except BaseException:
                        s.actor.discard_gradients()
                        raise
                res = s.actor.optimizer_step(grads)
                self.updated = True
                for k, v in res.metrics.items():
                    totals[k] += v / len(packs)
                totals["actor/grad_norm"] += res.grad_norm / len(packs)
                totals["train/skipped_updates"] += float(res.skipped)
                totals["optimizer/lr"] = lr
        pad = sum(p.padded_tokens for p in packs)
        real = sum(p.real_tokens for p in packs)
        totals["perf/padding_frac"] = 1.0 - real / max(pad, 1)
        totals["train/updates"] = float(len(packs))
        totals["train/logprob_pass"] = float(separate_pass)
        totals["optimizer/adam_step"] = steps.adam_step(s.actor.optimizer)
        totals["mem/state_gib"] = state_bytes(s.actor.model, s.actor.optimizer) / GIB
        totals["perf/train_tokens_per_s"] = real * topo.dp / max(self.timings["time/train"], 1e-9)
        return {**metrics, **totals}

    def gate(self, step: int, mbs, field: str) -> dict[str, float]:
        """Mismatch metrics over every DP rank's tokens, and the gate when the samples came from
        the trainer's current weights (stale samples differ by the policy's own updates)."""
        cfg, topo = self.cfg, self.s.topo
        metrics = step_mismatch([getattr(mb, field) for mb in mbs], mbs, topo.dp_group if topo.dp > 1 else None)
        if not self.stale:
            check_gate(metrics, dtype=cfg.model.dtype, threshold=cfg.train.mismatch_threshold, step=step,
                       version=f"step{step}")
        return metrics

    # ------------------------------------------------------------------ services
    def sync(self, version_step: int, *, in_place: bool = False) -> None:
        """Send the actor's weights to every live server. A server that died (mid-step or
        mid-sync) is dropped and the weight sync reopened with the survivors (a full sync), once.
        ``in_place``: running requests are frozen, not aborted, and continue on the new weights.

        distributed / shm on a CPU actor: the session's ``ActorSync`` (one sender per pipeline
        stage, delta when ``rollout.sync_delta``); disk / tensor, and distributed on a CUDA actor:
        rank 0 sends every stage (``sync_actor_weights``)."""
        from megatron_rl.weights.actor_sync import sync_actor_weights

        s, cfg = self.s, self.cfg
        receiver = (InPlacePause(s.client) if in_place else s.client) if s.rank0 else None
        version = f"step{version_step}"
        for attempt in range(2):
            try:
                if s.link is not None:
                    report = s.run(s.link.sync(weight_version=version, control=receiver))
                else:
                    report = s.run(sync_actor_weights(
                        s.actor.model[0], s.dims, s.topo, receiver, sender=s.sender,
                        bucket_bytes=cfg.rollout.bucket_size_mb << 20,
                        transport=cfg.rollout.sync_transport, disk_dir=s.out_dir / "sync", weight_version=version))
                self.record_sync(report)
                return
            except RolloutError:
                if attempt == 1 or not s.drop_dead_servers():
                    raise

    def record_sync(self, report) -> None:
        """Rank 0: add one sync's figures to this step's (``SyncReport`` or ``ActorSyncReport``)."""
        if report is None:
            return
        t = self.sync_totals
        t["seconds"] += report.seconds
        t["syncs"] += 1
        stats = getattr(report, "stats", None)
        if stats is None:  # sync_actor_weights: always full
            t["full"] = 1.0
            t["sent_bytes"] += report.num_bytes
            t["full_bytes"] += report.num_bytes
            return
        t["full"] = max(t["full"], float(report.full))
        t["sent_bytes"] += stats.sent_bytes
        t["full_bytes"] += stats.full_bytes
        t["changed"] += stats.changed
        t["elements"] += stats.elements
        t["resent_buckets"] += stats.fallbacks

    def sync_metrics(self) -> dict[str, float]:
        """This step's weight syncs (summed when there were several): seconds, whether any was
        full, bytes sent and their fraction of the model's bytes, the fraction of elements that
        changed (delta syncs only) and the buckets resent in full after a checksum refusal."""
        t = self.sync_totals
        if not t.get("syncs"):
            return {}
        out = {"time/sync_transfer": t["seconds"], "sync/full": t["full"], "sync/sent_bytes": t["sent_bytes"],
               "sync/sent_frac": t["sent_bytes"] / max(t["full_bytes"], 1.0),
               "sync/resent_buckets": t["resent_buckets"]}
        if t["elements"]:
            out["sync/changed_frac"] = t["changed"] / t["elements"]
        return out

    def save(self, completed: int) -> None:
        from megatron_rl.checkpoint.state import save_checkpoint

        s, cfg = self.s, self.cfg
        if not cfg.checkpoint.dir:
            return
        pending: list[Batch] = list(self.buffered.values())
        if s.rank0 and self.pipeline is not None:
            # Nothing in flight while the data position is read: it must follow the stored batches.
            pending += s.run(self.pipeline.drain())
        try:
            extra = {"data": s.stream.state_dict() if s.rank0 else None, "data_files": list(cfg.data.train_files),
                     "rollout_buffer": [b.to_json() for b in pending if b.error is None and b.step >= completed]}
            save_checkpoint(cfg.checkpoint.dir, completed, s.actor.model, s.actor.optimizer if
                            cfg.checkpoint.save_optimizer else None, extra=extra, keep_last=cfg.checkpoint.keep_last,
                            hf_dir=s.hf_dir, optimizer_format=cfg.checkpoint.optimizer_format)
        finally:
            if s.rank0 and self.pipeline is not None:
                s.run(self.pipeline.release())
        self.last_saved = completed

    def evaluate(self, step: int) -> None:
        """Samples of the eval set under the trainer's weights at ``step``; while generation runs
        ahead (async modes) the producer is held and the servers synced to ``step`` first."""
        s = self.s
        if not self.producing:
            return self._evaluate(step)
        p = self.pipeline
        if s.rank0:
            s.run(p.drain())  # no batch in flight, none started while we evaluate
        synced = False
        try:
            if broadcast(s.rank0 and p.server_version < step):
                self.s.drop_dead_servers()
                self.sync(step)
                synced = True
            self._evaluate(step)
        finally:
            if s.rank0:
                s.run(p.release(step if synced else None))

    def _evaluate(self, step: int) -> None:
        s, cfg = self.s, self.cfg

        def work():
            from megatron_rl.trainer.generate import Generator

            gen = Generator(cfg, s.client, s.pool, s.tokenizer)
            problems = [s.eval_set[i] for i in range(len(s.eval_set))]
            groups, _ = s.run(gen.run_groups(problems, cfg.eval.n_samples, EVAL_STEP_SEED, eval_mode=True))
            return eval_metrics(groups, cfg.eval.pass_k, default_kind=cfg.reward.kind)

        metrics = on_rank0(work)
        if self.logger is not None:
            self.logger.evaluation(step, metrics)


def quiet_libraries() -> None:
    """megatron-core logs every parameter name at INFO when it builds DDP buffers: keep the
    run's log about the run (`megatron-rl -v` still shows everything)."""
    if logging.getLogger().level > logging.DEBUG:
        for name in ("megatron", "megatron.core"):
            logging.getLogger(name).setLevel(logging.WARNING)


def train(cfg: RunConfig) -> int:
    """Run ``cfg`` in this process as one rank of the trainer world (torchrun/srun or alone)."""
    from megatron_rl.parallel.topology import Topology
    from megatron_rl.trainer.session import torch_threads

    torch_threads(cfg)
    quiet_libraries()
    s = open_session(cfg)
    try:
        return Trainer(s).run()
    finally:
        s.close()
        Topology.destroy()

