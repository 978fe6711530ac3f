"""Nodes API: topologies, averages by hand, byte counts, faults, and gloo processes vs in-process."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.core.errors import UserError
from harness.core.nodes import NodeFailure, Topology, make_nodes, merge_sparse

REPO = Path(__file__).resolve().parent.parent


def _states(P: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {i: {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g),
                "n": torch.tensor(7)} for i in range(P)}


def test_topologies_and_mixing_weights():
    ring = Topology.build("ring", 5)
    assert ring.neighbours(0) == [1, 4] and ring.neighbours(2) == [1, 3]
    assert ring.mixing_weights(0) == {0: 1 / 3, 1: 1 / 3, 4: 1 / 3}
    full = Topology.build("full", 4)
    assert full.mixing_weights(2) == {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}
    star = Topology.build("star", 4)
    assert star.neighbours(0) == [1, 2, 3] and star.neighbours(3) == [0]
    adj = Topology.build("adj:0-1,2-3", 4)
    assert adj.neighbours(1) == [0] and int(adj.adjacency.sum()) == 4
    for bad in ("adj:0-9", "mesh", "adj:x"):
        with pytest.raises(UserError):
            Topology.build(bad, 4)


def test_weighted_average_by_hand_and_bytes():
    nodes = make_nodes("inprocess", 3, "star")
    s = _states(3)
    out = nodes.weighted_average(s, {0: 1.0, 1: 3.0, 2: 0.0})
    assert torch.allclose(out["w"], (s[0]["w"] + 3 * s[1]["w"]) / 4)
    assert torch.allclose(out["b"], (s[0]["b"] + 3 * s[1]["b"]) / 4)
    assert "n" not in out  # integer tensors stay local
    # two participants, upload + download of 17 floats each
    assert nodes.meter.bytes_total == 2 * 2 * 17 * 4


def test_module_wise_average_and_empty_module():
    nodes = make_nodes("inprocess", 2, "full")
    s = _states(2)
    out = nodes.weighted_average(s, {0: {"w": 1.0, "b": 0.0}, 1: {"w": 1.0, "b": 0.0}})
    assert torch.allclose(out["w"], (s[0]["w"] + s[1]["w"]) / 2)
    assert "b" not in out  # nobody routed samples to it: keep your own
    assert nodes.meter.bytes_total == 2 * 2 * 17 * 4 + 2 * 2 * 4  # plus the two per-tensor weights


def test_neighbour_exchange_and_gossip_average():
    nodes = make_nodes("inprocess", 4, "ring")
    s = _states(4)
    got = nodes.neighbour_exchange(s)
    assert sorted(got[0]) == [1, 3] and torch.equal(got[0][3]["w"], s[3]["w"])
    assert nodes.meter.bytes_total == 8 * 17 * 4  # 8 directed edges
    w = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    avg = nodes.neighbour_average(s, w)
    expect = (1 * s[0]["w"] + 2 * s[1]["w"] + 4 * s[3]["w"]) / 7
    assert torch.allclose(avg[0]["w"], expect, atol=1e-6)


def test_sparse_exchange_indices_values_bytes():
    nodes = make_nodes("inprocess", 2, "full")
    s = {0: {"w": torch.arange(10.0)}, 1: {"w": -torch.arange(10.0)}}
    imp = {0: {"w": torch.tensor([0, 9, 0, 0, 8, 0, 0, 0, 0, 0.0])}, 1: {"w": torch.arange(10.0)}}
    got = nodes.sparse_exchange(s, imp, 0.2)
    assert sorted(got[1][0].indices["w"].tolist()) == [1, 4]
    assert sorted(got[0][1].values["w"].tolist()) == [-9.0, -8.0]
    assert got[0][1].indices["w"].dtype == torch.int32
    assert nodes.meter.bytes_total == 2 * 2 * (4 + 4)  # 2 edges x 2 entries x (int32 index + fp32 value)
    merged = merge_sparse(s[0], list(got[0].values()))
    expect = torch.arange(10.0)
    expect[8], expect[9] = (8 - 8) / 2, (9 - 9) / 2
    assert torch.equal(merged["w"], expect)


def test_in_process_faults_drop_or_stop():
    nodes = make_nodes("inprocess", 3, "full", faults={2: 2})
    s = _states(3)
    nodes.next_round()
    nodes.weighted_average(s, {0: 1.0, 1: 1.0, 2: 1.0})
    assert nodes.events == []
    nodes.next_round()
    out = nodes.weighted_average(s, {0: 1.0, 1: 1.0, 2: 1.0})
    assert torch.allclose(out["w"], (s[0]["w"] + s[1]["w"]) / 2)
    assert nodes.events[-1]["outcome"] == "dropped" and nodes.events[-1]["missing"] == [2]
    stop = make_nodes("inprocess", 3, "full", on_fault="stop", faults={1: 1})
    stop.next_round()
    with pytest.raises(NodeFailure, match="did not answer"):
        stop.neighbour_exchange(s)
    assert stop.events[-1]["outcome"] == "stopped"


WORKER = textwrap.dedent("""
    import json, sys, time, torch, torch.distributed as dist
    from datetime import timedelta
    sys.path.insert(0, {repo!r})
    from harness.core.nodes import make_nodes, NodeFailure
    rank, world, port, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    g = torch.Generator().manual_seed(0)
    states = {{i: {{"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}} for i in range(world)}}
    nodes = make_nodes("distributed", world, "ring", round_timeout_s=2.0, on_fault="stop")
    res = {{}}
    if mode == "ops":
        mine = {{rank: states[rank]}}
        res["avg"] = nodes.weighted_average(mine, {{rank: float(rank + 1)}})["w"].tolist()
        got = nodes.neighbour_exchange(mine)[rank]
        res["nbr"] = {{str(j): s["w"].tolist() for j, s in got.items()}}
        res["gossip"] = nodes.neighbour_average(mine, {{rank: {{"w": float(rank + 1), "b": 1.0}}}})[rank]["w"].tolist()
        sp = nodes.sparse_exchange(mine, {{rank: {{k: v.abs() for k, v in states[rank].items()}}}}, 0.25)[rank]
        res["sparse"] = {{str(j): m.indices["w"].tolist() for j, m in sp.items()}}
        res["bytes"] = nodes.meter.bytes_total
    else:
        if rank == world - 1:
            time.sleep(6)
        try:
            nodes.next_round()
            nodes.weighted_average({{rank: states[rank]}}, {{rank: 1.0}})
            res["outcome"] = "finished"
        except NodeFailure as e:
            res["outcome"] = nodes.events[-1]["outcome"]
            res["missing"] = nodes.events[-1]["missing"]
            res["line"] = e.line()
    json.dump(res, open(out, "w"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path: Path, world: int, mode: str, wait_s: float, only_rank0: bool = False) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(port),
                               str(tmp_path / f"r{r}.json"), mode], env=env, stderr=subprocess.PIPE)
             for r in range(world)]
    for r, p in enumerate(procs):
        try:
            p.wait(timeout=wait_s if r == 0 or not only_rank0 else 0.01)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [json.loads((tmp_path / f"r{r}.json").read_text()) if (tmp_path / f"r{r}.json").exists() else {}
            for r in range(world)]


def test_distributed_gloo_matches_in_process(tmp_path):
    world = 3
    res = _spawn(tmp_path, world, "ops", 60)
    ref = make_nodes("inprocess", world, "ring")
    g = torch.Generator().manual_seed(0)
    states = {i: {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for i in range(world)}
    avg = ref.weighted_average(states, {i: float(i + 1) for i in range(world)})["w"]
    nbr = ref.neighbour_exchange(states)
    gossip = ref.neighbour_average(states, {i: {"w": float(i + 1), "b": 1.0} for i in range(world)})
    sp = ref.sparse_exchange(states, {i: {k: v.abs() for k, v in s.items()} for i, s in states.items()}, 0.25)
    for r in range(world):
        assert torch.allclose(torch.tensor(res[r]["avg"]), avg, atol=1e-6)
        assert {int(j) for j in res[r]["nbr"]} == set(nbr[r])
        for j, w in res[r]["nbr"].items():
            assert torch.equal(torch.tensor(w), nbr[r][int(j)]["w"])
        assert torch.allclose(torch.tensor(res[r]["gossip"]), gossip[r]["w"], atol=1e-6)
        for j, ix in res[r]["sparse"].items():
            assert sorted(ix) == sorted(sp[r][int(j)].indices["w"].tolist())
        assert res[r]["bytes"] == ref.meter.bytes_total  # system-wide count, identical on every rank


def test_distributed_node_that_stops_answering_is_recorded(tmp_path):
    res = _spawn(tmp_path, 2, "timeout", 25, only_rank0=True)
    assert res[0]["outcome"] == "stopped"
    assert res[0]["missing"] == [1]
    assert "did not answer within 2s" in res[0]["line"]
