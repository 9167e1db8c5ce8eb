"""stable-baselines3 teachers (``ppo``, ``a2c``) on ``Teaching-v0``, through the Gym API only.

The policy applies one small network to every sample's row (its ``samples`` and ``internal``
features and the broadcast ``global`` features), so its size does not grow with the batch size:
the action head maps each row's embedding to that sample's mean weight, and the value head reads
the mean of the row embeddings. Actions are Gaussian around those means, clipped to [0, 1] by SB3.
The trained policy's tensors go into our checkpoint format, so a saved SB3 teacher loads and acts
through ``agents.load_teacher`` like every other teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
from torch import nn

from agents.base import Teacher
from agents.meta_grad import input_size, teacher_inputs
from envs.observation import FEATURE_TABLES, observation_box
from runconfig import field

ALGORITHMS = {"PPO": PPO, "A2C": A2C}


class PerSampleExtractor(BaseFeaturesExtractor):
    """One MLP applied to every sample's row; the (batch x hidden) embeddings, flattened."""

    def __init__(self, observation_space: spaces.Dict, features: str = "all", hidden: int = 32):
        batch = observation_space["samples"].shape[0]
        super().__init__(observation_space, features_dim=batch * hidden)
        self.features = features
        self.rows = nn.Sequential(nn.Linear(input_size(features), hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.rows(teacher_inputs(obs, self.features)).flatten(1)


class PerSampleHead(nn.Module):
    """(n, batch x hidden) row embeddings -> (n, batch) per-sample outputs of one shared linear map."""

    def __init__(self, hidden: int, bias: float):
        super().__init__()
        self.hidden, self.linear = hidden, nn.Linear(hidden, 1)
        nn.init.orthogonal_(self.linear.weight, gain=0.01)
        nn.init.constant_(self.linear.bias, bias)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.linear(latent.view(latent.shape[0], -1, self.hidden)).squeeze(-1)


class PooledValueHead(nn.Module):
    """(n, batch x hidden) row embeddings -> (n, 1) value from their mean (permutation invariant)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden, self.linear = hidden, nn.Linear(hidden, 1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.linear(latent.view(latent.shape[0], -1, self.hidden).mean(1))


class PerSamplePolicy(ActorCriticPolicy):
    """Actor-critic whose networks are shared across the samples of the batch."""

    def __init__(
        self,
        observation_space,
        action_space,
        lr_schedule,
        features: str = "all",
        hidden: int = 32,
        init_weight: float = 0.8,
        **kwargs,
    ):
        self.row_hidden, self.init_weight = hidden, init_weight
        kwargs.update(
            net_arch=[],
            features_extractor_class=PerSampleExtractor,
            features_extractor_kwargs={"features": features, "hidden": hidden},
        )
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self.action_net = PerSampleHead(self.row_hidden, self.init_weight)
        self.value_net = PooledValueHead(self.row_hidden)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)


def teaching_spaces(batch_size: int) -> tuple[spaces.Dict, spaces.Box]:
    """Observation and action spaces of a ``Teaching-v0`` with ``batch_size`` (for rebuilding a policy)."""
    obs = spaces.Dict({k: observation_box(t, None if k == "global" else batch_size) for k, t in FEATURE_TABLES.items()})
    return obs, spaces.Box(0.0, 1.0, (batch_size,), np.float32)


@dataclass
class SB3Options:
    """Options of the stable-baselines3 teachers (``ppo``, ``a2c``)."""

    features: str = field("all", "policy inputs: all = internal + surface, or surface", choices=["all", "surface"])
    hidden: int = field(32, "hidden units of the per-sample policy", low=1)
    teacher_lr: float = field(3e-4, "teacher learning rate (SB3's learning_rate)", above=0.0)
    n_steps: int = field(256, "SB3 rollout length per env before each update", low=1)
    minibatch_size: int = field(64, "ppo: SB3 minibatch size (SB3's batch_size)", low=1)
    n_epochs: int = field(5, "ppo: SB3 optimisation epochs per rollout", low=1)
    gamma: float = field(1.0, "SB3 discount factor", low=0.0, high=1.0)
    log_std_init: float = field(-1.0, "initial log standard deviation of the Gaussian actions")
    seed: int = field(0, "seeds SB3 (policy initialisation, actions, envs)", low=0)


class SB3Teacher(Teacher):
    """A stable-baselines3 on-policy algorithm with the per-sample policy."""

    reads_internal = "features"

    name = "sb3"
    kind = "episodic"
    Options = SB3Options
    needs_batch_size = True  # the policy's action and value heads are tied to the batch it was built for
    algorithm = "PPO"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.model: Any = None
        self.policy: PerSamplePolicy | None = None

    def _algorithm_kwargs(self) -> dict[str, Any]:
        o = self.options
        kwargs = dict(learning_rate=o.teacher_lr, n_steps=o.n_steps, gamma=o.gamma, seed=o.seed)
        if self.algorithm == "PPO":
            kwargs.update(batch_size=o.minibatch_size, n_epochs=o.n_epochs)
        return kwargs

    def _policy_kwargs(self) -> dict[str, Any]:
        return {"features": self.options.features, "hidden": self.options.hidden, "log_std_init": self.options.log_std_init}

    def learn(
        self, make_env: Callable[[], gym.Env], total_timesteps: int, n_envs: int = 1, tensorboard_log: str | None = None,
        callback: BaseCallback | None = None,
    ) -> None:  # fmt: skip
        """Train with SB3 on ``n_envs`` envs (subprocesses when > 1), continuing a loaded policy."""
        vec_cls = SubprocVecEnv if n_envs > 1 else DummyVecEnv
        vec = make_vec_env(make_env, n_envs=n_envs, seed=self.options.seed, vec_env_cls=vec_cls)
        cls = ALGORITHMS[self.algorithm]
        self.model = cls(
            PerSamplePolicy,
            vec,
            policy_kwargs=self._policy_kwargs(),
            tensorboard_log=tensorboard_log,
            verbose=0,
            **self._algorithm_kwargs(),
        )
        if self.policy is not None:  # resume: continue from the loaded weights
            self.model.policy.load_state_dict(self.policy.state_dict())
        self.policy = self.model.policy
        try:
            self.model.learn(total_timesteps=total_timesteps, callback=callback, tb_log_name=self.name, reset_num_timesteps=True)
        finally:
            vec.close()

    def train_episodes(
        self, make_env: Callable[[], gym.Env], steps: int, done_steps: int, n_envs: int,
        report: Callable[[int, dict[str, Any]], None], log_dir: str | None = None,
    ) -> None:  # fmt: skip
        """SB3's ``learn`` for the remaining updates, reporting every finished episode."""
        self.learn(
            make_env, max(0, steps - done_steps), n_envs, tensorboard_log=log_dir, callback=ProgressCallback(report, done_steps)
        )

    def act(self, obs: dict) -> torch.Tensor:
        if self.policy is None:
            raise RuntimeError(f"{self.name} teacher has no policy yet: train it (learn) or load a checkpoint")
        numpy_obs = {k: torch.as_tensor(v).detach().cpu().numpy() for k, v in obs.items()}
        action, _ = self.policy.predict(numpy_obs, deterministic=True)
        return torch.as_tensor(np.clip(action, 0.0, 1.0), dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        if self.policy is None:
            return {}
        return {"policy": self.policy.state_dict(), "optimizer": self.policy.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.trained_on is None:
            raise ValueError("an SB3 teacher's checkpoint needs its observation spec (batch size) to rebuild the policy")
        obs_space, action_space = teaching_spaces(self.trained_on["batch_size"])
        self.policy = PerSamplePolicy(obs_space, action_space, lambda _: self.options.teacher_lr, **self._policy_kwargs())
        self.policy.load_state_dict(state["policy"])
        self.policy.optimizer.load_state_dict(state["optimizer"])
        self.policy.set_training_mode(False)


class ProgressCallback(BaseCallback):
    """Reports each finished student episode (return, final accuracies) to ``report(step, record)``."""

    def __init__(self, report: Callable[[int, dict[str, Any]], None], offset: int = 0):
        super().__init__()
        self.report, self.offset, self.episodes, self.returns = report, offset, 0, None

    def _on_step(self) -> bool:
        rewards, dones, infos = self.locals["rewards"], self.locals["dones"], self.locals["infos"]
        self.returns = np.zeros(len(rewards)) if self.returns is None else self.returns
        self.returns += rewards
        for i in np.flatnonzero(dones):
            self.episodes += 1
            record = {"teacher/return": float(self.returns[i]), "episode": self.episodes}
            record.update({f"student/{k}": infos[i][k] for k in ("val_acc", "test_acc") if k in infos[i]})
            self.report(self.offset + self.num_timesteps, record)
            self.returns[i] = 0.0
        return True


class PPOTeacher(SB3Teacher):
    """Proximal Policy Optimisation (Schulman et al. 2017) via stable-baselines3."""

    name = "ppo"
    algorithm = "PPO"


class A2CTeacher(SB3Teacher):
    """Advantage actor-critic via stable-baselines3."""

    name = "a2c"
    algorithm = "A2C"
