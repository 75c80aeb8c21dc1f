"""The embedded CPU engine: a ``transformers`` causal LM (fp32) with continuous batching.

Its linear weights are stored column-major by default (``transposed_weights``, ``serve
--weight-layout``; see ``layout``): same values and names, decode steps about 1.4x faster,
weight loads slower (a transposing copy).

One scheduler thread owns the model's forward passes; the HTTP layer (``http_server``) and
the weight receivers run in other threads and only call the public methods here. Each
scheduler step (``_iteration``):

1. serves aborts: an aborted job ends at once with the tokens it has (its row leaves);
2. admits waiting jobs (oldest first, up to ``max_batch_size`` running) into a *prefill*: their
   prompts, left-padded (``batching.Prefill``); when the engine was idle it first waits
   ``batch_wait_s`` so requests sent together share one prefill;
3. feeds prompt chunks of at most ``chunked_prefill_size`` tokens (rows x columns) in all, so
   a long prompt delays the running rows by one chunk per step, never by its whole prefill; a
   prefill whose prompt is all fed samples its first tokens and its rows **join the running
   batch** (their left-padded KV cache merged into the batch's, ``batching.merge``);
4. runs one decode forward of the running batch and samples one token per row; rows that
   finish (stop token, stop string, length) **leave at once** and the cache columns nobody
   needs any more are cut.

Models whose cache is not plain full attention (sliding window, ...) cannot merge rows:
newcomers then wait until the running batch is empty (static batches).

Deterministic mode (``deterministic=True``, ``--deterministic``): each seeded job is prefilled
on its own (in the same fixed chunks from position 0), because CPU matmuls round differently
with the number of rows and attention with the padded width (measured: a prompt's logits
alone and in any batch, even of 8 copies of itself, differ in the last bits). Its decode
steps then run in one batch with the other seeded jobs, made batch-invariant by ``rowwise``
(column-major weights, lone rows padded to two, attention row by row over each row's own
columns); with ``--weight-layout hf`` or caches that cannot merge, each seeded job decodes in
forwards of its own (one row). Unseeded jobs share the ordinary batch. With the
counter-based draw of ``sampling``, a seeded job's tokens and log-probs are a function of the
request, the weights, ``chunked_prefill_size``, the layout and the torch build only.

Pauses and weight updates (partial rollouts): ``pause("in_place")`` freezes every job between
two forwards: each forward checks the flag under the model lock, and weight loads take the
same lock, so an update lands between two forwards, never inside one. Frozen jobs keep their
KV cache (computed by the old weights; not recomputed, as SGLang) and their sampled tokens;
after ``resume`` every forward runs on the new weights. ``Job.output_versions`` records, per
output token, the ``weight_version`` of the forward that produced its logits (exact when the
update happens while paused; an update without a pause may label the tokens of the forwards
between the load and the version change with the old version).

Per-token hook (``TokenHook``, for streaming): ``submit(..., on_token=f)`` calls
``f(job, token_id, logprob)`` in the scheduler thread for every new token of each of the
request's jobs, after the token, its log-prob and its version are appended to the job and
before ``job.done`` resolves. Keep it short and non-blocking (from asyncio:
``loop.call_soon_threadsafe``); the end of a job is ``job.done``.

Legend: B = rows, L = padded prompt length, T = cache width, V = vocabulary.
"""

from __future__ import annotations

import base64
import contextlib
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

from megatron_rl.rollout import rowwise
from megatron_rl.rollout.batching import Prefill, Rows, merge, mergeable
from megatron_rl.rollout.layout import TransposingCopier, is_transposed, to_decode_layout
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


@dataclass(eq=False)
class Job:
    """One sequence to generate (a request with n samples is n jobs); compared by identity."""

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


class EmbeddedEngine:
    """A CPU generation engine with SGLang's sampling and weight-update semantics."""

    def __init__(self, model_path: str, *, max_batch_size: int = 64, seed: int | None = None,
                 batch_wait_s: float = 0.005, original_logprobs: bool = False, deterministic: bool = False,
                 chunked_prefill_size: int = 512, transposed_weights: bool = True,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        if max_batch_size < 1 or chunked_prefill_size < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and chunked_prefill_size ({chunked_prefill_size}) "
                             "must be at least 1.")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype {dtype}: the embedded engine runs float32 or bfloat16")

        self.model_path = model_path
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        self.tokenizer = _load_tokenizer(model_path)
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.context_len = int(getattr(cfg, "max_position_embeddings", 32768))
        self.eos_ids = _eos_ids(self.model)
        # Linear weights column-major: decode steps read them about 1.4x faster (see ``layout``).
        self.transposed = to_decode_layout(self.model) if transposed_weights else []
        self._copier = TransposingCopier()
        # Deterministic mode decodes its seeded rows together when that is batch-invariant:
        # column-major weights and caches that merge (see ``rowwise``); else each row alone.
        self._rowwise = deterministic and bool(self.transposed) and mergeable(self.model.config)
        if self._rowwise:
            try:
                self.model.set_attn_implementation(rowwise.register())
            except (ValueError, NotImplementedError) as e:  # an architecture without pluggable attention
                log.warning("deterministic mode: %s cannot take row-wise attention (%s); seeded requests "
                            "decode one row per forward", type(self.model).__name__, e)
                self._rowwise = False
            else:
                rowwise.pad_single_rows(self.model)
        # state_dict tensors share storage with the parameters (tied names share one tensor),
        # so copying into them updates the model in place.
        self._targets = self.model.state_dict()
        from megatron_rl.weights.shm import SharedMaps

        self._shared: dict[str, str] = {}  # parameter name -> the shared bucket file it is bound to
        # A received bucket's names -> (the buffer its parameters live in, their data pointers)
        self._received: dict[tuple[str, ...], tuple[torch.Tensor, list[int]]] = {}
        self._shm_cache = SharedMaps()
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
        # Per weight group: a receive buffer reused by every bucket (grown when needed). Fresh
        # memory each time halved gloo's receive rate here (1.06 vs 1.97 GB/s for 512 MiB: the
        # page faults); it costs one bucket of memory per group while the group lives.
        self._recv_buffers: dict[str, torch.Tensor] = {}
        # Scheduler state, touched by the scheduler thread only (``_running`` mirrors it for others).
        self.chunked_prefill_size = chunked_prefill_size
        self._mergeable = mergeable(self.model.config)
        self._prefills: list[Prefill] = []
        self._batch: Rows | None = None
        self._solos: list[Rows] = []
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
        """Stop generating: ``abort`` ends running/queued jobs; ``in_place`` freezes them.

        Frozen jobs keep their KV cache and sampled tokens; no forward starts until ``resume``
        (the one in flight, if any, ends first: weight loads wait for it on the model lock).
        Weights loaded meanwhile apply to every later forward: a frozen job continues on them
        with its cache as it is (computed by the old weights, not recomputed, as SGLang does)."""
        if mode not in ("abort", "in_place"):
            raise BadRequest(f"pause mode must be 'abort' or 'in_place', got {mode!r}.")
        with self._cv:
            self._paused = True
            self._cv.notify_all()
        with self._model_lock:  # the forward in flight has ended when pause returns: a trainer may
            pass                # write weights this server maps from shared memory (zero-copy sync)
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
    weight_shm_dir: str | None = None
    """Directory whose files /update_weights_from_tensor may name (load_format ``shared_memory``,
    colocated sync); None refuses that format. Set by ``serve --weight-shm-dir``."""
    _unverified: frozenset[str] = frozenset()
    """Tensors whose checksum failed after a delta: they refuse deltas until loaded in full."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-named tensors into the model (cast to its dtype); BadRequest on unknown names/shapes."""
        loaded: list[str] = []
        try:
            with self._model_lock, torch.no_grad():
                for name, tensor in named_tensors:
                    self._unshare(name)
                    target = self._target(name, tuple(tensor.shape), len(loaded))
                    self._copier.copy_into(target, tensor)  # casts (bf16 -> fp32); transposes if stored so
                    loaded.append(name)
        finally:
            self._verified(loaded)
        return len(loaded)

    def _verified(self, names: Iterable[str]) -> None:
        """These tensors now hold values loaded in full: they take deltas again."""
        if self._unverified:
            self._unverified = self._unverified.difference(names)

    def _target(self, name: str, shape: tuple[int, ...], done: int) -> torch.Tensor:
        target = self._targets.get(name)
        if target is None:
            raise BadRequest(f"Unknown parameter name {name!r} for this model "
                             f"(e.g. {next(iter(self._targets))!r}); {done} tensors were loaded before it.")
        if tuple(target.shape) != shape:
            raise BadRequest(f"Shape mismatch for {name!r}: model has {tuple(target.shape)}, "
                             f"got {shape}; {done} tensors were loaded before it.")
        return target

    def load_flat(self, flat: torch.Tensor, names: list[str], dtypes: list[str], shapes: list[list[int]],
                  delta: dict[str, Any] | None = None) -> int:
        """Load one flat bucket (SGLang's flattened_bucket bytes) or, with ``delta``, a delta payload.

        A delta is applied, then every tensor of the bucket is checked against the sender's
        checksum; a mismatch raises BadRequest with ``MISMATCH_MARKER`` (the sender then sends
        the bucket in full) and leaves those tensors refusing deltas until a full load."""
        from megatron_rl.weights import delta as D
        from megatron_rl.weights.sync import unflatten_bucket

        torch_dtypes = _wire_dtypes(names, dtypes, shapes)
        if delta is None:
            try:
                tensors = unflatten_bucket(flat, torch_dtypes, shapes)
            except ValueError as e:
                raise BadRequest(f"Bad flattened bucket: {e}.") from None
            return self.load_weights(zip(names, tensors))
        try:
            header = D.DeltaHeader.from_json(delta, len(names))
        except ValueError as e:
            raise BadRequest(f"Bad delta header: {e}.") from None
        if len(set(torch_dtypes)) != 1:
            raise BadRequest(f"A delta bucket holds tensors of one dtype, got {sorted(set(dtypes))}.")
        stale = sorted(self._unverified.intersection(names))
        if stale:
            raise BadRequest(f"{D.MISMATCH_MARKER}: {stale[:3]} (of {len(stale)}) failed an earlier delta's checksum "
                             "and take a full update before any delta.")
        with self._model_lock, torch.no_grad():
            for n in names:
                self._unshare(n)
            targets = [self._target(n, tuple(s), i) for i, (n, s) in enumerate(zip(names, shapes))]
            # A delta addresses elements in the wire's row-major order: transposed weights take
            # it on a row-major copy, written back after.
            flat_targets = [t.contiguous() for t in targets]
            try:
                bad = D.apply(flat_targets, torch_dtypes[0], header, flat)
            except ValueError as e:
                bad = list(range(len(names)))  # possibly half applied: nothing in the bucket is trusted
                reason = f"malformed payload ({e})"
            else:
                reason = f"{len(bad)} tensor(s) differ from the sender's after the {header.encoding} delta"
                for target, applied in zip(targets, flat_targets):
                    if applied is not target:
                        self._copier.copy_into(target, applied)
        if bad:
            self._unverified = self._unverified.union(names[i] for i in bad)
            raise BadRequest(f"{D.MISMATCH_MARKER}: {reason}, e.g. {[names[i] for i in bad[:3]]}. They now hold "
                             "unverified values and refuse deltas until sent in full.")
        return len(names)

    def load_shared_memory(self, handles: list[Any]) -> int:
        """/update_weights_from_tensor with load_format ``shared_memory``: one bucket in a file of
        ``weight_shm_dir`` (see ``megatron_rl.weights.shm``); the JSON handle is validated, never unpickled."""
        from megatron_rl.weights.shm import map_shared_file

        if self.weight_shm_dir is None:
            raise BadRequest("load_format 'shared_memory' needs a server started with --weight-shm-dir "
                             "(the directory the trainer writes its buckets to).")
        if not isinstance(handles, list) or len(handles) != 1 or not isinstance(handles[0], dict):
            raise BadRequest("serialized_named_tensors must be a list of one handle object for load_format "
                             "'shared_memory' (this server has one TP rank).")
        h = handles[0]
        missing = [k for k in ("name", "nbytes", "names", "dtypes", "shapes") if k not in h]
        if missing:
            raise BadRequest(f"shared-memory handle lacks {missing}.")
        persistent = h.get("persistent") is True and h.get("delta") is None
        try:
            flat = (self._shm_cache.map(self.weight_shm_dir, h["name"], h["nbytes"]) if persistent
                    else map_shared_file(self.weight_shm_dir, h["name"], h["nbytes"]))
        except (ValueError, OSError) as e:
            raise BadRequest(f"Bad shared-memory handle: {e}.") from None
        if persistent and self._bind_shared(flat, h["name"], h["names"], h["dtypes"], h["shapes"]):
            return len(h["names"])
        return self.load_flat(flat, h["names"], h["dtypes"], h["shapes"], h.get("delta"))

    def _bind_shared(self, flat: torch.Tensor, file: str, names: list[str], dtypes: list[str],
                     shapes: list[list[int]]) -> bool:
        """Zero-copy load of a persistent shared bucket: make its tensors the parameters' storage.

        Only where every tensor has its parameter's dtype and (row-major) layout; returns False
        (the caller copies instead) otherwise. Binding again to the same file is free: the
        trainer has written the new values in place while generation was paused."""
        from megatron_rl.weights.sync import unflatten_bucket

        torch_dtypes = _wire_dtypes(names, dtypes, shapes)
        try:
            views = unflatten_bucket(flat, torch_dtypes, shapes)
        except ValueError as e:
            raise BadRequest(f"Bad flattened bucket: {e}.") from None
        params = self._bindable(names, views, flat)
        if params is None:
            return False
        with self._model_lock, torch.no_grad():
            bound = self._bind(params, names, views)
            for name in names:
                self._shared[name] = file
            self._shm_cache.keep(set(self._shared.values()))
        if bound:
            log.info("zero-copy weights: %d tensor(s) now live in the shared bucket %s", bound, file)
        self._verified(names)
        return True

    def _bindable(self, names: list[str], views: list[torch.Tensor], flat: torch.Tensor) -> dict | None:
        """The model's parameters by name if every tensor of a bucket can become its parameter's
        storage (same dtype, row-major, a true view of ``flat``), else None. BadRequest on an
        unknown name or shape, as a load."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        base = flat.untyped_storage().data_ptr()
        ok = True
        for i, (name, view) in enumerate(zip(names, views)):
            target = self._target(name, tuple(view.shape), i)
            ok = ok and (name in params and target.dtype == view.dtype and not is_transposed(target)
                         and target.is_contiguous() and view.untyped_storage().data_ptr() == base)
        return params if ok else None

    def _bind(self, params: dict, names: list[str], views: list[torch.Tensor]) -> int:
        """Model lock held: make each view its parameter's storage; returns how many changed.
        A parameter leaves any other bucket it was bound to (shared file or received buffer)."""
        bound = 0
        for name, view in zip(names, views):
            self._shared.pop(name, None)
            if params[name].data_ptr() != view.data_ptr():
                params[name].data = view
                bound += 1
        for key in [k for k in self._received if not set(k).isdisjoint(names)]:
            del self._received[key]
        self._targets = self.model.state_dict()
        return bound

    def _receive_in_place(self, names: list[str], group: Any, nbytes: int) -> int | None:
        """A flattened bucket whose parameters already live in a buffer of their own (bound by an
        earlier receive of the same bucket): broadcast straight into them under the model lock,
        nothing copied. None when the bucket is not bound (or no longer: a parameter moved)."""
        held = self._received.get(tuple(names))
        if held is None or held[0].numel() != nbytes:
            return None
        flat, ptrs = held
        if any(self._targets[n].data_ptr() != p for n, p in zip(names, ptrs)):
            return None
        with self._model_lock:
            group.broadcast([flat])
        self._verified(names)
        return len(names)

    def _keep_received(self, names: list[str], tensors: list[torch.Tensor], flat: torch.Tensor,
                       torch_dtypes: list[torch.dtype], shapes: list[list[int]]) -> bool:
        """After a flattened bucket arrived (``tensors``: its views of the receive buffer
        ``flat``): where its parameters can live in the wire bytes (bf16 server, row-major), copy
        the bucket into a buffer of its own and make that their storage, so the next sync of this
        bucket is received in place. False: load it by copying."""
        from megatron_rl.weights.sync import unflatten_bucket

        params = self._bindable(names, tensors, flat)
        if params is None:
            return False
        own = flat.clone()
        views = unflatten_bucket(own, torch_dtypes, shapes)
        with self._model_lock, torch.no_grad():
            self._bind(params, names, views)
            self._received[tuple(names)] = (own, [self._targets[n].data_ptr() for n in names])
        self._verified(names)
        return True

    def _unshare(self, name: str) -> None:
        """Before a copy into a parameter bound to a shared bucket: give it private storage, so
        the load changes this server only (several servers may map the same files)."""
        if self._shared.pop(name, None) is None:
            return
        params = dict(self.model.named_parameters(remove_duplicate=False))
        params[name].data = params[name].data.clone()
        for other in [n for n in self._shared if params[n] is params[name]]:
            self._shared.pop(other)  # tied names: one parameter
        self._targets = self.model.state_dict()

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
        self._recv_buffers.pop(group_name, None)
        if group is None:
            raise BadRequest(f"No weight group named {group_name!r}.")
        group.close()

    def receive_weights(self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
                        flattened: bool, delta: dict[str, Any] | None = None) -> int:
        """Receive one bucket by broadcast from rank 0 (SGLang's order), then load it.

        With ``delta`` (load_format ``delta``) the broadcast is the delta payload of
        ``delta["payload_bytes"]`` bytes (see ``load_flat``)."""
        from megatron_rl.weights.sync import bucket_nbytes, unflatten_bucket

        group = self._groups.get(group_name)
        if group is None:
            raise BadRequest(f"No weight group named {group_name!r}: call /init_weights_update_group first.")
        torch_dtypes = _wire_dtypes(names, dtypes, shapes)
        if delta is not None:
            size = delta.get("payload_bytes") if isinstance(delta, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"delta.payload_bytes must be a non-negative integer, got {size!r}.")
            payload = self._recv_buffer(group_name, size)
            group.broadcast([payload])
            return self.load_flat(payload, names, dtypes, shapes, delta)
        if flattened:
            nbytes = bucket_nbytes(torch_dtypes, shapes)
            done = self._receive_in_place(names, group, nbytes)
            if done is not None:
                return done
            flat = self._recv_buffer(group_name, nbytes)
            group.broadcast([flat])
            tensors = unflatten_bucket(flat, torch_dtypes, shapes)
            if self._keep_received(names, tensors, flat, torch_dtypes, shapes):
                return len(names)
        else:
            tensors = [torch.empty(list(s), dtype=d) for d, s in zip(torch_dtypes, shapes)]
            group.broadcast(tensors)
        # Received in full before any check, so a bad name never leaves the sender blocked.
        return self.load_weights(zip(names, tensors))

    def _recv_buffer(self, group_name: str, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of the group's reused receive buffer (uint8)."""
        buf = self._recv_buffers.get(group_name)
        if buf is None or buf.numel() < nbytes:
            self._recv_buffers.pop(group_name, None)  # the old one goes before the new one is made
            buf = self._recv_buffers[group_name] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]

    # ----------------------------------------------------------------- scheduler
    def _finish(self, job: Job, finish: dict[str, Any]) -> None:
        job.finish = finish
        job.weight_version = self.weight_version
        with self._cv:  # out of the running list before its future resolves: readers never see it stale
            if job in self._running:
                self._running.remove(job)
        if not job.done.done():
            job.done.set_result(job)

    def _parts(self) -> list[Prefill | Rows]:
        return [*self._prefills, *([self._batch] if self._batch else []), *self._solos]

    def _publish(self) -> None:
        """Refresh ``_running`` (read by /get_load, streaming, abort) from the scheduler's parts."""
        with self._cv:
            self._running = [j for part in self._parts() for j in part.jobs]

    def _loop(self) -> None:
        while self._wait_for_work():
            try:
                self._iteration()
            except Exception as e:  # a bug: fail the running requests (HTTP 500), keep serving
                log.exception("embedded engine step failed")
                for job in [j for part in self._parts() for j in part.jobs]:
                    if not job.done.done():
                        job.done.set_exception(e)
                self._prefills, self._batch, self._solos = [], None, []
            self._publish()
        for job in [j for part in self._parts() for j in part.jobs]:  # shutting down
            self._finish(job, {"type": "abort", "message": job.abort_message or "Server shutting down"})
        self._prefills, self._batch, self._solos = [], None, []
        self._publish()

    def _wait_for_work(self) -> bool:
        """Block while there is nothing to do (idle, or paused with no abort to serve); False to stop."""
        with self._cv:
            while not self._stopping:
                if any(j.abort_message for j in self._running):
                    return True
                if self._paused:
                    self._cv.wait()
                elif self._running:
                    return True
                elif self._pending:
                    break
                else:
                    self._cv.wait()
            else:
                return False
        time.sleep(self.batch_wait_s)  # idle until now: let requests sent together share one prefill
        return True

    def _iteration(self) -> None:
        """Serve aborts, admit newcomers, feed one budget of prompt chunks, then one decode step of every batch."""
        self._reap()
        if self._paused:
            return
        self._admit()
        self._publish()
        if self._prefill_step():
            self._decode_step()

    def _reap(self) -> None:
        """Finish aborted jobs where they are (their output so far is kept); drop their rows."""
        for part in self._parts():
            keep = [r for r, j in enumerate(part.jobs) if not j.abort_message]
            for job in part.jobs:
                if job.abort_message:
                    self._finish(job, {"type": "abort", "message": job.abort_message})
            part.select(keep)
        self._prefills = [p for p in self._prefills if p.jobs]
        self._solos = [s for s in self._solos if s.jobs]
        if self._batch is not None and not self._batch.jobs:
            self._batch = None

    def _admit(self) -> None:
        """Move waiting jobs (oldest first) into new prefills while there is room in the batch.

        Unseeded jobs (all jobs without ``deterministic``) share one prefill, as long as its padded
        prompts fit one chunk; seeded jobs in deterministic mode get one each. Without mergeable
        caches newcomers wait until nothing runs."""
        if not self._mergeable and self._parts():
            return
        with self._cv:
            room = self.max_batch_size - len(self._running)
            shared: list[Job] = []
            while self._pending and room > 0:
                job = self._pending[0]
                if self.deterministic and job.params.seed is not None:
                    self._prefills.append(self._new_prefill([job], solo=True))
                else:
                    width = max(len(j.prompt) for j in [*shared, job])
                    if shared and (len(shared) + 1) * width > self.chunked_prefill_size:
                        break
                    shared.append(job)
                self._pending.popleft()
                room -= 1
            if shared:
                self._prefills.append(self._new_prefill(shared, solo=False))

    def _new_prefill(self, jobs: list[Job], *, solo: bool) -> Prefill:
        from transformers import DynamicCache

        pre = Prefill.of(jobs, solo=solo)
        pre.cache = DynamicCache(config=self.model.config)
        return pre

    def _forward(self, **inputs: Any) -> tuple[Any, str] | None:
        """One forward and the weight version it ran with; None (nothing run) once paused.

        Under the model lock: a weight load waits for the forward in flight, and no forward
        starts after ``pause`` until ``resume``."""
        with self._model_lock, torch.no_grad():
            if self._paused:
                return None
            return self.model(**inputs), self.weight_version

    def _prefill_step(self) -> bool:
        """Feed prompt chunks up to ``chunked_prefill_size`` tokens; False if paused meanwhile.

        The oldest prefill always gets a chunk (all of the budget); a later one runs only if
        what is left of the budget feeds it whole. So a seeded job alone in its prefill is fed in
        fixed chunks from position 0 whatever else waits: its bits do not depend on the others."""
        budget = self.chunked_prefill_size
        for index, pre in enumerate(list(self._prefills)):
            if index > 0 and len(pre.jobs) * (pre.width - pre.fed) > budget:
                continue
            start, end = pre.next_chunk(budget)
            done = self._forward(input_ids=pre.ids_BL[:, start:end], attention_mask=pre.mask_BL[:, :end],
                                 position_ids=pre.pos_BL[:, start:end], past_key_values=pre.cache,
                                 use_cache=True, logits_to_keep=0 if pre.scoring else 1)
            if done is None:
                return False
            out, pre.version = done
            pre.fed, pre.cache, pre.last_logits_BV = end, out.past_key_values, out.logits[:, -1, :]
            if pre.scoring:
                pre.record_scores(start, out.logits)
            budget -= len(pre.jobs) * (end - start)
            if pre.fed == pre.width:
                self._prefills.remove(pre)
                self._prefilled(pre)
        return True

    def _prefilled(self, pre: Prefill) -> None:
        """Score, finish zero-token jobs, sample every row's first token, then join the decode batch."""
        for row, job in enumerate(pre.jobs):
            if pre.scoring and job.return_logprob and job.logprob_start_len >= 0:
                job.input_logprobs = pre.input_logprobs(row)
            if job.params.max_new_tokens == 0:
                self._finish(job, {"type": "length", "length": 0})
        decode = [r for r, j in enumerate(pre.jobs) if j.params.max_new_tokens > 0]
        if not decode:
            return
        rows = pre.to_rows()
        logits_BV = pre.last_logits_BV[decode]
        rows.select(decode)
        self._sample(rows, logits_BV, pre.version)
        if not rows.jobs:
            return
        if pre.solo and self._rowwise and self._solos:
            self._solos[0] = merge(self._solos[0], rows)
        elif pre.solo:
            self._solos.append(rows)
        else:
            self._batch = rows if self._batch is None else merge(self._batch, rows)

    def _decode_step(self) -> None:
        """One forward and one new token for every row of the shared batch and of each solo job."""
        for rows in [*([self._batch] if self._batch else []), *self._solos]:
            mask_BT = torch.cat([rows.mask_BT, torch.ones(len(rows.jobs), 1, dtype=rows.mask_BT.dtype)], dim=1)
            seeded = self._rowwise and rows is not self._batch
            with rowwise.rows_of(mask_BT.sum(dim=1).tolist()) if seeded else contextlib.nullcontext():
                done = self._forward(input_ids=rows.next_B1, attention_mask=mask_BT, position_ids=rows.pos_B1,
                                     past_key_values=rows.cache, use_cache=True)
            if done is None:
                break
            out, version = done
            rows.mask_BT, rows.pos_B1 = mask_BT, rows.pos_B1 + 1
            self._sample(rows, out.logits[:, -1, :], version)
        self._solos = [s for s in self._solos if s.jobs]
        if self._batch is not None and not self._batch.jobs:
            self._batch = None

    def _sample(self, rows: Rows, logits_BV: torch.Tensor, version: str) -> None:
        """Draw each row's next token, record it, finish the rows that stop; the others feed it next."""
        tokens, logprobs = sample_rows(logits_BV, [j.params for j in rows.jobs], [self._uniform(j) for j in rows.jobs],
                                       original_logprobs=self.original_logprobs)
        keep = []
        for row, job in enumerate(rows.jobs):
            if job.abort_message:
                self._finish(job, {"type": "abort", "message": job.abort_message})
                continue
            _append_token(job, tokens[row], logprobs[row], version)
            reason = self._stop_reason(job, tokens[row])
            if reason is not None:
                self._finish(job, reason)
            else:
                keep.append(row)
        rows.next_B1 = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
        rows.select(keep)

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


def _wire_dtypes(names: list[str], dtypes: list[str], shapes: list[list[int]]) -> list[torch.dtype]:
    """Torch dtypes of a weight request's ``dtypes``; BadRequest on a length or dtype error."""
    from megatron_rl.weights.sync import dtype_from_name

    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise BadRequest("names, dtypes and shapes must be lists.")
    if not (len(names) == len(dtypes) == len(shapes)):
        raise BadRequest(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)}).")
    if not all(isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes):
        raise BadRequest("shapes must be lists of non-negative integers.")
    try:
        return [dtype_from_name(d) for d in dtypes]
    except ValueError as e:
        raise BadRequest(f"Bad dtype in a weight update: {e}.") from None


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
