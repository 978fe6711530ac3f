"""FedAvg, DIMAT and WA: analytic byte counts, determinism, faults, exact permutation recovery."""

import copy

import pytest
import torch

from harness.core.backbones import build_backbone
from harness.core.nodes import NodeFailure
from harness.engine.runner import RunSpec, run
from methods.dimat import match_units, permutation_spec, permute_state
from tests.conftest import TINY, needs_fmnist

MLP_PARAMS = 784 * 400 + 400 + 400 * 400 + 400 + 400 * 10 + 10
SMALL = TINY | {"n_tasks": 2}


def _run(method, **mset):
    return run(RunSpec(method, "split-fmnist", 0, method_set=mset, scenario_set=SMALL))


@needs_fmnist
def test_fedavg_bytes_determinism_and_client_fraction():
    a = _run("fedavg", rounds=2)
    assert a["costs"]["comm_bytes"] == 2 * MLP_PARAMS * 4 * 4 * 2 * 2  # 2|θ|4 x 4 clients x 2 rounds x 2 tasks
    assert a["costs"]["comm_rounds"] == 4
    b = _run("fedavg", rounds=2)
    assert a["acc"] == b["acc"]  # same seed, same numbers
    half = _run("fedavg", rounds=2, client_fraction=0.5)
    assert half["costs"]["comm_bytes"] == 2 * MLP_PARAMS * 4 * 2 * 2 * 2
    sizes = a["artifacts"]["partition"]["0"]["sizes"]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == a["tasks"][0]["n_train"]


@needs_fmnist
def test_fedavg_failed_client_is_dropped_or_stops_the_run():
    rec = _run("fedavg", rounds=2, simulate_fault="3@2")  # client 3 silent from round 2 (of 4)
    assert rec["costs"]["comm_bytes"] == 2 * MLP_PARAMS * 4 * (4 + 3 + 3 + 3)
    events = rec["artifacts"]["node_events"]
    assert [e["round"] for e in events] == [2, 3, 4] and all(e["outcome"] == "dropped" for e in events)
    assert all(e["missing"] == [3] for e in events)
    with pytest.raises(NodeFailure):
        _run("fedavg", rounds=2, simulate_fault="3@2", on_fault="stop")


@needs_fmnist
def test_dimat_and_wa_bytes_and_agent_metric():
    d = _run("dimat", rounds=1, topology="ring")
    w = _run("wa", rounds=1, topology="ring")
    expect = 8 * MLP_PARAMS * 4 * 2  # 8 directed ring edges x |θ| x 4 bytes x 2 rounds
    assert d["costs"]["comm_bytes"] == expect and w["costs"]["comm_bytes"] == expect
    assert d["config"]["hparams"]["permute"] is True and w["config"]["hparams"]["permute"] is False
    names = [m[0] for m in d["method_metrics"]]
    assert names.count("agents_mean_val_acc") == 2


def _permute_hidden(model, groups, seed):
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(grp.size, generator=g) for grp in groups]
    twin = copy.deepcopy(model)
    twin.load_state_dict(permute_state(model.state_dict(), groups, perms))
    return twin, perms


@pytest.mark.parametrize("name,shape", [("mlp", (784,)), ("cnn", (1, 28, 28))])
def test_matching_recovers_a_known_permutation_exactly(name, shape):
    torch.manual_seed(0)
    model = build_backbone(name, shape, 10)
    if name == "cnn":  # narrow the CNN so the test stays fast
        from harness.core.backbones import cnn

        model = cnn(shape, 10, width=8, hidden=32)
    model.eval()
    groups = permutation_spec(model, shape)
    assert len(groups) == (2 if name == "mlp" else 3)
    twin, perms = _permute_hidden(model, groups, seed=1)
    x = torch.randn(256, *shape)
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x), atol=1e-5)  # same function, different unit order
    found = match_units(model, twin, [x[:128], x[128:]], groups)
    for p, q in zip(found, perms):
        assert torch.equal(p, torch.argsort(q))  # unit a of the model is unit q^-1[a] of the twin
    back = permute_state(twin.state_dict(), groups, found)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_unsupported_backbone_is_a_user_error():
    from harness.core.errors import UserError

    model = build_backbone("resnet18-reduced", (3, 8, 8), 10)
    with pytest.raises(UserError, match="mlp and cnn"):
        permutation_spec(model, (3, 8, 8))


def test_dimat_merge_of_permuted_twins_gives_the_original_wa_does_not():
    """Two agents computing the same function in different unit orders: DIMAT's merge is exact."""
    from types import SimpleNamespace

    from harness.core.nodes import make_nodes
    from methods.dimat import Dimat

    torch.manual_seed(0)
    model = build_backbone("mlp", (784,), 10)
    groups = permutation_spec(model, (784,))
    twin, _ = _permute_hidden(model, groups, seed=2)
    x = [torch.randn(128, 784)]
    own = {k: p.detach() for k, p in model.named_parameters()}
    theirs = {k: p.detach() for k, p in twin.named_parameters()}
    for permute, exact in ((True, True), (False, False)):
        fake = SimpleNamespace(hp=SimpleNamespace(permute=permute), agents={0: model}, groups=groups,
                               nodes=make_nodes("inprocess", 2, "full"), _scratch=[copy.deepcopy(model)])
        fake._scratch_models = lambda k, f=fake: f._scratch[:k]
        merged = Dimat.merge(fake, 0, own, {1: theirs}, x)
        close = all(torch.allclose(merged[k], own[k], atol=1e-6) for k in own)
        assert close is exact


def _dimat(method, **mset):
    from harness.core.config import hparams_from
    from harness.engine.runner import build_context, get_scenario, resolve_method

    spec = RunSpec(method, "split-fmnist", 0, method_set=mset, scenario_set=SMALL)
    scenario = get_scenario(spec)
    cls = resolve_method(method)
    m = cls(hparams_from(cls.HParams, mset), build_context(spec, scenario, torch.device("cpu")))
    m.before_task(scenario.tasks[0])
    return m, scenario.tasks[0]


def _merged(m, task, i=0):
    states = {j: {k: p.detach().clone() for k, p in a.named_parameters()} for j, a in m.agents.items()}
    received = {j: s for j, s in states.items() if j != i}
    return m.merge(i, states[i], received, m._stat_batches(task, i))


@needs_fmnist
def test_dimat_agents_start_distinct_and_the_merge_differs_from_wa():
    d, task = _dimat("dimat")
    w, _ = _dimat("wa")
    a0, a1 = (dict(d.agents[i].named_parameters()) for i in (0, 1))
    assert not torch.equal(a0["features.1.weight"], a1["features.1.weight"])  # seed + i initialisations
    fresh = build_backbone("mlp", (1, 28, 28), 10)
    assert all(torch.equal(p, q) for p, q in zip(d.agents[0].parameters(), w.agents[0].parameters()))
    assert sum(p.numel() for p in fresh.parameters()) == MLP_PARAMS
    md, mw = _merged(d, task), _merged(w, task)
    assert any(not torch.allclose(md[k], mw[k]) for k in md)
    moved, units = map(sum, zip(*d._moved))
    assert units == 3 * 800 and moved / units > 0.9  # 3 neighbours x (400 + 400) units; random inits barely agree
    # the merge of agent 0 with itself under a known permutation is agent 0 again, WA's is not
    twin, _ = _permute_hidden(d.agents[0], d.groups, seed=3)
    own = {k: p.detach().clone() for k, p in d.agents[0].named_parameters()}
    got = {k: p.detach().clone() for k, p in twin.named_parameters()}
    batches = d._stat_batches(task, 0)
    aligned = d.merge(0, own, {1: got}, batches)
    assert all(torch.allclose(aligned[k], own[k], atol=1e-6) for k in own)
    assert not all(torch.allclose(w.merge(0, own, {1: got}, batches)[k], own[k], atol=1e-3) for k in own)


@needs_fmnist
def test_dimat_merge_equals_wa_when_the_agents_are_identical():
    d, task = _dimat("dimat", init="shared")
    w, _ = _dimat("wa", init="shared")
    md, mw = _merged(d, task), _merged(w, task)
    assert all(torch.equal(md[k], mw[k]) for k in md)
    assert sum(m for m, _ in d._moved) == 0


@needs_fmnist
def test_dimat_logs_moved_fraction_per_round():
    rec = _run("dimat", rounds=2)
    moved = [m for m in rec["method_metrics"] if m[0] == "moved_fraction"]
    assert [m[2] for m in moved] == [1, 2, 3, 4] and all(0.0 <= m[1] <= 1.0 for m in moved)
    assert moved[0][1] > 0.5  # the first merge aligns distinct random initialisations


@needs_fmnist
def test_empty_shards_are_refused_by_dimat_before_training_and_wa_runs():
    from harness.core.errors import UserError

    # 2 tasks of 5 classes, 6 nodes: class k goes to node k mod 6, so node 5 gets nothing of task 0
    with pytest.raises(UserError, match=r"node\(s\) \[5\] without training data of task 0"):
        _run("dimat", partition="round_robin", n_nodes=6)
    rec = _run("wa", partition="round_robin", n_nodes=6)
    assert rec["status"] == "finished"


def test_counted_measures_once_per_signature_and_adds_the_same_flops():
    from harness.core.context import RunContext

    ctx = RunContext.__new__(RunContext)  # only the meter is used
    ctx.step_hook, ctx.extra_flops = None, 0

    def mm(a, b):
        return a @ b

    a, b = torch.ones(3, 4), torch.ones(4, 5)
    ctx.counted(mm, a, b)
    assert ctx.extra_flops == 2 * 3 * 4 * 5  # a (3x4)(4x5) matmul: 2·m·k·n
    ctx.counted(mm, a, b)  # same signature: reused, not re-measured
    assert ctx.extra_flops == 2 * (2 * 3 * 4 * 5) and len(ctx._counted_flops) == 1
    ctx.counted(mm, torch.ones(6, 4), b)  # another shape is measured
    assert ctx.extra_flops == 2 * 60 * 2 + 2 * 6 * 4 * 5 and len(ctx._counted_flops) == 2


@needs_fmnist
def test_dimat_flops_are_the_same_when_every_merge_is_measured(monkeypatch):
    from harness.core.context import RunContext

    once = _run("dimat", rounds=2)
    monkeypatch.setattr(RunContext, "COUNT_ONCE_PER_SIGNATURE", False)
    every = _run("dimat", rounds=2)
    assert once["costs"]["train_flops_total"] == every["costs"]["train_flops_total"] > 0
    assert once["costs"]["train_flops_boundary"] == every["costs"]["train_flops_boundary"] > 0
    assert once["acc"] == every["acc"]
