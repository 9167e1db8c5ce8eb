"""Non-learned baselines: no teaching, self-paced learning, and small-loss selection."""

from __future__ import annotations

import torch

from agents.base import Teacher
from envs.observation import GLOBAL_FEATURES, SAMPLE_FEATURES

_PROGRESS = [f[0] for f in GLOBAL_FEATURES].index("progress")
_LOSS = [f[0] for f in SAMPLE_FEATURES].index("loss")


def keep_lowest_loss(obs: dict, fraction: torch.Tensor | float) -> torch.Tensor:
    """Weight 1 for the ``fraction`` of the batch with the lowest loss (at least one sample), 0 otherwise."""
    loss = torch.as_tensor(obs["samples"])[:, _LOSS]
    keep = max(1, int(round(float(fraction) * len(loss))))
    weights = torch.zeros_like(loss)
    weights[loss.argsort()[:keep]] = 1.0
    return weights


def _progress(obs: dict) -> float:
    return float(obs["global"][_PROGRESS])


class UniformTeacher(Teacher):
    """No teaching: every sample weighs 1 (plain training)."""

    name = "uniform"

    def act(self, obs: dict) -> torch.Tensor:
        samples = torch.as_tensor(obs["samples"])
        return torch.ones(samples.shape[0], device=samples.device)


class SelfPacedTeacher(Teacher):
    """Self-paced learning (Kumar et al. 2010): train on the easiest samples first, admitting a
    growing fraction, linearly from ``start_fraction`` of each batch to all of it over the episode."""

    name = "spl"

    def __init__(self, start_fraction: float = 0.5):
        if not 0 < start_fraction <= 1:
            raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction}")
        super().__init__(start_fraction=start_fraction)

    def act(self, obs: dict) -> torch.Tensor:
        start = self.config["start_fraction"]
        return keep_lowest_loss(obs, start + (1 - start) * _progress(obs))


class SmallLossTeacher(Teacher):
    """Small-loss selection (as in Co-teaching, Han et al. 2018): drop the ``forget_rate`` highest-loss
    samples of each batch, ramping the rate up linearly over the first ``warmup`` of the episode."""

    name = "small_loss"

    def __init__(self, forget_rate: float = 0.4, warmup: float = 0.1):
        if not 0 <= forget_rate < 1 or not 0 < warmup <= 1:
            raise ValueError(f"need 0 <= forget_rate < 1 and 0 < warmup <= 1, got {forget_rate} and {warmup}")
        super().__init__(forget_rate=forget_rate, warmup=warmup)

    def act(self, obs: dict) -> torch.Tensor:
        ramp = min(1.0, _progress(obs) / self.config["warmup"])
        return keep_lowest_loss(obs, 1.0 - self.config["forget_rate"] * ramp)
