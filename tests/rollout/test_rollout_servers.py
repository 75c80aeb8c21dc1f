"""Server management: launch commands, port checks, health waits that end in clear errors, stop."""

import http.server
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from rollout_helpers import free_port

from megatron_rl.config.rollout import RolloutConfig
from megatron_rl.errors import RolloutError
from megatron_rl.rollout import servers as srv


def test_port_already_in_use_is_refused_before_launch(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(srv, "start_process", lambda *a, **k: launched.append(a))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        manager = srv.ServerManager(RolloutConfig(base_port=port, health_timeout_s=5), "model", log_dir=tmp_path)
        with pytest.raises(RolloutError, match=f"Port {port} on 127.0.0.1 is already in use"):
            manager.start()
    assert launched == [] and manager.servers == []


def test_server_that_never_becomes_healthy_times_out_and_its_process_group_is_killed(tmp_path):
    child_pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '120']); "
              f"open({str(child_pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    server = srv.start_process([sys.executable, "-c", script], f"http://127.0.0.1:{free_port()}", tmp_path / "s.log")
    try:
        start = time.monotonic()
        with pytest.raises(RolloutError, match=r"did not answer /health_generate with 200 within 2 s"):
            srv.wait_healthy([server], timeout_s=2.0, poll_s=0.1)
        assert time.monotonic() - start < 2.0 + 5.0
        while not child_pid_file.exists():
            time.sleep(0.05)
    finally:
        srv.stop_process(server, grace_s=2.0)
    assert server.process.poll() is not None
    child = int(child_pid_file.read_text())

    def gone() -> bool:
        try:
            return "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + 10  # SIGTERM was sent to the group; on a loaded CPU dying takes a moment
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone()


def test_server_that_exits_reports_status_and_log_tail(tmp_path):
    server = srv.start_process([sys.executable, "-c", "import sys; print('model not found: boom'); sys.exit(3)"],
                               f"http://127.0.0.1:{free_port()}", tmp_path / "s.log")
    try:
        with pytest.raises(RolloutError, match=r"exited with status 3 .*model not found: boom"):
            srv.wait_healthy([server], timeout_s=30, poll_s=0.1)
    finally:
        srv.stop_process(server)


class _Unhealthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_attached_server_that_stays_unhealthy_fails_within_timeout():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unhealthy)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        manager = srv.ServerManager(RolloutConfig(server_urls=[url], health_timeout_s=1.0))
        start = time.monotonic()
        with pytest.raises(RolloutError, match=r"did not answer /health_generate with 200 within 1 s"):
            manager.start()
        assert time.monotonic() - start < 1.0 + 5.0
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_sglang_commands_gpus_and_missing_install(tmp_path, monkeypatch):
    cfg = RolloutConfig(engine="sglang", num_servers=2, tp_size=2, gpu_ids=[4, 5, 6, 7], base_port=0, mem_fraction=0.5)
    manager = srv.ServerManager(cfg, "/models/qwen", log_dir=tmp_path)
    specs = manager.specs()
    assert [s.gpu_ids for s in specs] == [[4, 5], [6, 7]] and len({s.port for s in specs}) == 2
    cmd = srv.sglang_command(specs[0])
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[cmd.index("--tp-size") + 1] == "2" and cmd[cmd.index("--mem-fraction-static") + 1] == "0.5"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--model-path") + 1] == "/models/qwen"
    assert "--enable-memory-saver" not in cmd  # own GPUs: nothing to release
    assert "--dtype" not in cmd  # server_dtype auto: SGLang's own choice (the checkpoint's)
    for engine, command in (("sglang", srv.sglang_command), ("embedded", srv.embedded_command)):
        bf16 = RolloutConfig(engine=engine, base_port=0, server_dtype="bfloat16")
        cmd = command(srv.ServerManager(bf16, "/m", log_dir=tmp_path).specs()[0])
        assert cmd[cmd.index("--dtype") + 1] == "bfloat16", engine
    colocated = RolloutConfig(engine="sglang", num_servers=1, tp_size=2, base_port=0, mem_fraction=0.5, colocate=True)
    assert "--enable-memory-saver" in srv.sglang_command(srv.ServerManager(colocated, "/m", log_dir=tmp_path).specs()[0])
    seen = []
    monkeypatch.setattr(srv, "start_process", lambda command, url, log, env: seen.append(env) or srv.ServerProcess(url))
    manager._launch(1, specs[1])
    assert seen == [{"CUDA_VISIBLE_DEVICES": "6,7"}]
    monkeypatch.setattr(srv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RolloutError, match="SGLang is not installed"):
        srv.ServerManager(cfg, "/models/qwen", log_dir=tmp_path).start()
