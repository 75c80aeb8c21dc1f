"""Rollout server processes: launch SGLang or the embedded engine, wait for health, stop them.

This is the server-launch adapter: SGLang is only ever started here, as
``python -m sglang.launch_server`` in its own process group (never imported). The embedded
engine starts through the documented command, ``megatron-rl serve --model ...`` (the console
script beside the interpreter; ``python -m megatron_rl serve`` where none is installed), so
what users run is what the tests launch. Or attach to servers a user already runs
(``rollout.server_urls``): then nothing is launched or stopped.

``deterministic`` (read from the rollout config as ``getattr(cfg, "deterministic", False)``)
adds ``--enable-deterministic-inference`` to SGLang and ``--deterministic`` to the embedded
engine: seeded requests then return the same tokens and log-probs whatever they are batched
with (see docs/embedded_engine.md).

Each launched server gets ``tp_size`` consecutive GPUs of ``rollout.gpu_ids`` in
``CUDA_VISIBLE_DEVICES`` (colocated with the trainer or on its own GPUs: the same mechanism,
with ``mem_fraction`` lowered when colocated), a port checked free before launch, and a log
file whose tail is quoted in every error about it. Stopping sends SIGTERM to the process
group, then SIGKILL after a grace period.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_rl.errors import RolloutError

if TYPE_CHECKING:
    from megatron_rl.config.rollout import RolloutConfig

PR_SET_PDEATHSIG = 1
log = logging.getLogger(__name__)


@dataclass
class LaunchSpec:
    """What one server process is started with."""

    engine: str
    model_path: str
    port: int
    host: str = "127.0.0.1"
    tp_size: int = 1
    mem_fraction: float = 0.8
    gpu_ids: list[int] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    python: str = sys.executable
    deterministic: bool = False
    dtype: str = "auto"
    """``--dtype`` of the server (both engines take the flag); auto = the engine's default."""


def _dtype_args(spec: LaunchSpec) -> list[str]:
    return [] if spec.dtype == "auto" else ["--dtype", spec.dtype]


def sglang_command(spec: LaunchSpec) -> list[str]:
    return [spec.python, "-m", "sglang.launch_server", "--model-path", spec.model_path, "--host", spec.host,
            "--port", str(spec.port), "--tp-size", str(spec.tp_size),
            "--mem-fraction-static", str(spec.mem_fraction),
            *(["--enable-deterministic-inference"] if spec.deterministic else []), *_dtype_args(spec),
            *spec.extra_args]


def megatron_rl_command(python: str) -> list[str]:
    """``megatron-rl`` of ``python``'s environment: its console script, else ``python -m megatron_rl``."""
    script = Path(python).parent / "megatron-rl"
    return [str(script)] if script.is_file() and os.access(script, os.X_OK) else [python, "-m", "megatron_rl"]


def embedded_command(spec: LaunchSpec) -> list[str]:
    return [*megatron_rl_command(spec.python), "serve", "--model", spec.model_path, "--host", spec.host,
            "--port", str(spec.port), *(["--deterministic"] if spec.deterministic else []), *_dtype_args(spec),
            *spec.extra_args]


def check_port_free(host: str, port: int) -> None:
    """RolloutError if something already listens on (or holds) ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise RolloutError(
                f"Port {port} on {host} is already in use ({e.strerror}), so no rollout server can "
                f"start there. Stop whatever holds it (`ss -ltnp | grep :{port}`), pick another "
                "`rollout.base_port`, or set `rollout.base_port=0` to use free ports.") from None


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports that are free right now."""
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(int(s.getsockname()[1]))
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class ServerProcess:
    """A server we started (``process`` set) or attached to (``process`` None)."""

    url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, chars: int = 1500) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace")
        return text[-chars:].strip() or "(empty log)"


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Linux: deliver ``sig`` to this process when the thread that started it dies (no-op
    elsewhere). Servers and trainer ranks use it so that a launcher killed with SIGKILL (an
    OOM kill, a node agent) takes them along instead of leaving orphans holding GPUs/ports."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except OSError:
        pass


def start_process(command: list[str], url: str, log_path: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """Start ``command`` in a new process group (a terminal's Ctrl-C reaches the trainer, which
    stops its servers in order), stdout+stderr to ``log_path``; it dies with its parent."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True,
                                preexec_fn=set_parent_death_signal)
    log.info("started rollout server pid %d: %s (log %s)", proc.pid, " ".join(command), log_path)
    return ServerProcess(url, proc, log_path)


def _healthy(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url + "/health_generate", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(servers: list[ServerProcess], timeout_s: float, poll_s: float = 0.5) -> None:
    """Block until every server answers /health_generate with 200; RolloutError on exit or timeout."""
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for server in list(pending):
            code = server.exited()
            if code is not None:
                raise RolloutError(
                    f"The rollout server for {server.url} exited with status {code} before becoming "
                    f"healthy. End of its log ({server.log_path}): {server.log_tail()}")
            if _healthy(server.url, timeout_s=max(0.1, min(5.0, deadline - time.monotonic()))):
                pending.remove(server)
        if not pending:
            return
        if time.monotonic() >= deadline:
            tails = " | ".join(f"{s.url}: {s.log_tail(600)}" for s in pending)
            raise RolloutError(
                f"Rollout server(s) {[s.url for s in pending]} did not answer /health_generate with 200 "
                f"within {timeout_s:.0f} s (`rollout.health_timeout_s`). Large models load slowly: raise "
                f"the timeout; otherwise read the logs. Log tails: {tails}")
        time.sleep(poll_s)


def stop_process(server: ServerProcess, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL it if still alive after ``grace_s``."""
    proc = server.process
    if proc is None or proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            log.warning("rollout server pid %d ignored %s for %.0f s", proc.pid, sig.name, wait_s)


class ServerManager:
    """Start (or attach to) the rollout servers of a ``RolloutConfig``; a context manager."""

    def __init__(self, cfg: RolloutConfig, model_path: str | None = None, *, host: str = "127.0.0.1",
                 log_dir: str | Path | None = None, extra_args: list[str] | None = None,
                 python: str = sys.executable):
        self.cfg, self.model_path, self.host = cfg, model_path, host
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="megatron-rl-servers-"))
        self.extra_args, self.python = list(extra_args or []), python
        self.servers: list[ServerProcess] = []

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def specs(self) -> list[LaunchSpec]:
        """One LaunchSpec per server: ports checked free, GPUs assigned tp_size at a time."""
        cfg = self.cfg
        if self.model_path is None:
            raise RolloutError("Launching rollout servers needs a model path (the HF checkpoint to serve).")
        if cfg.base_port == 0:
            ports = free_ports(self.host, cfg.num_servers)
        else:
            ports = [cfg.base_port + i for i in range(cfg.num_servers)]
        for port in ports:
            check_port_free(self.host, port)
        gpus = cfg.gpu_ids if cfg.gpu_ids is not None else list(range(cfg.num_servers * cfg.tp_size))
        return [LaunchSpec(engine=cfg.engine, model_path=self.model_path, port=port, host=self.host,
                           tp_size=cfg.tp_size, mem_fraction=cfg.mem_fraction,
                           gpu_ids=gpus[i * cfg.tp_size:(i + 1) * cfg.tp_size] if cfg.engine == "sglang" else [],
                           # colocated: the trainer releases their GPU memory around each update
                           extra_args=self.extra_args + (["--enable-memory-saver"] if cfg.engine == "sglang"
                                                         and cfg.colocate else []), python=self.python,
                           deterministic=bool(getattr(cfg, "deterministic", False)),
                           dtype=getattr(cfg, "server_dtype", "auto"))
                for i, port in enumerate(ports)]

    def start(self) -> list[str]:
        """Launch (or attach), wait until all are healthy; returns their URLs. Stops all on failure."""
        try:
            if self.cfg.server_urls:
                self.servers = [ServerProcess(u.rstrip("/")) for u in self.cfg.server_urls]
            else:
                specs = self.specs()
                if self.cfg.engine == "sglang" and self.python == sys.executable and importlib.util.find_spec("sglang") is None:
                    raise RolloutError(
                        "`rollout.engine=sglang` but SGLang is not installed in this environment. Install it "
                        "(pip install 'megatron-rl[sglang]', GPU only), attach to running servers with "
                        "`rollout.server_urls`, or use `rollout.engine=embedded` on CPU.")
                for i, spec in enumerate(specs):
                    self.servers.append(self._launch(i, spec))
            wait_healthy(self.servers, self.cfg.health_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.urls

    def _launch(self, index: int, spec: LaunchSpec) -> ServerProcess:
        if spec.engine == "sglang":
            command, env = sglang_command(spec), {"CUDA_VISIBLE_DEVICES": ",".join(map(str, spec.gpu_ids))}
        else:
            command, env = embedded_command(spec), {"CUDA_VISIBLE_DEVICES": ""}
        url = f"http://{spec.host}:{spec.port}"
        return start_process(command, url, self.log_dir / f"server-{index}-{spec.port}.log", env)

    def stop(self) -> None:
        """Stop every server this manager launched (attached ones are left running)."""
        for server in self.servers:
            stop_process(server)

    def __enter__(self) -> ServerManager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
