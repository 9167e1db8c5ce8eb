"""The student as pure functions of its parameters: forward, per-sample losses, and the exact
momentum-SGD update the environment applies.

The env's real step and a meta-gradient teacher's differentiable replay call the same functions,
so the teacher differentiates through precisely the updates the student received.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from students.models import Hidden

Params = dict[str, torch.Tensor]

LR_SCHEDULES = ("constant", "cosine", "step")
WEIGHT_SUM_EPS = 1e-8


@dataclass(frozen=True)
class SGDConfig:
    """Momentum SGD with L2 weight decay, as ``torch.optim.SGD`` (dampening 0, no Nesterov)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"  # constant | cosine (to 0 over the horizon) | step (x0.1 at 50% and 75%)

    def lr_at(self, step: int, horizon: int) -> float:
        """Learning rate for update number ``step`` (0-based) of an episode of ``horizon`` updates."""
        if self.schedule == "cosine":
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * step / horizon))
        if self.schedule == "step":
            return self.lr * (0.1 ** ((step >= 0.5 * horizon) + (step >= 0.75 * horizon)))
        return self.lr


def sgd_update(params: Params, momentum_buffers: Params, grads: Params, lr: float, cfg: SGDConfig) -> tuple[Params, Params]:
    """One momentum-SGD step as pure function: returns new ``(params, momentum_buffers)``.

    Matches ``torch.optim.SGD`` operation by operation: d = g + wd p; b = mu b + d; p = p - lr b
    (with b starting at zero, the first step's b is d, as in PyTorch). Differentiable in every input.
    """
    new_params, new_buffers = {}, {}
    for name, p in params.items():
        d = torch.add(grads[name], p, alpha=cfg.weight_decay) if cfg.weight_decay else grads[name]
        b = momentum_buffers[name] * cfg.momentum + d if cfg.momentum else d
        new_params[name] = torch.add(p, b, alpha=-lr)
        new_buffers[name] = b
    return new_params, new_buffers


def parameter_layers(params: Params) -> list[list[str]]:
    """The student's layers with parameters, as lists of parameter names grouped by the module that
    owns them, in registration order (the forward order of the built-in students)."""
    layers: dict[str, list[str]] = {}
    for name in params:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    return list(layers.values())


class FunctionalStudent:
    """A student module used functionally: parameters and buffers live outside the module."""

    def __init__(self, model: nn.Module):
        self.model = model

    def initial_state(self) -> tuple[Params, Params]:
        """Detached copies of the module's initial ``(params, buffers)``."""
        params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        return params, buffers

    def forward(self, params: Params, buffers: Params, x: torch.Tensor, train: bool = True) -> tuple[torch.Tensor, Hidden]:
        """Logits and hidden states. In train mode BatchNorm updates ``buffers`` in place."""
        self.model.train(train)
        return functional_call(self.model, (params, buffers), (x,))

    def per_sample_losses(self, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each sample, in train mode, leaving ``buffers`` untouched (works on copies)."""
        scratch = {n: b.clone() for n, b in buffers.items()}
        logits, _ = self.forward(params, scratch, x, train=True)
        return F.cross_entropy(logits, y, reduction="none")

    @staticmethod
    def weighted_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The training objective of a weighted step, the weighted mean sum_i w_i l_i / sum_i w_i.

        Equal weights of any size (summing to at least ``WEIGHT_SUM_EPS``) give the plain mean, so a teacher
        redistributes the step over the batch but cannot change its size (that is the learning rate's job).
        Weights summing below it shrink the step with their sum, and all-zero weights give a zero loss:
        the update then applies momentum and weight decay only.
        """
        return (weights * losses).sum() / weights.sum().clamp(min=WEIGHT_SUM_EPS)
