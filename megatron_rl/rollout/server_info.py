"""/get_server_info, /get_load and /v1/loads bodies for the embedded engine.

SGLang v0.5.4's /get_server_info is ``dataclasses.asdict(ServerArgs)`` (about 250 keys)
plus the scheduler's ``max_total_num_tokens`` / ``max_req_input_len``, ``internal_states``
(one dict per DP rank) and ``version``. We answer the keys clients read or assert on
(slime's external-engine discovery and sanity check: ``tp_size``, ``pp_size``, ``dp_size``,
``ep_size``, ``disaggregation_mode``, ``encoder_only``, ``enable_memory_saver``,
``skip_server_warmup``, ``dtype``...; load balancers: ``max_total_num_tokens``,
``max_running_requests``, ``context_length``) with the embedded engine's true values;
``version`` is the SGLang API version followed (clients parse it as a version number) and
``engine`` says what actually serves.

/get_load (v0.5.4) answers one entry per DP rank ``{dp_rank, num_reqs, num_waiting_reqs,
num_tokens}``; /v1/loads (newer SGLang, used by slime's abort-until-idle loop) answers
``{timestamp, version, accelerator, num_accelerators, loads: [per-rank metrics]}``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from megatron_rl.rollout.engine import EmbeddedEngine, Job
from megatron_rl.rollout.sampling import BadRequest
from megatron_rl.rollout.sglang_api import SGLANG_VERSION_TESTED

LOAD_SECTIONS = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}


def engine_jobs(engine: EmbeddedEngine) -> tuple[list[Job], list[Job]]:
    """(running, waiting) jobs, read under the scheduler's lock."""
    with engine._cv:  # the scheduler moves jobs between these two under this lock
        return list(getattr(engine, "_running", [])), list(getattr(engine, "_pending", []))


def capacity_tokens(engine: EmbeddedEngine) -> int:
    """The most tokens the engine holds at once: a full batch of full-context sequences."""
    return engine.max_batch_size * engine.context_len


def server_info_body(engine: EmbeddedEngine, host: str) -> dict[str, Any]:
    from megatron_rl import __version__

    hostname, _, port = host.rpartition(":")
    tokenizer_path = engine.model_path if engine.tokenizer is not None else None
    return {
        # ServerArgs fields, with what the embedded engine really does
        "model_path": engine.model_path, "tokenizer_path": tokenizer_path, "tokenizer_mode": "auto",
        "skip_tokenizer_init": engine.tokenizer is None, "load_format": "safetensors",
        "trust_remote_code": False, "dtype": str(engine.dtype).removeprefix("torch."), "kv_cache_dtype": "auto", "quantization": None,
        "context_length": engine.context_len, "device": "cpu", "served_model_name": engine.model_path,
        "is_embedding": False, "host": hostname or host, "port": int(port) if port.isdigit() else None,
        "tp_size": 1, "pp_size": 1, "dp_size": 1, "ep_size": 1, "moe_dp_size": 1, "nnodes": 1, "node_rank": 0,
        "max_running_requests": engine.max_batch_size, "max_total_tokens": None, "chunked_prefill_size": engine.chunked_prefill_size,
        "max_prefill_tokens": None, "schedule_policy": "fcfs", "stream_interval": 1, "stream_output": False,
        "disable_radix_cache": True, "enable_deterministic_inference": engine.deterministic,
        "random_seed": None, "weight_version": engine.weight_version, "sampling_defaults": "model",
        "disaggregation_mode": "null", "encoder_only": False, "enable_memory_saver": False,
        "skip_server_warmup": True, "enable_metrics": False, "enable_lora": False,
        # the scheduler's part
        "status": "ready", "max_total_num_tokens": capacity_tokens(engine),
        "max_req_input_len": engine.context_len - 1,
        "internal_states": [{"last_gen_throughput": 0.0,
                             "memory_usage": {"token_capacity": capacity_tokens(engine)}}],
        "version": SGLANG_VERSION_TESTED,
        "engine": f"megatron-rl {__version__} embedded engine (SGLang {SGLANG_VERSION_TESTED} API)",
        "vocab_size": engine.vocab_size,
    }


def load_v054(engine: EmbeddedEngine) -> list[dict[str, Any]]:
    running, waiting = engine_jobs(engine)
    return [{"dp_rank": 0, "num_reqs": len(running) + len(waiting), "num_waiting_reqs": len(waiting),
             "num_tokens": _used_tokens(running) + sum(len(j.prompt) for j in waiting)}]


def _used_tokens(jobs: list[Job]) -> int:
    return sum(len(j.prompt) + len(j.output_ids) for j in jobs)


def loads_v1(engine: EmbeddedEngine, include: list[str] | None) -> dict[str, Any]:
    """/v1/loads: the ``core`` and ``queues`` sections are measured; others are absent (no GPU, no spec)."""
    sections = set(include or ["all"])
    unknown = sections - LOAD_SECTIONS
    if unknown:
        raise BadRequest(f"Invalid include sections: {sorted(unknown)}. Valid options: {sorted(LOAD_SECTIONS)}")
    everything = "all" in sections
    running, waiting = engine_jobs(engine)
    used, capacity = _used_tokens(running), capacity_tokens(engine)
    load: dict[str, Any] = {"dp_rank": 0, "timestamp": time.time()}
    if everything or "core" in sections:
        load.update({
            "num_running_reqs": len(running), "num_waiting_reqs": len(waiting), "num_used_tokens": used,
            "num_total_tokens": used + sum(len(j.prompt) for j in waiting), "max_total_num_tokens": capacity,
            "token_usage": used / capacity if capacity else 0.0, "gen_throughput": 0.0, "cache_hit_rate": 0.0,
            "utilization": len(running) / engine.max_batch_size, "max_running_requests": engine.max_batch_size})
    if everything or "queues" in sections:
        load["queues"] = {"waiting": len(waiting), "grammar": 0, "paused": 0, "retracted": 0}
    return {"timestamp": datetime.now(UTC).isoformat(), "version": SGLANG_VERSION_TESTED,
            "accelerator": None, "num_accelerators": 0, "loads": [load]}
