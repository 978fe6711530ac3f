"""DMKD mechanics: routing, sparse dispatch, KD, Fisher, entropy, switches, logging, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.core.backbones import build_backbone
from harness.core.config import hparams_from
from harness.core.context import RunContext
from harness.core.data import Scenario, Task, TensorSource
from harness.core.errors import UserError
from harness.core.protocol import Protocol
from harness.engine.costs import count_flops
from methods.dmkd import DMKD, DMKDModel, DMKDParams
from methods.dmkd.preservation import fisher_importance, salient_masks
from methods.dmkd.specialization import class_gate_mass, entropy, expert_entropies, measure

D_IN, C = 16, 4


# ------------------------------------------------------------------------------------------------
# Synthetic two-task scenario: four well separated Gaussian classes, tasks {0,1} and {2,3}.
# ------------------------------------------------------------------------------------------------
def synthetic_scenario(seed: int = 0, n_train: int = 96, n_val: int = 24, n_test: int = 24,
                       noise: float = 0.7) -> Scenario:
    """Tasks {0,1} and {2,3}; each task lives on its own 8 input dimensions (well separated)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(C, D_IN)
    for c in range(C):  # task t lives on its own block of dimensions; classes differ inside it
        means[c, (c // 2) * 8 : (c // 2) * 8 + 8] = 3.0
        means[c, (c // 2) * 8 + (c % 2) * 4 : (c // 2) * 8 + (c % 2) * 4 + 4] += 2.0
    per = n_train + n_val + n_test
    y = torch.arange(C).repeat_interleave(per)
    x = means[y] + noise * torch.randn(len(y), D_IN, generator=g)
    source = TensorSource(x, y)
    tasks = []
    for t in range(2):
        tr, va, te = [], [], []
        for c in (2 * t, 2 * t + 1):
            base = c * per
            tr.append(torch.arange(base, base + n_train))
            va.append(torch.arange(base + n_train, base + n_train + n_val))
            te.append(torch.arange(base + n_train + n_val, base + per))
        tasks.append(Task(t, [2 * t, 2 * t + 1], source, torch.cat(tr), torch.cat(va), torch.cat(te)))
    return Scenario("synthetic", "class", tasks, C, (D_IN,), "mlp", [f"c{c}" for c in range(C)])


def make_ctx(seed: int = 0, lr: float = 0.05, epochs: int = 2) -> RunContext:
    sc = synthetic_scenario(seed)
    return RunContext(sc, Protocol(epochs=epochs, batch_size=32, lr=lr), torch.device("cpu"), seed,
                      lambda: build_backbone("mlp", sc.input_shape, sc.num_classes))


def make_method(seed: int = 0, **overrides) -> DMKD:
    base = {"encoder": "linear", "encoder_dim": 12, "expert_hidden": 8, "ae_hidden": 4, "n_experts": 4,
            "fisher_samples": 64}
    hp = hparams_from(DMKDParams, base | overrides)
    torch.manual_seed(seed)
    return DMKD(hp, make_ctx(seed))


def train_tasks(m: DMKD, n: int = 2) -> None:
    for task in m.ctx.scenario.tasks[:n]:
        m.ctx.current_task = task
        m.before_task(task)
        m.train_task(task)
        m.after_task(task)


def small_model(n: int = 6, k: int = 2, routing: str = "learned", seed: int = 0) -> DMKDModel:
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(D_IN, 10), nn.ReLU())
    return DMKDModel(enc, 10, D_IN, C, n, 7, k, routing, ae_hidden=5).eval()


# ------------------------------------------------------------------------------------------------
# Routing and dispatch
# ------------------------------------------------------------------------------------------------
def test_top_k_routing_and_renormalisation_hand_built():
    model = small_model(n=4, k=2)
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.bias.copy_(torch.log(torch.tensor([0.1, 0.5, 0.15, 0.25])))
    _, g = model.gates(torch.randn(3, D_IN))
    assert torch.allclose(g, torch.tensor([0.1, 0.5, 0.15, 0.25]).expand(3, 4), atol=1e-6)
    from methods.dmkd.model import top_k_gates

    w, idx = top_k_gates(g, 2)
    assert idx[0].tolist() == [1, 3]
    assert torch.allclose(w[0], torch.tensor([0.5 / 0.75, 0.25 / 0.75]), atol=1e-6)
    # y = 2/3 M_1(x) + 1/3 M_3(x) exactly
    x = torch.randn(3, D_IN)
    h = model.encoder(x)
    expected = (2 / 3) * model.experts[1](h) + (1 / 3) * model.experts[3](h)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_probability_mixture_combination():
    model = small_model(n=4, k=2)
    model.combine_mode = "probs"
    with torch.no_grad():
        model.router.weight.zero_()
        model.router.bias.copy_(torch.log(torch.tensor([0.1, 0.5, 0.15, 0.25])))
    x = torch.randn(3, D_IN)
    h = model.encoder(x)
    mix = (2 / 3) * F.softmax(model.experts[1](h), 1) + (1 / 3) * F.softmax(model.experts[3](h), 1)
    assert torch.allclose(model(x), mix.log(), atol=1e-5)
    assert torch.allclose(model(x, dense=True), mix.log(), atol=1e-5)


def test_sparse_dispatch_equals_dense_masked_and_per_sample_loop():
    model = small_model(n=6, k=2)
    x = torch.randn(50, D_IN)
    sparse, dense = model(x), model(x, dense=True)
    assert torch.allclose(sparse, dense, atol=1e-5)
    # reference: one sample at a time, only its two experts
    h, g = model.gates(x)
    for b in range(5):
        v, i = g[b].topk(2)
        v = v / v.sum()
        ref = sum(v[k] * model.experts[int(i[k])](h[b : b + 1]) for k in range(2))
        assert torch.allclose(sparse[b : b + 1], ref, atol=1e-5)
    # gradients agree as well
    gs = torch.autograd.grad(model(x).sum(), list(model.experts[0].parameters()))
    gd = torch.autograd.grad(model(x, dense=True).sum(), list(model.experts[0].parameters()))
    for a, b in zip(gs, gd):
        assert torch.allclose(a, b, atol=1e-5)


def test_inference_flops_grow_with_k_not_n():
    def flops(n: int, k: int) -> float:
        torch.manual_seed(0)
        model = DMKDModel(nn.Flatten(), 784, 784, 10, n, 100, k, "learned").eval()
        x = torch.randn(32, 784)
        return count_flops(model, x)[0] / 32

    expert = 2 * (784 * 100 + 100 * 10)

    def router(n: int) -> int:
        return 2 * 784 * n

    for k in (1, 2, 4):
        assert flops(8, k) == pytest.approx(router(8) + k * expert, rel=1e-6)
    # N = 16 at K = 2 costs only the wider router, not more experts
    assert flops(16, 2) - flops(8, 2) == pytest.approx(router(16) - router(8), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# KD, Fisher, entropy
# ------------------------------------------------------------------------------------------------
class FixedTeacher(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def test_logit_kd_against_hand_computed_value():
    m = make_method(kd="logits", temperature=2.0)
    m.teacher = FixedTeacher(torch.tensor([[0.0, 1.0, 9.0, 9.0]]))
    m.teacher_classes = [0, 1]
    student = torch.tensor([[1.0, 0.0, -5.0, 3.0]], requires_grad=True)
    # temperature=2: p_t = softmax([0, .5]) = [a, b], p_s = softmax([.5, 0]) = [b, a]; KL = (b - a) ln(b / a)
    a = 1 / (1 + math.exp(0.5))
    b = 1 - a
    expected = 4.0 * (b - a) * math.log(b / a)
    value = m._kd(torch.zeros(1, D_IN), torch.zeros(1, 12), student)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert value.requires_grad  # the KD term must train the student


def test_module_kd_is_zero_for_an_identical_snapshot_and_positive_after_a_change():
    m = make_method(kd="module", routing="learned", top_k=2)
    from methods.common import frozen_copy

    m.teacher, m.teacher_classes = frozen_copy(m.model), [0, 1]
    x = torch.randn(8, D_IN)
    h = m.model.encoder(x)
    assert m._kd(x, h, m.model(x)).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        m.model.experts[2][2].bias.add_(torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert m._kd(x, h, m.model(x)).item() > 1e-3


def test_fisher_matches_per_sample_gradients_one_by_one():
    model = small_model(n=4, k=2)
    x, y = torch.randn(12, D_IN), torch.randint(0, C, (12,))
    fisher = fisher_importance(model, [(x[:5], y[:5]), (x[5:], y[5:])], max_samples=100)
    params = {n: p for n, p in model.named_parameters() if not n.startswith("autoencoders")}
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(12):  # the sparse forward, one sample and one backward at a time
        logp = F.log_softmax(model(x[i : i + 1]), dim=1)[0, y[i]]
        grads = torch.autograd.grad(logp, list(params.values()), allow_unused=True)
        for n, gr in zip(params, grads):
            if gr is not None:
                ref[n] += gr.pow(2) / 12
    assert set(fisher) == set(ref)
    for n, expected in ref.items():
        assert torch.allclose(fisher[n], expected, atol=1e-6, rtol=1e-4), n
    assert fisher["router.weight"].abs().sum() > 0  # K=2: the gates carry gradient to the router


def test_entropy_and_specialization_against_hand_computed_distribution():
    mass = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 4.0]])
    h = expert_entropies(mass)
    assert h[0].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), rel=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-9)
    assert expert_entropies(torch.zeros(3, 1))[0].item() == pytest.approx(math.log(3))  # unused expert

    class Stub:
        n_experts, top_k = 2, 1

        def gates(self, x):
            return x, x

    gates = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    y = torch.tensor([0, 0, 2])
    assert torch.equal(class_gate_mass(gates, y, 3), torch.tensor([[1.5, 0.5], [0.0, 0.0], [0.25, 0.75]]))
    spec = measure(Stub(), [(gates, y)], 3)
    assert spec.gate_entropy == pytest.approx((math.log(2) + entropy(torch.tensor([0.25, 0.75])).item()) / 3)
    assert spec.usage.tolist() == pytest.approx([2 / 3, 1 / 3])  # top-1 picks: expert 0, 0, 1
    assert spec.routing_matrix()[0] == pytest.approx([0.75, 0.25])


def test_salient_masks_take_top_share_per_module():
    imp = {"experts.0.0.weight": torch.tensor([[1.0, 5.0], [3.0, 2.0]]), "experts.0.0.bias": torch.tensor([4.0, 0.0]),
           "router.weight": torch.tensor([[9.0, 8.0, 7.0, 6.0]])}
    masks = salient_masks(imp, 0.34)  # ceil(0.34 * 6) = 3 in expert_0, ceil(0.34 * 4) = 2 in the router
    assert masks["experts.0.0.weight"].tolist() == [[False, True], [True, False]]
    assert masks["experts.0.0.bias"].tolist() == [True, False]
    assert masks["router.weight"].tolist() == [[True, True, False, False]]


# ------------------------------------------------------------------------------------------------
# Switches change what they should
# ------------------------------------------------------------------------------------------------
def _salient_drift(m: DMKD, common: dict, ref_kind: str = "fisher") -> float:
    """Train task 0, then task 1; return Σ Ω̂ (θ − θ*)² over the salient set of a reference run (the
    importance-weighted drift: unimportant members of a module's top p% may move freely)."""
    train_tasks(m, 1)
    ref = make_method(**(common | {"preservation": ref_kind}))
    train_tasks(ref, 1)
    task = m.ctx.scenario.tasks[1]
    m.before_task(task)
    m.train_task(task)
    params = dict(m.model.named_parameters())
    return sum(float((w * (params[n].detach() - ref.pres.anchors[n]).pow(2)).sum()) for n, w in ref.pres.weights.items())


def test_preservation_keeps_salient_parameters_closer():
    common = {"routing": "learned", "top_k": 2, "kd": "none", "lambda_pres": 10.0}
    for kind in ("fisher", "magnitude"):
        off = _salient_drift(make_method(preservation="none", **common), common, kind)
        on = _salient_drift(make_method(preservation=kind, **common), common, kind)
        assert on < 0.3 * off, kind


def test_module_kd_keeps_old_experts_closer_to_their_snapshot():
    """After task 1, each expert's prediction over task 0's classes on task 0's held-out data stays
    closer (in KL) to its snapshot with kd=module than with kd=none."""
    from methods.common import frozen_copy, kd_loss

    def drift(kd: str) -> float:
        m = make_method(kd=kd, routing="learned", top_k=2, preservation="none", lambda_kd=5.0)
        train_tasks(m, 1)
        snap = frozen_copy(m.model)
        train_tasks(m, 2)
        x = torch.cat([xb for xb, _ in m.ctx.scenario.tasks[0].batches("val", 1000)])
        with torch.no_grad():
            now, before = m.model.expert_logits(m.model.encoder(x)), snap.expert_logits(snap.encoder(x))
            return sum(float(kd_loss(now[:, i], before[:, i], 1.0, [0, 1])) for i in range(4))

    assert drift("module") < 0.5 * drift("none")


def test_static_router_stays_fixed_and_learned_router_moves():
    for routing, moves in (("static", False), ("learned", True)):
        m = make_method(routing=routing, top_k=2, kd="none", preservation="none")
        w0 = m.model.router.weight.detach().clone()
        train_tasks(m, 1)
        assert (not torch.equal(w0, m.model.router.weight)) == moves


def test_entropy_routing_bias_is_beta_times_specialization():
    m = make_method(routing="entropy", top_k=2, beta=2.0, kd="none", preservation="none")
    train_tasks(m, 1)
    h = torch.tensor(m.history["entropy_per_task"][-1])
    assert torch.allclose(m.model.spec_bias, 2.0 * (1 - h / math.log(C)).clamp(0, 1).float(), atol=1e-6)
    m2 = make_method(routing="learned", top_k=2, kd="none", preservation="none")
    train_tasks(m2, 1)
    assert torch.equal(m2.model.spec_bias, torch.zeros(4))


def test_autoencoder_routing_gives_each_task_its_expert_and_routes_by_reconstruction():
    m = make_method(routing="autoencoder", top_k=1, ae_hidden=6, ae_lr=0.03)
    train_tasks(m, 2)
    assert m.model.owned.tolist() == [True, True, False, False]
    m.model.eval()
    for t, task in enumerate(m.ctx.scenario.tasks):
        x = torch.cat([xb for xb, _ in task.batches("val", 1000)])
        _, g = m.model.gates(x)
        assert (g.argmax(1) == t).float().mean() > 0.9
        assert float(g[:, 2:].detach().sum()) == 0.0  # experts without data never compete


def test_growth_adds_experts_up_to_n_max():
    m = make_method(routing="learned", n_experts=2, top_k=1, n_max=3, growth=True, growth_threshold=0.0,
                    kd="none", preservation="fisher")
    train_tasks(m, 2)
    assert m.model.n_experts == 3 and m.model.router.out_features == 3
    assert m.pres.weights["router.weight"].shape[0] == 3
    m.before_task(m.ctx.scenario.tasks[1])
    assert m.model.n_experts == 3  # n_max reached


def test_prune_and_merge_remove_unused_unspecialised_experts():
    m = make_method(routing="learned", top_k=1, prune="prune", prune_usage=1.0, prune_entropy=0.0,
                    kd="none", preservation="none")
    train_tasks(m, 1)
    assert m.model.n_experts == 1  # everything qualified; pruning stops at K experts
    mm = make_method(routing="learned", n_experts=2, top_k=1, prune="merge", prune_usage=1.0, prune_entropy=0.0,
                     kd="none", preservation="none")
    a = [p.detach().clone() for p in mm.model.experts[0].parameters()]
    b = [p.detach().clone() for p in mm.model.experts[1].parameters()]
    spec = measure(mm.model, [(torch.randn(20, D_IN), torch.randint(0, C, (20,)))], C)
    mm._prune(spec)
    assert mm.model.n_experts == 1
    u0, u1 = float(spec.usage[0]), float(spec.usage[1])
    w = u1 / (u0 + u1) if u0 + u1 > 0 else 0.5
    merged = list(mm.model.experts[0].parameters())
    assert torch.allclose(merged[0], (1 - w) * a[0] + w * b[0], atol=1e-6)


def test_transfer_init_copies_donor_and_inject_freezes_its_salient_entries():
    m = make_method(routing="autoencoder", n_experts=2, top_k=1, transfer="init", kd="none", preservation="fisher")
    train_tasks(m, 1)
    m.before_task(m.ctx.scenario.tasks[1])
    for p0, p1 in zip(m.model.experts[0].parameters(), m.model.experts[1].parameters()):
        assert torch.equal(p0, p1)
    mi = make_method(routing="autoencoder", n_experts=2, top_k=1, transfer="inject", kd="none",
                     preservation="fisher")
    train_tasks(mi, 1)
    w_donor = mi.model.experts[0][0].weight.detach().clone()
    mask = mi.pres.masks["experts.0.0.weight"]
    task = mi.ctx.scenario.tasks[1]
    mi.before_task(task)
    mi.train_task(task)
    w_new = mi.model.experts[1][0].weight
    assert torch.equal(w_new[mask], w_donor[mask])
    assert not torch.equal(w_new[~mask], w_donor[~mask])  # the rest trains


def test_invalid_switches_raise_user_errors():
    for bad in ({"top_k": 5, "n_experts": 4}, {"kd": "features"}, {"routing": "hash"}, {"training": "decentralized"},
                {"teacher": "external"}, {"salient_p": 0.0}, {"n_max": 2, "n_experts": 4}):
        with pytest.raises(UserError):
            hparams_from(DMKDParams, bad)
    with pytest.raises(UserError):
        make_method(teacher="external", teacher_path="/nonexistent/teacher.pt", kd="logits")
    assert hparams_from(DMKDParams, {"kd": "none", "top_k": "2"}).top_k == 2  # CLI strings coerce


def test_field_constraints_and_rules_between_fields_are_one_line_user_errors():
    """Bounds and choices come from the fields (pydantic); rules between fields from validate()."""
    for bad, words in (({"n_experts": 0}, "n_experts must be >= 1"),
                       ({"salient_p": 1.5}, "salient_p must be <= 1"),
                       ({"temperature": 0}, "temperature must be > 0"),
                       ({"lambda_kd": -1}, "lambda_kd must be >= 0"),
                       ({"topology": "star"}, "topology='star' is not one of full, ring"),
                       ({"top_k": 6}, "top_k=6 must be in 1..n_experts=5"),
                       ({"training": "decentralized", "n_nodes": 2, "rounds": 0}, "rounds must be >= 1")):
        with pytest.raises(UserError) as e:
            hparams_from(DMKDParams, bad)
        assert words in str(e.value) and "\n" not in str(e.value)
    # The nodes fields are NodesParams' declarations: their bounds and choices hold in every training mode
    for bad in ({"rounds": 0}, {"partition": "shards"}):
        with pytest.raises(UserError):
            hparams_from(DMKDParams, bad)


def test_search_space_is_the_former_hand_written_one():
    """The search= ranges beside the fields reproduce DMKD's former search_space, key order included
    (the sampler's random stream depends on the order of suggestions)."""
    import optuna

    from harness.core.method import Method

    def former(trial):
        return {"protocol.lr": trial.suggest_float("lr", 1e-3, 1e-1, log=True),
                "lambda_kd": trial.suggest_float("lambda_kd", 0.1, 10.0, log=True),
                "temperature": trial.suggest_categorical("temperature", [1.0, 2.0, 4.0]),
                "lambda_pres": trial.suggest_float("lambda_pres", 1.0, 100.0, log=True),
                "salient_p": trial.suggest_float("salient_p", 0.02, 0.5, log=True),
                "n_experts": trial.suggest_int("n_experts", 4, 8),
                "top_k": trial.suggest_int("top_k", 1, 3)}

    assert DMKD.search_space.__func__ is Method.search_space.__func__  # no override left
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    new_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    old_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        new, old = DMKD.search_space(new_study.ask()), former(old_study.ask())
        assert list(new.items()) == list(old.items())
    trial = optuna.trial.FixedTrial({"lr": 0.01, "lambda_kd": 2.0, "temperature": 4.0, "lambda_pres": 5.0,
                                     "salient_p": 0.1, "n_experts": 6, "top_k": 2})
    assert list(DMKD.search_space(trial).items()) == list(former(trial).items())


def test_every_field_has_a_meaning_a_source_and_its_kinds_as_choices():
    import dataclasses

    from harness.core.defaults import undocumented
    from methods.dmkd import hparams
    from methods.moe import MoEParams

    assert undocumented(DMKDParams) == [] and undocumented(MoEParams) == []
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(DMKDParams)}
    for name, kinds in (("kd", hparams.KD_KINDS), ("routing", hparams.ROUTING_KINDS),
                        ("topology", hparams.TOPOLOGIES), ("salient_by", hparams.SALIENT_BY_KINDS),
                        ("training", hparams.TRAINING_KINDS), ("encoder", hparams.ENCODER_KINDS)):
        assert choices[name] == kinds
    dmkd = {f.name: f.metadata for f in dataclasses.fields(DMKDParams)}
    moe = {f.name: f.metadata for f in dataclasses.fields(MoEParams)}
    for name in ("top_k", "routing", "combine", "kd", "preservation"):  # MoE's new defaults keep DMKD's rules
        assert {k: v for k, v in moe[name].items() if k != "source"} == \
            {k: v for k, v in dmkd[name].items() if k != "source"}


def test_external_teacher_from_path(tmp_path):
    backbone = make_ctx(0).make_model()
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_()
    path = tmp_path / "teacher.pt"
    torch.save(backbone.state_dict(), path)
    m = make_method(teacher="external", teacher_path=str(path), kd="logits", routing="learned", top_k=2)
    x = torch.randn(3, D_IN)
    assert torch.allclose(m.teacher(x), backbone(x))
    assert not any(p.requires_grad for p in m.teacher.parameters())
    # A pickled module is refused before anything in it runs.
    torch.save(nn.Sequential(nn.Linear(D_IN, C)), path)
    with pytest.raises(UserError, match="not a state dict of tensors"):
        make_method(teacher="external", teacher_path=str(path), kd="logits", routing="learned", top_k=2)
    torch.save({"0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match="not a state dict of this run's backbone"):
        make_method(teacher="external", teacher_path=str(path), kd="logits", routing="learned", top_k=2)


# ------------------------------------------------------------------------------------------------
# Logging, accounting, resume
# ------------------------------------------------------------------------------------------------
def test_specialization_is_logged_per_task_from_validation_only():
    m = make_method(routing="learned", top_k=2, kd="none", preservation="fisher")
    splits = []
    original = m.ctx.eval_batches

    def spy(task, split="val"):
        splits.append(split)
        return original(task, split)

    m.ctx.eval_batches = spy
    train_tasks(m, 2)
    assert splits and set(splits) == {"val"}
    names = {(n, s) for n, _, s in m.ctx.metrics}
    for t in range(2):
        assert ("dmkd/gate_entropy", t) in names and ("dmkd/n_experts", t) in names
        assert all((f"dmkd/expert_{i}_entropy", t) in names and (f"dmkd/expert_{i}_usage", t) in names
                   for i in range(4))
    art = m.ctx.artifacts["dmkd"]
    assert len(art["entropy_per_task"]) == 2 and len(art["usage_per_task"][1]) == 4
    assert sum(art["usage_per_task"][1]) == pytest.approx(2.0)  # K=2 selections per sample
    rm = torch.tensor(art["routing_matrix"])
    assert rm.shape == (C, 4) and torch.allclose(rm.sum(1), torch.ones(C), atol=1e-6)
    assert "routing_matrix_kind" in art and art["class_names"] == ["c0", "c1", "c2", "c3"]
    assert set(art["importance_hist"]) == {"encoder", "router", "expert_0", "expert_1", "expert_2", "expert_3"}
    h = art["importance_hist"]["expert_0"]
    assert len(h["bin_edges"]) == len(h["counts"]) + 1 and sum(h["counts"]) == sum(
        p.numel() for p in m.model.experts[0].parameters())


def test_state_bytes_and_resume_roundtrip():
    m = make_method(routing="learned", n_experts=2, top_k=1, growth=True, growth_threshold=0.0, kd="module",
                    preservation="fisher")
    train_tasks(m, 2)
    assert m.model.n_experts == 3  # grown once, before task 1
    model_bytes = sum(p.numel() * 4 for p in m.model.parameters()) + sum(b.numel() * b.element_size()
                                                                          for b in m.model.buffers())
    assert m.state_bytes() >= model_bytes  # at least the teacher copy
    state = m.state_dict()
    fresh = make_method(routing="learned", n_experts=2, top_k=1, growth=True, growth_threshold=0.0, kd="module",
                        preservation="fisher")
    fresh.load_state_dict(state)
    x = torch.randn(10, D_IN)
    assert torch.equal(fresh.predict(x), m.predict(x))
    assert fresh.teacher is not None and torch.equal(fresh.teacher(x), m.teacher(x))
    assert torch.equal(fresh.pres.penalty(fresh.model), m.pres.penalty(m.model))


def test_module_state_roundtrip_for_the_decentralized_issue():
    model = small_model(n=3, k=1, routing="autoencoder")
    other = small_model(n=3, k=1, routing="autoencoder", seed=1)
    other.load_module_state(2, model.module_state(2))
    x = torch.randn(4, D_IN)
    h = model.encoder(x)
    assert torch.equal(other.experts[2](h), model.experts[2](h))
    assert "ae.encode.weight" in model.module_state(2)
    assert model.routed_counts.shape == (3,)


# ------------------------------------------------------------------------------------------------
# Speed paths: the same numbers as the plain forms they replace
def test_direct_penalty_gradient_equals_autograd_of_the_penalty():
    m = make_method(routing="learned", top_k=2, kd="none", lambda_pres=10.0)
    train_tasks(m, 1)
    with torch.no_grad():  # move away from the anchors so that the penalty is not zero
        for p in m.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = {n: p for n, p in m.model.named_parameters() if not n.startswith("autoencoders")}
    m.model.zero_grad(set_to_none=True)
    (3.0 * m.pres.penalty(m.model)).backward()
    ref = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    dense = sum((w * (params[n] - m.pres.anchors[n]).pow(2)).sum() for n, w in m.pres.weights.items())
    m.model.zero_grad(set_to_none=True)
    value = m.pres.add_penalty_grad(m.model, 3.0)
    assert float(value) > 0 and float(value) == pytest.approx(float(dense.detach()), rel=1e-5)
    assert set(ref) == {n for n, p in params.items() if p.grad is not None}  # zero grads, not None, as autograd
    for n, g in ref.items():
        torch.testing.assert_close(params[n].grad, g, rtol=1e-5, atol=1e-7)


def test_stacked_module_kd_equals_the_mean_of_per_expert_terms():
    from methods.common import kd_loss

    for routing in ("learned", "autoencoder"):
        m = make_method(routing=routing, top_k=2, kd="module")
        train_tasks(m, 2)
        x = torch.randn(9, D_IN)
        with torch.no_grad():
            for p in m.model.experts.parameters():
                p.add_(0.1 * torch.randn_like(p))
        h = m.model.encoder(x)
        got = m._kd(x, h, m.model(x)).detach()
        teacher = m.teacher
        old = [i for i in range(teacher.n_experts) if routing != "autoencoder" or bool(teacher.owned[i])]
        h_t = teacher.encoder(x)
        terms = [kd_loss(m.model.experts[i](h), teacher.experts[i](h_t), m.hp.temperature, m.teacher_classes) for i in old]
        if routing == "learned":
            terms.append(kd_loss(m.model.router(h), teacher.router(h_t), m.hp.temperature))
        want = torch.stack(terms).mean().detach()
        assert float(got) > 1e-4
        assert float(got) == pytest.approx(float(want), rel=1e-5), routing
