"""ER: experience replay with a reservoir-sampled buffer (Chaudhry et al. 2019), docs/methods.md §3.

Reservoir sampling (Vitter 1985): the n-th stream sample (0-based) goes to slot n while n < M;
otherwise r ~ U{0..n} is drawn and it replaces slot r if r < M. A whole batch is inserted at once
with the same result as inserting its samples one by one (later samples win a contested slot).
Each step trains on the stream batch concatenated with an equally sized batch drawn without
replacement from the buffer (Mammoth's ER). The buffer lives on the training device and holds
inputs after the task's transform (permutation/rotation), as the model saw them. Where the data set
stores uint8 images and the transform keeps pixel values (none, a permutation), a sample is stored
as its uint8 image (1 byte per pixel, as the papers count exemplars) and decoded bit-identically when
replayed; otherwise (a rotation interpolates, CIFAR's augmented crops) as the float input.

Cost against FT (bench/method_cost.py): about 2x FT's per stream sample from the second task on,
by the algorithm: every step trains on twice the samples (stream plus replay); measured 0.44-0.57 of
FT's samples/s on the quick suite's scenarios, which includes the buffer's sampling and insertion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from harness.core.data import SampleCodec, Task
from harness.core.defaults import documented
from harness.core.memory import check_allocation, sample_bytes, stream_samples
from harness.core.method import HParams, Method, register, tensor_bytes


@dataclass
class ERParams(HParams):
    """ER options; each field documents its default and source (``dmkd list --method er``).
    The learning rate is the protocol's (tuned like every method's: the base search space)."""

    buffer_size: int = documented(500, "M, examples stored in the reservoir (a reported hyperparameter)",
                                  "Buzzega et al. 2020 (Mammoth): buffer sizes 200 / 500 / 5120; 500 the middle one",
                                  ge=1, role="buffer_size")
    replay_batch: int = documented(0, "buffer samples per step (0 = the stream batch size)",
                                   "Mammoth's ER: minibatch_size defaults to batch_size", ge=0)


class ReservoirBuffer:
    """Fixed-size reservoir of (x, y) on one device; insertion is vectorised per batch.

    ``capacity`` (default ``size``) is what is allocated: a reservoir of M slots fed N <= M samples
    holds them at slots 0..N-1 and never draws a slot >= N, so a stream of N samples needs only
    min(M, N) slots, with the same contents, draws and numbers as M."""

    def __init__(self, size: int, device: torch.device, generator: torch.Generator,
                 capacity: int | None = None) -> None:
        self.size = size
        self.capacity = size if capacity is None else min(size, capacity)
        self.device = device
        self.generator = generator  # CPU generator: reproducible draws on any device
        self.n_seen = 0
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.codec: SampleCodec | None = None  # stored format of x (None: the float inputs themselves)

    def use_codec(self, codec: SampleCodec | None) -> None:
        """Store samples through ``codec`` (chosen before the first insert; every task must share it)."""
        if self.x is None:
            self.codec = codec
            return
        if self.codec is None and codec is not None and self.x.dtype == codec.dtype:
            self.codec = codec  # a buffer restored from a checkpoint: its samples were stored encoded
        if (codec is None) != (self.codec is None) or (codec is not None and codec.source is not self.codec.source):
            raise RuntimeError("ER: a later task's inputs need another stored format than the buffer's")

    @property
    def filled(self) -> int:
        return min(self.n_seen, self.size)

    def slots_for(self, batch: int) -> Tensor:
        """Target slot of each of the next ``batch`` stream samples (−1: not stored)."""
        pos = torch.arange(self.n_seen, self.n_seen + batch)
        draw = (torch.rand(batch, generator=self.generator, dtype=torch.float64) * (pos + 1)).long()
        return torch.where(pos < self.size, pos, torch.where(draw < self.size, draw, -1))

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor) -> None:
        if self.codec is not None:
            stored = self.codec.encode(x)
            if self.x is None and not torch.equal(self.codec.decode(stored), x):
                raise RuntimeError("ER: the task's inputs are not exactly representable in the source's format")
            x = stored
        if self.x is None:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype, device=self.device)
            self.y = torch.zeros(self.capacity, dtype=y.dtype, device=self.device)
        slots = self.slots_for(len(y))
        self.n_seen += len(y)
        keep = slots >= 0
        slots, src = slots[keep], torch.nonzero(keep).flatten()
        if len(slots) == 0:
            return
        # Last writer wins, as in sequential insertion: the highest source index per slot.
        if int(slots.max()) >= self.capacity:
            raise RuntimeError(f"reservoir slot beyond its {self.capacity} allocated slots: the stream is longer "
                               "than the capacity it was given")
        winner = torch.full((self.capacity,), -1, dtype=torch.long)
        winner.scatter_reduce_(0, slots, src, reduce="amax")
        dest = torch.nonzero(winner >= 0).flatten()
        src = winner[dest]
        dest, src = dest.to(self.device), src.to(x.device)
        assert self.y is not None
        self.x.index_copy_(0, dest, x.detach().index_select(0, src).to(self.device))
        self.y.index_copy_(0, dest, y.index_select(0, src).to(self.device))

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        assert self.x is not None and self.y is not None
        idx = torch.randperm(self.filled, generator=self.generator)[: min(n, self.filled)].to(self.device)
        x = self.x.index_select(0, idx)
        return (self.codec.decode(x) if self.codec is not None else x), self.y.index_select(0, idx)

    def state(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "n_seen": self.n_seen}

    def load(self, st: dict[str, Any]) -> None:
        self.x = None if st.get("x") is None else st["x"].to(self.device)
        self.y = None if st.get("y") is None else st["y"].to(self.device)
        self.n_seen = int(st.get("n_seen", 0))


@register
class ER(Method):
    NAME = "er"
    HParams = ERParams
    STATE_KINDS = {"buffer": "replay"}
    DESCRIPTION = "Experience replay: reservoir buffer, stream batch + equal buffer batch"

    def __init__(self, hp: ERParams, ctx) -> None:
        super().__init__(hp, ctx)
        gen = torch.Generator().manual_seed(ctx.seed + 2_147_483)
        stream = stream_samples(ctx.scenario)  # a buffer never holds more than the stream's samples
        slots = min(hp.buffer_size, stream)
        check_allocation(f"er's replay buffer (buffer_size={hp.buffer_size}: {slots:,} slots)",
                         slots * sample_bytes(ctx.scenario), ctx.device,
                         "lower buffer_size (Mammoth uses 200 / 500 / 5120)")
        self.buffer = ReservoirBuffer(hp.buffer_size, ctx.device, gen, capacity=stream)

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.buffer.use_codec(task.codec())
        stored = "float" if self.buffer.codec is None else "uint8"
        self.ctx.artifacts.setdefault("er", {})["stored_as"] = stored

    def training_loss(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        if self.buffer.filled > 0:
            bx, by = self.buffer.sample(self.hp.replay_batch or len(y))
            x, y = torch.cat([x, bx]), torch.cat([y, by])
        return nn.functional.cross_entropy(self.model(x), y)

    def after_step(self, x: Tensor, y: Tensor, task: Task) -> None:
        self.buffer.add(x, y)

    def state_bytes(self) -> int:
        return tensor_bytes(self.buffer.x, self.buffer.y)

    def extra_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state(), "rng": self.buffer.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "buffer" in state:
            self.buffer.load(state["buffer"])
        if "rng" in state:
            self.buffer.generator.set_state(state["rng"])

