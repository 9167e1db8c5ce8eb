"""The teaching environment; importing this package registers ``Teaching-v0`` with Gymnasium."""

from gymnasium.envs.registration import register, registry

from envs.teaching import TeachingEnv, Transition

__version__ = "0.1.0"

if "Teaching-v0" not in registry:
    register(id="Teaching-v0", entry_point="envs.teaching:TeachingEnv")

__all__ = ["TeachingEnv", "Transition"]
