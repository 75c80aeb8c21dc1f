"""`megatron-rl train` with delta weight sync (rollout.sync_delta) through ``ActorSync``.

(a) distributed transport into an attached server: every step's mismatch gate passes, the
    syncs after start-up send only the changed elements, and after training the server's
    log-probs equal a `transformers` model loaded from the run's Hugging Face export;
(b) shared-memory transport (servers launched by the run with --weight-shm-dir): one delta is
    corrupted on purpose (the test hook MEGATRON_RL_FAULT_CORRUPT_DELTA), the server refuses it
    by its checksum, the bucket goes again in full and the next step's gate still passes; no
    shared-memory file is left behind;
(c) the same at PP=2: each stage's first rank sends its own layers (stage 1 with a rollout
    client of its own);
(d) zero-copy colocated sync: bf16 servers (rollout.server_dtype) of a bf16 TP=2 actor map
    the shared buckets as their weights; the TP peer writes its own shards into them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import sections
from tests.trainer.helpers import CLI, env, metrics, run_patched, write_recipe

pytestmark = pytest.mark.slow
SEQS = [[5, 9, 14, 3, 27, 8, 2, 11], [40, 41, 42, 43, 44, 45, 46, 47]]
# A bf16 actor, where delta sync pays: after an fp32 Adam step nearly every element moves
# (99.6% measured on this model, weight decay alone moves them); after a bf16 one only those
# whose fp32 master weight crossed a rounding boundary. The random tiny model earns no reward
# (zero advantages): an entropy bonus gives every step a gradient.
BF16 = {"model": {"dtype": "bfloat16"}, "algorithm": {"entropy_coef": 0.01}}


def train(recipe: Path, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "train", str(recipe)], capture_output=True, text=True, timeout=timeout,
                          env=dict(env(), **extra_env))


def shm_entries() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("megatron-rl-weights-*")} if Path("/dev/shm").is_dir() else set()


def check_gated_rows(rows: list[dict], steps: int) -> None:
    assert [r["step"] for r in rows] == list(range(steps))
    for r in rows:  # every step follows a sync (start-up's or the previous step's): the gate held
        # bf16 trainer vs the server's fp32 math on the same bf16 values (the gate's bound: 0.05)
        assert r["mismatch/abs_logp_diff_mean"] < 0.05 and r["mismatch/tokens"] > 0, r


@pytest.fixture
def attached_server(tiny):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([CLI, "serve", "--model", str(tiny / "hf"), "--port", str(port), "--deterministic",
                               "--threads", "1"], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health_generate", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError("the attached server did not come up") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def server_scores(url: str) -> list[list[float]]:
    from megatron_rl.rollout.client import RolloutClient

    async def go():
        async with RolloutClient([url]) as client:
            return await client.score(SEQS)

    return asyncio.run(go())


def hf_scores(hf_dir: Path) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(SEQS)).logits.float(), -1)
    return [[logp[b, t - 1, seq[t]].item() for t in range(1, len(seq))] for b, seq in enumerate(SEQS)]


def test_delta_sync_keeps_the_server_equal_to_the_actor(tiny, tmp_path, attached_server):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", **sections(
        tiny, run_dir, train={"num_steps": 4}, checkpoint={"save_every": 4}, **BF16,
        rollout={"server_urls": [attached_server], "sync_delta": True, "sync_full_every": 0}))
    proc = train(recipe)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(run_dir, drop_timings=False)
    check_gated_rows(rows, 4)
    for r in rows:  # start-up's sync was the full one; every step's own sync is a delta
        assert r["sync/full"] == 0 and r["sync/resent_buckets"] == 0, r
        assert 0 < r["sync/sent_frac"] < 1 and 0 < r["sync/changed_frac"] < 1, r
        assert r["sync/sent_bytes"] > 0 and r["time/sync_transfer"] > 0
    # After training the server holds exactly the actor's final weights.
    got, want = server_scores(attached_server), hf_scores(run_dir / "hf")
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=2e-5)
    before = hf_scores(tiny / "hf")
    assert max(abs(a - b) for g, w in zip(before, want) for a, b in zip(g, w)) > 1e-4  # training moved it


@pytest.mark.parametrize("pp", [1, 2], ids=["pp1", "pp2"])
def test_corrupted_delta_is_refused_and_resent_in_full(tiny, tmp_path, pp):
    run_dir = tmp_path / "run"
    shm_before = shm_entries()
    recipe = write_recipe(tmp_path / "r.yaml", **sections(
        tiny, run_dir, train={"num_steps": 3}, checkpoint={"save_every": 3}, parallel={"tp": 1, "pp": pp, "num_microbatches": pp}, **BF16,
        rollout={"sync_transport": "shm", "sync_delta": True, "sync_full_every": 0}))
    # Sync 0 is start-up's (full), sync 1 step 0's (a delta), sync 2 step 1's: corrupted.
    proc = train(recipe, MEGATRON_RL_FAULT_CORRUPT_DELTA="2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(run_dir, drop_timings=False)
    check_gated_rows(rows, 3)  # step 2 trained on samples of the weights resent after the refusal
    assert rows[1]["sync/resent_buckets"] >= 1  # the server's checksum caught it
    assert rows[1]["sync/sent_frac"] > rows[0]["sync/sent_frac"]
    for r in (rows[0], rows[2]):
        assert r["sync/full"] == 0 and r["sync/resent_buckets"] == 0 and r["sync/sent_frac"] < 1, r
    log = (run_dir / "train.log").read_text() + proc.stderr
    assert "weight checksum mismatch" in log
    assert shm_entries() <= shm_before  # the run's shared-memory directory went with it
    assert not os.environ.get("MEGATRON_RL_FAULT_CORRUPT_DELTA")


def test_bf16_servers_take_the_shared_buckets_as_their_weights(tiny, tmp_path):
    run_dir = tmp_path / "run"
    shm_before = shm_entries()
    recipe = write_recipe(tmp_path / "r.yaml", **sections(
        tiny, run_dir, train={"num_steps": 3}, checkpoint={"save_every": 3}, parallel={"tp": 2}, **BF16,
        # not deterministic: its batch-invariant decode keeps weights column-major, which a sync must transpose
        rollout={"sync_transport": "shm", "server_dtype": "bfloat16", "deterministic": False}))
    proc = train(recipe)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(run_dir, drop_timings=False)
    check_gated_rows(rows, 3)  # bf16 actor vs bf16 server: the samples came from the actor's weights
    assert all(r["sync/full"] == 1 and r["sync/sent_frac"] == 1 for r in rows)
    (server_log,) = (run_dir / "servers").glob("*.log")
    text = server_log.read_text()
    assert "(bfloat16, row-major weights" in text and "zero-copy weights:" in text, text[-3000:]
    assert shm_entries() <= shm_before


def test_single_sender_path_of_cuda_actors_still_syncs(tiny, tmp_path):
    """A CUDA actor keeps rank 0's single weight group (``sync_actor_weights``); here on CPU with
    ``stage_sync_enabled`` patched off, as on a GPU machine: every step's gate holds, each sync full."""
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", **sections(tiny, run_dir, train={"num_steps": 2},
                                                          checkpoint={"save_every": 2}))
    proc = run_patched("import megatron_rl.trainer.session as session\n"
                       "session.stage_sync_enabled = lambda cfg: False", ["train", recipe])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(run_dir, drop_timings=False)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["mismatch/abs_logp_diff_max"] < 1e-4 and r["sync/full"] == 1 and r["sync/sent_frac"] == 1, r
