"""The embedded engine's receive side of colocated (shared-memory) and delta updates, over HTTP
in process: a round trip, handles that try to leave the directory, a corrupted delta."""

import asyncio
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "rollout"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from aiohttp.test_utils import TestServer  # noqa: E402
from helpers.tiny_models import make_tiny_hf  # noqa: E402
from rollout_helpers import TINY, greedy  # noqa: E402

from megatron_rl.errors import RolloutError  # noqa: E402
from megatron_rl.rollout.client import RolloutClient  # noqa: E402
from megatron_rl.rollout.engine import EmbeddedEngine  # noqa: E402
from megatron_rl.rollout.http_server import build_app  # noqa: E402
from megatron_rl.weights import delta as D  # noqa: E402
from megatron_rl.weights.shm import ShmSlots, handle  # noqa: E402
from megatron_rl.weights.sync import flatten_bucket  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    make_tiny_hf(path, seed=0, **TINY)
    return path


def bf16_weights(seed: int, tmp: Path) -> list[tuple[str, torch.Tensor]]:
    model = make_tiny_hf(tmp / f"src{seed}", seed=seed, **TINY)
    return [(n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters()]


def run_with_server(engine, fn):
    async def main():
        server = TestServer(build_app(engine, stop_engine_on_shutdown=False), host="127.0.0.1")
        await server.start_server()
        try:
            async with RolloutClient([str(server.make_url("")).rstrip("/")]) as client:
                return await fn(client)
        finally:
            await server.close()

    return asyncio.run(main())


def shm_body(name, nbytes, named, delta=None):
    names = [n for n, _ in named]
    return {"serialized_named_tensors": [handle(name, nbytes, names, ["bfloat16"] * len(names),
                                                [list(t.shape) for _, t in named], delta)],
            "load_format": "shared_memory", "flush_cache": False, "weight_version": None}


def test_shared_memory_round_trip_full_then_delta_then_corrupted_delta(served, tmp_path):
    engine = EmbeddedEngine(str(served), seed=0)
    engine.weight_shm_dir = str(tmp_path / "shm")
    old, new = bf16_weights(1, tmp_path), bf16_weights(1, tmp_path)
    for _, t in new[:3]:
        t.view(-1)[::7] += 1  # a few changed elements in the first tensors
    slots = ShmSlots(tmp_path / "shm", sum(t.numel() * 2 for _, t in old), count=1)
    algo = D.checksum_algos()[0]

    async def main(client):
        flat = flatten_bucket([t for _, t in old])
        slots.tensors[0][:flat.numel()].copy_(flat)
        await client.post_weights("/update_weights_from_tensor", shm_body(slots.names[0], flat.numel(), old))
        full_ok = all(torch.equal(engine._targets[n], t.float()) for n, t in old)
        new_flat = flatten_bucket([t for _, t in new])
        kind, k, payload, _ = D.encode(new_flat, flat, 2)
        sums = [D.checksum(t, algo) for _, t in new]
        header = D.DeltaHeader(kind, k, payload.numel(), algo, tuple(sums)).to_json()
        slots.tensors[0][:payload.numel()].copy_(payload)
        await client.post_weights("/update_weights_from_tensor", shm_body(slots.names[0], payload.numel(), new, header))
        delta_ok = all(torch.equal(engine._targets[n], t.float()) for n, t in new)
        slots.tensors[0][payload.numel() - 1] ^= 0x08  # corrupted in transit
        with pytest.raises(RolloutError, match=D.MISMATCH_MARKER) as refused:
            await client.post_weights("/update_weights_from_tensor",
                                      shm_body(slots.names[0], payload.numel(), new, header))
        with pytest.raises(RolloutError, match="take a full update before any delta"):
            await client.post_weights("/update_weights_from_tensor",
                                      shm_body(slots.names[0], payload.numel(), new, header))
        slots.tensors[0][:new_flat.numel()].copy_(new_flat)  # the sender's fallback: the bucket in full
        await client.post_weights("/update_weights_from_tensor", shm_body(slots.names[0], new_flat.numel(), new))
        return full_ok, delta_ok, str(refused.value)

    try:
        full_ok, delta_ok, message = run_with_server(engine, main)
    finally:
        slots.close()
        engine.shutdown()
    assert full_ok and delta_ok
    assert all(torch.equal(engine._targets[n], t.float()) for n, t in new)
    assert not engine._unverified and "refuse deltas until sent in full" in message


def test_shared_memory_handles_cannot_leave_the_directory(served, tmp_path):
    engine = EmbeddedEngine(str(served), seed=0)
    named = bf16_weights(2, tmp_path)[:1]
    (tmp_path / "outside").write_bytes(b"\0" * 1024)
    shm = tmp_path / "shm"
    shm.mkdir()
    os.symlink(tmp_path / "outside", shm / "link")
    (shm / "short").write_bytes(b"\0" * 8)
    nbytes = named[0][1].numel() * 2

    async def main(client):
        messages = []
        for name, size in (("x", nbytes), ("../outside", nbytes), (str(tmp_path / "outside"), nbytes),
                           ("link", nbytes), ("short", nbytes), ("missing", nbytes)):
            with pytest.raises(RolloutError) as e:
                await client.post_weights("/update_weights_from_tensor", shm_body(name, size, named))
            messages.append(str(e.value))
        return messages

    try:
        refused_without_dir = run_with_server(engine, lambda c: main(c))[0]
        engine.weight_shm_dir = str(shm)
        messages = run_with_server(engine, main)
    finally:
        engine.shutdown()
    assert "--weight-shm-dir" in refused_without_dir
    assert "bare file name" in messages[1] and "bare file name" in messages[2]
    assert "is not a file in the server's weight directory" in messages[3]
    assert "holds 8 bytes" in messages[4] and "is not a file" in messages[5]


def test_a_ram_file_system_too_small_for_the_buckets_is_refused_before_any_file_is_made(tmp_path, monkeypatch):
    """tmpfs lets a file be sized past its free space, then SIGBUSes on the first page it cannot
    back: the space is checked first, and the TP fill falls back to point to point."""
    from megatron_rl.weights import stage_sync

    real = os.statvfs

    class Small:
        f_bavail, f_frsize = 16, 4096  # 64 KiB free

    monkeypatch.setattr(os, "statvfs", lambda p: Small() if str(p).startswith(str(tmp_path)) else real(p))
    with pytest.raises(OSError, match=r"0 MiB free, weight-sync buckets need 2 MiB .*--shm-size"):
        ShmSlots(tmp_path / "w", 1 << 20, count=2)
    assert list((tmp_path / "w").iterdir()) == []
    monkeypatch.setattr(stage_sync, "DEFAULT_ROOT", str(tmp_path))
    assert stage_sync._private_fill_slots(1 << 20) is None
    assert [p for p in tmp_path.iterdir() if p.name.startswith("megatron-rl-fill-")] == []


def test_attached_slots_share_memory_and_survive_the_names_being_unlinked(tmp_path):
    owner = ShmSlots(tmp_path, 4096, count=2, tag="t")
    peer = ShmSlots.attach(tmp_path, owner.names, 4096)
    owner.unlink()
    assert list(tmp_path.iterdir()) == []
    peer.tensors[1][:3] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert owner.tensors[1][:3].tolist() == [1, 2, 3]
    peer.close()
    owner.close()
    with pytest.raises(ValueError, match="shorter"):
        small = ShmSlots(tmp_path, 100, count=1, tag="s")
        try:
            ShmSlots.attach(tmp_path, small.names, 4096)
        finally:
            small.close()


def test_persistent_buckets_become_the_weights_of_bf16_servers_and_a_private_load_unshares(served, tmp_path):
    """Zero-copy sync: two bf16 row-major servers map one persistent bucket as their weights; the
    trainer's next in-place write is their new weights with nothing copied; a load through any
    other path gives that server private storage first (the other server and the file keep theirs).
    An fp32 server given the same handle copies (casts) as before."""
    shm = tmp_path / "shm"
    engines = [EmbeddedEngine(str(served), seed=0, dtype=torch.bfloat16, transposed_weights=False) for _ in range(2)]
    fp32 = EmbeddedEngine(str(served), seed=0)
    old, new = bf16_weights(1, tmp_path), bf16_weights(2, tmp_path)
    flat = flatten_bucket([t for _, t in old])
    slots = ShmSlots(shm, flat.numel(), count=1)
    names = [n for n, _ in old]
    body = {"serialized_named_tensors": [handle(slots.names[0], flat.numel(), names, ["bfloat16"] * len(names),
                                                [list(t.shape) for _, t in old], None, persistent=True)]}
    base = slots.tensors[0]

    def in_file(t: torch.Tensor) -> bool:  # its storage is the mapped file (another mapping of it)
        return t.untyped_storage().nbytes() == base.numel()

    try:
        for e in [*engines, fp32]:
            e.weight_shm_dir = str(shm)
        base.copy_(flat)
        for e in [*engines, fp32]:
            assert e.load_shared_memory(body["serialized_named_tensors"]) == len(names)
        for e in engines:
            assert all(in_file(e._targets[n]) and torch.equal(e._targets[n], t) for n, t in old)
            assert e.model.lm_head.weight is e.model.model.embed_tokens.weight  # still tied
        assert not any(in_file(fp32._targets[n]) for n in names)
        assert all(torch.equal(fp32._targets[n], t.float()) for n, t in old)

        base.copy_(flatten_bucket([t for _, t in new]))  # the trainer's next sync, written in place
        for e in engines:
            assert e.load_shared_memory(body["serialized_named_tensors"]) == len(names)
            assert all(torch.equal(e._targets[n], t) for n, t in new)
        assert all(torch.equal(fp32._targets[n], t.float()) for n, t in old)  # fp32: only by a load

        engines[0].load_weights(old[:1])  # e.g. a checkpoint loaded into one server
        name = names[0]
        assert not in_file(engines[0]._targets[name]) and torch.equal(engines[0]._targets[name], old[0][1])
        assert in_file(engines[1]._targets[name]) and torch.equal(engines[1]._targets[name], new[0][1])
        ids, _ = greedy(engines[1], [3, 14, 15], n=4)
        assert len(ids) == 4
    finally:
        slots.close()
        for e in [*engines, fp32]:
            e.shutdown()

