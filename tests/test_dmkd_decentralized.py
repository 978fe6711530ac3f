"""Decentralized DMKD: module-wise averages by hand, salient bytes and entries, determinism, the aggregate
teacher, gloo processes against in-process, and the analytic byte count of a real run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.core.backbones import build_backbone
from harness.core.config import hparams_from
from harness.core.context import RunContext
from harness.core.data import Scenario, Task, TensorSource
from harness.core.errors import UserError
from harness.core.protocol import Protocol
from harness.engine.runner import RunSpec, run
from methods.dmkd import DMKD, DMKDParams
from methods.dmkd.decentralized import DecentralizedDMKD, merge_weighted_sparse
from tests.conftest import TINY, needs_fmnist

REPO = Path(__file__).resolve().parent.parent
D_IN, C = 16, 4


def scenario(seed: int = 0, n_train: int = 64, n_val: int = 16, n_test: int = 16) -> Scenario:
    """Four Gaussian classes, tasks {0,1} and {2,3}, each task on its own block of dimensions."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(C, D_IN)
    for c in range(C):
        means[c, (c // 2) * 8 + (c % 2) * 4 : (c // 2) * 8 + (c % 2) * 4 + 4] = 3.0
    per = n_train + n_val + n_test
    y = torch.arange(C).repeat_interleave(per)
    src = TensorSource(means[y] + 0.7 * torch.randn(len(y), D_IN, generator=g), y)
    tasks = []
    for t in range(2):
        cut = [torch.arange(c * per, (c + 1) * per) for c in (2 * t, 2 * t + 1)]
        tasks.append(Task(t, [2 * t, 2 * t + 1], src, torch.cat([a[:n_train] for a in cut]),
                          torch.cat([a[n_train : n_train + n_val] for a in cut]),
                          torch.cat([a[n_train + n_val :] for a in cut])))
    return Scenario("synthetic", "class", tasks, C, (D_IN,), "mlp")


def method(seed: int = 0, nodes=None, **overrides) -> DMKD:
    base = {"training": "decentralized", "n_nodes": 3, "rounds": 1, "expert_hidden": 8, "ae_hidden": 4,
            "n_experts": 3, "top_k": 2, "fisher_samples": 32}
    hp = hparams_from(DMKDParams, base | overrides)
    sc = scenario(seed)
    ctx = RunContext(sc, Protocol(batch_size=16, lr=0.05), torch.device("cpu"), seed,
                     lambda: build_backbone("mlp", sc.input_shape, sc.num_classes), nodes=nodes)
    return DMKD(hp, ctx)


def params_of(m: DecentralizedDMKD) -> dict[int, dict[str, torch.Tensor]]:
    return {i: {n: p.detach().clone() for n, p in lr.model.named_parameters()} for i, lr in m.learners.items()}


def train_locally(m: DecentralizedDMKD, task_id: int = 0) -> Task:
    task = m.ctx.scenario.tasks[task_id]
    m.before_task(task)
    for i in m.nodes.local_ids:
        m.local_train_dmkd(i, task)
    return task


def test_dispatch_and_invalid_decentralized_options():
    m = method()
    assert isinstance(m, DecentralizedDMKD) and len(m.learners) == 3
    assert m.model is m.learners[0].model  # node 0 is the evaluated model
    for bad in ({"training": "decentralized", "n_nodes": 1}, {"teacher": "aggregate"}, {"n_nodes": 4},
                {"training": "decentralized", "n_nodes": 2, "prune": "prune"},
                {"training": "decentralized", "n_nodes": 2, "salient_by": "random"},
                {"training": "decentralized", "n_nodes": 2, "partition": "shards"},
                {"training": "decentralized", "n_nodes": 2, "routing": "learned", "growth": True}):
        with pytest.raises(UserError):
            hparams_from(DMKDParams, bad)


def test_full_sync_is_the_routed_count_weighted_average_by_hand():
    m = method(routing="learned", encoder="linear", encoder_dim=6, partition="dirichlet", dirichlet_alpha=0.5)
    train_locally(m)
    before = params_of(m)
    counts = {i: (lr.model.routed_counts - m.counts_at_sync[i]).tolist() for i, lr in m.learners.items()}
    samples = dict(m.samples)
    assert len(set(samples.values())) > 1  # Dirichlet shards: the node weights differ
    m.synchronise()
    active = [e for e in range(3) if sum(counts[j][e] for j in before) > 0]
    assert active and len({tuple(c) for c in counts.values()}) > 1  # routing differs between the nodes
    for lr in m.learners.values():
        after = dict(lr.model.named_parameters())
        for e in range(3):
            for name in (f"experts.{e}.0.weight", f"experts.{e}.2.bias"):
                if e not in active:  # nobody routed to it: each node keeps its own copy
                    assert torch.equal(after[name], before[lr.node][name])
                    continue
                w = {j: counts[j][e] for j in before}
                expect = sum(w[j] * before[j][name] for j in before) / sum(w.values())
                assert torch.allclose(after[name], expect, atol=1e-6)
        for name in ("router.weight", "encoder.1.weight"):
            expect = sum(samples[j] * before[j][name] for j in before) / sum(samples.values())
            assert torch.allclose(after[name], expect, atol=1e-6)
    # bytes: the counts probe (N + 1 floats up and down per node), then every travelling parameter up and
    # down per node plus one 4-byte weight per tensor per node
    travel = [p for n, p in m.learners[0].model.named_parameters()
              if n.startswith(("router.", "encoder.")) or (n.startswith("experts.") and int(n.split(".")[1]) in active)]
    n_par = sum(p.numel() for p in travel)
    assert m.nodes.meter.bytes_total == 2 * 3 * 4 * (3 + 1) + 2 * 3 * 4 * n_par + 3 * 4 * len(travel)


def test_module_nobody_routed_to_is_not_sent_and_keeps_each_nodes_copy():
    m = method(routing="autoencoder")  # task 0 trains expert 0 (and autoencoder 0) only
    train_locally(m)
    with torch.no_grad():
        m.learners[1].model.experts[2][0].weight.add_(1.0)
    before = params_of(m)
    m.synchronise()
    after = params_of(m)
    assert torch.equal(after[1]["experts.2.0.weight"], before[1]["experts.2.0.weight"])
    assert not torch.equal(after[0]["experts.2.0.weight"], after[1]["experts.2.0.weight"])
    shard = [len(m.shards[i]) for i in range(3)]
    for name in ("experts.0.0.weight", "autoencoders.0.encode.weight"):  # autoencoder 0 weighted like expert 0
        expect = sum(shard[j] * before[j][name] for j in range(3)) / sum(shard)
        assert all(torch.allclose(after[i][name], expect, atol=1e-6) for i in range(3))
    travel = [p for n, p in m.learners[0].model.named_parameters() if n.startswith(("experts.0.", "autoencoders.0."))]
    n_par = sum(p.numel() for p in travel)
    assert m.nodes.meter.bytes_total == 2 * 3 * 4 * (3 + 1) + 2 * 3 * 4 * n_par + 3 * 4 * len(travel)


def test_weighted_sparse_merge_against_dense_reference():
    own = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = merge_weighted_sparse(own, 1.0, [(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([5.0, 7.0]), 3.0),
                                           (torch.tensor([2], dtype=torch.int32), torch.tensor([-1.0]), 2.0)])
    assert torch.allclose(got, torch.tensor([(1 + 15) / 4, 2.0, (3 + 21 - 2) / 6, 4.0]))
    zero = merge_weighted_sparse(own, 0.0, [(torch.tensor([1], dtype=torch.int32), torch.tensor([9.0]), 0.0)])
    assert torch.equal(zero, own)  # no weight anywhere: keep own


def test_salient_exchange_sends_the_analytic_bytes_and_changes_only_salient_entries():
    p, P = 0.1, 3
    m = method(routing="autoencoder", communication="salient", salient_p=p)
    train_locally(m)
    before = params_of(m)
    modules = {"expert_0": [n for n in before[0] if n.startswith("experts.0.")],
               "ae_0": [n for n in before[0] if n.startswith("autoencoders.0.")]}
    flat = {i: {mod: torch.cat([before[i][n].reshape(-1) for n in names]) for mod, names in modules.items()}
            for i in range(P)}
    upd = {i: {mod: torch.cat([(before[i][n] - m.synced[i][n]).abs().reshape(-1) for n in names])
               for mod, names in modules.items()} for i in range(P)}
    weight = [float(len(m.shards[i])) for i in range(P)]  # routed to expert 0 = the shard
    m.nodes.meter.bytes_total = 0
    m.synchronise()
    # probe (N + 1 floats up and down per node); per directed edge (6): k values + k int32 indices per
    # module, and one 4-byte weight per module
    ks = {mod: max(1, -(-(v.numel() * 10) // 100)) for mod, v in flat[0].items()}  # ceil(0.1 n)
    edges = P * (P - 1)
    assert m.nodes.meter.bytes_total == 2 * P * 4 * 4 + edges * sum(8 * k for k in ks.values()) + edges * 2 * 4
    after = params_of(m)
    for i in range(P):
        for mod, names in modules.items():
            new = torch.cat([after[i][n].reshape(-1) for n in names])
            masks = {j: torch.zeros_like(new, dtype=torch.bool) for j in range(P) if j != i}
            for j, mask in masks.items():
                mask[torch.topk(upd[j][mod], ks[mod], sorted=False).indices] = True
            covered = torch.stack(list(masks.values())).any(0)
            assert torch.equal(new[~covered], flat[i][mod][~covered])  # only salient entries change
            num = weight[i] * flat[i][mod] + sum(weight[j] * masks[j] * flat[j][mod] for j in masks)
            den = weight[i] + sum(weight[j] * masks[j] for j in masks)
            assert torch.allclose(new, num / den, atol=1e-6)
            assert covered.float().mean() < 0.35  # at most (P - 1) x 10% of the entries


def test_same_seed_same_numbers_in_process():
    runs = []
    for _ in range(2):
        m = method(routing="autoencoder", communication="salient", rounds=2, partition="dirichlet")
        for task in m.ctx.scenario.tasks:
            m.before_task(task)
            m.train_task(task)
            m.after_task(task)
        x = m.ctx.scenario.tasks[0].source.data[:20]
        runs.append((m.predict(x), m.ctx.comm_bytes, m.ctx.comm_rounds))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]
    assert runs[0][2] == 4  # 2 rounds x 2 tasks


def test_aggregate_teacher_is_the_average_of_the_other_nodes():
    m = method(routing="autoencoder", communication="salient", teacher="aggregate", kd="logits")
    task = m.ctx.scenario.tasks[0]
    m.before_task(task)
    m.train_task(task)
    bytes_before = m.ctx.comm_bytes
    m.after_task(task)
    models = {i: dict(lr.model.named_parameters()) for i, lr in m.learners.items()}
    for i, lr in m.learners.items():
        t = dict(lr.teacher.named_parameters())
        others = [j for j in models if j != i]
        for name in ("experts.0.0.weight", "autoencoders.0.encode.weight", "experts.1.2.bias"):
            expect = sum(models[j][name] for j in others) / len(others)
            assert torch.allclose(t[name], expect, atol=1e-6)
        assert not torch.equal(t["experts.0.0.weight"], models[i]["experts.0.0.weight"])  # not its own copy
        assert not any(p.requires_grad for p in t.values())
        assert lr.teacher_classes == [0, 1]
    state = {k: v for k, v in m.learners[0].model.state_dict().items() if v.is_floating_point() and k != "routed_counts"}
    payload = sum(v.numel() * 4 for v in state.values())
    assert m.ctx.comm_bytes - bytes_before == 6 * payload  # one full model per directed edge
    # the KD term of the next task uses that teacher: zero for a student equal to it, positive otherwise
    x, _ = next(task.batches("train", 16))
    lr0 = m.learners[0]
    h = lr0.model.encoder(x)
    assert float(lr0._kd(x, h, lr0.teacher(x))) == pytest.approx(0.0, abs=1e-6)
    assert float(lr0._kd(x, h, lr0.model(x)).detach()) > 0


WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from datetime import timedelta
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    from tests.test_dmkd_decentralized import OPTS, method
    m = method(**OPTS, backend="distributed")
    for task in m.ctx.scenario.tasks:
        m.before_task(task); m.train_task(task); m.after_task(task)
    x = m.ctx.scenario.tasks[1].source.data[:12]
    json.dump({{"pred": m.predict(x).tolist(), "bytes": m.ctx.comm_bytes, "ids": m.nodes.local_ids}}, open(out, "w"))
    dist.destroy_process_group()
""")
OPTS = {"n_nodes": 2, "routing": "autoencoder", "communication": "salient", "teacher": "aggregate", "kd": "module",
        "rounds": 2, "partition": "dirichlet"}


def test_distributed_gloo_matches_in_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port), str(tmp_path / f"r{r}.json")],
                              env=env, stderr=subprocess.PIPE, cwd=REPO) for r in range(2)]
    for p in procs:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    res = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    ref = method(**OPTS)
    for task in ref.ctx.scenario.tasks:
        ref.before_task(task)
        ref.train_task(task)
        ref.after_task(task)
    x = ref.ctx.scenario.tasks[1].source.data[:12]
    for r in range(2):
        assert res[r]["ids"] == [r]
        assert torch.allclose(torch.tensor(res[r]["pred"]), ref.learners[r].model(x), atol=1e-5)
        assert res[r]["bytes"] == ref.ctx.comm_bytes  # system-wide count, the same on every rank


@needs_fmnist
def test_run_through_the_registry_counts_the_module_bytes_of_each_sync():
    rec = run(RunSpec("dmkd", "split-fmnist", 0, method_set={"training": "decentralized", "n_nodes": 4, "rounds": 1},
                      scenario_set=TINY | {"n_tasks": 2}))
    P, N = 4, 5
    expert = 784 * 100 + 100 + 100 * 10 + 10
    ae = 784 * 64 + 64 + 784
    per_round = 2 * P * 4 * (N + 1) + 2 * P * 4 * (expert + ae) + P * 4 * 7  # expert: 4 tensors, autoencoder: 3
    assert rec["costs"]["comm_bytes"] == 2 * per_round and rec["costs"]["comm_rounds"] == 2
    assert rec["metrics"]["task_il"]["final_avg_acc"] > 0.3  # 5 classes per task: chance is 0.2
    assert [n for n, _, _ in rec["method_metrics"]].count("nodes_mean_val_acc") == 2
