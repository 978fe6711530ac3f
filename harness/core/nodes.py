"""Decentralized execution: P nodes, a topology, averaging and exchange operations, a byte meter.

Two backends behind one API, so method code does not change:

- :class:`InProcessNodes` (default): every node lives in this process; deterministic; node failures
  are simulated by a schedule (``faults={node: first_round_it_stops_answering}``).
- :class:`DistributedNodes`: one process per node under torchrun (gloo on CPU, nccl on GPU). Every
  operation starts with a ``monitored_barrier`` on a gloo group bounded by ``round_timeout_s``, so a
  node that dies or stops answering ends the round instead of hanging the run.

A method passes the states of the nodes it hosts (``dict[node_id, dict[name, Tensor]]``; all P
nodes in-process, its own rank under torchrun) and gets back what those nodes receive.

Byte meter: counts the protocol's messages, the same number on every backend and every rank
(system-wide, not per process): ``weighted_average`` is a server average, one upload and one
download of the payload per participating node (FedAvg: 2 x |θ| x 4 bytes per client and round);
``neighbour_exchange`` sends the payload once along every directed edge between answering nodes;
``sparse_exchange`` sends k values plus k int32 indices per tensor along every edge. Only floating
tensors travel (BatchNorm's ``num_batches_tracked`` stays local). A scalar weight (a client's sample
count) is left out of the count; per-tensor weights (module-wise averaging) are counted.

Faults (``on_fault``): ``drop`` completes the round with the nodes that answered (FedAvg style);
``stop`` raises :class:`NodeFailure`, a one-line error; the run resumes from its last task checkpoint.
The distributed backend can only stop: a collective cannot finish without a dead rank. Either
outcome is appended to ``events`` (round, missing nodes, outcome).

Under torchrun the entry point is the CLI's: ``torchrun --nproc-per-node P -m harness.cli run --method
fedavg --scenario split-fmnist --nodes-backend distributed`` (rank 0 records the run).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from harness.core.errors import UserError

State = dict[str, Tensor]
Weight = float | dict[str, float]
BACKENDS = ("inprocess", "distributed")
FAULT_POLICIES = ("drop", "stop")


class NodeFailure(UserError):
    """A node did not answer within the round timeout and the run had to stop."""


# ---------------------------------------------------------------------------------------------
# Topology
# ---------------------------------------------------------------------------------------------
@dataclass
class Topology:
    """Undirected graph over P nodes as a boolean adjacency matrix (no self loops)."""

    name: str
    adjacency: Tensor

    @property
    def n_nodes(self) -> int:
        return int(self.adjacency.shape[0])

    def neighbours(self, i: int) -> list[int]:
        return torch.nonzero(self.adjacency[i]).flatten().tolist()

    def mixing_weights(self, i: int) -> dict[int, float]:
        """π_ij: uniform over the node and its neighbours (fully connected: 1/P; ring: 1/3)."""
        group = [i, *self.neighbours(i)]
        return {j: 1.0 / len(group) for j in sorted(group)}

    @staticmethod
    def build(spec: str, n_nodes: int) -> Topology:
        """``full`` | ``ring`` | ``star`` (node 0 is the centre) | ``adj:0-1,1-2,...`` (explicit edges)."""
        if n_nodes < 1:
            raise UserError(f"n_nodes must be >= 1, got {n_nodes}", "use n_nodes=4 for example")
        a = torch.zeros(n_nodes, n_nodes, dtype=torch.bool)
        if spec in ("full", "fully_connected"):
            a[:] = True
        elif spec == "ring":
            for i in range(n_nodes):
                a[i, (i + 1) % n_nodes] = a[(i + 1) % n_nodes, i] = True
        elif spec == "star":
            a[0, :] = a[:, 0] = True
        elif spec.startswith("adj:"):
            try:
                for edge in filter(None, spec[4:].split(",")):
                    u, v = (int(s) for s in edge.split("-"))
                    if not (0 <= u < n_nodes and 0 <= v < n_nodes):
                        raise ValueError
                    a[u, v] = a[v, u] = True
            except ValueError:
                raise UserError(f"topology {spec!r} is not a valid edge list over {n_nodes} nodes",
                                "write it as adj:0-1,1-2 with node ids below n_nodes") from None
        else:
            raise UserError(f"unknown topology {spec!r}", "use full, ring, star or adj:0-1,1-2,...")
        a.fill_diagonal_(False)
        return Topology(spec, a)


# ---------------------------------------------------------------------------------------------
# Meter and messages
# ---------------------------------------------------------------------------------------------
@dataclass
class CommMeter:
    """System-wide bytes and rounds, by operation; ``take`` returns what accrued since the last take."""

    bytes_total: int = 0
    rounds: int = 0
    messages: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    _taken: tuple[int, int] = (0, 0)

    def add(self, op: str, nbytes: int, messages: int) -> None:
        self.bytes_total += int(nbytes)
        self.messages += int(messages)
        self.by_op[op] = self.by_op.get(op, 0) + int(nbytes)

    def take(self) -> tuple[int, int]:
        b, r = self.bytes_total - self._taken[0], self.rounds - self._taken[1]
        self._taken = (self.bytes_total, self.rounds)
        return b, r


@dataclass
class SparseState:
    """Top-k entries of each tensor: flat int32 ``indices`` and their ``values``, plus shapes."""

    indices: dict[str, Tensor]
    values: dict[str, Tensor]
    shapes: dict[str, torch.Size]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.indices, self.values) for t in d.values())


def floating_items(state: State) -> list[tuple[str, Tensor]]:
    """The entries that travel: floating tensors, in the state's own order."""
    return [(k, v) for k, v in state.items() if v.is_floating_point()]


def payload_bytes(state: State) -> int:
    return sum(v.numel() * v.element_size() for _, v in floating_items(state))


def flatten(state: State) -> Tensor:
    return torch.cat([v.detach().reshape(-1) for _, v in floating_items(state)])


def unflatten(vec: Tensor, like: State) -> State:
    out, pos = {}, 0
    for k, v in floating_items(like):
        out[k] = vec[pos : pos + v.numel()].view_as(v)
        pos += v.numel()
    return out


def top_fraction(state: State, importance: State, fraction: float) -> SparseState:
    """Keep the ceil(fraction·n) entries of each tensor with the largest importance."""
    idx, val, shapes = {}, {}, {}
    for k, v in floating_items(state):
        k_keep = max(1, math.ceil(fraction * v.numel()))
        top = torch.topk(importance[k].reshape(-1), k_keep, sorted=False).indices
        idx[k] = top.to(torch.int32)
        val[k] = v.detach().reshape(-1)[top]
        shapes[k] = v.shape
    return SparseState(idx, val, shapes)


def merge_sparse(own: State, received: list[SparseState]) -> State:
    """Average each entry with the received values that cover it (uniform over covering senders)."""
    out = {}
    for k, v in own.items():
        if not v.is_floating_point() or not received:
            out[k] = v
            continue
        acc, cnt = v.detach().clone().reshape(-1), torch.ones(v.numel(), device=v.device, dtype=v.dtype)
        for msg in received:
            ix = msg.indices[k].long()
            acc.index_add_(0, ix, msg.values[k])
            cnt.index_add_(0, ix, torch.ones_like(msg.values[k]))
        out[k] = (acc / cnt).view_as(v)
    return out


def _weight_of(w: Weight, name: str) -> float:
    return float(w) if not isinstance(w, dict) else float(w.get(name, 0.0))


def _weight_vector(w: Weight, like: State, device: torch.device) -> Tensor:
    return torch.tensor([_weight_of(w, k) for k, _ in floating_items(like)], dtype=torch.float64, device=device)


def _is_participant(w: Weight) -> bool:
    return any(x > 0 for x in w.values()) if isinstance(w, dict) else w > 0


# ---------------------------------------------------------------------------------------------
# The API (shared logic); backends supply the transport
# ---------------------------------------------------------------------------------------------
class Nodes:
    """P nodes on a topology; ``local_ids`` are the nodes this process hosts."""

    backend = ""

    def __init__(self, n_nodes: int, topology: Topology, local_ids: list[int], round_timeout_s: float,
                 on_fault: str) -> None:
        if on_fault not in FAULT_POLICIES:
            raise UserError(f"on_fault={on_fault!r} is not one of {', '.join(FAULT_POLICIES)}",
                            "set on_fault to drop or stop")
        if not round_timeout_s > 0:
            raise UserError(f"round_timeout_s must be > 0, got {round_timeout_s}", "use e.g. round_timeout_s=300")
        self.n_nodes = n_nodes
        self.topology = topology
        self.local_ids = local_ids
        self.round_timeout_s = round_timeout_s
        self.on_fault = on_fault
        self.meter = CommMeter()
        self.events: list[dict[str, Any]] = []
        self.round = 0

    # ---- rounds and faults ---------------------------------------------------------------
    def next_round(self) -> int:
        """Start a communication round (counted by the meter); returns its id."""
        self.round += 1
        self.meter.rounds += 1
        return self.round

    def failed(self) -> set[int]:
        """Nodes known to have stopped answering (in-process schedule); empty in distributed."""
        return set()

    def _missing(self, op: str, missing: list[int], detail: str = "") -> None:
        """Record a fault; raise :class:`NodeFailure` unless the policy drops the missing nodes."""
        outcome = "dropped" if self.on_fault == "drop" and self.backend == "inprocess" else "stopped"
        self.events.append({"round": self.round, "op": op, "missing": missing, "outcome": outcome,
                            "detail": detail})
        if outcome == "stopped":
            raise NodeFailure(
                f"node(s) {missing} did not answer within {self.round_timeout_s:g}s in round {self.round} ({op})"
                + (f": {detail}" if detail else ""),
                "restart the failed node(s) and resume the run from its last task checkpoint",
            )

    # ---- operations ----------------------------------------------------------------------
    def weighted_average(self, states: dict[int, State], weights: dict[int, Weight]) -> State:
        """Σ_i w_i θ_i / Σ_i w_i over participating nodes (w_i > 0), per tensor, as a server average.

        ``weights[i]`` is a number (FedAvg: the node's sample count) or a dict name -> weight
        (module-wise averaging, e.g. samples routed to a module). Tensors whose weights sum to 0
        are left out of the result (keep your own). Every hosted node must pass its state.
        """
        like = states[self.local_ids[0]]
        dev = next(iter(like.values())).device
        failed = self.failed()
        live = {i: w for i, w in weights.items() if i not in failed}
        gone = sorted(i for i, w in weights.items() if i in failed and _is_participant(w))
        if gone:
            self._missing("weighted_average", gone)
        self._check_alive("weighted_average")
        sizes = [v.numel() for _, v in floating_items(like)]
        wsum_local = torch.zeros(len(sizes), dtype=torch.float64, device=dev)
        acc_local = torch.zeros(sum(sizes), dtype=torch.float32, device=dev)
        count_local = torch.zeros(1, dtype=torch.float64, device=dev)
        for i in sorted(states):
            w = live.get(i, 0.0)
            if not _is_participant(w):
                continue
            wv = _weight_vector(w, like, dev)
            if isinstance(w, dict):
                acc_local += torch.repeat_interleave(wv.float(), torch.tensor(sizes, device=dev)) * flatten(states[i])
            else:
                acc_local.add_(flatten(states[i]).float(), alpha=float(w))
            wsum_local += wv
            count_local += 1
        acc, wsum, count = self._sum_over_ranks(acc_local, wsum_local, count_local)
        acc = acc.float()
        n_part = round(float(count))
        extra = 4 * len(sizes) if any(isinstance(w, dict) for w in weights.values()) else 0
        self.meter.add("weighted_average", 2 * n_part * payload_bytes(like) + n_part * extra, 2 * n_part)
        out: State = {}
        pos = 0
        for (k, v), n, ws in zip(floating_items(like), sizes, wsum.tolist()):
            if ws > 0:
                out[k] = (acc[pos : pos + n] / ws).to(v.dtype).view_as(v)
            pos += n
        return out

    def neighbour_exchange(self, states: dict[int, State]) -> dict[int, dict[int, State]]:
        """Each hosted node receives the states of its answering neighbours: {i: {j: θ_j}}."""
        like = states[self.local_ids[0]]
        vecs = {i: flatten(s) for i, s in states.items()}
        got = self._exchange("neighbour_exchange", vecs, payload_bytes(like))
        return {i: {j: unflatten(v, like) for j, v in inbox.items()} for i, inbox in got.items()}

    def neighbour_average(self, states: dict[int, State], weights: dict[int, Weight]) -> dict[int, State]:
        """Gossip step: θ_i <- Σ_{j∈N(i)∪{i}} w_j θ_j / Σ w_j per tensor (module-wise weights allowed).

        The weights travel with the states (counted when they are per tensor).
        """
        like = states[self.local_ids[0]]
        dev = next(iter(like.values())).device
        per_tensor = any(isinstance(w, dict) for w in weights.values())
        vecs = {i: torch.cat([flatten(s).double(), _weight_vector(weights[i], like, dev)]) for i, s in states.items()}
        nbytes = payload_bytes(like) + (4 * len(floating_items(like)) if per_tensor else 0)
        got = self._exchange("neighbour_average", vecs, nbytes)
        sizes = torch.tensor([v.numel() for _, v in floating_items(like)], device=dev)
        n_w = len(sizes)
        out = {}
        for i, own in states.items():
            acc = torch.zeros(int(sizes.sum()), dtype=torch.float64, device=dev)
            wsum = torch.zeros(n_w, dtype=torch.float64, device=dev)
            for j in sorted([i, *got[i]]):
                v = vecs[i] if j == i else got[i][j]
                acc += torch.repeat_interleave(v[-n_w:], sizes) * v[:-n_w]
                wsum += v[-n_w:]
            merged = acc / torch.repeat_interleave(wsum.clamp(min=1e-300), sizes)
            new = unflatten(merged, like)
            out[i] = {k: (new[k].to(v.dtype) if float(wsum[n]) > 0 else v)
                      for n, (k, v) in enumerate(floating_items(own))}
        return out

    def sparse_exchange(self, states: dict[int, State], importance: dict[int, State],
                        fraction: float) -> dict[int, dict[int, SparseState]]:
        """Each node sends its top ``fraction`` entries by ``importance`` (values + int32 indices)."""
        if not 0 < fraction <= 1:
            raise UserError(f"sparse fraction must be in (0, 1], got {fraction}", "use e.g. 0.1 for the top 10%")
        msgs = {i: top_fraction(states[i], importance[i], fraction) for i in states}
        like = msgs[self.local_ids[0]]
        idx_vecs = {i: torch.cat([m.indices[k] for k in m.indices]) for i, m in msgs.items()}
        val_vecs = {i: torch.cat([m.values[k] for k in m.values]) for i, m in msgs.items()}
        got_i = self._exchange("sparse_exchange", idx_vecs, sum(t.numel() * 4 for t in like.indices.values()))
        got_v = self._exchange("sparse_exchange", val_vecs,
                               sum(t.numel() * t.element_size() for t in like.values.values()), check=False)
        out: dict[int, dict[int, SparseState]] = {}
        for i in states:
            out[i] = {}
            for j in got_i[i]:
                idx, val, pos = {}, {}, 0
                for k, t in like.indices.items():
                    idx[k] = got_i[i][j][pos : pos + t.numel()]
                    val[k] = got_v[i][j][pos : pos + t.numel()]
                    pos += t.numel()
                out[i][j] = SparseState(idx, val, dict(like.shapes))
        return out

    # ---- transport (backend specific) ----------------------------------------------------
    def _check_alive(self, op: str) -> None:
        """Distributed: barrier bounded by the round timeout. In-process: nothing to wait for."""

    def _sum_over_ranks(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tensors

    def _exchange(self, op: str, vecs: dict[int, Tensor], nbytes_per_msg: int,
                  check: bool = True) -> dict[int, dict[int, Tensor]]:
        raise NotImplementedError


class InProcessNodes(Nodes):
    """All nodes in this process. ``faults`` maps a node to the first round it stops answering."""

    backend = "inprocess"

    def __init__(self, n_nodes: int, topology: Topology, round_timeout_s: float = 300.0, on_fault: str = "drop",
                 faults: dict[int, int] | None = None) -> None:
        super().__init__(n_nodes, topology, list(range(n_nodes)), round_timeout_s, on_fault)
        self.faults = dict(faults or {})

    def failed(self) -> set[int]:
        return {i for i, r in self.faults.items() if self.round >= r}

    def _exchange(self, op, vecs, nbytes_per_msg, check=True):
        failed = self.failed()
        if check and failed:
            self._missing(op, sorted(failed))
        got: dict[int, dict[int, Tensor]] = {}
        n_msgs = 0
        for i in vecs:
            got[i] = {j: vecs[j] for j in self.topology.neighbours(i) if j not in failed and j in vecs}
            if i not in failed:
                n_msgs += len(got[i])
        self.meter.add(op, n_msgs * nbytes_per_msg, n_msgs)
        return got


class DistributedNodes(Nodes):
    """One node per torch.distributed rank (torchrun); the process group may already exist."""

    backend = "distributed"

    def __init__(self, n_nodes: int, topology: Topology, round_timeout_s: float = 300.0,
                 on_fault: str = "stop") -> None:
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise UserError("the distributed nodes backend needs one process per node",
                                f"start it with torchrun --nproc-per-node {n_nodes} ... (or use backend=inprocess)")
            use_cuda = torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if use_cuda else "gloo",
                                    timeout=timedelta(seconds=max(round_timeout_s, 30.0)))
        world = dist.get_world_size()
        if world != n_nodes:
            raise UserError(f"n_nodes={n_nodes} but torchrun started {world} processes",
                            f"use --nproc-per-node {n_nodes} (times --nnodes) or set n_nodes={world}")
        rank = dist.get_rank()
        super().__init__(n_nodes, topology, [rank], round_timeout_s, on_fault)
        self.rank = rank
        self.control = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")

    def _check_alive(self, op: str) -> None:
        try:
            self.dist.monitored_barrier(self.control, timeout=timedelta(seconds=self.round_timeout_s),
                                        wait_all_ranks=True)
        except RuntimeError as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            missing = sorted({int(t) for t in _ranks_in(text)} - {self.rank})
            self._missing(op, missing or [-1], text[:200])

    def _sum_over_ranks(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        sizes = [t.numel() for t in tensors]
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(self.device)
        self.dist.all_reduce(flat)
        return tuple(p.to(tensors[0].device) for p in torch.split(flat, sizes))

    def _exchange(self, op, vecs, nbytes_per_msg, check=True):
        if check:
            self._check_alive(op)
        vec = vecs[self.rank].contiguous().to(self.device)
        nbrs = self.topology.neighbours(self.rank)
        bufs = {j: torch.empty_like(vec) for j in nbrs}
        reqs = [self.dist.isend(vec, j) for j in nbrs] + [self.dist.irecv(bufs[j], j) for j in nbrs]
        for r in reqs:
            r.wait()
        n_msgs = int(self.topology.adjacency.sum())  # every directed edge carries one message
        self.meter.add(op, n_msgs * nbytes_per_msg, n_msgs)
        dev = vecs[self.rank].device
        return {self.rank: {j: b.to(dev) for j, b in bufs.items()}}


def _ranks_in(text: str) -> list[str]:
    """Rank numbers mentioned in a monitored_barrier error ("Rank 2 failed to pass ...")."""
    import re

    return re.findall(r"[Rr]anks?\s*[:=]?\s*\[?(\d+)", text)


def make_nodes(backend: str, n_nodes: int, topology: str | Topology = "full", *, round_timeout_s: float = 300.0,
               on_fault: str = "drop", faults: dict[int, int] | None = None) -> Nodes:
    """The nodes object of a run; the CLI calls this for ``--nodes-backend distributed``."""
    if backend not in BACKENDS:
        raise UserError(f"nodes backend {backend!r} is not one of {', '.join(BACKENDS)}",
                        "use inprocess or distributed")
    topo = topology if isinstance(topology, Topology) else Topology.build(topology, n_nodes)
    if topo.n_nodes != n_nodes:
        raise UserError(f"topology has {topo.n_nodes} nodes, n_nodes is {n_nodes}", "make them agree")
    if backend == "inprocess":
        return InProcessNodes(n_nodes, topo, round_timeout_s, on_fault, faults)
    return DistributedNodes(n_nodes, topo, round_timeout_s, on_fault)


# ---------------------------------------------------------------------------------------------
# Helpers for methods: one random stream per node, so both backends draw the same batches
# ---------------------------------------------------------------------------------------------
def node_generator(seed: int, node: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + 7_919 * (node + 1))


@contextlib.contextmanager
def using_generator(ctx: Any, gen: torch.Generator) -> Iterator[None]:
    """Let ``ctx.train_batches`` shuffle with ``gen`` (a node's own stream) inside the block."""
    saved = ctx.generator
    ctx.generator = gen
    try:
        yield
    finally:
        ctx.generator = saved
