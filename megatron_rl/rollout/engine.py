"""The embedded CPU engine: a ``transformers`` causal LM (fp32) with batched generation.

One scheduler thread owns the model's forward passes. Requests queue up; the thread takes
what is waiting (after a short window so concurrent arrivals share a batch), prefills it
left-padded in one forward, then decodes step by step with a KV cache, dropping finished
rows from the cache as they finish. Requests that arrive mid-batch wait for the next one.
Between steps it honours aborts and pauses, and weight loads take the same model lock, so
an update lands between two steps, never inside one. The HTTP layer (``http_server``) and
the weight-update receivers run in other threads and only call the public methods here.

Deterministic mode (``deterministic=True``, ``--deterministic``): each seeded job runs in
forwards of its own (one row, no padding), interleaved step by step with the others, because
CPU matmuls round differently with the number of rows and attention with the padded width
(measured: a prompt's logits alone and in any batch, even of 8 copies of itself, differ in
the last bits). With the counter-based draw of ``sampling``, its tokens and log-probs are
then a function of the request, the weights and the torch build only. Unseeded jobs still
share one batch.

Legend: B = rows, L = padded prompt length, V = vocabulary.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_rl.rollout.sampling import BadRequest, RequestParams, sample_rows, seeded_uniform

log = logging.getLogger(__name__)


TokenHook = Callable[["Job", int, float], None]
"""``on_token(job, token_id, logprob)``: called by the scheduler thread for every new token of a job.

It runs after the token, its log-prob and its weight version are appended to ``job.output_ids``
/ ``output_logprobs`` / ``output_versions`` and before ``job.done`` resolves (so the last token's
call comes before the future completes; a job aborted or finished without a new token gets no
call: wait on ``job.done`` for the end). It must return quickly and never block (it runs between
decode steps); from asyncio, hand over with ``loop.call_soon_threadsafe``. An exception it raises
is logged and the hook is dropped for that job; generation goes on."""


@dataclass
class Job:
    """One sequence to generate (a request with n samples is n jobs)."""

    rid: str
    parent_rid: str
    prompt: list[int]
    params: RequestParams
    return_logprob: bool
    logprob_start_len: int
    done: Future = field(default_factory=Future)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_versions: list[str] = field(default_factory=list)
    """The weight version of the forward that produced each output token (one per output id)."""
    input_logprobs: list[float | None] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    abort_message: str | None = None
    start: float = field(default_factory=time.perf_counter)
    on_token: TokenHook | None = None
    """Per-token hook (see ``TokenHook``); None = nobody listens."""
    weight_version: str | None = None
    """The engine's weight version when the job finished (SGLang's ``meta_info.weight_version``)."""


@dataclass
class Group:
    """Rows that share forward passes (one KV cache): a whole batch, or one seeded job."""

    jobs: list[Job]
    logits_BV: torch.Tensor
    cache: Any
    mask_BL: torch.Tensor
    pos_B1: torch.Tensor
    version: str
    """The weight version of the forward that produced ``logits_BV``."""


class EmbeddedEngine:
    """A CPU generation engine with SGLang's sampling and weight-update semantics."""

    def __init__(self, model_path: str, *, max_batch_size: int = 64, seed: int | None = None,
                 batch_wait_s: float = 0.005, original_logprobs: bool = False, deterministic: bool = False):
        from transformers import AutoModelForCausalLM

        self.model_path = model_path
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.tokenizer = _load_tokenizer(model_path)
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.context_len = int(getattr(cfg, "max_position_embeddings", 32768))
        self.eos_ids = _eos_ids(self.model)
        # state_dict tensors share storage with the parameters (tied names share one tensor),
        # so copying into them updates the model in place.
        self._targets = self.model.state_dict()
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.original_logprobs, self.deterministic = original_logprobs, deterministic
        self.generator = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
        self.weight_version = "default"
        self._model_lock = threading.Lock()
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._paused = False
        self._stopping = False
        self._groups: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- requests
    def submit(self, prompt: list[int], params: RequestParams, *, rid: str, return_logprob: bool = False,
               logprob_start_len: int = -1, on_token: TokenHook | None = None) -> list[Future]:
        """Queue ``params.n`` jobs for one prompt; BadRequest if the prompt cannot be served.

        ``on_token`` is called for each new token of each of the n jobs (see ``TokenHook``)."""
        if not prompt:
            raise BadRequest("input_ids is empty: a prompt needs at least one token.")
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise BadRequest(f"input_ids has token id(s) outside [0, {self.vocab_size}): {bad[:5]}.")
        if len(prompt) + params.max_new_tokens > self.context_len:
            raise BadRequest(
                f"The prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) "
                f"exceeds the model's context length of {self.context_len} tokens.")
        if params.stop and self.tokenizer is None:
            raise BadRequest(f"stop={params.stop!r} needs a tokenizer, and {self.model_path} has none; "
                             "use stop_token_ids instead.")
        if logprob_start_len >= len(prompt):
            raise BadRequest(f"logprob_start_len ({logprob_start_len}) must be < the prompt length ({len(prompt)}).")
        # The n copies share params, so one seed: identical samples, as SGLang's copies.
        jobs = [Job(rid=rid if params.n == 1 else f"{rid}-{i}", parent_rid=rid, prompt=list(prompt),
                    params=params, return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                    on_token=on_token)
                for i in range(params.n)]
        with self._cv:
            if self._stopping:
                raise BadRequest("The engine is shutting down.")
            self._pending.extend(jobs)
            self._cv.notify_all()
        return [j.done for j in jobs]

    def abort(self, rid: str | None = None, abort_all: bool = False, message: str = "Aborted by /abort_request") -> int:
        """Mark queued and running jobs of ``rid`` (``rid`` or ``rid-i``) as aborted; returns how many."""
        with self._cv:
            hits = [j for j in [*self._pending, *self._running]
                    if abort_all or rid in (j.rid, j.parent_rid)]
            for job in hits:
                job.abort_message = message
            for job in [j for j in self._pending if j.abort_message]:
                self._pending.remove(job)
                self._finish(job, {"type": "abort", "message": job.abort_message})
            self._cv.notify_all()
        return len(hits)

    def pause(self, mode: str = "abort") -> None:
        """Stop generating: ``abort`` ends running/queued jobs; ``in_place`` freezes them."""
        if mode not in ("abort", "in_place"):
            raise BadRequest(f"pause mode must be 'abort' or 'in_place', got {mode!r}.")
        with self._cv:
            self._paused = True
        if mode == "abort":
            self.abort(abort_all=True, message="Aborted by /pause_generation")

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def alive(self) -> bool:
        """The scheduler thread runs and the engine is not shutting down (what /health reports)."""
        return self._thread.is_alive() and not self._stopping

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self.abort(abort_all=True, message="Server shutting down")
        self._thread.join(timeout=10)

    # ----------------------------------------------------------------- weights
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-named tensors into the model (cast to its dtype); BadRequest on unknown names/shapes."""
        count = 0
        with self._model_lock, torch.no_grad():
            for name, tensor in named_tensors:
                target = self._targets.get(name)
                if target is None:
                    raise BadRequest(f"Unknown parameter name {name!r} for this model "
                                     f"(e.g. {next(iter(self._targets))!r}); {count} tensors were loaded before it.")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise BadRequest(f"Shape mismatch for {name!r}: model has {tuple(target.shape)}, "
                                     f"got {tuple(tensor.shape)}; {count} tensors were loaded before it.")
                target.copy_(tensor.to(target.dtype))
                count += 1
        return count

    def load_from_disk(self, path: str) -> int:
        """Load every ``*.safetensors`` file of a directory (one file at a time)."""
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise BadRequest(f"No *.safetensors files in {path!r} (the embedded engine reads safetensors only).")
        count = 0
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                count += self.load_weights((name, sf.get_tensor(name)) for name in sf.keys())
        return count

    def load_serialized(self, serialized: list[Any]) -> int:
        """/update_weights_from_tensor payload: base64 of ``safetensors.torch.save`` bytes (TP rank 0's)."""
        from safetensors.torch import load as load_safetensors

        if not isinstance(serialized, list) or not serialized or not isinstance(serialized[0], str):
            raise BadRequest("serialized_named_tensors must be a non-empty list of base64 strings.")
        try:
            tensors = load_safetensors(base64.b64decode(serialized[0], validate=True))
        except Exception as e:  # noqa: BLE001 - any decoding failure is the caller's payload
            raise BadRequest(f"serialized_named_tensors[0] is not base64 safetensors bytes ({e}); the embedded "
                             "engine does not accept SGLang's pickled tensors.") from None
        return self.load_weights(tensors.items())

    def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          group_name: str, backend: str) -> None:
        """Join the trainer's weight group at rank ``rank_offset`` (TP rank 0 of this server)."""
        from megatron_rl.weights.sync import WeightGroup

        if group_name in self._groups:
            raise BadRequest(f"Weight group {group_name!r} already exists; destroy it first.")
        if backend not in ("gloo", "nccl"):
            raise BadRequest(f"backend must be gloo or nccl, got {backend!r}.")
        if backend == "nccl" and not torch.cuda.is_available():
            raise BadRequest("backend 'nccl' needs CUDA; the embedded engine runs on CPU: use 'gloo'.")
        self._groups[group_name] = WeightGroup.open(master_address, master_port, rank_offset, world_size,
                                                    group_name, backend)

    def destroy_weight_group(self, group_name: str) -> None:
        group = self._groups.pop(group_name, None)
        if group is None:
            raise BadRequest(f"No weight group named {group_name!r}.")
        group.close()

    def receive_weights(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
                        flattened: bool) -> int:
        """Receive one bucket by broadcast from rank 0 (SGLang's order), then load it."""
        from megatron_rl.weights.sync import bucket_nbytes, dtype_from_name, unflatten_bucket

        group = self._groups.get(group_name)
        if group is None:
            raise BadRequest(f"No weight group named {group_name!r}: call /init_weights_update_group first.")
        if not (len(names) == len(dtypes) == len(shapes)):
            raise BadRequest(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)}).")
        try:
            torch_dtypes = [dtype_from_name(d) for d in dtypes]
        except ValueError as e:
            raise BadRequest(f"Bad dtype in update_weights_from_distributed: {e}.") from None
        if flattened:
            flat = torch.empty(bucket_nbytes(torch_dtypes, shapes), dtype=torch.uint8)
            group.broadcast([flat])
            tensors = unflatten_bucket(flat, torch_dtypes, shapes)
        else:
            tensors = [torch.empty(list(s), dtype=d) for d, s in zip(torch_dtypes, shapes)]
            group.broadcast(tensors)
        # Received in full before any check, so a bad name never leaves the sender blocked.
        return self.load_weights(zip(names, tensors))

    # ----------------------------------------------------------------- scheduler
    def _finish(self, job: Job, finish: dict[str, Any]) -> None:
        job.finish = finish
        job.weight_version = self.weight_version
        if not job.done.done():
            job.done.set_result(job)

    def _take_batch(self) -> list[Job]:
        with self._cv:
            while not self._stopping and (self._paused or not self._pending):
                self._cv.wait()
            if self._stopping:
                return []
        time.sleep(self.batch_wait_s)  # let requests sent together share the batch
        with self._cv:
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                batch.append(self._pending.popleft())
            self._running = list(batch)
        return batch

    def _loop(self) -> None:
        while not self._stopping:
            jobs = self._take_batch()
            if not jobs:
                continue
            try:
                self._run_batch(jobs)
            except Exception as e:  # a bug: fail these requests (HTTP 500), keep serving
                log.exception("embedded engine batch failed")
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(e)
            finally:
                with self._cv:
                    self._running = []

    def _wait_if_paused(self) -> None:
        with self._cv:
            while self._paused and not self._stopping and not all(j.abort_message for j in self._running):
                self._cv.wait(timeout=0.1)

    def _run_batch(self, jobs: list[Job]) -> None:
        parts = [jobs]
        if self.deterministic:
            rest = [j for j in jobs if j.params.seed is None]
            parts = [[j] for j in jobs if j.params.seed is not None] + ([rest] if rest else [])
        groups = [g for g in map(self._prefill, parts) if g is not None]
        while groups:  # one decode step of every group per round, so no group starves
            self._wait_if_paused()
            groups = [g for g in groups if self._step(g)]

    def _prefill(self, jobs: list[Job]) -> Group | None:
        """One left-padded forward over the prompts; the group still to decode, if any."""
        lengths = [len(j.prompt) for j in jobs]
        width = max(lengths)
        ids_BL = torch.zeros(len(jobs), width, dtype=torch.long)
        mask_BL = torch.zeros(len(jobs), width, dtype=torch.long)
        for row, job in enumerate(jobs):
            ids_BL[row, width - lengths[row]:] = torch.tensor(job.prompt)
            mask_BL[row, width - lengths[row]:] = 1
        pos_BL = (mask_BL.cumsum(1) - 1).clamp(min=0)
        scoring = any(j.return_logprob and j.logprob_start_len >= 0 for j in jobs)
        decoding = any(j.params.max_new_tokens > 0 for j in jobs)
        with self._model_lock, torch.no_grad():
            out = self.model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL,
                             use_cache=decoding, logits_to_keep=0 if scoring else 1)
            version = self.weight_version
        if scoring:
            self._score_prompts(jobs, out.logits, width)
        for job in jobs:
            if job.params.max_new_tokens == 0:
                self._finish(job, {"type": "length", "length": 0})
        if not decoding:
            return None
        keep = torch.tensor([r for r, j in enumerate(jobs) if j.params.max_new_tokens > 0])
        if len(keep) < len(jobs):
            out.past_key_values.batch_select_indices(keep)
        return Group([jobs[r] for r in keep.tolist()], out.logits[keep, -1, :], out.past_key_values,
                     mask_BL[keep], pos_BL[keep, -1:], version)

    def _score_prompts(self, jobs: list[Job], logits_BLV: torch.Tensor, width: int) -> None:
        """SGLang's input_token_logprobs: position p holds log p(prompt[p] | prompt[:p]); p = 0 is None."""
        for row, job in enumerate(jobs):
            if not (job.return_logprob and job.logprob_start_len >= 0):
                continue
            pad = width - len(job.prompt)
            logp_LV = torch.log_softmax(logits_BLV[row, pad:].float(), dim=-1)
            target = torch.tensor(job.prompt[1:])
            scores = logp_LV[:-1].gather(1, target.unsqueeze(1)).squeeze(1).tolist()
            job.input_logprobs = ([None] + scores)[job.logprob_start_len:]

    def _stop_reason(self, job: Job, token: int) -> dict[str, Any] | None:
        p = job.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return {"type": "stop", "matched": token}
        if p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(job.output_ids)
            for s in p.stop:
                if s in text:
                    return {"type": "stop", "matched": s}
        if len(job.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        return None

    def _uniform(self, job: Job) -> float:
        """The draw's random number: from (seed, position) when seeded, else the server's stream."""
        if job.params.greedy:
            return 0.0
        if job.params.seed is not None:  # position of the last token fed, as SGLang's `positions`
            return seeded_uniform(job.params.seed, len(job.prompt) + len(job.output_ids) - 1)
        return float(torch.rand((), dtype=torch.float64, generator=self.generator))

    def _step(self, g: Group) -> bool:
        """Sample one token per row, finish rows, run the next forward; False once the group is done."""
        tokens, logprobs = sample_rows(g.logits_BV, [j.params for j in g.jobs], [self._uniform(j) for j in g.jobs],
                                       original_logprobs=self.original_logprobs)
        keep = []
        for row, job in enumerate(g.jobs):
            if job.abort_message:
                self._finish(job, {"type": "abort", "message": job.abort_message})
                continue
            _append_token(job, tokens[row], logprobs[row], g.version)
            reason = self._stop_reason(job, tokens[row])
            if reason is not None:
                self._finish(job, reason)
            else:
                keep.append(row)
        if not keep:
            return False
        if len(keep) < len(g.jobs):
            index = torch.tensor(keep)
            g.cache.batch_select_indices(index)
            g.mask_BL, g.pos_B1, g.jobs = g.mask_BL[index], g.pos_B1[index], [g.jobs[r] for r in keep]
        next_B1 = torch.tensor([[tokens[r]] for r in keep])
        g.mask_BL = torch.cat([g.mask_BL, torch.ones(len(keep), 1, dtype=g.mask_BL.dtype)], dim=1)
        g.pos_B1 = g.pos_B1 + 1
        with self._model_lock, torch.no_grad():
            out = self.model(input_ids=next_B1, attention_mask=g.mask_BL, position_ids=g.pos_B1,
                             past_key_values=g.cache, use_cache=True)
            g.version = self.weight_version
        g.logits_BV = out.logits[:, -1, :]
        return True


def _append_token(job: Job, token: int, logprob: float, version: str) -> None:
    """Record one new token of ``job`` and tell its hook (a failing hook is dropped, not fatal)."""
    job.output_ids.append(token)
    job.output_logprobs.append(logprob)
    job.output_versions.append(version)
    if job.on_token is not None:
        try:
            job.on_token(job, token, logprob)
        except Exception:  # noqa: BLE001 - a listener's bug must not end the generation
            log.exception("on_token hook of job %s failed; dropped", job.rid)
            job.on_token = None


def _load_tokenizer(model_path: str) -> Any:
    # transformers builds an empty tokenizer for a directory without tokenizer files; that
    # would decode everything to "": treat such a model as token-ids-only instead.
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((Path(model_path) / n).exists() for n in names):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - no tokenizer files: token-id API only (stop strings refused)
        return None


def _eos_ids(model: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return ids
