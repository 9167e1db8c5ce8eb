"""L2T's policy-gradient teacher (Fan et al., ICLR 2018), on ``Teaching-v0`` through the Gym API only.

One small policy network is shared by all samples: it reads a sample's row (its ``samples`` and
``internal`` features and the broadcast ``global`` features; ``features="surface"`` drops the
internal ones, as in the original L2T state) and gives a keep probability. Actions are Bernoulli
keep (weight 1) / drop (weight 0). After each round of ``n_envs`` student episodes (run in parallel
processes when ``n_envs > 1``), the policy takes one REINFORCE step,

    grad J ~ mean over episodes of (G - b) * sum_t grad log pi(a_t | s_t),

with G the episode's return and b a baseline. With ``paired`` (default) the episodes of a round
teach identical students (same initialisation and batch order), so their returns differ only by the
teacher's actions, and each episode's baseline is the mean return of the others (leave-one-out):
common random numbers, which cuts the variance that student-to-student luck otherwise adds. Without
it, or with one env, b is a moving average of past returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from agents.base import Teacher, as_tensor_obs
from agents.meta_grad import input_size, teacher_inputs
from runconfig import field

SURFACE_FEATURES = ("all", "surface")


class KeepPolicy(nn.Module):
    """Per-sample MLP -> keep logit (one hidden layer, as L2T)."""

    def __init__(self, in_dim: int, hidden: int, init_keep: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, float(torch.logit(torch.tensor(init_keep))))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows).squeeze(-1)


def reinforce_loss(log_probs: torch.Tensor, returns: torch.Tensor, baseline: torch.Tensor | float) -> torch.Tensor:
    """Surrogate whose gradient is the REINFORCE estimate of -grad J.

    :param log_probs: (episodes,) sum over each episode's steps and samples of log pi(a | s).
    :param returns: (episodes,) each episode's return G.
    :param baseline: b, one value or one per episode (independent of that episode's actions).
    """
    return -((returns - baseline) * log_probs).mean()


def bernoulli_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a) of independent keep/drop decisions, summed over the last dimension."""
    return -nn.functional.binary_cross_entropy_with_logits(logits, actions, reduction="none").sum(-1)


@dataclass
class ReinforceOptions:
    """Options of the L2T policy-gradient teacher (``reinforce``)."""

    features: str = field("all", "policy inputs: all = internal + surface, or surface", choices=list(SURFACE_FEATURES))
    hidden: int = field(32, "hidden units of the policy", low=1)
    teacher_lr: float = field(1e-2, "teacher learning rate (Adam)", above=0.0)
    baseline_momentum: float = field(0.9, "momentum of the moving-average baseline", low=0.0, below=1.0)
    init_keep: float = field(0.9, "initial keep probability of every sample", above=0.0, below=1.0)
    paired: bool = field(True, "the episodes of a round teach identical students (leave-one-out baseline)")
    seed: int = field(0, "seeds the policy's initialisation and its action draws", low=0)


class ReinforceTeacher(Teacher):
    """L2T: Bernoulli keep/drop per sample from a shared policy, trained by REINFORCE with a baseline."""

    reads_internal = "features"

    name = "reinforce"
    kind = "episodic"
    Options = ReinforceOptions

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o.seed)
            self.policy = KeepPolicy(input_size(o.features), o.hidden, o.init_keep)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=o.teacher_lr)
        self.baseline: float | None = None
        self.rounds = 0
        self.generator = torch.Generator().manual_seed(o.seed + 1)
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> ReinforceTeacher:
        self.device = torch.device(device)
        self.policy.to(self.device)
        return self

    def logits(self, obs: dict) -> torch.Tensor:
        """Keep logits, shape (..., batch_size), for one observation or a stack of them."""
        return self.policy(teacher_inputs(as_tensor_obs(obs, self.device), self.options.features))

    def act(self, obs: dict) -> torch.Tensor:
        """Frozen teacher: the policy's mean action, each sample's keep probability, as its weight
        (under the env's weighted mean this is the expected update of sampled keep/drop decisions)."""
        with torch.no_grad():
            return torch.sigmoid(self.logits(obs))

    def sample(self, obs: dict) -> torch.Tensor:
        """Training-time actions: Bernoulli draws from the policy (seeded generator)."""
        with torch.no_grad():
            probs = torch.sigmoid(self.logits(obs)).cpu()
        return torch.bernoulli(probs, generator=self.generator)

    # ------------------------------------------------------------------ learning
    def learn(
        self, make_env: Callable[[], gym.Env], rounds: int, n_envs: int = 1, seed: int = 0, callback: Callable | None = None,
        processes: bool = True,
    ) -> None:  # fmt: skip
        """Train for ``rounds`` REINFORCE updates, each over ``n_envs`` fresh student episodes.

        :param make_env: builds one ``Teaching-v0`` (called in each worker process when ``n_envs > 1``).
        :param processes: run the ``n_envs`` episodes in parallel worker processes (else one after another).
        :param callback: called after every round with ``(round, stats)``; returning False stops.
        """
        if n_envs > 1 and processes:  # forkserver: forking a process whose torch thread pools are running can deadlock
            envs = gym.vector.AsyncVectorEnv([make_env] * n_envs, context="forkserver")
        else:
            envs = gym.vector.SyncVectorEnv([make_env] * n_envs)
        try:
            while self.rounds < rounds:
                stats = self.learn_round(envs, seed + self.rounds * n_envs)
                self.rounds += 1
                if callback is not None and callback(self.rounds, stats) is False:
                    break
        finally:
            envs.close()

    def train_episodes(
        self, make_env: Callable[[], gym.Env], steps: int, done_steps: int, n_envs: int,
        report: Callable[[int, dict[str, Any]], None], log_dir: str | None = None,
    ) -> None:  # fmt: skip
        """Rounds of ``n_envs`` episodes until the student updates actually taken reach ``steps``
        (episodes that reach the threshold end early, so rounds differ in length)."""
        taken = [done_steps]

        def after_round(rounds: int, stats: dict[str, Any]) -> bool:
            taken[0] += int(round(stats["episode_steps"] * n_envs))
            record = {f"teacher/{k}": v for k, v in stats.items() if k not in ("val_acc", "test_acc")}
            record.update({f"student/{k}": stats[k] for k in ("val_acc", "test_acc") if k in stats})
            report(min(taken[0], steps), {**record, "episode": rounds * n_envs})
            return taken[0] < steps

        # every round takes at least one update per env, so ``steps`` rounds is an upper bound
        self.learn(make_env, rounds=steps, n_envs=n_envs, seed=self.options.seed, callback=after_round)

    def seeds_met(self, first_seed: int, n_envs: int) -> list[int]:
        """Round r resets its episodes with ``first_seed + r * n_envs`` (+ i when unpaired)."""
        return [first_seed, first_seed + max(self.rounds, 1) * n_envs - 1]

    def learn_round(self, envs: gym.vector.VectorEnv, seed: int) -> dict[str, Any]:
        """Run one episode in every env of ``envs``, then take one REINFORCE step."""
        n = envs.num_envs
        obs, infos = envs.reset(seed=[seed if self.options.paired else seed + i for i in range(n)])
        trajectories: list[list[tuple[dict, torch.Tensor]]] = [[] for _ in range(n)]
        returns, active = np.zeros(n), np.ones(n, bool)
        finals: list[dict] = [{} for _ in range(n)]
        steps_to_end = np.zeros(n, int)
        while active.any():
            actions = self.sample(obs)
            for i in np.flatnonzero(active):
                trajectories[i].append(({k: np.array(v[i]) for k, v in obs.items()}, actions[i]))
            obs, rewards, terminated, truncated, infos = envs.step(actions.numpy())
            returns += np.where(active, rewards, 0.0)
            for i in np.flatnonzero(active & (terminated | truncated)):
                active[i] = False
                steps_to_end[i] = len(trajectories[i])
                finals[i] = {k: float(infos[k][i]) for k in ("val_acc", "test_acc") if k in infos and infos[f"_{k}"][i]}
        log_probs = torch.stack([self._episode_log_prob(t) for t in trajectories])
        returns_t = torch.as_tensor(returns, dtype=torch.float32, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        reinforce_loss(log_probs, returns_t, self._baselines(returns)).backward()
        self.optimizer.step()
        beta = self.options.baseline_momentum
        self.baseline = (
            float(returns.mean()) if self.baseline is None else self.baseline * beta + (1 - beta) * float(returns.mean())
        )
        keep = float(np.mean([a.mean().item() for t in trajectories for _, a in t]))
        return {
            "return": float(returns.mean()), "baseline": self.baseline, "keep_fraction": keep,
            "episode_steps": float(steps_to_end.mean()),
            **{k: float(np.mean([f[k] for f in finals if k in f])) for k in ("val_acc", "test_acc") if any(k in f for f in finals)},
        }  # fmt: skip

    def _baselines(self, returns: np.ndarray) -> torch.Tensor:
        """Per-episode baselines: with paired episodes, the mean return of the round's other episodes
        (same student, other actions); otherwise the moving average of past returns."""
        n = len(returns)
        if self.options.paired and n > 1:
            values = (returns.sum() - returns) / (n - 1)
        else:
            values = np.full(n, returns.mean() if self.baseline is None else self.baseline)
        return torch.as_tensor(values, dtype=torch.float32, device=self.device)

    def _episode_log_prob(self, trajectory: list[tuple[dict, torch.Tensor]]) -> torch.Tensor:
        """sum_t log pi(a_t | s_t) for one episode, from one batched forward over its steps."""
        stacked = {k: np.stack([o[k] for o, _ in trajectory]) for k in trajectory[0][0]}
        actions = torch.stack([a for _, a in trajectory]).to(self.device)
        return bernoulli_log_prob(self.logits(stacked), actions).sum()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline, "rounds": self.rounds, "generator": self.generator.get_state(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.baseline, self.rounds = state["baseline"], state["rounds"]
            self.generator.set_state(state["generator"])
