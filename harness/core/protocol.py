"""The training protocol shared by every method of a run (epochs, batch size, optimiser, numerics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.core.config import Search, check, documented


@dataclass
class Protocol:
    """Training protocol shared by every method of a run (the paper's 'experimental setup'); each
    field documents its default and source (``dmkd list --protocol``). ``epochs`` is the one training
    budget of docs/methods.md §6, the same for every method."""

    epochs: int = documented(1, "passes over each task's training data (the training budget of every method)",
                             "ours: the single-epoch protocol of GEM/A-GEM (Lopez-Paz & Ranzato 2017; "
                             "Chaudhry et al. 2019); image suites set their own", ge=1)
    batch_size: int = documented(128, "training minibatch size", "ours: a common CL default (Avalanche and "
                                 "FACIL examples use 64-128; Mammoth 32 for its image benchmarks)", ge=1)
    eval_batch_size: int = documented(1024, "evaluation batch size (no effect on the numbers, only on speed)",
                                      "ours (harness option)", ge=1)
    optimizer: str = documented("sgd", "sgd (with momentum) | adam", "ours: SGD as in FACIL, Mammoth and Avalanche",
                                choices=("sgd", "adam"))
    lr: float = documented(0.01, "learning rate (tuned for every method on validation data)",
                           "ours: the start of the search every method gets", gt=0, search=Search.log(1e-3, 1e-1))
    momentum: float = documented(0.9, "SGD momentum", "ours: the usual 0.9 (FACIL uses 0.0 by default)", ge=0, lt=1)
    weight_decay: float = documented(0.0, "L2 weight decay of the optimiser", "FACIL and Avalanche default: 0", ge=0)
    backbone: str | None = documented(None, "network (None: the scenario's default; `dmkd list` names them)",
                                      "each scenario names the backbone of its reference paper")
    reset_optimizer: bool = documented(True, "fresh optimiser state at every task",
                                       "Avalanche and FACIL: a new optimiser per experience / task")
    # Numerics and speed (GPU): autocast dtype of every forward pass (training, teachers, Fisher passes,
    # replay, routing, evaluation); fp16 adds torch.amp's gradient scaler. channels_last: NHWC weights and
    # image batches. compile: torch.compile the model (nn.Module.compile, in place; state dict unchanged).
    precision: str = documented("fp32", "autocast dtype of every forward pass: fp32 | bf16 | fp16 (fp16 adds a "
                                "gradient scaler)", "ours: fp32 is the papers' setting; bf16/fp16 for GPU speed",
                                choices=("fp32", "bf16", "fp16"))
    channels_last: bool = documented(False, "NHWC weights and image batches (convolutional backbones)",
                                     "PyTorch performance guide: faster convolutions on tensor cores")
    compile: bool = documented(False, "torch.compile the model (in place; the state dict is unchanged)",
                               "ours: off by default (compile time)")

    def validate(self) -> None:
        check(self)  # every field against its declaration (also after dataclasses.replace)


# Autocast dtype of each Protocol.precision (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
