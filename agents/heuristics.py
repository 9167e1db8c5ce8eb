"""Non-learned baselines: no teaching, self-paced learning, small-loss selection, and the ``oracle``
reference (it reads the corruption mask, so it is a ceiling, never a teacher)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.base import Teacher
from envs.observation import GLOBAL_FEATURES, SAMPLE_FEATURES
from runconfig import field

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

    reads_internal = False

    name = "uniform"

    def act(self, obs: dict) -> torch.Tensor:
        samples = torch.as_tensor(obs["samples"])
        return torch.ones(samples.shape[0], device=samples.device)


@dataclass
class SelfPacedOptions:
    start_fraction: float = field(0.5, "fraction of each batch admitted at the start", above=0.0, high=1.0)


class SelfPacedTeacher(Teacher):
    """Self-paced learning (Kumar et al. 2010): train on the easiest samples first, admitting a
    growing fraction, linearly from ``start_fraction`` of each batch to all of it over the episode."""

    reads_internal = False  # the loss alone

    name = "spl"
    Options = SelfPacedOptions

    def act(self, obs: dict) -> torch.Tensor:
        start = self.options.start_fraction
        return keep_lowest_loss(obs, start + (1 - start) * _progress(obs))


@dataclass
class SmallLossOptions:
    forget_rate: float = field(0.4, "fraction of the highest-loss samples dropped after warm-up", low=0.0, below=1.0)
    warmup: float = field(0.1, "fraction of the episode over which the forget rate ramps up", above=0.0, high=1.0)


class SmallLossTeacher(Teacher):
    """Small-loss selection (as in Co-teaching, Han et al. 2018): drop the ``forget_rate`` highest-loss
    samples of each batch, ramping the rate up linearly over the first ``warmup`` of the episode."""

    reads_internal = False  # the loss alone

    name = "small_loss"
    Options = SmallLossOptions

    def act(self, obs: dict) -> torch.Tensor:
        ramp = min(1.0, _progress(obs) / self.options.warmup)
        return keep_lowest_loss(obs, 1.0 - self.options.forget_rate * ramp)


class OracleReference(Teacher):
    """Not a teacher: weight 1 for every sample whose given label is correct, 0 for a corrupted one,
    read from the env's diagnostic corruption mask. It shows the headroom of a setting (what perfect
    separation of clean from corrupted labels buys); reports label it, by its name, as a reference."""

    name = "oracle"
    needs_handle = True
    reads_internal = False

    def act(self, obs: dict) -> torch.Tensor:
        if self.handle is None:
            raise RuntimeError("oracle reads the corruption mask: call teacher.attach(env.unwrapped.handle) first")
        return (~self.handle.corrupted_in_batch()).float()
