"""A real one-node Slurm cluster (Debian's slurmctld, slurmd and munge) for the launch tests.

`SlurmCluster` writes a slurm.conf into a temporary directory (no systemd, no cgroups:
proctrack/linuxproc, task/none, no accounting), starts its own munged (own key and socket,
as user munge: the system's munged is never used or stopped, and two clusters on one machine
are independent), then slurmctld and slurmd in the foreground as its own children, and waits
until `sinfo` shows the node idle. `env` is the environment for sbatch/srun/squeue/scontrol
(SLURM_CONF set, the caller's SLURM_* and launcher variables removed). At exit it cancels what
is left, stops slurmd, then slurmctld, then munged (killing munged first wedges slurmd), and
kills any leftover process of this cluster (found by its SLURM_CONF).

`SlurmUnavailable` is raised, with the daemons' log tails, when the cluster cannot start;
the `slurm_cluster` fixture turns it into a skip.

Run by hand: `.venv/bin/python -m tests.launch.slurm.cluster` starts one, runs `srun -n 2
hostname` and stops it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "procps")
DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# Set in a pytest process by in-process single-rank tests, or by an outer launcher: a job that
# inherits them would think torchrun or another Slurm job had started it.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "TORCHELASTIC_RUN_ID")

TEMPLATE = (Path(__file__).with_name("slurm.conf.in")).read_text()
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot start here (binaries missing and not installable, not root, a daemon failed)."""


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_binaries() -> list[str]:
    # pkill (procps, absent from minimal images): the launcher's sbatch script forwards SIGUSR1 with it
    return [b for b in (*DAEMONS, *CLIENTS, "munge", "unmunge", "pkill") if which(b) is None]


def ensure_installed(timeout: float = 600) -> None:
    """Install Debian's packages when a binary is missing and we may (root, apt-get); else raise."""
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0 or which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm binaries missing ({', '.join(missing)}) and not installable here "
                               f"(needs root and apt-get: apt-get install {' '.join(PACKAGES)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=timeout, env=env)
        proc = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} timed out after {timeout:.0f} s") from None
    missing = missing_binaries()
    if missing:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed (rc {proc.returncode}), still "
                               f"missing {', '.join(missing)}:\n{(proc.stdout + proc.stderr)[-1500:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} missing)"
    return "\n".join(lines[-n:])


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) without SLURM_* and launcher variables."""
    base = dict(os.environ if base is None else base)
    return {k: v for k, v in base.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
            and k not in LAUNCHER_VARS}


def munge_works(socket_path: Path) -> bool:
    munge, unmunge = which("munge"), which("unmunge")
    if not (munge and unmunge):
        return False
    try:
        cred = subprocess.run([munge, "-n", f"--socket={socket_path}"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run([unmunge, f"--socket={socket_path}"], input=cred.stdout, capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False


def parse_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line as a dict (values may hold spaces only in the last fields)."""
    out = {}
    for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", line.strip()):
        out[m.group(1)] = m.group(2)
    return out


def kill_marked(conf: Path) -> None:
    """SIGKILL every process started under a cluster (slurmstepd, job scripts): they carry its SLURM_CONF."""
    mark = f"SLURM_CONF={conf}".encode()
    me = os.getpid()
    for _ in range(3):
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == me:
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if mark in environ.split(b"\0"):
                found.append(int(pid))
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)


def _proc(pid: str) -> tuple[list[str], int] | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return cmd, ppid


def _gone(pid: int, timeout: float) -> bool:
    """Whether `pid` exits (or is a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.1)
    return False


def reap_orphans() -> list[Path]:
    """Stop test clusters left running by a test session that died without stopping them (SIGKILL):
    daemons of a `slurm-test-*` directory whose parent is no longer a Python process. Returns their
    directories. Clusters of live sessions, and any real cluster, are left alone."""
    groups: dict[Path, dict[str, int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        info = _proc(pid)
        if not info or not info[0][0]:
            continue
        cmd, ppid = info
        name = Path(cmd[0]).name
        if name in ("slurmd", "slurmctld") and "-f" in cmd[:-1]:
            root = Path(cmd[cmd.index("-f") + 1]).parent
        elif name == "munged" and any(a.startswith("--socket=") for a in cmd):
            root = Path(next(a for a in cmd if a.startswith("--socket="))[len("--socket="):]).parent.parent
        else:
            continue
        if not root.name.startswith("slurm-test-"):
            continue
        parent = _proc(str(ppid)) if ppid > 1 else None
        if parent and "python" in Path(parent[0][0]).name:
            continue
        groups.setdefault(root, {})[name] = int(pid)
    for root, procs in groups.items():
        for name in ("slurmd", "slurmctld", "munged"):  # the order that does not wedge slurmd
            pid = procs.get(name)
            if pid is None:
                continue
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                if _gone(pid, wait):
                    break
        kill_marked(root / "slurm.conf")
        shutil.rmtree(root, ignore_errors=True)
    return list(groups)


class SlurmCluster:
    """A one-node Slurm cluster living in a temporary directory (a context manager)."""

    def __init__(self, root: str | Path | None = None, *, cpus: int | None = None, real_memory_mb: int | None = None,
                 partition: str = "debug", kill_wait: int = 5, start_timeout: float = 60.0,
                 install: bool = True):
        self._tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="slurm-test-")
        self.root = Path(root if root is not None else self._tmp.name)
        self.cpus = cpus or os.cpu_count() or 1
        self.real_memory_mb = real_memory_mb or self._modest_memory()
        self.partition = partition
        self.kill_wait = kill_wait
        self.start_timeout = start_timeout
        self.install = install
        self.hostname = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip() \
            or socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        # The node's name is what jobs see in SLURM_JOB_NODELIST (the launcher's MASTER_ADDR): a host
        # name that does not resolve (some containers) would break torch.distributed, localhost does not.
        self.node = self.hostname if _resolves(self.hostname) else "localhost"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.logs = {"slurmctld": self.root / "slurmctld.log", "slurmd": self.root / "slurmd.log",
                     "munged": self.munge_dir / "munged.log"}
        self._procs: dict[str, subprocess.Popen] = {}
        self.start_seconds: float | None = None

    @staticmethod
    def _modest_memory() -> int:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        except (ValueError, OSError):
            total = 2048
        return max(256, min(total // 2, 8192))

    # --- environment --------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients and the jobs they submit (jobs inherit it: --export=ALL)."""
        env = clean_env()
        path = env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        env["PATH"] = os.pathsep.join(path + [p for p in SBIN if p not in path])
        env["SLURM_CONF"] = str(self.conf)
        return env

    def job_env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` (e.g. a test's own environment) made fit for submitting jobs to this cluster."""
        env = clean_env(base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = self.env["PATH"] if "PATH" not in env else \
            os.pathsep.join(env["PATH"].split(os.pathsep) + [p for p in SBIN if p not in env["PATH"].split(os.pathsep)])
        return env

    # --- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_config(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        values = {"munge_socket": str(self.munge_socket), "host": self.hostname, "node": self.node, "root": str(self.root), "cpus": self.cpus, "mem": self.real_memory_mb,
                  "ctld_port": free_port(), "slurmd_port": free_port(), "partition": self.partition,
                  "kill_wait": self.kill_wait}
        self.conf.write_text(TEMPLATE.format(**values))

    def start(self) -> None:
        t0 = time.monotonic()
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs slurmd/slurmctld as root (SlurmUser=root); not root here")
        if self.install:
            ensure_installed()
        else:
            missing = missing_binaries()
            if missing:
                raise SlurmUnavailable(f"Slurm binaries missing: {', '.join(missing)}")
        self.reaped = reap_orphans()  # clusters a killed test session left behind
        self.write_config()
        self._start_munge()
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._run_quiet(["scontrol", "ping"]).stdout.count("UP") > 0, "slurmctld to answer ping",
                   ("slurmctld",))
        self._spawn("slurmd", [which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, "the node to be idle in sinfo", ("slurmctld", "slurmd"))
        self.start_seconds = time.monotonic() - t0

    def _start_munge(self) -> None:
        """A private munged (own key, socket, log) as user munge: clusters never share or stop the
        system's munged, and two test sessions on one machine do not stop each other's."""
        munged = which("munged")
        d = self.munge_dir
        d.mkdir(exist_ok=True)
        d.chmod(0o755)  # munged: "execute permissions for all required" on the socket directory
        self.root.chmod(0o755)  # user munge reaches its directory
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        try:
            for path in (d, key):
                shutil.chown(path, "munge", "munge")
        except (LookupError, PermissionError) as e:
            raise SlurmUnavailable(f"cannot prepare {d} for munged (user munge from the munge package): {e}") from None
        self._spawn("munged", [munged, "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={d / 'munged.pid'}", f"--log-file={self.logs['munged']}",
                               f"--seed-file={d / 'munged.seed'}"], user="munge")
        self._wait(lambda: munge_works(self.munge_socket), "munged to answer (munge -n | unmunge)", ("munged",),
                   timeout=20)

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        out = open(self.root / f"{name}.out", "ab")
        env = clean_env()
        env["SLURM_CONF"] = str(self.conf)  # inherited by slurmstepd and jobs: how leftovers are found
        kwargs = {"user": user, "group": user, "extra_groups": []} if user else {}
        try:
            self._procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 env=env, cwd=self.root, start_new_session=True, **kwargs)
        except OSError as e:
            raise SlurmUnavailable(f"cannot start {name}: {e}") from None
        finally:
            out.close()

    def _wait(self, ready, what: str, daemons: tuple[str, ...], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            for name in daemons:
                proc = self._procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited ({proc.returncode}) while waiting for {what}\n"
                                           + self.log_tails())
            if ready():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"timed out after {timeout or self.start_timeout:.0f} s waiting for {what}\n"
                               + self.log_tails())

    def _node_idle(self) -> bool:
        out = self._run_quiet(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split()
        return len(out) >= 2 and out[1].rstrip("*") == "idle"

    def log_tails(self, n: int = 15) -> str:
        parts = []
        for name in DAEMONS:
            for path in (self.logs[name], self.root / f"{name}.out"):  # the log file, else the console
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- {path} (last {n} lines) ---\n{tail(path, n)}")
                    break
        return "\n".join(parts)

    def stop(self) -> None:
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            self._run_quiet(["scancel", "--full", "--quiet", "-u", "root"])  # everything still queued or running
            self._run_quiet(["scancel", "--quiet", "-u", "root"])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._run_quiet(["squeue", "-h", "-o", "%i"]).stdout.strip():
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self._kill_leftovers()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _kill_leftovers(self) -> None:
        kill_marked(self.conf)

    # --- client helpers -----------------------------------------------------------------------------

    def _run_quiet(self, cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
        except (OSError, subprocess.TimeoutExpired) as e:
            return subprocess.CompletedProcess(cmd, 1, "", str(e))

    def run(self, cmd: list[str], *, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster; raise with its output when `check` and it fails."""
        kwargs.setdefault("env", self.env)
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, script: str, *args: str, cwd: str | Path | None = None, env: dict | None = None) -> str:
        """Submit `script` (text) with sbatch `args`; return the job id."""
        cwd = Path(cwd or self.root)
        path = Path(tempfile.mkstemp(prefix="job-", suffix=".sh", dir=cwd)[1])
        path.write_text(script)
        proc = self.run(["sbatch", "--parsable", *args, str(path)], cwd=cwd, env=env or self.env)
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` records for a job (one per array task); empty once it has aged out."""
        proc = self._run_quiet(["scontrol", "show", "job", "-o", str(job_id)])
        return [parse_record(line) for line in proc.stdout.splitlines() if line.strip()]

    def state(self, job_id: str) -> str:
        recs = self.jobs(job_id)
        return recs[0].get("JobState", "?") if recs else "GONE"

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            recs = self.jobs(job_id)
            if recs:
                last = recs[0]
                if last.get("JobState") in states:
                    return last
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f} s (last: {last})\n"
                             + self.diagnostics())

    def wait_done(self, job_id: str, timeout: float = 180) -> list[dict[str, str]]:
        """Wait until every task of the job is in a terminal state; return their records."""
        deadline = time.monotonic() + timeout
        recs: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            recs = self.jobs(job_id)
            if recs and all(r.get("JobState") in TERMINAL for r in recs):
                return recs
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: "
                             f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in recs]}\n"
                             + self.diagnostics())

    def requeue(self, job_id: str, timeout: float = 60) -> None:
        """`scontrol requeue` a running job and make it eligible at once: Slurm holds a requeued job
        pending (Reason=BeginTime) for ~2 minutes, which the test need not wait out."""
        self.run(["scontrol", "requeue", str(job_id)])
        self.release(job_id, timeout)

    def release(self, job_id: str, timeout: float = 60) -> None:
        """Once the job is pending again after a requeue, start it now instead of after its BeginTime."""
        rec = self.wait_state(job_id, ("PENDING", *TERMINAL), timeout=timeout)
        if rec.get("JobState") == "PENDING":
            # A requeued job is pending while its node may still be completing the old run (the
            # batch step's cleanup); started at once then, one CI run saw it fail with exit 1
            # before its script printed a line. Wait for the node to finish that first.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "comp" in self._run_quiet(["sinfo", "-h", "-N", "-o", "%T"]).stdout:
                time.sleep(0.5)
            self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)

    def diagnostics(self) -> str:
        q = self._run_quiet(["squeue", "-a", "-o", "%i %T %r %N"]).stdout
        s = self._run_quiet(["sinfo", "-N", "-o", "%N %T %E"]).stdout
        return f"squeue:\n{q}\nsinfo:\n{s}\n{self.log_tails(10)}"


if __name__ == "__main__":
    t = time.monotonic()
    with SlurmCluster() as c:
        print(f"cluster up in {c.start_seconds:.1f} s (conf {c.conf})")
        print(c.run(["srun", "-n", "2", "hostname"]).stdout, end="")
    print(f"stopped; {time.monotonic() - t:.1f} s in all")
