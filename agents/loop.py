"""The one teaching loop: act -> env step -> teacher update -> callbacks, over one or more episodes.

Both CLIs, the benchmarks, the soak and the tests drive teachers through ``teach``; what they log or
save is a ``Callback`` (modelled on stable-baselines3's ``BaseCallback``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agents.base import Teacher
from agents.diagnostics import auroc


@dataclass
class TeachingRun:
    """The loop's state, which callbacks read; pass it back to ``teach`` to continue."""

    env: Any
    teacher: Teacher
    obs: Any = None  # the observation the teacher acts on next
    next_info: dict = field(default_factory=dict)  # its info (``corrupted`` of the next batch)
    step: int = 0  # student updates taken, over all episodes
    episode: int = 0
    # the last step, for callbacks
    weights: torch.Tensor | None = None
    corrupted: torch.Tensor | None = None  # which labels of the batch those weights were given to are wrong
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)  # what the teacher's update reported (numbers or 0-d tensors)
    seconds: float = 0.0  # wall time spent in act + env step + teacher update


class Callback:
    """Hooks into ``teach``; ``on_step`` may return False to stop the loop. (The callers own what
    outlives one call of ``teach``, such as a log file or a progress bar, and close it themselves.)"""

    def on_step(self, run: TeachingRun) -> bool | None:
        """After every step (before the env is reset when the episode ended)."""


def start(env: Any, teacher: Teacher, seed: int) -> TeachingRun:
    """A run at the start of a fresh episode (``env.reset(seed=seed)``), with the teacher attached."""
    if teacher.needs_handle:
        teacher.attach(env.unwrapped.handle)
    obs, info = env.reset(seed=seed)
    return TeachingRun(env, teacher, obs, info)


def teach(
    run: TeachingRun,
    steps: int,
    callbacks: Sequence[Callback] = (),
    episode_seed: Callable[[int], int] | None = None,
) -> TeachingRun:
    """Take ``steps`` more student updates. When an episode ends, the next one starts with
    ``reset(seed=episode_seed(episode))``; without ``episode_seed`` the loop stops at the end of
    the episode instead."""
    env, teacher = run.env, run.teacher
    for _ in range(steps):
        tick = time.perf_counter()
        weights = teacher.act(run.obs)
        run.corrupted = run.next_info.get("corrupted")
        run.obs, run.reward, terminated, truncated, run.info = env.step(weights)
        run.done = bool(terminated or truncated)
        run.scalars = teacher.observe(run.reward, run.done, run.info)
        run.seconds += time.perf_counter() - tick
        run.weights, run.next_info = weights, run.info
        run.step += 1
        keep_going = [callback.on_step(run) is not False for callback in callbacks]
        if run.done:
            if episode_seed is None:
                break
            run.episode += 1
            run.obs, run.next_info = env.reset(seed=episode_seed(run.episode))
        if not all(keep_going):
            break
    return run


class WeightStats(Callback):
    """The weights given to clean and to corrupted samples (device tensors until summarised)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.corrupted: list[torch.Tensor] = []

    def on_step(self, run: TeachingRun) -> None:
        self.weights.append(torch.as_tensor(run.weights).detach())
        self.corrupted.append(torch.as_tensor(run.corrupted))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(weights, corrupted) of every sample seen, as numpy arrays."""
        if not self.weights:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        w = torch.cat([t.float().cpu() for t in self.weights]).numpy()
        c = torch.cat([t.cpu() for t in self.corrupted]).numpy().astype(bool)
        return w, c

    def summary(self) -> dict[str, float]:
        """Mean weight of clean and of corrupted samples, and the AUROC of weights for clean labels."""
        w, c = self.arrays()
        nan = float("nan")
        return {
            "weight_clean": float(w[~c].mean()) if (~c).any() else nan,
            "weight_corrupted": float(w[c].mean()) if c.any() else nan,
            "auroc": auroc(w, ~c) if len(w) else nan,
        }

    def clear(self) -> None:
        self.weights.clear()
        self.corrupted.clear()


class TeacherScalars(Callback):
    """The teacher's reported scalars (meta loss, ...) since the last ``flush``, averaged. Tensors are
    kept on their device until ``flush``, so that logging adds no sync to a step."""

    def __init__(self) -> None:
        self.values: dict[str, list[Any]] = {}

    def on_step(self, run: TeachingRun) -> None:
        for key, value in run.scalars.items():
            self.values.setdefault(key, []).append(value.detach() if isinstance(value, torch.Tensor) else value)

    def flush(self) -> dict[str, float]:
        means = {
            key: float(torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in v]).mean()) for key, v in self.values.items()
        }
        self.values = {}
        return means


class Curve(Callback):
    """(step, selection accuracy, test accuracy) at every evaluation of the episode. The selection
    accuracy is ``select_acc`` (the held-out split no method trains on) when the env has one, else
    ``val_acc``."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []

    def on_step(self, run: TeachingRun) -> None:
        info = run.info
        if "val_acc" in info:
            self.points.append((info["step"], info.get("select_acc", info["val_acc"]), info["test_acc"]))
