"""ActorSync end to end: a bf16 PP=2 Megatron actor (torchrun, gloo) syncs into two serve
processes, one sender per stage, full then delta after real optimizer steps, a corrupted delta
caught by its checksum and resent in full, and the colocated shared-memory path.

After every sync each server's log-probs must equal those of a `transformers` model holding
the actor's exported weights (the server's weights are the actor's, bit for bit; each delta
bucket was also checked by the server against the sender's per-tensor checksums)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parents[1]
for extra in (TESTS, TESTS / "rollout"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from helpers.launch import torchrun  # noqa: E402
from helpers.tiny_models import make_tiny_hf  # noqa: E402
from rollout_helpers import TINY, serve_processes  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "stage_sync_worker.py"
sys.path.insert(0, str(WORKER.parent))
from stage_sync_worker import SEQS  # noqa: E402

VERSIONS = ["v1", "v2", "v3", "v4", "v5", "v6", "v7"]


def shm_servers(model_dir: Path, count: int, tmp: Path, shm_dir: Path):
    return serve_processes(model_dir, count, tmp, extra_args=("--weight-shm-dir", str(shm_dir)))


def fill_dirs() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("megatron-rl-fill-*")} if Path("/dev/shm").is_dir() else set()


@pytest.fixture(scope="module", params=[(1, 2), (2, 1)], ids=["tp1pp2", "tp2pp1"])
def run(request, tmp_path_factory):
    tp, pp = request.param
    tmp = tmp_path_factory.mktemp(f"stage_sync_tp{tp}pp{pp}")
    make_tiny_hf(tmp / "served", seed=0, **TINY)
    make_tiny_hf(tmp / "actor", seed=1, **TINY)
    shm = tmp / "shm"
    shm.mkdir()
    before = fill_dirs()
    with shm_servers(tmp / "served", 2, tmp, shm) as servers:
        torchrun(2, WORKER, tmp / "actor", tmp, ",".join(s.url for s in servers), shm, tp, pp, timeout=300)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    ranks[0]["fill_dirs_left"] = sorted(fill_dirs() - before)
    ranks[0]["tp"] = tp
    return ranks, tmp


def reference_scores(tmp: Path, version: str) -> list[list[float]]:
    model = make_tiny_hf(tmp / f"ref_{version}", seed=0, **TINY).eval()
    exported = load_file(str(tmp / f"export_{version}.safetensors"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(exported[name])
        logp = torch.log_softmax(model(torch.tensor(SEQS)).logits, -1)
    return [[logp[b, t - 1, seq[t]].item() for t in range(1, len(seq))] for b, seq in enumerate(SEQS)]


@pytest.mark.slow
def test_each_stage_sends_its_own_layers_and_delta_keeps_servers_equal_to_the_actor(run):
    (r0, r1), tmp = run
    if r0["tp"] == 1:
        assert r0["leaders"][0][0] == 0 and r1["leaders"][0][0] == 1  # rank 1 sends stage 1 itself
        assert r0["leaders"][0][1] != r1["leaders"][0][1]  # over a weight group of its own
    else:
        assert r0["leaders"][0][0] == 0 and r1["leaders"] == []  # the TP peer is no sender
    for version in VERSIONS:
        want = reference_scores(tmp, version)
        for server_scores in r0[f"scores_{version}"]:
            for got, ref in zip(server_scores, want):
                assert got == pytest.approx(ref, abs=1e-5), version
    assert reference_scores(tmp, "v1") != reference_scores(tmp, "v2")  # the step changed the model


@pytest.mark.slow
def test_delta_sends_only_changed_elements_and_a_corrupted_delta_falls_back_to_full(run):
    (r0, _), _ = run
    reports = r0["reports"]
    for version in ("v1", "v4"):  # the first sync of each ActorSync is full
        rep = reports[version]
        assert rep["full"] and rep["sent_bytes"] == rep["full_bytes"] and rep["delta_buckets"] == 0
    for version in ("v2", "v5"):
        rep = reports[version]
        assert not rep["full"] and rep["delta_buckets"] == rep["buckets"] and rep["fallbacks"] == 0
        assert 0 < rep["changed"] < rep["elements"] and rep["sent_bytes"] < rep["full_bytes"]
    v3 = reports["v3"]
    assert v3["fallbacks"] == 1  # caught by the server's checksum, resent in full ...
    assert v3["sent_bytes"] > v3["full_bytes"] / v3["buckets"]  # ... and the rest of that stage too


@pytest.mark.slow
def test_tp_peers_write_their_shards_into_shared_buckets_and_leave_nothing_behind(run):
    """TP=2: the peer maps the leader's shared-memory buckets in every phase but the one with
    ``shared_fill`` off (point to point); the servers matched the actor in all of them (above),
    and the private fill directories are gone at the end."""
    (r0, r1), _ = run
    if r0["tp"] == 1:
        assert not any(r0["shared"].values()) and not any(r1["shared"].values())
    else:
        want = {v: v != "v7" for v in VERSIONS}
        assert r0["shared"] == want and r1["shared"] == want
    assert r0["fill_dirs_left"] == []
