"""Rollout section: which engine serves generation, how many servers, sampling defaults, sync.

Defaults follow the DeepScaleR recipe where it says something (temperature 0.6, n = 8,
8K responses); the rest are SGLang's own defaults. ``engine="embedded"`` is the CPU engine
(``python -m megatron_rl.rollout.serve``) that speaks the same HTTP API as SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_rl.config.base import require

EngineKind = Literal["embedded", "sglang"]
SyncTransport = Literal["distributed", "shm", "disk", "tensor"]
RolloutMode = Literal["sync", "one_step_off", "async"]
ServerDtype = Literal["auto", "float32", "bfloat16"]


@dataclass
class RolloutConfig:
    engine: EngineKind = "embedded"
    """Rollout server kind: embedded (CPU, transformers) or sglang (GPU, launched or attached)."""
    server_urls: list[str] = field(default_factory=list)
    """Attach mode: URLs of servers a user already runs (e.g. http://node3:30000); empty = launch our own."""
    num_servers: int = 1
    """Servers to launch when server_urls is empty (each is one data-parallel rollout replica)."""
    tp_size: int = 1
    """Tensor-parallel size of each SGLang server (GPUs per server); the embedded engine needs 1."""
    server_dtype: ServerDtype = "auto"
    """dtype of launched servers (`--dtype`). auto: float32 for the embedded engine (log-probs
    closest to an fp32 actor's), the checkpoint's for SGLang. bfloat16 on the embedded engine
    reads half the weight bytes per decode step and loads a bf16 actor's sync as plain copies
    (with `sync_transport: shm` and `deterministic: false`, none: the servers map the trainer's
    buckets as their weights); its log-probs then differ from an fp32 actor's as SGLang's do
    (mind `algo` corrections)."""
    mem_fraction: float = 0.8
    """SGLang --mem-fraction-static: share of each GPU for weights + KV cache (lower when colocated)."""
    gpu_ids: list[int] | None = None
    """GPUs given to launched servers, tp_size consecutive ids each; None = 0 .. num_servers*tp_size-1."""
    base_port: int = 30000
    """Port of the first launched server (server i uses base_port + i); 0 = pick free ports."""
    request_timeout_s: float = 1800.0
    """Per-request HTTP timeout; a request past it is aborted there and retried on another server."""
    max_retries: int = 3
    """How many other servers one request may be retried on after a server fails it."""
    max_inflight_per_server: int = 256
    """Requests in flight per server at most; the client balances on least outstanding requests."""
    health_timeout_s: float = 600.0
    """How long launched or attached servers may take to answer /health_generate with 200."""
    sync_transport: SyncTransport = "distributed"
    """Weight sync. distributed: each pipeline stage's first rank broadcasts its own layers over a
    weight group of its own (NCCL/gloo, SGLang's protocol); shm: colocated servers on this node,
    launched by this run with the embedded engine, map the buckets from shared memory (/dev/shm);
    disk: a safetensors directory; tensor: tensors over HTTP (rank 0 sends every stage)."""
    sync_address: str | None = None
    """Address the servers reach this run's weight senders at (distributed transport). None: the
    address of the interface that routes to the first remote server (127.0.0.1 when every server
    is on this host); set it where several networks connect the nodes."""
    bucket_size_mb: int = 512
    """Weight sync bucket size in MiB: tensors are sent in groups of about this many bytes."""
    sync_delta: bool = False
    """Weight sync sends only the weights that changed since the last sync (per bucket, with a
    checksum per tensor; a server that finds a mismatch gets the bucket in full). Costs one copy
    of each pipeline stage's weights on its sending rank. Needs sync_transport distributed or shm."""
    sync_full_every: int = 10
    """With sync_delta: every sync_full_every-th sync is full anyway (0 = only the first)."""
    temperature: float = 0.6
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest top set with at least this probability mass (1 = off)."""
    top_k: int = -1
    """Keep only the k most likely tokens (-1 = off)."""
    max_new_tokens: int = 8192
    """Most tokens generated per sample (longer samples finish with reason `length`)."""
    n_samples: int = 8
    """Samples per prompt (GRPO group size)."""
    colocate: bool = False
    """The servers share the trainer's GPUs: they release their memory (weights, KV cache) after
    generation and take it back for the weight sync. False: they keep their own GPUs."""
    attached_memory_saver: bool = False
    """The attached servers (`server_urls`) run on the trainer's GPUs with SGLang's
    --enable-memory-saver, as `megatron-rl launch` starts them on every node of a multi-node
    colocated job: `colocate: true` may then release and resume their memory."""
    deterministic: bool = False
    """Results depend only on each request's seed, never on batching (embedded: `--deterministic`;
    SGLang: `--enable-deterministic-inference`). Needed for bit-exact resume; costs some speed (the
    embedded engine decodes seeded requests in a batch-invariant batch: one SDPA call per row)."""
    max_abort_retries: int = 2
    """A sample that comes back aborted (server paused or restarted mid-request) is re-requested
    this many times with the same seed; then its whole group is dropped, never graded."""
    mode: RolloutMode = "sync"
    """sync: each step trains on samples of the current weights. one_step_off: step t+1's samples
    are generated (with the weights before step t's update) while step t trains; every sample
    is exactly one version old. async: generation runs ahead of training by up to
    `max_staleness` batches; the servers take new weights between batches (see docs/architecture.md)."""
    max_staleness: int = 1
    """async: a sample trained at step t was generated with weights of step t - max_staleness or
    newer (the version is recorded per sample; TIS / masked IS correct for it)."""
    partial: bool = False
    """one_step_off / async: push new weights as soon as the trainer has them, also mid-batch:
    running requests are paused in place, the weights land, and their remaining tokens come
    from the new policy (per-token versions recorded). Fresher samples; batch versions then
    depend on timing."""

    @property
    def staleness(self) -> int:
        """How many versions older than the trainer a sample may be: 0 (sync), 1, or max_staleness."""
        return {"sync": 0, "one_step_off": 1}.get(self.mode, self.max_staleness)

    def __post_init__(self) -> None:
        require(self.num_servers >= 1, "`rollout.num_servers` must be >= 1.")
        require(not self.partial or self.mode != "sync",
                "`rollout.partial: true` continues requests across a weight sync made while generation runs "
                "ahead: set `rollout.mode` to one_step_off or async too.")
        require(self.mode in ("sync", "one_step_off", "async"),
                f"`rollout.mode` is `{self.mode}`: use sync, one_step_off or async.")
        require(self.max_staleness >= 1, "`rollout.max_staleness` must be >= 1 (mode sync has none).")
        require(self.mode == "sync" or not self.colocate,
                f"`rollout.mode: {self.mode}` generates while the actor trains, which colocated servers "
                "cannot (they release the GPUs to the actor): set `rollout.colocate: false` (servers on "
                "their own GPUs) or `rollout.mode: sync`.")
        require(self.tp_size >= 1, "`rollout.tp_size` must be >= 1.")
        require(self.engine != "embedded" or self.tp_size == 1,
                "`rollout.tp_size` must be 1 with the embedded engine (it runs one CPU process "
                "per server); use more servers (`rollout.num_servers`) instead.")
        require(0.0 < self.mem_fraction <= 1.0, "`rollout.mem_fraction` must be in (0, 1].")
        require(self.gpu_ids is None or len(self.gpu_ids) >= self.num_servers * self.tp_size,
                f"`rollout.gpu_ids` lists {len(self.gpu_ids or [])} GPUs but {self.num_servers} "
                f"servers x tp_size {self.tp_size} need {self.num_servers * self.tp_size}.")
        require(self.base_port == 0 or 1024 <= self.base_port <= 65535 - self.num_servers,
                "`rollout.base_port` must be 0 (free ports) or a port in 1024..65535 leaving room "
                "for one port per server.")
        require(all(u.startswith(("http://", "https://")) for u in self.server_urls),
                "`rollout.server_urls` must be full URLs such as http://127.0.0.1:30000.")
        require(self.request_timeout_s > 0 and self.health_timeout_s > 0,
                "`rollout.request_timeout_s` and `rollout.health_timeout_s` must be > 0.")
        require(self.max_retries >= 0, "`rollout.max_retries` must be >= 0.")
        require(self.max_inflight_per_server >= 1, "`rollout.max_inflight_per_server` must be >= 1.")
        require(self.bucket_size_mb >= 1, "`rollout.bucket_size_mb` must be >= 1.")
        require(self.sync_full_every >= 0, "`rollout.sync_full_every` must be >= 0 (0 = only the first sync is full).")
        require(not self.sync_delta or self.sync_transport in ("distributed", "shm"),
                f"`rollout.sync_delta: true` sends deltas over the per-stage weight sync: set `rollout.sync_transport` "
                f"to distributed or shm (it is `{self.sync_transport}`), or sync_delta false.")
        require(self.sync_transport != "shm" or (self.engine == "embedded" and not self.server_urls),
                "`rollout.sync_transport: shm` writes the weights into shared-memory files that the servers map, "
                "so it needs servers this run launches itself on this node (`rollout.server_urls` empty) with the "
                "embedded engine (started with --weight-shm-dir); attached or SGLang servers cannot be told the "
                "directory: use `rollout.sync_transport: distributed`.")
        require(self.temperature >= 0, "`rollout.temperature` must be >= 0 (0 = greedy).")
        require(0.0 < self.top_p <= 1.0, "`rollout.top_p` must be in (0, 1].")
        require(self.top_k == -1 or self.top_k >= 1, "`rollout.top_k` must be -1 (off) or >= 1.")
        require(self.max_new_tokens >= 1, "`rollout.max_new_tokens` must be >= 1.")
        require(self.n_samples >= 1, "`rollout.n_samples` must be >= 1.")
        require(not (self.colocate and self.server_urls) or self.attached_memory_saver,
                "`rollout.colocate: true` releases and resumes the memory of servers this run launches on "
                "its own GPUs; attached servers (`rollout.server_urls`) keep theirs: set colocate=false, or "
                "`rollout.attached_memory_saver: true` when they were started on the trainer's GPUs with "
                "--enable-memory-saver (as `megatron-rl launch` starts them).")
        require(not self.attached_memory_saver or (self.colocate and self.server_urls),
                "`rollout.attached_memory_saver: true` describes attached colocated servers: it needs "
                "`rollout.server_urls` and `rollout.colocate: true`.")
