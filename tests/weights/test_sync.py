"""Weight sync transports, fed by a `transformers` model's named parameters (the HF names the
Megatron exporter yields too), into the embedded engine: in-process, disk, tensor, distributed."""

import asyncio
import sys
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "rollout"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from aiohttp.test_utils import TestServer  # noqa: E402
from helpers.tiny_models import make_tiny_hf  # noqa: E402
from rollout_helpers import TINY, serve_processes  # noqa: E402

from megatron_rl.errors import RolloutError  # noqa: E402
from megatron_rl.rollout.client import RolloutClient  # noqa: E402
from megatron_rl.rollout.engine import EmbeddedEngine  # noqa: E402
from megatron_rl.rollout.http_server import build_app  # noqa: E402
from megatron_rl.weights.sync import (  # noqa: E402
    DistributedSender,
    bucket_nbytes,
    dtype_from_name,
    dtype_name,
    flatten_bucket,
    iter_buckets,
    sync_in_process,
    sync_weights,
    unflatten_bucket,
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    served, trainer = tmp_path_factory.mktemp("served"), tmp_path_factory.mktemp("trainer")
    make_tiny_hf(served, seed=0, **TINY)
    return served, trainer


def trainer_model(path, seed):
    return make_tiny_hf(path / f"seed{seed}", seed=seed, **TINY).eval()


def assert_same_weights(engine, model):
    served = engine.model.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(served[name], p), name


def test_buckets_keep_order_and_size():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 1, 100])]  # fp32: 4 bytes each
    buckets = list(iter_buckets(tensors, bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4"], ["t5"]]
    assert list(iter_buckets([], 80)) == []


def test_flattened_bucket_roundtrip_mixed_dtypes():
    tensors = [torch.randn(3, 5).to(torch.bfloat16), torch.arange(7), torch.randn(2, 2, 2)]
    flat = flatten_bucket(tensors)
    dtypes, shapes = [t.dtype for t in tensors], [list(t.shape) for t in tensors]
    assert flat.dtype == torch.uint8 and flat.numel() == bucket_nbytes(dtypes, shapes) == 30 + 56 + 32
    for a, b in zip(tensors, unflatten_bucket(flat, dtypes, shapes)):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert [dtype_name(d) for d in dtypes] == ["bfloat16", "int64", "float32"]
    assert dtype_from_name("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_from_name("Tensor")


def test_in_process_transport_loads_hf_named_parameters(dirs):
    served, trainer_dir = dirs
    engine = EmbeddedEngine(str(served), seed=0)
    try:
        source = trainer_model(trainer_dir, seed=3)
        report = sync_in_process(source.named_parameters(), engine.load_weights, bucket_bytes=32 << 10)
        assert_same_weights(engine, source)
        assert report.num_tensors == len(list(source.parameters())) and report.num_buckets > 1
        assert report.num_bytes == sum(p.numel() * 4 for p in source.parameters())
    finally:
        engine.shutdown()


class Recorder:
    """A WeightReceiver that records the call order (and can fail one update)."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def num_weight_ranks(self):
        return 1

    def __getattr__(self, name):
        async def record(*args, **kwargs):
            self.calls.append(name)
            if self.fail and name.startswith("update"):
                raise RolloutError("refused")
        return record


def test_sync_pauses_then_flushes_and_always_continues(tmp_path):
    model = torch.nn.Linear(4, 3)
    ok = Recorder()
    report = asyncio.run(sync_weights(model.named_parameters(), ok, transport="tensor", bucket_bytes=16))
    assert ok.calls == ["pause_generation", "update_weights_from_tensor", "update_weights_from_tensor",
                        "flush_cache", "continue_generation"] and report.num_tensors == 2
    failing = Recorder(fail=True)
    with pytest.raises(RolloutError, match="refused"):
        asyncio.run(sync_weights(model.named_parameters(), failing, transport="disk", bucket_bytes=16,
                                 disk_dir=tmp_path / "w"))
    assert failing.calls == ["pause_generation", "update_weights_from_disk", "continue_generation"]


@pytest.mark.parametrize("transport", ["disk", "tensor"])
def test_disk_and_tensor_transports_over_http(dirs, tmp_path, transport):
    served, trainer_dir = dirs
    engine = EmbeddedEngine(str(served), seed=0)
    source = trainer_model(trainer_dir, seed=4)

    async def main():
        server = TestServer(build_app(engine), host="127.0.0.1")
        await server.start_server()
        try:
            async with RolloutClient([str(server.make_url("")).rstrip("/")]) as client:
                report = await sync_weights(source.named_parameters(), client, transport=transport,
                                            bucket_bytes=48 << 10, disk_dir=tmp_path / "sync", weight_version="w7")
                (sample,) = await client.score([[1, 2, 3, 4]])
                return report, sample, (await client._server(client.pool.servers[0]).get_model_info())
        finally:
            await server.close()

    report, scores, info = asyncio.run(main())
    assert_same_weights(engine, source)
    assert info["weight_version"] == "w7" and report.transport == transport and len(scores) == 3
    if transport == "disk":
        assert (tmp_path / "sync" / "model.safetensors.index.json").exists()
        assert len(list((tmp_path / "sync").glob("model-*.safetensors"))) == report.num_buckets > 1


@pytest.mark.slow
def test_distributed_transport_to_a_server_process_and_bad_names_do_not_hang(dirs, tmp_path):
    served, trainer_dir = dirs
    source = trainer_model(trainer_dir, seed=5)
    seq = [9, 8, 7, 6, 5, 4]
    with torch.no_grad():
        logp = torch.log_softmax(source(torch.tensor([seq])).logits[0], -1)
    want = [logp[t - 1, seq[t]].item() for t in range(1, len(seq))]

    async def main(url):
        async with RolloutClient([url]) as client:
            sender = await DistributedSender.connect(client, group_name=f"g-{uuid.uuid4().hex[:6]}", timeout_s=60)
            try:
                report = await sync_weights(source.named_parameters(), client, transport="distributed",
                                            bucket_bytes=16 << 10, sender=sender, flattened=True)
                (got,) = await client.score([seq])
                renamed = [("model.not_a_layer.weight", torch.zeros(3))]
                with pytest.raises(RolloutError, match="Unknown parameter name 'model.not_a_layer.weight'"):
                    await sync_weights(renamed, client, transport="distributed", bucket_bytes=1 << 20, sender=sender)
                (still,) = await client.score([seq])  # the group and the server survive a refused bucket
            finally:
                await sender.close()
            return report, got, still

    with serve_processes(served, 1, tmp_path) as (server,):
        report, got, still = asyncio.run(main(server.url))
    assert got == pytest.approx(want, abs=1e-4) and still == pytest.approx(want, abs=1e-4)
    assert report.num_tensors == len(list(source.parameters())) and report.num_buckets > 1


def test_a_bf16_server_takes_received_buckets_as_its_weights_and_receives_later_syncs_in_place(dirs, tmp_path):
    """serve --dtype bfloat16: the first flattened bucket of a bf16 sender becomes the storage of
    its parameters; the next sync of the same buckets is broadcast straight into them. Each
    sync's weights are the sender's: the server scores as a bf16 model holding them does."""
    served, trainer_dir = dirs
    seq = [9, 8, 7, 6, 5, 4]

    def bf16_scores(model) -> list[float]:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        return [logp[t - 1, seq[t]].item() for t in range(1, len(seq))]

    sources = [trainer_model(trainer_dir, seed=s).to(torch.bfloat16) for s in (5, 6)]
    wants = [bf16_scores(m) for m in sources]
    assert max(abs(a - b) for a, b in zip(*wants)) > 0.1  # two clearly different models

    async def main(url):
        got = []
        async with RolloutClient([url]) as client:
            sender = await DistributedSender.connect(client, group_name=f"g-{uuid.uuid4().hex[:6]}", timeout_s=60)
            try:
                for m in (sources[0], sources[1], sources[0]):  # bind, in place, in place
                    await sync_weights(m.named_parameters(), client, transport="distributed",
                                       bucket_bytes=16 << 10, sender=sender, flattened=True)
                    got.append((await client.score([seq]))[0])
            finally:
                await sender.close()
        return got

    with serve_processes(served, 1, tmp_path, extra_args=("--dtype", "bfloat16")) as (server,):
        got = asyncio.run(main(server.url))
    log = (tmp_path / "serve-0.log").read_text()
    assert "bfloat16, row-major weights" in log
    for g, w in zip(got, (wants[0], wants[1], wants[0])):
        assert g == pytest.approx(w, abs=2e-2)


def test_sync_address_is_loopback_for_local_servers_and_a_routed_interface_for_remote_ones():
    from megatron_rl.weights.sync import address_toward

    assert address_toward(["http://127.0.0.1:30000", "http://localhost:30001"]) == "127.0.0.1"
    # A remote server (TEST-NET-1, never answered: a UDP connect only picks the route): the
    # address is one of this host's own interfaces, never loopback.
    import socket

    try:
        got = address_toward(["http://127.0.0.1:30000", "http://192.0.2.7:30001"])
    except OSError as e:  # no route at all (a sandbox without a default route)
        pytest.skip(f"no route to a remote address here: {e}")
    assert got != "127.0.0.1" and socket.inet_aton(got)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((got, 0))  # it is this host's
