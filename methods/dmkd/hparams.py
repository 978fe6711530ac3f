"""DMKD's hyperparameters: one dataclass holding every switch of docs/methods.md §4-§5."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from harness.core.config import require
from harness.core.defaults import Search, documented
from harness.core.nodes_method import NodesParams

KD_KINDS = ("none", "logits", "module")
PRESERVATION_KINDS = ("none", "magnitude", "fisher")
TRANSFER_KINDS = ("regularize", "inject", "init")
ROUTING_KINDS = ("static", "learned", "entropy", "autoencoder", "gaussian")
TRAINING_KINDS = ("centralized", "decentralized")
TOPOLOGIES = ("full", "ring")
COMMUNICATION_KINDS = ("full", "salient")
TEACHER_KINDS = ("snapshot", "aggregate", "external")
ENCODER_KINDS = ("linear", "none", "backbone")
PRUNE_KINDS = ("off", "prune", "merge")
COMBINE_KINDS = ("logits", "probs")
SALIENT_BY_KINDS = ("update", "importance")

# The validation evidence in the sources below: final accuracy, class-IL / task-IL, on the validation split
# of Split Fashion-MNIST (full data, 1 epoch per task, seed 0).
VAL = "validation (Split Fashion-MNIST, seed 0, class-IL / task-IL)"


@dataclass
class DMKDParams(NodesParams):
    """Every DMKD switch; each field documents its default and source (``dmkd list --method dmkd``).

    The defaults were chosen on the validation split of Split Fashion-MNIST (full data, 1 epoch per task,
    seed 0, class-IL / task-IL final accuracy; the evidence is in each field's source). Rule: the best
    class-IL accuracy among the settings with task-IL >= 0.98; the winner is autoencoder routing with
    encoder=none, N=5, K=3, combine=probs (0.823 / 0.987). With
    encoder=none and N >= tasks every task owns its expert, so kd and preservation change nothing there;
    they are kept on because they protect reused experts when N < tasks (the N=4 rows of
    configs/dmkd.yaml, configs/dmkd-components.yaml).

    The nodes options (n_nodes, topology, partition, dirichlet_alpha, rounds, local_epochs, free_budget,
    backend, round_timeout_s, on_fault, simulate_fault) are :class:`NodesParams`' and mean what they
    mean for FedAvg/DIMAT; they act under training=decentralized only (methods/dmkd/decentralized.py),
    where NodesParams' checks run. DMKD re-declares the two that differ: n_nodes (1: centralized) and
    topology (full or ring).
    """

    # ---- nodes options that differ from NodesParams' --------------------------------------------
    n_nodes: int = documented(
        1, "P, the number of nodes under training=decentralized (>= 2, each a full DMKD learner with one "
        "shard of every task); 1 under training=centralized",
        "ours: 1 = the centralized default; docs/methods.md §4 (Decentralized mode: P nodes)", ge=1)
    topology: str = documented(
        "full", "training=decentralized: full (network average) | ring (gossip with the two neighbours)",
        "docs/methods.md §4 (nodes average over the topology); DIMAT (Saadati et al. 2024): fully connected and "
        "ring topologies", choices=TOPOLOGIES)

    # ---- model ------------------------------------------------------------------------------------
    encoder: str = documented(
        "none", "shared encoder f_enc: none (Flatten only: nothing shared to forget) | linear (Flatten + "
        "Linear(d_in, encoder_dim) + ReLU, trained by every task) | backbone (the scenario backbone's "
        "features)",
        f"docs/methods.md §4 (a shared encoder f_enc); none: ours, on {VAL}: 0.823 / 0.987 with autoencoder "
        "routing, K=3, combine=probs; a trainable linear 256 encoder: 0.816-0.829 / 0.975-0.980 depending on "
        "kd/preservation", choices=ENCODER_KINDS)
    encoder_dim: int = documented(
        256, "width of the shared encoder (encoder=linear only)",
        "ours: the width of the linear-encoder runs on validation (0.816-0.829 / 0.975-0.980)", ge=1)
    expert_hidden: int = documented(
        100, "h, the hidden width of each expert Linear(d_enc, h) + ReLU + Linear(h, C)",
        "ours: with N=5 experts and their autoencoders the default model on Split Fashion-MNIST has 656,595 "
        "parameters, 1.37x the MLP 784-400-400-10 (docs/methods.md §5's goal: <= 1.5x)", ge=1, role="capacity")
    n_experts: int = documented(
        5, "N, the experts at the start (growth may add experts up to n_max)",
        "docs/methods.md §4 (N experts); 5 = ours: with N >= tasks (5 on Split Fashion-MNIST) every task owns its "
        "expert under autoencoder routing (configs/dmkd.yaml also runs N=4 and N=8); search 4..8",
        ge=1, search=Search.integers(4, 8, order=5), role="capacity")
    top_k: int = documented(
        3, "K, the experts each sample runs through (top-K gates, renormalised); K <= n_experts",
        f"docs/methods.md §4 (top-K routing); 3 = ours, on {VAL} with combine=probs: K=3 0.823 / 0.987, K=2 "
        "0.823 / 0.976, K=5 0.823 / 0.989 at more FLOPs (combine=logits, K=1: 0.820 / 0.935); search 1..3 "
        "(K <= N holds for every trial)", ge=1, search=Search.integers(1, 3, order=6))

    # ---- routing ----------------------------------------------------------------------------------
    routing: str = documented(
        "autoencoder",
        "static (router frozen at its random init) | learned (softmax router trained by the task loss, the "
        "proposal's router) | entropy (learned + beta·s_i, s_i = 1 - H(M_i)/log C) | autoencoder (extension: "
        "one autoencoder per expert on the raw input, gates = softmax(-err_i/ae_temperature) over the experts "
        "that own data; each new task gets a fresh expert, or the best-reconstructing one when none is free) | "
        "gaussian (extension, SEED-like: each task trains a fresh home expert as under autoencoder; after the "
        "task, per class of that task, a Gaussian of the home expert's hidden features relu(W1 h + b1) on "
        "the task's training data (class mean, the expert's pooled within-class diagonal variance clamped at "
        "gauss_var_floor); s_i(x) = max_c log N(f_i(x); mu_ic, var_ic), gates = softmax(s_i / "
        "(gauss_temperature · expert_hidden)) over the experts that own Gaussians; the router runs the first "
        "layer of every owning expert, so its FLOPs grow with N; centralized training only)",
        "static/learned/entropy: docs/proposal.md §3 and docs/methods.md §4 (g(x) = softmax(W f_enc(x) + b), "
        "entropy-guided routing); autoencoder: Expert Gate (Aljundi et al. 2017), gaussian: SEED (Rypeść et "
        f"al. 2024), both extensions (docs/methods.md §5); autoencoder = ours, on {VAL}: 0.823 / 0.987, while the "
        "learned router stays near 0.2 class-IL and gaussian reaches 0.531 / 0.937 (a 2-class expert's hidden "
        "features pick the right expert for only ~0.6 of validation inputs)", choices=ROUTING_KINDS)
    beta: float = documented(
        1.0, "routing=entropy: strength β of the bias β·s_i added to expert i's router logit",
        "docs/methods.md §4 (entropy-guided routing: add β·s_i); 1.0 = ours (no validation evidence recorded)", ge=0)
    ae_hidden: int = documented(
        64, "routing=autoencoder: hidden width of each expert's tied-weight autoencoder on the raw input",
        "Expert Gate (Aljundi et al. 2017): one small autoencoder per expert (docs/methods.md §5); 64 = ours", ge=1)
    ae_lr: float = documented(
        0.003, "learning rate of the autoencoders' Adam optimiser (autoencoders only; experts and router use "
        "the protocol's optimiser)", "ours (no validation evidence recorded)", gt=0)
    ae_temperature: float = documented(
        0.02, "routing=autoencoder: gates = softmax(-err_i / ae_temperature) over the experts that own data",
        "Expert Gate (Aljundi et al. 2017): softmax over negative reconstruction errors (docs/methods.md §5); "
        "0.02 = ours", gt=0)
    ae_relative: bool = documented(
        False, "routing=autoencoder: divide err_i by autoencoder i's mean training error",
        f"ours: off, worse on {VAL}")
    gauss_temperature: float = documented(
        1.0, "routing=gaussian: T in gates = softmax(s_i / (T · expert_hidden)) (divides the per-dimension "
        "log-likelihood)",
        f"ours, on {VAL} with gauss_var_floor=0.01: T=0.1 / 1 / 10: 0.527 / 0.940, 0.531 / 0.937, 0.533 / "
        "0.937 (flat, so T stays 1)", gt=0)
    gauss_var_floor: float = documented(
        0.01, "routing=gaussian: minimum of the per-dimension variance of the class Gaussians",
        f"ours, on {VAL} at gauss_temperature=1: floor 0.01 / 0.1 / 1 / 10: 0.531, 0.503, 0.448, 0.426 "
        "class-IL", gt=0)
    combine: str = documented(
        "probs", "probs: y = log Σ_{i∈TopK} g̃_i softmax(M_i(x)) (a mixture of the experts' distributions, "
        "so a confident right expert wins a task-IL decision even at a small gate) | logits: y = Σ g̃_i M_i(x)",
        f"logits: docs/methods.md §4; probs = ours, on {VAL} with autoencoder routing, K=3: 0.823 / 0.987 vs "
        "logits 0.819 / 0.981", choices=COMBINE_KINDS)

    # ---- loss -------------------------------------------------------------------------------------
    kd: str = documented(
        "module", "none | logits (temperature² KL on the combined logits, over the classes the teacher knows) "
        "| module (each expert from its own snapshot and the router's gates from the snapshot router, "
        "m2mKD-style)",
        "docs/methods.md §4 (KD variants none / logits / module); logits: Hinton et al. 2015; module: m2mKD (Lo et "
        "al. 2024); module = ours: kept on, it protects reused experts when N < tasks (inert when every task "
        "owns its expert)", choices=KD_KINDS)
    teacher: str = documented(
        "snapshot", "snapshot (the model at the previous task boundary) | aggregate (the other nodes' models; "
        "training=decentralized only) | external (the model at teacher_path)",
        "docs/methods.md §4 (teacher switch, snapshot the default); docs/proposal.md §3", choices=TEACHER_KINDS)
    teacher_path: str | None = documented(
        None, "teacher=external: a state dict of the run's backbone (torch.save(model.state_dict())), read "
        "with weights_only=True; pickled modules are refused, since unpickling runs code",
        "docs/methods.md §4 (an external pretrained model given by path); the file format: ours (safe loading)")
    temperature: float = documented(
        2.0, "τ, the KD temperature in τ² KL(σ(z_teacher/τ) ‖ σ(z_student/τ))",
        "Hinton et al. 2015 (softened outputs, τ² scaling; docs/methods.md §4); 2.0 = ours, the temperature "
        "docs/methods.md §3 gives LwF; search {1, 2, 4} (Hinton-style KD)",
        gt=0, search=Search.categorical(1.0, 2.0, 4.0, order=2))
    lambda_kd: float = documented(
        1.0, "λ_KD, the weight of L_KD in L = CE + λ_KD L_KD + λ_reg L_reg",
        "docs/proposal.md §3 and docs/methods.md §4 (λ_KD); 1.0 = ours (unit weight); search log 0.1..10 "
        "(Hinton-style KD)",
        ge=0, search=Search.log(0.1, 10.0, order=1))
    lambda_balance: float = documented(
        0.01, "weight of the router load-balance term, CV² of expert importance Σ_x g_i(x)",
        "Shazeer et al. 2017 (CV² importance loss; docs/methods.md §4); 0.01 = ours", ge=0)
    lambda_diversity: float = documented(
        0.0, "weight of the diversity term: mean pairwise cosine similarity of the experts' in-batch class "
        "profiles Σ_{x:y=c} g_i(x)",
        "docs/methods.md §4 (an optional diversity term in L_reg); 0 = ours: off by default", ge=0)

    # ---- knowledge preservation (at every task boundary) ------------------------------------------
    preservation: str = documented(
        "fisher", "importance Ω: none | magnitude (|θ|) | fisher (diagonal empirical Fisher on fisher_samples "
        "training samples of the task)",
        "docs/proposal.md §3 step 4 and docs/methods.md §4 (Fisher the default, magnitude a switch); fisher = ours, "
        "kept on: it protects reused experts when N < tasks (inert when every task owns its expert)",
        choices=PRESERVATION_KINDS)
    transfer: str = documented(
        "regularize", "regularize (λ_pres Σ_salient Ω (θ − θ*)² on later tasks) | inject (a new expert gets "
        "its donor's salient parameters, kept fixed) | init (a new expert starts as a copy of its donor)",
        "docs/methods.md §4 (transfer switch, regularize the default)", choices=TRANSFER_KINDS)
    salient_p: float = documented(
        0.10, "p, the share of each module's parameters in its salient set (top p by Ω)",
        "docs/methods.md §4 (p a hyperparameter, default 10%); search log 0.02..0.5",
        gt=0, le=1, search=Search.log(0.02, 0.5, order=4))
    lambda_pres: float = documented(
        20.0, "λ_pres, the strength of the preservation penalty, on importances normalised to median 1 over "
        "the salient set and capped at 3",
        "docs/methods.md §4 (λ_pres); 20 = ours; search log 1..100, the EWC-like range (lr·λ_pres·3 >= 2 diverges "
        "and scores 0)", ge=0, search=Search.log(1.0, 100.0, order=3))
    fisher_samples: int = documented(
        512, "preservation=fisher: training samples of the task used for the Fisher importance",
        "ours: a fixed cap on the boundary's Fisher pass (no validation evidence recorded)", ge=1)
    scale_by_specialization: bool = documented(
        False, "scale λ_pres per expert by its specialization: λ_i = λ_pres · (1 − H(M_i)/log C)",
        "docs/methods.md §4 (preservation strength may scale with specialization); off = ours")

    # ---- specialization, growth, pruning ------------------------------------------------------------
    log_specialization: bool = documented(
        True, "log the experts' entropy H(M_i), usage and the routing matrix per task, on validation data",
        "docs/methods.md §4 (log H(M_i) and usage per task)")
    growth: bool = documented(
        False, "add an expert (up to n_max) when the new task's mean normalised gate entropy exceeds "
        "growth_threshold", "docs/methods.md §4 (module growth up to N_max); off = ours")
    n_max: int = documented(
        8, "N_max, the most experts growth may reach (>= n_experts)",
        "docs/methods.md §4 (N_max); 8 = ours, the top of the n_experts search range (n_max >= n_experts holds for "
        "every trial)", ge=1)
    growth_threshold: float = documented(
        0.9, "growth: the mean normalised gate entropy of the new task's data above which an expert is added",
        "docs/methods.md §4 (grow when the new task is routed with high gate entropy); 0.9 = ours", ge=0, le=1)
    prune: str = documented(
        "off", "off | prune | merge the experts whose usage is below prune_usage and whose normalised entropy "
        "exceeds prune_entropy", "docs/methods.md §4 (pruning or merging of unspecialised, rarely selected "
        "modules); off = ours", choices=PRUNE_KINDS)
    prune_usage: float = documented(
        0.02, "prune/merge: usage below which an expert counts as rarely selected", "ours", ge=0, le=1)
    prune_entropy: float = documented(
        0.9, "prune/merge: normalised entropy above which an expert counts as unspecialised", "ours",
        ge=0, le=1)

    # ---- decentralized (methods/dmkd/decentralized.py) ---------------------------------------------
    training: str = documented(
        "centralized", "centralized | decentralized (P = n_nodes >= 2 full DMKD learners, one shard of every "
        "task each)", "docs/proposal.md §3 and docs/methods.md §4 (training {centralized, decentralized}; "
        "Decentralized mode); centralized = ours: the DMKD rows of configs/dmkd.yaml", choices=TRAINING_KINDS)
    communication: str = documented(
        "full", "training=decentralized: full (module-wise weighted average of the modules routed to since "
        "the last sync) | salient (only the top salient_p share of each such module: values + int32 indices)",
        "docs/methods.md §4 (Decentralized mode: average module parameters, or exchange only the salient ones); "
        "docs/proposal.md §3 step 6", choices=COMMUNICATION_KINDS)
    salient_by: str = documented(
        "update", "communication=salient: which entries are salient for the exchange: update (|θ − θ at the "
        "last sync|) | importance (the preservation map Ω where it is non-zero, else the update)",
        "importance: docs/proposal.md §3 step 6 (exchange the important parameters identified by the preservation "
        "protocol); update = ours: what the node learned since it last synchronised", choices=SALIENT_BY_KINDS)

    def validate(self) -> None:
        """Rules between fields (pydantic has checked each field's type, bounds and choices)."""
        require(self.top_k <= self.n_experts, f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}",
                "choose top_k <= n_experts")
        require(self.n_max >= self.n_experts, f"n_max={self.n_max} is below n_experts={self.n_experts}",
                "set n_max >= n_experts")
        if self.teacher == "external":
            require(bool(self.teacher_path), "teacher=external needs teacher_path", "set teacher_path=/path/model.pt")
        if self.training == "centralized":
            require(self.teacher != "aggregate", "teacher=aggregate needs training=decentralized",
                    "use teacher=snapshot, or training=decentralized n_nodes=4")
            require(self.n_nodes == 1, f"n_nodes={self.n_nodes} needs training=decentralized",
                    "set training=decentralized, or leave n_nodes at 1")
            return
        require(self.routing != "gaussian", "routing=gaussian is available with training=centralized only",
                "set training=centralized, or routing=autoencoder")
        require(self.n_nodes >= 2, f"training=decentralized needs n_nodes >= 2, got {self.n_nodes}",
                "set n_nodes=4 for example")
        super().validate()  # NodesParams' rule (simulate_fault); the nodes fields' own bounds hold in every mode
        require(self.prune == "off", "prune/merge is not available with training=decentralized",
                "set prune=off (nodes could disagree on which experts exist)")
        require(not self.growth or self.routing == "autoencoder",
                "growth with training=decentralized needs routing=autoencoder",
                "set growth=false or routing=autoencoder (other routers grow on local data; nodes could disagree)")


def redeclared(cls: type, name: str, default: Any, source: str, meaning: str | None = None) -> Any:
    """Field ``name`` of ``cls`` with another default (and its source): the same bounds, choices and
    search range, and the same meaning unless ``meaning`` is given (for a subclass such as MoEParams)."""
    base = next(f for f in dataclasses.fields(cls) if f.name == name)
    md = dict(base.metadata)
    md.update(source=source, meaning=meaning or md["meaning"])
    return dataclasses.field(default=default, metadata=md)
