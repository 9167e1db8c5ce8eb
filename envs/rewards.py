"""Reward functions of ``Teaching-v0``. Each sees the validation accuracy at every evaluation and
returns ``(reward, done)``; the env evaluates at the final step of every episode.

- ``threshold`` (L2T, Fan et al. 2018): -log(tau / T) at the first evaluation where validation
  accuracy reaches the threshold (tau: updates taken, T: the horizon); the episode then ends.
  An episode that never reaches it earns 0.
- ``accuracy``: the validation accuracy at the end of the episode, 0 before.
- ``delta``: the gain in validation accuracy since the previous evaluation (dense; sums to the
  final accuracy minus chance, 1/K).
"""

from __future__ import annotations

import math

from students.data import check_name

REWARDS = ("threshold", "accuracy", "delta")


class Reward:
    """Base class: ``reset`` at episode start, ``on_eval`` after each validation."""

    def __init__(self, horizon: int, num_classes: int, threshold: float):
        self.horizon, self.num_classes, self.threshold = horizon, num_classes, threshold

    def reset(self) -> None:
        pass

    def on_eval(self, step: int, val_acc: float, final: bool) -> tuple[float, bool]:
        raise NotImplementedError


class ThresholdReward(Reward):
    def on_eval(self, step: int, val_acc: float, final: bool) -> tuple[float, bool]:
        if val_acc >= self.threshold:
            return -math.log(step / self.horizon), True
        return 0.0, False


class AccuracyReward(Reward):
    def on_eval(self, step: int, val_acc: float, final: bool) -> tuple[float, bool]:
        return (val_acc if final else 0.0), False


class DeltaReward(Reward):
    def reset(self) -> None:
        self.previous = 1.0 / self.num_classes

    def on_eval(self, step: int, val_acc: float, final: bool) -> tuple[float, bool]:
        gain, self.previous = val_acc - self.previous, val_acc
        return gain, False


def make_reward(name: str, horizon: int, num_classes: int, threshold: float) -> Reward:
    """The reward function ``name`` for episodes of ``horizon`` updates."""
    check_name("reward", name, REWARDS)
    cls = {"threshold": ThresholdReward, "accuracy": AccuracyReward, "delta": DeltaReward}[name]
    return cls(horizon, num_classes, threshold)
