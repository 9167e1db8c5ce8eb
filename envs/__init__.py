"""The teaching environment; importing this package registers ``Teaching-v0`` with Gymnasium."""

import functools

import gymnasium as gym
from gymnasium.envs.registration import register, registry

from envs.teaching import TeachingEnv

__version__ = "0.1.0"

if "Teaching-v0" not in registry:
    register(id="Teaching-v0", entry_point="envs.teaching:TeachingEnv")


def env_factory(**kwargs) -> functools.partial:
    """A picklable zero-argument constructor of ``Teaching-v0`` with ``kwargs``, for vector envs and
    worker processes (the ``envs:`` prefix makes a fresh process import and register this package)."""
    return functools.partial(gym.make, "envs:Teaching-v0", **kwargs)


__all__ = ["TeachingEnv", "env_factory"]
