"""`megatron-rl serve`: the README's command, run through the installed console script.

ServerManager launches the embedded engine with the same command (``embedded_command``), so
this is the path every launched server takes.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from rollout_helpers import free_port

from megatron_rl.config.rollout import RolloutConfig
from megatron_rl.rollout import servers as srv

ROOT = Path(__file__).resolve().parents[2]


def console_script() -> str:
    found = shutil.which("megatron-rl", path=str(Path(sys.executable).parent)) or shutil.which("megatron-rl")
    assert found, "the megatron-rl console script is not installed (pip install -e .)"
    return found


def readme_serve_command() -> list[str]:
    """The `megatron-rl serve ...` line of README.md's command-line section, as argv."""
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("megatron-rl serve ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("#")[0])


def test_serve_help_exits_0():
    proc = subprocess.run([console_script(), "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout and "--deterministic" in proc.stdout and "--weight-layout" in proc.stdout
    assert "--dtype" in proc.stdout


def test_readme_serve_command_serves_generates_and_stops_on_sigterm(tiny_model_dir, tmp_path):
    argv = readme_serve_command()
    assert argv[:2] == ["megatron-rl", "serve"] and "HF_DIR" in argv and "--port" in argv
    port = free_port()
    argv[argv.index("HF_DIR")] = str(tiny_model_dir)
    argv[argv.index("--port") + 1] = str(port)
    argv[0] = console_script()
    url = f"http://127.0.0.1:{port}"
    server = srv.start_process(argv, url, tmp_path / "serve.log", {"CUDA_VISIBLE_DEVICES": ""})
    try:
        srv.wait_healthy([server], timeout_s=120, poll_s=0.2)
        body = json.dumps({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 3, "sampling_seed": 1}})
        request = urllib.request.Request(url + "/generate", body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            reply = json.loads(resp.read())
        assert len(reply["output_ids"]) == 3 and reply["meta_info"]["finish_reason"]["type"] == "length"
        os.kill(server.process.pid, signal.SIGTERM)  # the process itself, as a supervisor would
        assert server.process.wait(timeout=30) == 0, server.log_tail()
    finally:
        srv.stop_process(server, grace_s=5.0)


def test_server_manager_launches_the_documented_command(tmp_path):
    cfg = RolloutConfig(base_port=0)
    (spec,) = srv.ServerManager(cfg, "/models/m", log_dir=tmp_path, extra_args=["--threads", "1"]).specs()
    cmd = srv.embedded_command(spec)
    assert cmd[:4] == [console_script(), "serve", "--model", "/models/m"] and "--deterministic" not in cmd
    assert cmd[-2:] == ["--threads", "1"]
    (spec,) = srv.ServerManager(RolloutConfig(base_port=0, deterministic=True), "/models/m", log_dir=tmp_path).specs()
    assert "--deterministic" in srv.embedded_command(spec)
    assert "--enable-deterministic-inference" in srv.sglang_command(spec)
    bare = srv.embedded_command(srv.LaunchSpec("embedded", "/m", 1, python=str(tmp_path / "python")))
    assert bare[:4] == [str(tmp_path / "python"), "-m", "megatron_rl", "serve"]  # no console script there
