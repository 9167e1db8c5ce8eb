"""Policy-gradient teachers: the REINFORCE estimator, learning progress, and PPO through our interface."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import train_teacher
from agents import load_teacher, make_agent
from agents.loop import start, teach
from agents.reinforce import bernoulli_log_prob, reinforce_loss
from envs import env_factory
from tests.conftest import TINY, make_env, make_tensor_env


def test_reinforce_estimator_equals_the_exact_policy_gradient():
    """Two samples, one step: every keep/drop action can be enumerated. The expectation of the
    estimator (G - b) grad log pi(a) over a ~ pi equals grad sum_a pi(a) R(a) for any baseline."""
    torch.manual_seed(0)
    teacher = make_agent("reinforce", hidden=4, init_keep=0.6)
    obs = {"samples": torch.randn(2, 7), "internal": torch.randn(2, 10), "global": torch.rand(8)}
    rewards = {(0, 0): 0.1, (0, 1): 0.7, (1, 0): -0.3, (1, 1): 1.0}
    params = list(teacher.policy.parameters())

    def log_prob(action) -> torch.Tensor:
        return bernoulli_log_prob(teacher.logits(obs), torch.tensor(action, dtype=torch.float32))

    exact_objective = sum(log_prob(a).exp() * r for a, r in rewards.items())
    exact = torch.autograd.grad(exact_objective, params)
    for baseline in (0.0, 0.5):
        expected = 0
        for action in itertools.product((0, 1), repeat=2):
            probability = log_prob(action).exp().detach()
            surrogate = reinforce_loss(log_prob(action)[None], torch.tensor([rewards[action]]), baseline)
            expected = expected + probability * surrogate  # E over a ~ pi of the surrogate
        estimate = torch.autograd.grad(expected, params)
        for e, g in zip(estimate, exact):
            torch.testing.assert_close(-e, g, rtol=1e-5, atol=1e-7)


def test_sampled_actions_follow_the_policy_and_are_seeded():
    teacher = make_agent("reinforce", init_keep=0.25, seed=3)
    obs = {
        "samples": np.zeros((4000, 7), np.float32),
        "internal": np.zeros((4000, 10), np.float32),
        "global": np.zeros(8, np.float32),
    }
    draws = teacher.sample(obs)
    assert set(draws.unique().tolist()) <= {0.0, 1.0} and abs(draws.mean().item() - 0.25) < 0.03
    assert torch.equal(draws, make_agent("reinforce", init_keep=0.25, seed=3).sample(obs))


@pytest.mark.slow
def test_reinforce_learns_to_raise_its_episode_reward():
    """Clean labels and a policy that starts by dropping 90% of every batch: keeping more is better,
    and the mean return of the last rounds must clearly exceed that of the first ones."""
    make = env_factory(**{**TINY, "noise": "none", "lr": 0.05, "horizon": 30, "eval_every": 30, "reward": "accuracy"})
    teacher = make_agent("reinforce", init_keep=0.1, teacher_lr=5e-2, seed=0)
    returns, keep = [], []

    def record(rounds, stats):
        returns.append(stats["return"])
        keep.append(stats["keep_fraction"])

    teacher.learn(make, rounds=30, n_envs=4, seed=0, processes=False, callback=record)
    first, last = np.mean(returns[:8]), np.mean(returns[-8:])
    assert last > first + 0.03, f"return went from {first:.3f} to {last:.3f}"
    assert keep[-1] > 0.9, f"keep fraction ended at {keep[-1]:.2f}"


def test_parallel_processes_give_the_same_round_as_one_process():
    make = env_factory(**{**TINY, "horizon": 6, "eval_every": 3})
    a, b = make_agent("reinforce", seed=1), make_agent("reinforce", seed=1)
    stats = []
    a.learn(make, rounds=1, n_envs=2, seed=5, processes=True, callback=lambda r, s: stats.append(s))
    b.learn(make, rounds=1, n_envs=2, seed=5, processes=False, callback=lambda r, s: stats.append(s))
    assert stats[0] == stats[1]
    assert all(torch.equal(p, q) for p, q in zip(a.policy.parameters(), b.policy.parameters()))


def test_ppo_trains_saves_reloads_and_acts_through_our_interface(tmp_path):
    teacher = make_agent("ppo", n_steps=64, minibatch_size=32, n_epochs=2)
    teacher.learn(env_factory(**TINY), total_timesteps=256, n_envs=1)
    env = make_env()
    teacher.save(tmp_path / "ppo.pt", env)
    loaded = load_teacher(tmp_path / "ppo.pt", env=env)
    obs, _ = env.reset(seed=0)
    a, b = teacher.act(obs), loaded.act(obs)
    assert torch.equal(a, b) and a.shape == (16,) and a.min() >= 0 and a.max() <= 1
    n_params = sum(p.numel() for p in loaded.policy.parameters())
    assert n_params < 5_000, "the per-sample policy must not grow with the batch size"
    with pytest.raises(ValueError, match="batch_size"):
        load_teacher(tmp_path / "ppo.pt", env=make_env(batch_size=32))


def test_one_env_instance_serves_reinforce_ppo_and_meta_grad(tmp_path):
    ppo = make_agent("ppo", n_steps=32, minibatch_size=16, n_epochs=1)
    ppo.learn(env_factory(**TINY), total_timesteps=32, n_envs=1)
    env = make_tensor_env()
    teachers = {
        "reinforce": make_agent("reinforce"), "ppo": ppo, "meta_grad": make_agent("meta_grad").train().attach(env.unwrapped.handle)
    }  # fmt: skip
    run = start(env, teachers["reinforce"], seed=0)
    for name, teacher in teachers.items():
        run.teacher = teacher  # the same student, taught three steps by each
        teach(run, 3)
        assert run.weights.shape == (16,), name
    assert env.unwrapped.t == 9 and run.step == 9


@pytest.mark.parametrize("agent", ["reinforce", "ppo"])
def test_train_teacher_runs_rl_agents_end_to_end(tmp_path, agent):
    argv = ["--agent", agent, "--out", str(tmp_path / agent), "--dataset", "digits", "--student-kwargs", "{hidden: [16, 8]}",
            "--batch-size", "16", "--val-size", "200", "--steps", "120", "--horizon", "20", "--eval-every", "10",
            "--no-progress", "--device", "cpu", "--n-envs", "1"]  # fmt: skip
    summary = train_teacher.main(argv)
    assert 0 <= summary["final_test_acc"] <= 1
    teacher = load_teacher(tmp_path / agent, env=make_env())
    obs, _ = make_env().reset(seed=0)
    assert teacher.act(obs).shape == (16,)
