"""Teaching-v0: Gym/SB3 checkers, equivalence with plain training, determinism, invariances, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torch.func import functional_call
from torch.nn import functional as F

from agents import make_agent
from agents.loop import start, teach
from envs.observation import ObservationBuilder
from students.data import load_dataset
from students.models import make_student
from tests.conftest import make_env, make_tensor_env


def test_registered_and_gymnasium_checker_passes():
    env = make_env()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped, skip_render_check=True)
    assert not [w for w in caught if "Teaching" in str(w.message) or "obs" in str(w.message).lower()], [
        str(w.message) for w in caught
    ]


def test_stable_baselines3_checker_passes():
    env = make_env()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env.unwrapped, warn=True)
    # Two recommendations are by design: per-sample rows are 2-D (our SB3 feature extractor applies
    # one network to each row), and weights live in [0, 1] (the env's meaning of a weight).
    by_design = ("unconventional shape", "symmetric and normalized Box action space")
    messages = [str(w.message) for w in caught if not any(d in str(w.message) for d in by_design)]
    assert not messages, messages


@pytest.mark.parametrize(
    "student,kwargs,dataset",
    [("mlp", {"hidden": [16, 12]}, "digits"), ("mlp", {"hidden": [64, 32, 8]}, "digits"), ("cnn", {"channels": [4, 8], "fc": 16}, "digits"),
     ("cnn", {"channels": [4, 8], "fc": 16}, "mnist1d"), ("resnet20", {"width": 4}, "digits")],
    ids=["mlp", "mlp-wide-deep", "cnn-2d", "cnn-1d", "resnet20"],
)  # fmt: skip
def test_observation_shapes_do_not_depend_on_the_student(student, kwargs, dataset):
    env = make_env(student=student, student_kwargs=kwargs, dataset=dataset)
    obs, info = env.reset(seed=0)
    reference = make_env().observation_space
    assert env.observation_space == reference
    assert all(obs[k].shape == reference[k].shape and obs[k].dtype == np.float32 for k in obs)
    obs, *_ = env.step(np.ones(16, np.float32))
    assert all(np.isfinite(v).all() for v in obs.values())


def test_uniform_weights_reproduce_a_plain_pytorch_loop():
    """All weights 1 == torch.optim.SGD on the same student, data order and hyper-parameters."""
    env = make_env(horizon=60, lr=0.05, momentum=0.9, weight_decay=5e-4)
    env.reset(seed=7)
    unwrapped = env.unwrapped
    model = make_student("mlp", (1, 8, 8), 10, hidden=[16, 12])
    model.load_state_dict({k: v.detach().clone() for k, v in unwrapped.handle.params.items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(50):
        batch = unwrapped.handle.batch_indices.clone()
        env.step(np.ones(16, np.float32))
        optimizer.zero_grad()
        logits, _ = model(unwrapped.data.train.x[batch])
        F.cross_entropy(logits, unwrapped.handle.pool.y[batch]).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(unwrapped.handle.params[name].detach(), p.detach(), atol=1e-6, rtol=0, msg=name)


def test_validation_and_test_labels_stay_clean_and_mask_matches():
    env = make_env(noise="pairflip", noise_rate=0.4).unwrapped
    data = load_dataset("digits", val_size=200, seed=0)
    assert torch.equal(env.data.val.y, data.val.y) and torch.equal(env.data.test.y, data.test.y)
    handle = env.handle
    assert torch.equal(handle.corrupted, handle.pool.y != data.train.y)
    _, info = env.reset(seed=0)
    assert np.array_equal(info["corrupted"], handle.corrupted[handle.batch_indices].numpy())


def _trajectory(seed: int, steps: int = 15) -> list[np.ndarray]:
    env = make_env()
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(0)
    out = [obs["samples"]]
    for _ in range(steps):
        obs, *_ = env.step(rng.uniform(size=16).astype(np.float32))
        out.append(np.concatenate([obs["samples"], obs["internal"]], 1))
    return out


def test_same_seed_same_trajectory_different_seed_different():
    a, b, c = _trajectory(3), _trajectory(3), _trajectory(4)
    for step, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"step {step}")
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize(
    "action,match",
    [
        (np.ones(15, np.float32), r"shape \(16,\)"),  # too short
        (np.ones((16, 1), np.float32), r"shape \(16,\)"),  # wrong rank
        (np.full(16, np.nan, np.float32), "finite and in"),  # NaN
        (np.r_[np.ones(15), np.inf].astype(np.float32), "weight 15 is inf"),  # inf
        (np.r_[np.ones(15), 1.5].astype(np.float32), "weight 15 is 1.5"),  # above the box
        (np.r_[-0.1, np.ones(15)].astype(np.float32), "weight 0 is -0.1"),  # below the box
        (np.array(["a"] * 16), "real numbers"),  # strings
        (torch.ones(16, dtype=torch.complex64), "real numbers"),  # complex tensor
    ],
    ids=["short", "rank", "nan", "inf", "above", "below", "strings", "complex"],
)
def test_invalid_actions_raise_and_leave_the_student_untouched(action, match):
    env = make_env()
    env.reset(seed=0)
    before = {k: v.detach().clone() for k, v in env.unwrapped.handle.params.items()}
    t = env.unwrapped.t
    with pytest.raises(ValueError, match=match):
        env.unwrapped.step(action)
    assert env.unwrapped.t == t
    assert all(torch.equal(before[k], v) for k, v in env.unwrapped.handle.params.items())
    env.unwrapped.step(np.ones(16, np.float32))  # and the env still works


def test_step_before_reset_and_after_end_are_refused():
    env = make_env(horizon=2, eval_every=1).unwrapped
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.ones(16, np.float32))
    env.reset(seed=0)
    env.step(np.ones(16, np.float32))
    *_, terminated, _, _ = env.step(np.ones(16, np.float32))
    assert terminated
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(np.ones(16, np.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dataset": "imagenet"}, "valid datasets: mnist1d, digits"),
        ({"student": "vit"}, "valid students: mlp, cnn, resnet20, resnet32"),
        ({"noise": "gaussian"}, "valid noises: none, symmetric, pairflip"),
        ({"reward": "loss"}, "valid rewards: threshold, accuracy, delta"),
        ({"student": "resnet20", "dataset": "mnist1d"}, "needs image inputs"),
        ({"batch_size": 100_000}, "batch_size must be in"),
        ({"noise_rate": 1.0}, r"noise rate must be in \[0, 1\)"),
        ({"lr_schedule": "linear"}, "valid lr_schedules"),
    ],
)
def test_bad_configuration_names_the_culprit(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env(**kwargs)


def test_divergence_ends_the_episode_with_a_penalty_and_reset_works():
    env = make_env(lr=1e6, horizon=200, divergence_penalty=-2.0)
    env.reset(seed=0)
    for _ in range(200):
        obs, reward, terminated, truncated, info = env.step(np.ones(16, np.float32))
        if terminated:
            break
    assert info["diverged"] and reward == -2.0 and all(np.isfinite(v).all() for v in obs.values())
    obs, info = env.reset(seed=1)
    assert not info["diverged"]
    env.step(np.ones(16, np.float32))


def test_threshold_reward_pays_minus_log_of_time_fraction():
    env = make_env(reward="threshold", threshold=0.3, horizon=200, eval_every=10, noise="none")
    env.reset(seed=0)
    total, terminated = 0.0, False
    while not terminated:
        _, reward, terminated, _, info = env.step(np.ones(16, np.float32))
        total += reward
    assert info["val_acc"] >= 0.3 and info["step"] < 200
    assert total == pytest.approx(-np.log(info["step"] / 200))


def test_state_dict_round_trip_continues_identically():
    env = make_env(horizon=40)
    env.reset(seed=0)
    for _ in range(7):
        env.step(np.full(16, 0.5, np.float32))
    state = env.unwrapped.state_dict()
    expected = [env.step(np.ones(16, np.float32))[0]["samples"] for _ in range(5)]
    other = make_env(horizon=40)
    other.reset(seed=99)
    other.unwrapped.load_state_dict(state)
    for step, want in enumerate(expected):
        got = other.step(np.ones(16, np.float32))[0]["samples"]
        np.testing.assert_array_equal(got, want, err_msg=f"step {step} after restore")


def test_internal_features_are_rotation_invariant_and_width_independent():
    """Rotating a hidden representation (h -> hQ, Q orthogonal) and folding Q^T into the layer that
    reads it leaves the network's function unchanged; the internal features must not change either.
    (ReLU does not commute with a rotation, so the rotation is applied to the representations the
    features read, here the hidden states of a real student.)"""
    torch.manual_seed(0)
    model = make_student("mlp", (1, 8, 8), 10, hidden=[16, 12]).double()
    x, labels = torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
    q = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    params = dict(model.named_parameters())
    logits, hidden = model(x)
    h1, h2 = hidden["fc1"], hidden["fc2"]
    rotated_logits = functional_call(model.head, {"weight": params["head.weight"] @ q, "bias": params["head.bias"]}, (h2 @ q,))
    torch.testing.assert_close(rotated_logits, logits)  # the rotated network computes the same function
    a, b = ObservationBuilder(100, 10, "cpu"), ObservationBuilder(100, 10, "cpu")
    q1 = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    for _ in range(3):  # running centroids rotate along
        fa = a.internal([h1.float(), h2.float()], labels)
        fb = b.internal([(h1 @ q1).float(), (h2 @ q).float()], labels)
        torch.testing.assert_close(fa, fb, atol=1e-5, rtol=1e-5)
    wide = ObservationBuilder(100, 10, "cpu").internal([torch.randn(32, 300), torch.randn(32, 7)], labels)
    assert wide.shape == fa.shape


def test_internal_features_unchanged_by_a_permutation_folded_into_the_weights():
    """A permutation is an orthogonal map that commutes with ReLU, so it can be folded into the
    weights of a real student (and its running centroids): the permuted student then trains to
    identical internal features."""
    env = make_tensor_env()
    env.reset(seed=0)
    for _ in range(3):
        env.step(torch.ones(16))
    state = env.unwrapped.state_dict()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    for group in ("params", "momentum"):
        p = state["student"][group]
        p["layers.1.weight"], p["layers.1.bias"], p["head.weight"] = (
            p["layers.1.weight"][perm],
            p["layers.1.bias"][perm],
            p["head.weight"][:, perm],
        )
    state["features"]["centroids"][1] = state["features"]["centroids"][1][:, perm]
    twin = make_tensor_env()
    twin.reset(seed=0)
    twin.unwrapped.load_state_dict(state)
    for step in range(3):
        weights = torch.rand(16, generator=torch.Generator().manual_seed(step))
        a, b = env.step(weights)[0], twin.step(weights)[0]
        torch.testing.assert_close(a["internal"], b["internal"], atol=1e-5, rtol=1e-5, msg=f"step {step}")


def test_tensor_observations_live_on_the_env_device():
    env = make_tensor_env()
    obs, info = env.reset(seed=0)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in obs.values())
    assert isinstance(info["corrupted"], torch.Tensor)


def test_a_pickled_env_continues_identically():
    import pickle

    env = make_env()
    env.reset(seed=0)
    for _ in range(3):
        env.step(np.full(16, 0.5, np.float32))
    clone = pickle.loads(pickle.dumps(env))
    for step in range(5):
        a, b = env.step(np.ones(16, np.float32)), clone.step(np.ones(16, np.float32))
        np.testing.assert_array_equal(a[0]["internal"], b[0]["internal"], err_msg=f"step {step}")
        assert a[1:4] == b[1:4]


@pytest.mark.parametrize("pool", ["clean", "noisy+clean", "finetune"])
def test_clean_data_pools_train_on_the_clean_split_with_its_true_labels(pool):
    env = make_tensor_env(noise_rate=0.4, train_pool=pool, horizon=40, finetune_fraction=0.25)
    handle, n_train = env.unwrapped.handle, len(env.unwrapped.data.train)
    _, info = env.reset(seed=0)
    batches = [handle.batch_indices.clone()]
    for _ in range(39):
        _, _, done, _, info = env.step(torch.ones(16))
        if not done:
            batches.append(handle.batch_indices.clone())
    assert torch.equal(handle.pool.y[n_train:], env.unwrapped.data.val.y) and not handle.corrupted[n_train:].any()
    clean = [bool((b >= n_train).all()) for b in batches]
    noisy = [bool((b < n_train).all()) for b in batches]
    if pool == "clean":
        assert all(clean)
    elif pool == "finetune":  # the last quarter of the 40 updates uses the clean split
        assert all(noisy[:30]) and all(clean[30:])
    else:
        assert any(not c and not n for c, n in zip(clean, noisy)), "batches mix both splits"


def test_a_pool_smaller_than_the_batch_is_refused_by_name():
    with pytest.raises(ValueError, match="smallest data pool of train_pool 'clean'"):
        make_env(train_pool="clean", val_size=10)


def test_reset_with_a_seed_replays_the_episode_exactly_meta_grad_included():
    """``reset(seed=s)`` reseeds everything that draws in an episode (student, batch order and the
    validation batches of meta-gradients): 50 steps of meta_grad on one env, twice, are identical."""
    env = make_tensor_env(horizon=60)
    trajectories = []
    for _ in range(2):
        teacher = make_agent("meta_grad", seed=0)
        run = start(env, teacher.train(), seed=5)
        weights, losses = [], []
        for _ in range(50):
            teach(run, 1)
            weights.append(run.weights.detach().clone())
            if "meta_loss" in run.scalars:  # a meta step every unroll updates
                losses.append(float(run.scalars["meta_loss"]))
        trajectories.append((torch.stack(weights), losses))
    assert len(trajectories[0][1]) == 50 // make_agent("meta_grad").options.unroll, "a meta step every unroll updates"
    assert torch.equal(trajectories[0][0], trajectories[1][0]) and trajectories[0][1] == trajectories[1][1]
    assert not torch.equal(trajectories[0][0][0], trajectories[0][0][-1]), "the teacher learned (weights moved)"


def test_which_labels_are_corrupted_never_reaches_the_observation():
    """Real noise, two different corruption masks over the same given labels: the observation is
    identical (it depends on the labels the student is given, never on whether they are wrong)."""
    env = make_env(noise_rate=0.4)
    handle = env.unwrapped.handle
    obs_a, info_a = env.reset(seed=0)
    assert set(obs_a) == {"global", "samples", "internal"}
    assert info_a["corrupted"].any() and not info_a["corrupted"].all()
    handle.corrupted = ~handle.corrupted  # flip which labels count as corrupted; given labels unchanged
    obs_b, info_b = env.reset(seed=0)
    assert (info_b["corrupted"] == ~info_a["corrupted"]).all()
    for key in obs_a:
        np.testing.assert_array_equal(obs_a[key], obs_b[key], err_msg=key)
    for _ in range(5):
        obs_a2 = env.step(np.linspace(0, 1, 16, dtype=np.float32))[0]
    handle.corrupted = ~handle.corrupted
    env.reset(seed=0)
    for _ in range(5):
        obs_b2 = env.step(np.linspace(0, 1, 16, dtype=np.float32))[0]
    for key in obs_a2:
        np.testing.assert_array_equal(obs_a2[key], obs_b2[key], err_msg=key)


def test_a_held_out_selection_split_is_never_seen_by_teachers_or_data_pools():
    env = make_tensor_env(val_size=200, select_fraction=0.5, train_pool="noisy+clean", horizon=20)
    data, handle = env.unwrapped.data, env.unwrapped.handle
    assert len(data.val) == 100 and len(data.select) == 100
    rows = lambda split: {tuple(x.flatten().tolist()) for x in split.x}  # noqa: E731
    assert not rows(data.val) & rows(data.select), "the two clean parts are disjoint"
    assert len(handle.pool) == len(data.train) + len(data.val), "the clean pool is the teachers' part only"
    assert int(handle.val_indices(1000).max()) < len(data.val) and len(handle.val_indices(1000)) == 100
    env.reset(seed=0)
    for _ in range(20):
        *_, info = env.step(torch.ones(16))
    assert {"select_acc", "select_loss", "val_acc", "test_acc"} <= set(info)
    whole = make_tensor_env(val_size=200).unwrapped.data
    assert rows(whole.val) == rows(data.val) | rows(data.select), "carved from the same clean split"
