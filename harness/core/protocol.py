"""The training protocol shared by every method of a run (epochs, batch size, optimiser, numerics)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.core.errors import UserError


@dataclass
class Protocol:
    """Training protocol shared by every method of a run (the paper's 'experimental setup')."""

    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int = 1024
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    backbone: str | None = None  # None: the scenario's default
    reset_optimizer: bool = True  # fresh optimiser state at every task (Avalanche/FACIL default)
    # Numerics and speed (GPU): autocast dtype of every forward pass (training, teachers, Fisher passes,
    # replay, routing, evaluation); fp16 adds torch.amp's gradient scaler. channels_last: NHWC weights and
    # image batches. compile: torch.compile the model (nn.Module.compile, in place; state dict unchanged).
    precision: str = "fp32"  # fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserError(f"epochs must be >= 1, got {self.epochs}", "pass --epochs 1 or more")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}", "use a positive batch size")
        if self.eval_batch_size < 1:
            raise UserError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}",
                            "use a positive evaluation batch size, e.g. eval_batch_size=1024")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"lr must be a positive number, got {self.lr}", "set lr=0.01 for example")
        for name in ("momentum", "weight_decay"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UserError(f"{name} must be a finite number >= 0, got {v}", f"set e.g. {name}=0")
        if self.momentum >= 1:
            raise UserError(f"momentum must be < 1, got {self.momentum}", "use e.g. momentum=0.9")
        if self.optimizer not in ("sgd", "adam"):
            raise UserError(f"unknown optimizer {self.optimizer!r}", "use sgd or adam")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}", f"use one of: {', '.join(PRECISIONS)}")


# Autocast dtype of each Protocol.precision (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
