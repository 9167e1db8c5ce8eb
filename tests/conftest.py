"""Shared helpers: tiny env configurations that keep the suite fast on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
import torch

import envs  # noqa: F401  (registers Teaching-v0)

torch.set_num_threads(2)

MNIST_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = dict(
    dataset="digits", student="mlp", student_kwargs={"hidden": [16, 12]}, batch_size=16, horizon=40, eval_every=20, val_size=200
)


def make_env(**overrides) -> gym.Env:
    """A small ``Teaching-v0`` (digits, tiny mlp, batch 16) with ``overrides``."""
    return gym.make("Teaching-v0", **{**TINY, **overrides})


def make_tensor_env(**overrides) -> gym.Env:
    """As ``make_env`` but with tensor observations, for in-process torch teachers."""
    return make_env(tensor_obs=True, disable_env_checker=True, **overrides)


@pytest.fixture
def mnist_root() -> Path:
    """The real MNIST in ../shared/data; tests that need it skip when it is absent."""
    raw = MNIST_ROOT / "MNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found in {raw}")
    return MNIST_ROOT
