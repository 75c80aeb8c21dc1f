"""In-sandbox test driver: a standalone script (stdlib only; it is copied into the sandbox).

Run as ``python -I driver.py job.json``. It first drops to the throw-away uid (when given),
sets resource limits and makes itself undumpable, then announces ``{"ready": true}`` (the
parent counts a driver that never says so as a sandbox that failed to start, a grader
failure), then reads one test index per line on stdin and answers one JSON line per test on
stdout: ``{"i", "status", "stdout", "payload", "detail"}`` where status is done / error /
timeout / output_limit / crashed, or driver_error when the driver itself failed. Each test runs in a fresh fork: stdin
from a memfd holding the input, stdout into a capped pipe, a per-test CPU limit, and a
wall-clock kill. After each test every process the code left behind is killed.

A line may instead be a JSON call request ``{"call": name, "args": [...]}`` (assert
mode): the candidate's function ``name`` is called with the decoded arguments and its
result comes back encoded (``_encode``). The asserts themselves never enter the sandbox.

It never sees expected outputs or test code, so nothing the code does here can fake a
pass: at most it can forge a value, which the parent then checks.
"""

import json
import os
import resource
import select
import signal
import sys
import time
import traceback
import types


def _count_my_processes(uid):
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat("/proc/" + name).st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _harden(job):
    uid = job.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise SystemExit("uid drop failed")
    lim = job["limits"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (lim["address_space_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["open_files"],) * 2)
    # NPROC counts every process of this uid; without a fresh uid or namespace that
    # includes the caller's own, so the budget is what exists now plus the allowance.
    nproc = _count_my_processes(os.getuid()) + lim["nproc"]
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _kill_leftovers(job, pgid):
    if job.get("kill_all"):
        # Safe only with a PID namespace or a throw-away uid (the parent decides): this
        # reaches exactly the processes the tests started, wherever they went.
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
    if pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    # As the subreaper, the driver inherits every orphan: reap them so none lingers as a
    # zombie. Blocking is safe only when everything was just SIGKILLed.
    flags = 0 if job.get("kill_all") else os.WNOHANG
    try:
        while os.waitpid(-1, flags)[0]:
            pass
    except ChildProcessError:
        pass


def _become_subreaper():
    # PR_SET_CHILD_SUBREAPER: orphans of the code reparent to the driver, not to the
    # host's init, so they are reaped here and never escape the driver's bookkeeping.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _set_dumpable(flag):
    # PR_SET_DUMPABLE (4). Undumpable, the driver's /proc/<pid>/mem, environ and fd/ are out
    # of reach of the code it runs under the same uid, so the code can neither read it nor
    # write into its reply pipe. Each test child turns it back on for itself (fork inherits
    # it), so the code sees an ordinary process.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, flag, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _jsonable(x):
    # Exact built-in types only: a subclass (an int whose __eq__ is always true) or any
    # other object is refused rather than sent by a representation the code controls.
    t = type(x)
    if t in (list, tuple):
        return [_jsonable(v) for v in x]
    if t is dict:
        if not all(type(k) is str for k in x):
            raise TypeError("dict keys must be str")
        return {k: _jsonable(v) for k, v in x.items()}
    if x is None or t in (bool, int, float, str):
        return x
    raise TypeError(f"return value of type {t.__name__} is not plain data")


def _encode(x):
    """Tagged plain data for assert mode: tuples, sets and non-str dict keys survive."""
    t = type(x)
    if x is None or t in (bool, int, float, str):
        return x
    if t is list:
        return [_encode(v) for v in x]
    if t in (tuple, set, frozenset):
        return {"__t": t.__name__, "v": [_encode(v) for v in x]}
    if t is dict:
        return {"__t": "dict", "v": [[_encode(k), _encode(v)] for k, v in x.items()]}
    raise TypeError(f"value of type {t.__name__} is not plain data")


def _decode(x):
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if isinstance(x, dict):
        kind, v = x["__t"], x["v"]
        if kind == "dict":
            return {_decode(k): _decode(w) for k, w in v}
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[kind](_decode(w) for w in v)
    return x


def _resolve(mod, name):
    cls = mod.__dict__.get("Solution")
    if cls is not None and hasattr(cls, name):
        return getattr(cls(), name)
    return mod.__dict__[name]


def _run_code(job, i):
    """Body of the test child; returns the status payload (result JSON or '')."""
    code = compile(job["source"], "<solution>", "exec")
    if job["mode"] == "stdio" and not isinstance(i, dict):
        try:
            exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        except SystemExit:
            pass
        sys.stdout.flush()
        return ""
    mod = types.ModuleType("solution")
    sys.modules["solution"] = mod
    exec(code, mod.__dict__)
    if isinstance(i, dict):  # assert mode: one call requested by the parent's test code
        fn = _resolve(mod, i["call"])
        return json.dumps(_encode(fn(*_decode(i["args"]))), allow_nan=True)
    return json.dumps(_jsonable(_resolve(mod, job["fn_name"])(*job["inputs"][i])))


def _child(job, i, out_w, st_w):
    os.setpgid(0, 0)
    _set_dumpable(1)
    null = os.open(os.devnull, os.O_RDWR)
    if job["mode"] == "stdio" and not isinstance(i, dict):
        data = job["inputs"][i].encode("utf-8")
        mfd = os.memfd_create("stdin")
        os.write(mfd, data)  # before RLIMIT_FSIZE, which also caps memfd writes
        os.lseek(mfd, 0, os.SEEK_SET)
        os.dup2(mfd, 0)
        os.dup2(out_w, 1)
    else:
        os.dup2(null, 0)
        os.dup2(null, 1)
    os.dup2(null, 2)
    # Only the status pipe survives: the code must not reach the driver's own channel.
    os.closerange(3, st_w)
    os.closerange(st_w + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
    cpu = int(job["timeout_s"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    fsize = job["limits"]["file_size_bytes"]
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    try:
        payload = "ok\n" + _run_code(job, i)
    except BaseException:
        payload = "error\n" + traceback.format_exc(limit=-2)[-2000:]
    try:
        os.write(st_w, payload.encode("utf-8", "replace"))
    except OSError:
        pass
    os._exit(0)


def _drain(fd, buf, cap, deadline, pidfd):
    """Read ``fd`` until EOF, cap, deadline or child exit; returns (status, child_exited)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", False
        ready, _, _ = select.select([fd, pidfd], [], [], remaining)
        if fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None, False
            buf.extend(chunk)
            if len(buf) > cap:
                return "output_limit", False
        elif pidfd in ready:
            os.set_blocking(fd, False)
            try:  # what the child wrote before exiting is still in the pipe
                while len(buf) <= cap:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        break
                    buf.extend(chunk)
            except BlockingIOError:
                pass
            return ("output_limit" if len(buf) > cap else None), True


def _run_test(job, i):
    out_r, out_w = os.pipe()
    st_r, st_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _child(job, i, out_w, st_w)
        finally:
            os._exit(1)
    os.close(out_w)
    os.close(st_w)
    pidfd = os.pidfd_open(pid)
    cap = job["limits"]["output_bytes"]
    deadline = time.monotonic() + job["timeout_s"]
    out, st = bytearray(), bytearray()
    status, exited = _drain(out_r, out, cap, deadline, pidfd)
    if status is None:
        status, _ = _drain(st_r, st, cap + 4096, deadline, pidfd)
    if status is None and not exited:
        ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        status = None if ready else "timeout"
    try:
        os.kill(pid, signal.SIGKILL)  # a zombie by now if it finished: harmless
    except OSError:
        pass
    _, wstatus = os.waitpid(pid, 0)
    _kill_leftovers(job, pid)
    for fd in (out_r, st_r, pidfd):
        os.close(fd)
    kind, _, body = bytes(st).decode("utf-8", "replace").partition("\n")
    rec = {"i": i, "stdout": out.decode("utf-8", "replace"), "payload": "", "detail": ""}
    if status is not None:
        rec["status"] = status
    elif kind == "ok":
        rec.update(status="done", payload=body)
    elif kind == "error":
        rec.update(status="error", detail=body)
    else:
        sig = os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None
        rec.update(status="crashed", detail=f"signal {sig}" if sig else f"exit {wstatus >> 8}")
    return rec


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    _harden(job)
    _become_subreaper()
    _set_dumpable(0)
    sys.stdout.write('{"ready": true}\n')
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            rec = _run_test(job, request)
        except Exception:  # the driver's own fault: the parent reports a grader failure
            rec = {"i": request, "status": "driver_error", "stdout": "", "payload": "",
                   "detail": traceback.format_exc(limit=-3)[-2000:]}
        sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    _kill_leftovers(job, 0)


if __name__ == "__main__":
    main()
