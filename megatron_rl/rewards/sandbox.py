"""One sandboxed test session: start the driver, run tests one at a time, tear down.

The parent (this module) never runs untrusted code and never tells the sandbox the expected
answers: the driver only returns what each test printed or returned, and the caller
compares. Tests are requested one by one, so a caller that needs every test to pass stops
at the first failure instead of paying every timeout.

Failures are told apart by who caused them. A driver that never announces itself (bwrap
missing or broken, an interpreter that does not exist, a driver that cannot run) raises
``SandboxStartError`` before any untrusted code runs: the grader's fault. Once the driver
is up, only the candidate's code runs beside it, so a driver that dies or stops answering
during a test is reported as ``driver_lost``, the candidate's fault (it can signal the driver,
which shares its uid). A driver that catches its own bug answers ``driver_error``.

Teardown is unconditional: close the driver's stdin, then SIGKILL the whole process group
(under bwrap the PID namespace dies with it), then, when the code ran as a throw-away uid,
kill every process that uid still owns, then delete the directory.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import time
from typing import Any

from megatron_rl.rewards.sandbox_setup import (
    SandboxLimits,
    SandboxSetup,
    allocate_uid,
    clean_env,
    kill_uid,
    make_job_dirs,
)

logger = logging.getLogger(__name__)
_DRIVER_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_driver.py")
# Slack on top of a test's own timeout before the parent gives up on the driver itself.
DRIVER_SLACK_S = 1.5
# How long the driver may take to start (interpreter start-up, bwrap's mounts) on a loaded host.
STARTUP_TIMEOUT_S = 20.0


class SandboxStartError(RuntimeError):
    """The sandbox did not start: a grader failure, not the candidate's."""


class SandboxRun:
    """A running driver for one job; use as a context manager so teardown always happens.

    ``job`` holds ``mode`` ("stdio", "call" or "assert"), ``source``, ``inputs`` (one entry
    per test), ``timeout_s`` per test and, per mode, ``fn_name`` / ``test_code`` /
    ``entry_point``. Expected outputs are never part of it.
    """

    def __init__(self, setup: SandboxSetup, job: dict[str, Any], limits: SandboxLimits):
        self.setup = setup
        self._limits = limits
        self._job_dir, self._work_dir = make_job_dirs()
        self._uid = allocate_uid() if setup.drop_uid else None
        self._buf = b""
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            self._start(job)
        except BaseException:
            self.close()
            raise

    def _start(self, job: dict[str, Any]) -> None:
        shutil.copyfile(_DRIVER_SRC, os.path.join(self._job_dir, "driver.py"))
        full = dict(job, uid=self._uid, limits=self._limits.__dict__,
                    kill_all=self.setup.protections.kill_leftovers)
        with open(os.path.join(self._job_dir, "job.json"), "w", encoding="utf-8") as f:
            json.dump(full, f)
        for name in ("driver.py", "job.json"):
            os.chmod(os.path.join(self._job_dir, name), 0o644)
        if self._uid is not None:
            os.chown(self._work_dir, self._uid, self._uid)
        home = "/tmp" if self.setup.backend == "bwrap" else self._work_dir
        err_path = os.path.join(self._job_dir, "driver.err")  # bwrap's or Python's complaint
        try:
            with open(err_path, "wb") as err:
                self._proc = subprocess.Popen(
                    self.setup.command(self._job_dir, self._limits), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=err, cwd=self._work_dir,
                    env=clean_env(home), start_new_session=True, close_fds=True)
        except OSError as e:
            raise SandboxStartError(f"{self.setup.backend} sandbox could not be started: {e}") from e
        assert self._proc.stdout is not None
        line = self._read_line(self._proc.stdout.fileno(), time.monotonic() + STARTUP_TIMEOUT_S)
        if line is None or line.strip() != b'{"ready": true}':
            code = self._proc.poll()
            with open(err_path, "rb") as f:
                why = f.read()[-300:].decode("utf-8", "replace").strip()
            state = f"exit {code}" if code is not None else f"no answer in {STARTUP_TIMEOUT_S:g}s"
            raise SandboxStartError(f"{self.setup.backend} sandbox driver did not start ({state})"
                                    + (f": {why}" if why else ""))

    def run_test(self, index: int | dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Run test ``index`` (or a call request ``{"call": name, "args": encoded}``); the
        driver's record, or one with status "driver_lost" when the driver died, hung or
        answered out of turn while the code ran.

        ``timeout_s`` is the test's own limit; the driver enforces it and this waits
        DRIVER_SLACK_S longer before declaring the driver lost.
        """
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        lost = {"i": index, "status": "driver_lost",
                "detail": "(the sandbox driver died or stopped answering while the code ran)"}
        try:
            proc.stdin.write((json.dumps(index) + "\n").encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return lost
        line = self._read_line(proc.stdout.fileno(), time.monotonic() + timeout_s + DRIVER_SLACK_S)
        try:
            rec = json.loads(line) if line is not None else None
        except ValueError:
            rec = None
        return rec if isinstance(rec, dict) and rec.get("i") == index else lost

    def _read_line(self, fd: int, deadline: float) -> bytes | None:
        # JSON escaping can grow captured bytes up to 6x; anything longer is not our driver.
        cap = 6 * self._limits.output_bytes + (64 << 10)
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(self._buf) > cap:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def close(self) -> None:
        """Stop everything the job started and delete its files; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin:
                    proc.stdin.close()
                proc.wait(timeout=0.5)  # the driver exits on EOF after killing leftovers
            except (OSError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
        if self._uid is not None:
            kill_uid(self._uid)  # catches anything that escaped the group with setsid()
        if os.path.isdir(self._job_dir):
            force_rmtree(self._job_dir)

    def __enter__(self) -> SandboxRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def force_rmtree(path: str) -> None:
    """rmtree that first restores permissions the code may have removed (chmod 000)."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        logger.warning("sandbox directory %s could not be removed", path)
