"""How untrusted code is isolated on this machine: backend detection, limits, argv.

Two backends, chosen at run time:

* ``bwrap`` (Debian's ``bubblewrap``): new PID, network, IPC and UTS namespaces, a root
  filesystem that holds only ``/usr``, ``/etc`` and the interpreter's prefix read-only, a
  private size-capped ``/tmp`` as the working directory, and the job files read-only. When
  the grader runs as root, the sandbox drops to a throw-away uid (so ``RLIMIT_NPROC``
  counts, since the kernel never enforces it for uid 0); otherwise bwrap makes a user
  namespace, in which the kernel counts processes afresh.
* ``plain``: no isolation tool. A fresh directory, its own session and process group,
  resource limits, a clean environment, and (as root) the same throw-away uid, which
  confines writes to world-writable places and lets cleanup kill every process it owns.
  No network or PID isolation, and world-readable host files stay readable.

``Protections`` records which of these hold, so callers (and tests) can report them.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, fields

BWRAP_BIN = "bwrap"
# Throw-away uids live far above any real or subordinate uid range; each sandbox gets its own
# so that NPROC counts and `kill(-1)` as that uid reach this sandbox's processes only.
_UID_BASE = 3_000_000_000
_uid_counter = itertools.count()
_uid_lock = threading.Lock()


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits applied to every process the untrusted code runs in."""

    address_space_bytes: int = 1 << 30
    """RLIMIT_AS per process; bounds a memory bomb (total <= nproc x this)."""
    nproc: int = 8
    """Processes/threads the code may add (RLIMIT_NPROC, counted for the sandbox's uid)."""
    file_size_bytes: int = 16 << 20
    """RLIMIT_FSIZE: the largest file the code may write."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    output_bytes: int = 1 << 20
    """Captured stdout (or return value) per test; more fails the test at once."""
    tmpfs_bytes: int = 64 << 20
    """Size of the private scratch /tmp under bwrap (RAM-backed, so it is capped)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"SandboxLimits.{f.name} must be positive")


@dataclass(frozen=True)
class Protections:
    """Which protections hold for a backend on this machine (True = active)."""

    backend: str
    wall_timeout: bool = True
    process_group: bool = True
    rlimits: bool = True
    clean_env: bool = True
    fresh_workdir: bool = True
    output_cap: bool = True
    uid_drop: bool = False
    nproc_enforced: bool = False
    kill_leftovers: bool = False
    pid_namespace: bool = False
    network_isolated: bool = False
    host_fs_readonly: bool = False
    """No write anywhere on the host, world-writable /tmp included."""
    caller_files_protected: bool = False
    """The caller's own files cannot be changed (other uid, or read-only mounts)."""
    host_files_hidden: bool = False
    """Only system directories and the interpreter are visible (datasets, /root are not)."""
    parent_unreachable: bool = False
    """The code can neither signal nor read the environment of the grader's processes."""

    def describe(self) -> str:
        """One line: the backend, then every protection as +name (active) or -name."""
        flags = [
            ("+" if getattr(self, f.name) else "-") + f.name
            for f in fields(self)
            if f.name != "backend"
        ]
        return f"{self.backend}: " + " ".join(flags)


@dataclass(frozen=True)
class SandboxSetup:
    """A resolved backend: the interpreter to run and whether to drop to a throw-away uid."""

    backend: str
    python: str
    drop_uid: bool
    protections: Protections

    def command(self, job_dir: str, limits: SandboxLimits) -> list[str]:
        """argv that starts the in-sandbox driver on ``job_dir/job.json``."""
        if self.backend == "plain":
            return [self.python, "-I", os.path.join(job_dir, "driver.py"),
                    os.path.join(job_dir, "job.json")]
        return _bwrap_argv(self.python, job_dir, limits.tmpfs_bytes) + [
            self.python, "-I", "/job/driver.py", "/job/job.json"]


def allocate_uid() -> int:
    """A throw-away uid unique to this process and call (wraps after 1000 live sandboxes)."""
    with _uid_lock:
        slot = next(_uid_counter) % 1000
    return _UID_BASE + (os.getpid() % 1_000_000) * 1000 + slot


def clean_env(home: str) -> dict[str, str]:
    """The only environment the code sees: no parent variables, hence no secrets."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": home, "TMPDIR": home}


def _python_prefix(python: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.realpath(python)))


def _bwrap_argv(python: str, job_dir: str, tmpfs_bytes: int) -> list[str]:
    # Resolved here: the sandbox starts with a clean PATH, which must not pick another bwrap
    # than the one this process probed.
    argv = [shutil.which(BWRAP_BIN) or BWRAP_BIN, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if os.getuid() == 0:
        # No user namespace as root: the driver keeps CAP_SETUID/SETGID only long enough to
        # drop to its throw-away uid before any untrusted code runs.
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--ro-bind", "/etc", "/etc"]
    prefix = _python_prefix(python)
    if not prefix.startswith("/usr/"):
        # Parents bwrap creates are 0700: make each one traversable for the dropped uid, so
        # that only the interpreter's prefix (not the rest of e.g. /root) is visible.
        parts = prefix.strip("/").split("/")[:-1]
        for i in range(len(parts)):
            argv += ["--perms", "0755", "--dir", "/" + "/".join(parts[: i + 1])]
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--dev", "/dev", "--proc", "/proc", "--ro-bind", job_dir, "/job",
             "--perms", "1777", "--size", str(tmpfs_bytes), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    return argv


def _protections(backend: str, drop_uid: bool) -> Protections:
    root = os.getuid() == 0
    if backend == "bwrap":
        return Protections(backend, uid_drop=drop_uid, nproc_enforced=True, kill_leftovers=True,
                           pid_namespace=True, network_isolated=True, host_fs_readonly=True,
                           caller_files_protected=True, host_files_hidden=True,
                           parent_unreachable=True)
    return Protections(backend, uid_drop=drop_uid, nproc_enforced=drop_uid or not root,
                       kill_leftovers=drop_uid, caller_files_protected=drop_uid,
                       parent_unreachable=drop_uid)


def _probe(argv: list[str], drop_uid: bool) -> bool:
    """True when the driver starts this way and answers a trivial job."""
    from megatron_rl.rewards.sandbox import SandboxRun, SandboxStartError  # local: cycle

    setup = SandboxSetup(argv[0], argv[1], drop_uid, _protections(argv[0], drop_uid))
    # Importing modules the driver has not loaded proves the (possibly dropped) uid can
    # read the interpreter's standard library, not just run the already-started process.
    job = {"mode": "stdio", "source": "import fractions, heapq, decimal\nprint(input())",
           "inputs": ["ok"], "timeout_s": 5.0}
    try:
        with SandboxRun(setup, job, SandboxLimits()) as run:
            rec = run.run_test(0, 10.0)
    except (OSError, SandboxStartError):
        return False
    return rec is not None and rec.get("status") == "done" and rec.get("stdout", "").strip() == "ok"


@functools.lru_cache(maxsize=8)
def detect(backend: str = "auto", python: str | None = None) -> SandboxSetup:
    """Resolve ``backend`` ("auto", "bwrap" or "plain") by starting a trivial job once.

    "auto" takes bwrap when it runs here, else plain. Asking for "bwrap" where it cannot
    start raises RuntimeError. The interpreter defaults to the base interpreter of this one
    (run with ``-I``, so no user site, venv or PYTHON* variables).
    """
    if backend not in ("auto", "bwrap", "plain"):
        raise ValueError(f"unknown sandbox backend {backend!r}; use auto, bwrap or plain")
    py = python or os.path.realpath(sys.executable)
    root = os.getuid() == 0
    if backend in ("auto", "bwrap") and shutil.which(BWRAP_BIN):
        if _probe(["bwrap", py], drop_uid=root):
            return SandboxSetup("bwrap", py, root, _protections("bwrap", root))
    if backend == "bwrap":
        raise RuntimeError("bubblewrap (bwrap) is missing or cannot start on this machine")
    if root:
        # The throw-away uid must be able to reach the interpreter (e.g. not under /root).
        candidates = [py] + ([] if python else ["/usr/bin/python3"])
        for cand in candidates:
            if os.path.exists(cand) and _probe(["plain", cand], drop_uid=True):
                return SandboxSetup("plain", cand, True, _protections("plain", True))
    return SandboxSetup("plain", py, False, _protections("plain", False))


def make_job_dirs() -> tuple[str, str]:
    """(job_dir, work_dir): job files readable by the sandbox, and its writable scratch."""
    job_dir = tempfile.mkdtemp(prefix="mrl-sbx-")
    os.chmod(job_dir, 0o755)
    work_dir = os.path.join(job_dir, "work")
    os.mkdir(work_dir, 0o700)
    return job_dir, work_dir


def kill_uid(uid: int) -> None:
    """Kill every process owned by ``uid`` (root only): ``kill(-1)`` sent as that uid."""
    if uid < _UID_BASE or os.getuid() != 0:
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            # Only after the drop really happened: kill(-1) as root would hit every process.
            if os.getuid() == uid and os.geteuid() == uid:
                os.kill(-1, 9)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
