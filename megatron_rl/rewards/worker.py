"""A grader worker: a child Python process that runs one call at a time under a hard limit.

Why a process and not a thread: math-verify and sympy can spin in C code that no signal
interrupts, and math-verify's own timeouts use ``signal.alarm``, which only works on a
main thread. The parent waits on a pipe with a deadline; on expiry it SIGKILLs the worker
and the next call starts a fresh one. The worker is a plain ``python -m`` subprocess (not
``multiprocessing``), so it never re-imports the caller's ``__main__`` or inherits its
threads, and it imports nothing heavier than the grader it runs (no torch).

Each worker gets its own temporary directory (its ``TMPDIR``), where the sandboxes it starts
keep their job files; the parent empties it whenever it kills the worker and deletes it on
``close`` (or at exit), so a worker killed mid-grade leaves nothing behind in ``/tmp``.

Calls name their target as "module:function"; only ``megatron_rl.rewards`` modules may be
called. Messages are length-prefixed pickles over the worker's stdin/stdout; stray prints
in the worker go to stderr.
"""

from __future__ import annotations

import importlib
import os
import pickle
import resource
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from typing import Any, BinaryIO

from megatron_rl.errors import UserError
from megatron_rl.rewards.sandbox import force_rmtree

_HEADER = struct.Struct("<I")
_ALLOWED_PREFIX = "megatron_rl.rewards."
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerProcess:
    """One supervised worker process; ``call`` is thread-safe (calls are serialised)."""

    def __init__(self, startup_timeout_s: float = 120.0,
                 memory_limit_bytes: int | None = 4 << 30) -> None:
        """``memory_limit_bytes`` caps the worker's address space (RLIMIT_AS): a grader
        expanding a huge number fails with MemoryError instead of exhausting the host."""
        self._startup_timeout_s = startup_timeout_s
        self._memory_limit = memory_limit_bytes
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: str | None = None
        self._remove_tmp: weakref.finalize | None = None
        self._lock = threading.Lock()
        self._started = False
        self.restarts = 0
        """How many times a dead or killed worker was replaced."""

    @property
    def tmp_dir(self) -> str | None:
        """The worker's temporary directory (emptied when it is killed, deleted on close)."""
        return self._tmp

    def call(self, target: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None,
             timeout_s: float) -> tuple[bool, Any]:
        """Run ``target(*args, **kwargs)`` in the worker within ``timeout_s`` seconds.

        Returns (True, result), or (False, reason) when the call raised, timed out or the
        worker died; after a timeout or death the worker is replaced on the next call.
        Worker start-up time is not counted in ``timeout_s``.
        """
        with self._lock:
            try:
                proc = self._ensure_started()
            except (OSError, TimeoutError) as e:
                self._kill()
                return False, f"worker failed to start: {e}"
            assert proc.stdin is not None and proc.stdout is not None
            try:
                _send(proc.stdin, (target, args, kwargs or {}))
                reply = _recv(proc.stdout, time.monotonic() + timeout_s)
            except TimeoutError:
                self._kill()
                return False, f"timeout after {timeout_s:g}s"
            except (OSError, EOFError, pickle.UnpicklingError) as e:
                code = self._kill()
                return False, f"worker crashed (exit {code}): {type(e).__name__}"
            kind, value = reply
            return (True, value) if kind == "ok" else (False, f"grader error: {value}")

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._kill()
        if self._started:
            self.restarts += 1
        self._started = True
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PKG_ROOT, env.get("PYTHONPATH")]))
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="mrl-worker-")
            os.chmod(self._tmp, 0o711)  # a sandbox's throw-away uid reaches its job dir, lists nothing
            self._remove_tmp = weakref.finalize(self, force_rmtree, self._tmp)  # runs at exit too
        env["TMPDIR"] = self._tmp
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_rl.rewards._worker_main",
             str(self._memory_limit or 0)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, close_fds=True)
        assert self._proc.stdout is not None
        kind, _ = _recv(self._proc.stdout, time.monotonic() + self._startup_timeout_s)
        if kind != "ready":
            raise OSError("worker did not announce itself")
        return self._proc

    def _kill(self) -> int | None:
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            proc.kill()
            code = proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        if self._tmp is not None:  # what its sandboxes could not clean up, killed with it
            for name in os.listdir(self._tmp):
                path = os.path.join(self._tmp, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    force_rmtree(path)
                else:
                    os.unlink(path)
        return code

    def close(self) -> None:
        """Stop the worker (it also exits by itself when this process goes away)."""
        with self._lock:
            self._kill()
            if self._remove_tmp is not None:
                self._remove_tmp()
            self._tmp = self._remove_tmp = None


def _send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int, deadline: float | None) -> bytes:
    fd = stream.fileno()
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _recv(stream: BinaryIO, deadline: float | None) -> Any:
    (size,) = _HEADER.unpack(_read_exact(stream, _HEADER.size, deadline))
    return pickle.loads(_read_exact(stream, size, deadline))


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    if not module.startswith(_ALLOWED_PREFIX):
        raise ValueError(f"worker refuses target {target!r}")
    return getattr(importlib.import_module(module), name)


def _undumpable() -> None:
    """PR_SET_DUMPABLE 0: this process holds tests and expected answers, and a sandbox without
    a uid of its own (plain, not root) runs the candidate as our uid; undumpable, our
    /proc/<pid>/mem, environ and fd/ are closed to it (docs/code_grader.md)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    """Worker loop: answer each request with ("ok", result) or ("error", text).

    ``argv[0]``, if given and non-zero, is the address-space limit in bytes."""
    args = sys.argv[1:] if argv is None else argv
    if args and int(args[0]) > 0:
        resource.setrlimit(resource.RLIMIT_AS, (int(args[0]), int(args[0])))
    _undumpable()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints inside graders must not corrupt the reply channel
    inp = sys.stdin.buffer
    _send(out, ("ready", None))
    while True:
        try:
            target, args, kwargs = _recv(inp, None)
        except EOFError:
            return
        try:
            reply = ("ok", _resolve(target)(*args, **kwargs))
        except UserError as e:  # bad input (e.g. malformed tests): its message says it all
            reply = ("error", f"{type(e).__name__}: {e}")
        except BaseException as e:  # a grader bug must come back as a reason, not kill us
            reply = ("error", f"{type(e).__name__}: {e} | {traceback.format_exc(limit=-2)[-400:]}")
        _send(out, reply)


if __name__ == "__main__":
    main()
