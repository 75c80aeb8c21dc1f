"""Placement maths (who runs where) and the layouts refused before anything is submitted."""

from __future__ import annotations

import pytest

from megatron_rl.config.run import load_config
from megatron_rl.errors import ConfigError
from megatron_rl.launch.placement import Cluster, compute_placement, format_placement
from tests.launch.launch_helpers import ROOT

DC32 = ROOT / "configs" / "deepcoder_14b_32k.yaml"
DC16 = ROOT / "configs" / "deepcoder_14b_16k.yaml"
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def place(recipe, cluster: Cluster, *overrides: str):
    return compute_placement(load_config(recipe, list(overrides)), cluster)


def test_deepcoder_32k_colocated_on_4_nodes_of_8():
    p = place(DC32, Cluster(nodes=4, gpus_per_node=8))
    assert (p.mode, p.trainer_nodes, p.nproc_per_node, p.world_size) == ("colocated", 4, 8, 32)
    assert len(p.servers) == 16 and p.started_by == "launcher"
    for node in range(4):  # four TP=2 servers on each node's eight trainer GPUs
        mine = [s for s in p.servers if s.node == node]
        assert [s.gpu_ids for s in mine] == [(0, 1), (2, 3), (4, 5), (6, 7)]
        assert [s.port for s in mine] == [30000, 30001, 30002, 30003]
    assert {s.mem_fraction for s in p.servers} == {0.55} and {s.tp_size for s in p.servers} == {2}
    assert p.trainer_overrides() == ["rollout.attached_memory_saver=true"]


def test_one_node_colocated_servers_started_by_the_trainer_on_its_gpus():
    p = place(DC16, Cluster(nodes=1, gpus_per_node=8))
    assert (p.mode, p.started_by, p.nproc_per_node) == ("colocated", "trainer", 8)
    assert [s.gpu_ids for s in p.servers] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert p.trainer_overrides() == ["rollout.gpu_ids=[0,1,2,3,4,5,6,7]"]


def test_disaggregated_4_nodes_trainer_on_two_servers_on_two():
    p = place(DC32, Cluster(nodes=4, gpus_per_node=8), "rollout.colocate=false", "parallel.dp=2",
              "rollout.num_servers=8", "rollout.mem_fraction=0.85")
    assert (p.mode, p.trainer_nodes, p.nproc_per_node, p.started_by) == ("disaggregated", 2, 8, "launcher")
    assert [s.node for s in p.servers] == [2, 2, 2, 2, 3, 3, 3, 3]
    assert {s.mem_fraction for s in p.servers} == {0.85}
    assert p.trainer_overrides() == []  # URLs are added by the script (host names known only there)


def test_disaggregated_one_node_servers_on_the_gpus_after_the_trainer():
    p = place(DC16, Cluster(nodes=1, gpus_per_node=8), "rollout.colocate=false", "parallel.tp=4",
              "rollout.num_servers=2")
    assert p.nproc_per_node == 4 and [s.gpu_ids for s in p.servers] == [(4, 5), (6, 7)]
    assert p.started_by == "trainer" and p.trainer_overrides() == ["rollout.gpu_ids=[4,5,6,7]"]


def test_cpu_two_processes_embedded_server_beside_rank0():
    p = place(TINY, Cluster(nodes=1, procs_per_node=2), "parallel.tp=2")
    assert (p.nproc_per_node, p.trainer_nodes, p.started_by) == (2, 1, "trainer")
    assert [(s.node, s.gpu_ids, s.port) for s in p.servers] == [(0, (), 0)]  # base_port 0: the trainer picks
    assert p.trainer_overrides() == []


def test_attached_servers_are_not_placed():
    p = place(TINY, Cluster(nodes=1, procs_per_node=1), "rollout.server_urls=[http://h:1]")
    assert p.mode == "attached" and p.servers == () and p.attached_urls == ("http://h:1",)


def test_format_placement_is_a_table_with_every_server():
    text = format_placement(place(DC32, Cluster(nodes=4, gpus_per_node=8)))
    assert "4 node(s) x 8 GPUs; colocated" in text and "tp 4 x pp 1 x cp 2 x dp 4" in text
    assert text.count("rollout server") == 16 and "trainer ranks 24-31" in text
    assert "mem-fraction" in text and "0.55" in text


@pytest.mark.parametrize("recipe, cluster, overrides, says", [
    (DC32, Cluster(3, 8), [], r"does not fill 3 node\(s\) x 8 GPUs = 24: set parallel.dp=3 \(or --nodes 4\)"),
    (DC16, Cluster(1, 8), ["rollout.tp_size=16"], "set rollout.tp_size to at most 8"),
    (DC16, Cluster(1, 8), ["rollout.num_servers=5"], "set rollout.num_servers=4"),
    (DC16, Cluster(2, 8), ["rollout.colocate=false", "rollout.num_servers=12"],
     r"12 rollout servers of tp_size 2 do not fit: 4 fit .*set rollout.num_servers=4, or add nodes \(--nodes 4\)"),
    (DC16, Cluster(3, 8), ["rollout.colocate=false"], r"Node\(s\) \[2\] .* use --nodes 2"),
    (DC32, Cluster(4, 8), ["rollout.colocate=false", "parallel.dp=1", "parallel.tp=3", "parallel.cp=4"],
     "make it a multiple of 8"),
    (DC32, Cluster(1, 8), ["rollout.colocate=false"], "needs 4 nodes of 8 GPUs but the job has 1"),
    (TINY, Cluster(2, 0), [], "do not split evenly over 2 nodes"),
    (TINY, Cluster(1, 0, 2), [], r"--procs-per-node 2 x --nodes 1 = 2 processes.*set parallel.dp=2"),
    (DC16, Cluster(1, 0), [], "sglang, which needs GPUs"),
])
def test_impossible_layouts_are_refused_with_what_to_change(recipe, cluster, overrides, says):
    with pytest.raises(ConfigError, match=says):
        place(recipe, cluster, *overrides)


def test_cluster_flags_refused():
    with pytest.raises(ConfigError, match="--procs-per-node 2 is for CPU nodes"):
        Cluster(1, 8, 2)
    with pytest.raises(ConfigError, match="--nodes must be >= 1"):
        Cluster(0, 8)


def test_attached_colocated_servers_need_the_memory_saver_flag():
    with pytest.raises(ConfigError, match="attached_memory_saver"):
        load_config(None, ["rollout.colocate=true", "rollout.server_urls=[http://n:1]"])
    cfg = load_config(None, ["rollout.colocate=true", "rollout.server_urls=[http://n:1]",
                             "rollout.attached_memory_saver=true"])
    assert cfg.rollout.attached_memory_saver
    with pytest.raises(ConfigError, match="needs `rollout.server_urls` and `rollout.colocate: true`"):
        load_config(None, ["rollout.attached_memory_saver=true"])
