"""DMKD's hyperparameters: one dataclass holding every switch of METHODS.md §4-§5."""

from __future__ import annotations

from dataclasses import dataclass, fields

from harness.core.config import choice, require
from harness.core.method import HParams
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


@dataclass
class DMKDParams(HParams):
    """Every DMKD switch (defaults chosen on the validation split of Split Fashion-MNIST, seed 0).

    Validation evidence (full data, 1 epoch/task, class-IL / task-IL final accuracy): autoencoder
    routing with encoder=none, K=3, combine=probs: 0.823 / 0.987 (combine=logits: 0.819 / 0.981; probs
    with K=2: 0.823 / 0.976, K=5: 0.823 / 0.989 at more FLOPs; logits K=1: 0.820 / 0.935); with a
    trainable shared encoder (linear 256), K=3: 0.816-0.829 / 0.975-0.980 depending on kd/preservation;
    the learned router stays near 0.2 class-IL. Rule: best class-IL among settings with task-IL >= 0.98.
    With encoder=none and N >= tasks every task owns its expert, so kd/preservation change nothing there
    (they are kept on: they protect reused experts when N < tasks; see the N=4 rows of configs/dmkd.yaml).

    Model
      encoder="none": shared f_enc = Flatten only (nothing shared to forget); "linear" = Flatten +
          Linear(d_in, encoder_dim)+ReLU, trained by every task; "backbone" = the scenario backbone's features.
      encoder_dim=256 (linear only), expert_hidden=100: each expert is Linear(d_enc, h)+ReLU+Linear(h, C).
      n_experts=5 (N), top_k=3 (K): experts at the start; experts run per sample at inference.
    Routing
      routing="autoencoder": static (router frozen at its random init) | learned (softmax router
          trained by the task loss, the proposal's router) | entropy (learned + beta*s_i, s_i = 1 -
          H(M_i)/log C) | autoencoder (extension, Expert Gate: one autoencoder per expert on the raw
          input, gates = softmax(-err_i/ae_temperature) over experts that own data; each new task
          gets a fresh expert, or the best-reconstructing one when none is free) | gaussian (extension,
          SEED-like: each task trains a fresh home expert as under autoencoder; after the task, per class
          of that task a Gaussian of the home expert's hidden features relu(W1 h + b1) on the task's
          training data: the class mean and the expert's pooled within-class diagonal variance, clamped
          at gauss_var_floor; s_i(x) = max_c log N(f_i(x); mu_ic, var_ic), gates = softmax(s_i /
          (gauss_temperature * expert_hidden)) over experts that own Gaussians; the router runs the first
          layer of every owning expert, so its FLOPs grow with N; centralized training only).
      beta=1.0: strength of the entropy-guided bias. ae_hidden=64 (tied-weight autoencoder on the raw
      input), ae_lr=3e-3 (Adam, autoencoders only), ae_temperature=0.02 (gates = softmax(-err/temp)),
      ae_relative=False (True divides err_i by autoencoder i's mean training error; worse on validation).
      gauss_temperature=1.0 (divides the per-dimension log-likelihood), gauss_var_floor=0.01 (minimum
      variance). Validation (full data, seed 0, class-IL / task-IL): T=0.1/1/10 with floor 0.01: 0.527/0.940,
      0.531/0.937, 0.533/0.937 (flat, so T stays 1); floor 0.1/1/10 at T=1: 0.503, 0.448, 0.426. The hidden
      features of a 2-class expert pick the right expert for only ~0.6 of validation inputs, so this
      router stays well below autoencoder routing (0.823 on validation).
      combine="probs": y = log Σ_{i∈TopK} g̃_i softmax(M_i(x)) (a mixture of the experts' distributions, so
          a confident right expert wins a task-IL decision even at a small gate) | logits: y = Σ g̃_i M_i(x).
    Loss
      kd="module": none | logits (temperature^2 KL on the combined logits, classes the teacher knows) | module
          (each expert from its own snapshot and the router's gates from the snapshot router, m2mKD-style).
      teacher="snapshot": snapshot at the previous boundary | aggregate (decentralized only) |
          external (at teacher_path: a state dict of the run's backbone, torch.save(model.state_dict()),
          read with weights_only=True; pickled modules are refused, since unpickling runs code).
      temperature=2.0, lambda_kd=1.0, lambda_balance=0.01 (CV^2 of expert importance, Shazeer 2017),
      lambda_diversity=0.0 (mean pairwise cosine similarity of the experts' in-batch class profiles).
    Knowledge preservation (at every boundary)
      preservation="fisher": none | magnitude (|theta|) | fisher (diagonal, empirical, fisher_samples).
      transfer="regularize": regularize (lambda_pres * sum_salient Omega (theta - theta*)^2) | inject
          (a new expert gets its donor's salient parameters, kept fixed) | init (a new expert starts as a
          copy of its donor). salient_p=0.10 (top share per module), lambda_pres=20.0 (on importances
          normalised to median 1 over the salient set, capped at 3), scale_by_specialization=False.
    Specialization, growth, pruning
      log_specialization=True (entropy, usage, routing matrix per task, on validation data).
      growth=False: add an expert (up to n_max=8) when the new task's mean normalised gate entropy
          exceeds growth_threshold=0.9. prune="off": off | prune | merge experts whose usage is below
          prune_usage=0.02 and whose normalised entropy exceeds prune_entropy=0.9.
    Decentralized (methods/dmkd/decentralized.py; the nodes options mean what they mean for FedAvg/DIMAT)
      training="centralized" | decentralized (P = n_nodes >= 2 full DMKD learners, one shard of every task
          each); n_nodes=1. topology="full" (network average) | ring (gossip with the two neighbours).
      partition="iid" | dirichlet (dirichlet_alpha=0.5) | round_robin. rounds=3 synchronisations per task, each after
          local_epochs=0 local epochs (0 = epochs / rounds: R·E = the protocol's epochs, as for FedAvg;
          free_budget=true allows another product).
      communication="full": module-wise weighted average of the modules routed to since the last sync |
          salient: only the top salient_p share of each such module (values + int32 indices).
      salient_by="update": which entries are salient for the exchange: update (|theta - theta at the last
          sync|) | importance (the preservation map Omega where it is non-zero, else the update).
      backend="inprocess" | distributed (torchrun, one rank per node); round_timeout_s=300, on_fault="drop",
          simulate_fault="" (in-process only, node@round).
    """

    encoder: str = "none"
    encoder_dim: int = 256
    expert_hidden: int = 100
    n_experts: int = 5
    top_k: int = 3
    routing: str = "autoencoder"
    beta: float = 1.0
    ae_hidden: int = 64
    ae_lr: float = 0.003
    ae_temperature: float = 0.02
    ae_relative: bool = False
    gauss_temperature: float = 1.0
    gauss_var_floor: float = 0.01
    combine: str = "probs"
    kd: str = "module"
    teacher: str = "snapshot"
    teacher_path: str | None = None
    temperature: float = 2.0
    lambda_kd: float = 1.0
    lambda_balance: float = 0.01
    lambda_diversity: float = 0.0
    preservation: str = "fisher"
    transfer: str = "regularize"
    salient_p: float = 0.10
    lambda_pres: float = 20.0
    fisher_samples: int = 512
    scale_by_specialization: bool = False
    log_specialization: bool = True
    growth: bool = False
    n_max: int = 8
    growth_threshold: float = 0.9
    prune: str = "off"
    prune_usage: float = 0.02
    prune_entropy: float = 0.9
    training: str = "centralized"
    topology: str = "full"
    communication: str = "full"
    n_nodes: int = 1
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    rounds: int = 3
    local_epochs: float = 0.0
    free_budget: bool = False
    salient_by: str = "update"
    backend: str = "inprocess"
    round_timeout_s: float = 300.0
    on_fault: str = "drop"
    simulate_fault: str = ""

    def nodes_params(self) -> NodesParams:
        """The nodes options as FedAvg/DIMAT's NodesParams (same meaning, same validation)."""
        names = {f.name for f in fields(NodesParams)}
        return NodesParams(**{n: getattr(self, n) for n in names if hasattr(self, n)})

    def faults(self) -> dict[int, int]:
        return self.nodes_params().faults()

    def validate(self) -> None:
        for value, allowed, key in (
            (self.encoder, ENCODER_KINDS, "encoder"),
            (self.routing, ROUTING_KINDS, "routing"),
            (self.kd, KD_KINDS, "kd"),
            (self.teacher, TEACHER_KINDS, "teacher"),
            (self.preservation, PRESERVATION_KINDS, "preservation"),
            (self.transfer, TRANSFER_KINDS, "transfer"),
            (self.prune, PRUNE_KINDS, "prune"),
            (self.combine, COMBINE_KINDS, "combine"),
            (self.training, TRAINING_KINDS, "training"),
            (self.topology, TOPOLOGIES, "topology"),
            (self.communication, COMMUNICATION_KINDS, "communication"),
            (self.salient_by, SALIENT_BY_KINDS, "salient_by"),
        ):
            choice(value, allowed, key)
        require(self.n_experts >= 1, f"n_experts must be >= 1, got {self.n_experts}", "set n_experts=4 for example")
        require(1 <= self.top_k <= self.n_experts, f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}",
                "choose top_k <= n_experts")
        require(self.n_max >= self.n_experts, f"n_max={self.n_max} is below n_experts={self.n_experts}",
                "set n_max >= n_experts")
        require(self.encoder_dim >= 1 and self.expert_hidden >= 1 and self.ae_hidden >= 1,
                "encoder_dim, expert_hidden and ae_hidden must be >= 1", "use positive layer widths")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}", "set temperature=2 for example")
        require(0 < self.salient_p <= 1, f"salient_p must be in (0, 1], got {self.salient_p}", "use e.g. 0.1")
        require(self.ae_temperature > 0 and self.ae_lr > 0, "ae_temperature and ae_lr must be > 0",
                "use ae_temperature=0.02 ae_lr=0.003")
        require(self.gauss_temperature > 0 and self.gauss_var_floor > 0,
                "gauss_temperature and gauss_var_floor must be > 0", "use gauss_temperature=1 gauss_var_floor=0.01")
        require(self.fisher_samples >= 1, "fisher_samples must be >= 1", "use e.g. 512")
        for name in ("lambda_kd", "lambda_pres", "lambda_balance", "lambda_diversity", "beta"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0", f"set {name} to 0 or more")
        require(0 <= self.prune_usage <= 1 and 0 <= self.prune_entropy <= 1 and 0 <= self.growth_threshold <= 1,
                "prune_usage, prune_entropy and growth_threshold are fractions in [0, 1]", "use values in [0, 1]")
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
        self.nodes_params().validate()
        require(self.prune == "off", "prune/merge is not available with training=decentralized",
                "set prune=off (nodes could disagree on which experts exist)")
        require(not self.growth or self.routing == "autoencoder",
                "growth with training=decentralized needs routing=autoencoder",
                "set growth=false or routing=autoencoder (other routers grow on local data; nodes could disagree)")
