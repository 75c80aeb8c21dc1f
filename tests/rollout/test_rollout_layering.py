"""Layer rule: rollout (and weights.sync) import without megatron-core, SGLang, actor or trainer."""

import subprocess
import sys

MODULES = ["types", "sglang_api", "sampling", "balancer", "client", "servers", "engine", "http_server", "serve"]


def test_rollout_and_sync_import_without_heavy_or_higher_layers():
    code = "\n".join([
        "import sys",
        *[f"import megatron_rl.rollout.{m}" for m in MODULES],
        "import megatron_rl.weights.sync",
        "bad = [m for m in sys.modules if m.split('.')[0] == 'sglang' or m.startswith(('megatron.core', "
        "'megatron_rl.actor', 'megatron_rl.trainer', 'megatron_rl.cli'))]",
        "print(bad)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
