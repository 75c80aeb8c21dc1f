"""``--model`` values and the servers that sample from them.

A value is a Hugging Face directory, a megatron-rl checkpoint (a run's checkpoint root, which
follows ``latest``, a ``step_XXXXXXXX/`` folder, or a converted checkpoint), or a glob of
those (``'runs/x/ckpt/step_*'``, expanded in sorted order when the shell left it quoted).
A checkpoint is exported to HF once with the project's converter (``megatron-rl convert
mcore-to-hf``, ``checkpoint.convert.convert_mcore_to_hf``) into ``OUT/models/<name>/``, which
later runs reuse; the servers then load that directory. With ``--api openai`` the value may
also be the served model's name.

``open_backend`` starts the servers for one model (``rollout.ServerManager``: SGLang, or the
embedded engine on CPU, ``--servers`` data-parallel replicas of ``--tp`` GPUs each) or attaches
to ``--server-urls``, and yields the backend; launched servers stop when it exits.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rl.errors import UserError
from megatron_rl.eval.backends import (
    Backend,
    NativeBackend,
    OpenAIBackend,
    SamplingSettings,
    served_model_name,
    speaks_native,
)

log = logging.getLogger(__name__)


def expand_models(values: list[str]) -> list[str]:
    """``--model`` values with globs expanded (sorted), duplicates dropped, order kept."""
    out: list[str] = []
    for v in values:
        if any(c in v for c in "*?["):
            matches = sorted(glob.glob(v))
            if not matches:
                raise UserError(f"--model {v}: the pattern matches no file or directory.")
            out += matches
        else:
            out.append(v)
    return list(dict.fromkeys(out))


def is_local(model: str) -> bool:
    return Path(model).exists()


def hf_dir_for(model: str, out_dir: Path) -> Path:
    """The HF directory to serve for ``model``: itself, or its checkpoint's export (module doc)."""
    from megatron_rl.checkpoint import io

    p = Path(model)
    if (p / "config.json").is_file():
        return p
    if not p.exists():
        raise UserError(f"--model {model}: no such directory. Give a Hugging Face model directory or a "
                        "megatron-rl checkpoint (with --api openai and --server-urls, the served model's name).")
    ckpt = io.resolve(p)  # CheckpointError when it is no checkpoint either
    target = out_dir / "models" / re.sub(r"[^A-Za-z0-9._-]+", "_", str(ckpt.resolve()).strip("/"))[-150:]
    if (target / "config.json").is_file():
        return target
    from megatron_rl.checkpoint.convert import convert_mcore_to_hf

    log.info("exporting checkpoint %s to %s (megatron-rl convert mcore-to-hf)", ckpt, target)
    return convert_mcore_to_hf(ckpt, target)


@dataclass
class ServeSettings:
    """How samples are served (the CLI's server options)."""

    engine: str = "auto"
    """embedded, sglang, or auto (sglang when installed, else the embedded CPU engine)."""
    servers: int = 1
    tp: int = 1
    server_urls: list[str] = field(default_factory=list)
    api: str = "auto"
    """native (SGLang's /generate), openai (/v1/chat/completions), auto (native when it answers)."""
    served_model_name: str = ""
    deterministic: bool | None = None
    """None: on for the embedded engine (exact resume), off for SGLang (it costs speed)."""
    chat_template: str = ""
    health_timeout_s: float = 1800.0
    request_timeout_s: float = 7200.0

    def resolved_engine(self) -> str:
        if self.engine != "auto":
            return self.engine
        return "sglang" if importlib.util.find_spec("sglang") is not None else "embedded"


def _api(settings: ServeSettings) -> str:
    if settings.api != "auto":
        return settings.api
    if not settings.server_urls:
        return "native"
    return "native" if asyncio.run(speaks_native(settings.server_urls[0])) else "openai"


@contextmanager
def open_backend(model: str, out_dir: Path, settings: ServeSettings,
                 sampling: SamplingSettings) -> Iterator[Backend]:
    """A backend sampling from ``model`` (servers launched, or attached; module doc)."""
    if _api(settings) == "openai":
        if not settings.server_urls:
            raise UserError("--api openai needs --server-urls (the OpenAI-compatible servers to ask).")
        name = settings.served_model_name or (model if not is_local(model) else "")
        name = name or asyncio.run(served_model_name(settings.server_urls[0]))
        yield OpenAIBackend(settings.server_urls, name, sampling, timeout_s=settings.request_timeout_s,
                            api_key=os.environ.get("OPENAI_API_KEY"))
        return
    hf = hf_dir_for(model, out_dir)
    from megatron_rl.config.rollout import RolloutConfig
    from megatron_rl.data.template import load_tokenizer
    from megatron_rl.rollout.client import RolloutClient
    from megatron_rl.rollout.servers import ServerManager

    engine = settings.resolved_engine()
    deterministic = settings.deterministic if settings.deterministic is not None else engine == "embedded"
    cfg = RolloutConfig(engine=engine, server_urls=list(settings.server_urls), num_servers=settings.servers,  # type: ignore[arg-type]
                        tp_size=settings.tp, base_port=0, deterministic=deterministic,
                        health_timeout_s=settings.health_timeout_s, request_timeout_s=settings.request_timeout_s)
    # Embedded servers share this machine's cores: one share each instead of all of them each.
    extra = ["--threads", str(max(1, (os.cpu_count() or 1) // settings.servers))] if engine == "embedded" else []
    tokenizer = load_tokenizer(str(hf))
    with ServerManager(cfg, str(hf), log_dir=out_dir / "servers", extra_args=extra) as servers:
        log.info("%s: sampling from %s (%s)", model, servers.urls, engine if not settings.server_urls else "attached")
        client = RolloutClient.from_config(cfg, servers.urls)
        yield NativeBackend(client, tokenizer, sampling, settings.chat_template)
