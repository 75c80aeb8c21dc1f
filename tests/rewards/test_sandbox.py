"""Hostile programs against the code sandbox, on every backend this machine has.

Each hostile program is graded with a stdin/stdout test whose expected output is a secret
token that the program can only print if it breaks out (reads the parent's environment,
reaches a host socket, ...), so a breach shows up as a 1.0. Every case must score 0.0
within timeout + 2 s and leave no process, memory or directory behind. A case runs only
on backends that claim the protection it attacks; the rest are skipped with the reason,
so these tests never run a fork bomb where nothing bounds it.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from megatron_rl.rewards.code import grade_code
from megatron_rl.rewards.sandbox_setup import SandboxLimits, SandboxSetup

TIMEOUT_S = 2.0
# Low limits: a bomb stops at 8 processes x 256 MiB before it can touch this shared machine.
LIMITS = SandboxLimits(address_space_bytes=256 << 20, nproc=8, output_bytes=1 << 20)


def run_hostile(setup: SandboxSetup, program: str, token: str, footprint) -> str:
    """Grade ``program`` (expected output: ``token``); returns the reason. Asserts 0.0,
    the time bound and a clean machine."""
    response = f"```python\n{program}\n```"
    start = time.monotonic()
    grade = grade_code(response, {"inputs": [""], "outputs": [token]}, timeout_s=TIMEOUT_S,
                       limits=LIMITS, backend=setup.backend)
    elapsed = time.monotonic() - start
    assert grade.score == 0.0, f"breach on {setup.backend}: {grade.reason}"
    assert elapsed <= TIMEOUT_S + 2.0, f"took {elapsed:.1f}s"
    footprint.assert_restored()
    return grade.reason


def need(setup: SandboxSetup, *flags: str) -> None:
    missing = [f for f in flags if not getattr(setup.protections, f)]
    if missing:
        pytest.skip(f"{setup.backend} here lacks {', '.join(missing)}")


def test_fork_bomb(sandbox_setup, footprint):
    need(sandbox_setup, "nproc_enforced", "kill_leftovers")
    prog = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert run_hostile(sandbox_setup, prog, "never", footprint).startswith("timeout")


def test_memory_bomb(sandbox_setup, footprint):
    prog = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"
    assert "MemoryError" in run_hostile(sandbox_setup, prog, "never", footprint)


def test_infinite_loop(sandbox_setup, footprint):
    reason = run_hostile(sandbox_setup, "while True:\n    pass", "never", footprint)
    assert reason.startswith("timeout: test 0")


def test_busy_child_left_behind(sandbox_setup, footprint):
    need(sandbox_setup, "kill_leftovers")
    # The child leaves the process group and session, then spins; the parent exits at once.
    prog = ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        while True:\n            pass\n    os._exit(0)\nprint('done')")
    assert run_hostile(sandbox_setup, prog, "never", footprint).startswith("wrong_answer")


def test_write_outside_workdir(sandbox_setup, footprint):
    token = secrets.token_hex(8)
    targets = []
    if sandbox_setup.protections.caller_files_protected:
        mine = tempfile.mkdtemp(prefix="mrl-test-owned-")  # 0700, owned by us
        os.chmod(mine, 0o755)
        targets.append(os.path.join(mine, "pwned"))
    if sandbox_setup.protections.host_fs_readonly:
        shared = tempfile.mkdtemp(prefix="mrl-test-shared-")
        os.chmod(shared, 0o777)  # even a world-writable host directory must stay untouched
        targets.append(os.path.join(shared, "pwned"))
    if not targets:
        pytest.skip(f"{sandbox_setup.backend} here confines no writes")
    prog = (f"ok = False\nfor path in {targets!r}:\n    try:\n"
            f"        open(path, 'w').write('x')\n        ok = True\n    except OSError:\n"
            f"        pass\nprint({token!r} if ok else 'contained')")
    try:
        run_hostile(sandbox_setup, prog, token, footprint)
        assert not any(os.path.exists(t) for t in targets)
    finally:
        for t in targets:
            subprocess.run(["rm", "-rf", os.path.dirname(t)], check=False)


def test_parent_environment_not_inherited(sandbox_setup, footprint, monkeypatch):
    token = secrets.token_hex(8)
    monkeypatch.setenv("MRL_TEST_SECRET", token)
    prog = "import os\nprint(os.environ.get('MRL_TEST_SECRET', 'absent'))"
    assert run_hostile(sandbox_setup, prog, token, footprint).startswith("wrong_answer")


def test_parent_environment_not_readable_via_proc(sandbox_setup, footprint, monkeypatch):
    need(sandbox_setup, "parent_unreachable")
    token = secrets.token_hex(8)
    monkeypatch.setenv("MRL_TEST_SECRET", token)
    prog = ("import os\nfound = 'absent'\nfor pid in os.listdir('/proc'):\n    try:\n"
            "        env = open(f'/proc/{pid}/environ', 'rb').read().split(b'\\0')\n"
            "    except OSError:\n        continue\n    for kv in env:\n"
            "        if kv.startswith(b'MRL_TEST_SECRET='):\n"
            "            found = kv.split(b'=', 1)[1].decode()\nprint(found)")
    run_hostile(sandbox_setup, prog, token, footprint)


def test_network_socket(sandbox_setup, footprint):
    need(sandbox_setup, "network_isolated")
    token = secrets.token_hex(8)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted: list[bool] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(True)
            conn.sendall(token.encode())
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    prog = (f"import socket\ntry:\n    s = socket.create_connection(('127.0.0.1', {port}), "
            f"timeout=1)\n    print(s.recv(100).decode())\nexcept OSError as e:\n    print('no', e)")
    try:
        run_hostile(sandbox_setup, prog, token, footprint)
    finally:
        stop.set()
        t.join()
        server.close()
    assert not accepted


def test_print_one_gigabyte(sandbox_setup, footprint):
    prog = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)"
    assert run_hostile(sandbox_setup, prog, "never", footprint).startswith("output_limit")


def test_kill_parent(sandbox_setup, footprint):
    need(sandbox_setup, "parent_unreachable")
    sentinel = subprocess.Popen(["sleep", "60"])  # a process of ours the code knows about
    try:
        targets = [os.getpid(), sentinel.pid]
        prog = ("import os, signal\nfor pid in [os.getppid(), *" + repr(targets) + "]:\n"
                "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n"
                "        pass\nprint('tried')")
        # Not run_hostile: the sentinel is a child of ours until the end of the test.
        start = time.monotonic()
        grade = grade_code(f"```python\n{prog}\n```", {"inputs": [""], "outputs": ["never"]},
                           timeout_s=TIMEOUT_S, limits=LIMITS, backend=sandbox_setup.backend)
        assert grade.score == 0.0
        assert time.monotonic() - start <= TIMEOUT_S + 2.0
        assert sentinel.poll() is None, "the sandbox killed a process outside it"
    finally:
        sentinel.kill()
        sentinel.wait()
    footprint.assert_restored()
