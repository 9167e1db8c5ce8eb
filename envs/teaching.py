"""``Teaching-v0``: training one student network, one weighted mini-batch update per step."""

from __future__ import annotations

import copy
import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from envs.observation import FEATURE_TABLES, ObservationBuilder, clip_to_bounds, feature_bounds, observation_box
from envs.rewards import make_reward
from students.data import BatchSampler, Dataset, Split, check_name, load_dataset, to_device
from students.functional import LR_SCHEDULES, FunctionalStudent, SGDConfig
from students.handle import StudentHandle
from students.models import make_student
from students.noise import corrupt_labels

EVAL_CHUNK = 1024
TRAIN_POOLS = ("noisy", "clean", "noisy+clean", "finetune")


def training_pool(
    data: Dataset, noisy_labels: torch.Tensor, corrupted: torch.Tensor, train_pool: str, switch_step: int
) -> tuple[Split, torch.Tensor, list[tuple[int, int, int]]]:
    """(the samples a student may train on with the labels it is given, which of those are corrupted,
    the phases of an episode as (first step, first pool index, pool samples)). The clean split is
    appended after the noisy one when a pool uses it; it keeps serving as validation data."""
    n_train, n_val = len(data.train), len(data.val)
    if train_pool == "noisy":
        return Split(data.train.x, noisy_labels), corrupted, [(0, 0, n_train)]
    pool = Split(torch.cat([data.train.x, data.val.x]), torch.cat([noisy_labels, data.val.y]))
    mask = torch.cat([corrupted, torch.zeros(n_val, dtype=torch.bool, device=corrupted.device)])
    phases = {
        "clean": [(0, n_train, n_val)],
        "noisy+clean": [(0, 0, n_train + n_val)],
        "finetune": [(0, 0, n_train), (switch_step, n_train, n_val)],
    }[train_pool]
    return pool, mask, phases


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False; use 'cpu' or 'auto'")
    return device


class TeachingEnv(gym.Env):
    """
    ## Description
    A student network is trained from a fresh initialisation on a (possibly label-corrupted)
    training set. At each step the teacher sees the current mini-batch through the student's eyes
    and gives every sample a weight; the student then takes one momentum-SGD update on the
    weighted mean loss sum_i w_i l_i / sum_i w_i. The teacher is judged by the student's accuracy on a clean
    validation split.

    ## Action Space
    ``Box(0, 1, (batch_size,), float32)``: one weight per sample of the current batch, in the
    order of the observation's rows. Weights of 1 reproduce plain training. An action of the wrong
    shape or dtype raises ``ValueError`` before anything changes, and so does a NumPy action with
    NaN or inf or outside [0, 1]. A torch action's values are checked on its device, so that a step
    never waits for the device: a bad one's update is skipped (the student loses nothing) and the
    ``ValueError`` naming its step comes at the next evaluation.
    A torch action that requires grad makes the update a differentiable function of it (the new
    parameters keep the graph), so a teacher can back-propagate through real updates; it then calls
    ``handle.detach()`` to cut that history.

    ## Observation Space
    ``Dict`` of float32 arrays whose shapes do not depend on the student:

    | key | shape | content |
    |---|---|---|
    | ``global`` | (G,) | training progress (see ``envs.observation.GLOBAL_FEATURES``) |
    | ``samples`` | (batch_size, F) | surface statistics per sample (``SAMPLE_FEATURES``) |
    | ``internal`` | (batch_size, D) | hidden-state statistics per sample (``INTERNAL_FEATURES``) |

    With ``tensor_obs=True`` the same entries are torch tensors on the env's device (for in-process
    torch teachers; not Gym-conformant, so make such envs with ``disable_env_checker=True``).

    ## Rewards
    ``threshold`` (L2T), ``accuracy`` or ``delta``, see ``envs.rewards``. Divergence earns
    ``divergence_penalty``.

    ## Starting State
    A student freshly initialised from the reset seed; the first batch of a reshuffled epoch.

    ## Episode End
    *termination*: ``horizon`` updates done; or, with the ``threshold`` reward, validation accuracy
    reached the threshold; or the student diverged (``info["diverged"] = True``): an update met a
    non-finite loss, which leaves the student as it was and is noticed, on the device, at the next
    evaluation (later updates go on from the last finite state).

    ## Arguments
    See ``__init__``. Data, split and label noise are fixed by ``seed`` at construction; the
    student's initialisation and the batch order come from ``reset(seed=...)`` (or ``seed`` on the
    first reset when none is given).

    ## info
    ``step``, ``epoch``, ``lr``, ``diverged``; ``indices`` and ``corrupted`` (which given labels of
    the observed batch are wrong: for diagnostics only, never part of the observation); after each
    evaluation ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc``, with ``select_fraction`` also
    ``select_loss``, ``select_acc`` (the held-out selection split), and the running ``train_loss``,
    ``train_acc`` of the updates since the last one.

    ## Differentiable access (beyond the Gym API)
    ``handle`` (a ``students.handle.StudentHandle``, one for the env's life) holds the student's
    functional state and lets a meta-gradient teacher compute the validation loss after student
    updates as a differentiable function of the weights it proposed.

    ## Version History
    * v0: initial version.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        dataset: str = "mnist1d",
        student: str = "mlp",
        noise: str = "symmetric",
        noise_rate: float = 0.4,
        batch_size: int = 128,
        horizon: int = 1000,
        reward: str = "accuracy",
        threshold: float = 0.6,
        eval_every: int = 100,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: str = "constant",
        val_size: float | None = None,
        train_size: int | None = None,
        student_kwargs: dict[str, Any] | None = None,
        data_root: str | None = None,
        download: bool = False,
        device: str = "cpu",
        seed: int = 0,
        tensor_obs: bool = False,
        divergence_penalty: float = -1.0,
        dtype: str = "float32",
        train_pool: str = "noisy",
        finetune_fraction: float = 0.2,
        select_fraction: float = 0.0,
        internal_features: bool = True,
    ):
        """
        :param dataset: one of ``students.data.DATASETS``.
        :param student: one of ``students.models.STUDENTS``; ``student_kwargs`` go to its constructor.
        :param noise: ``none``, ``symmetric`` or ``pairflip``, corrupting ``noise_rate`` of training labels.
        :param batch_size: samples per update (and the action's length).
        :param horizon: updates per episode.
        :param reward: ``threshold``, ``accuracy`` or ``delta``; ``threshold`` is its accuracy level.
        :param eval_every: updates between validation (and test) evaluations; also at the last step.
        :param lr, momentum, weight_decay, lr_schedule: the student's SGD (see ``SGDConfig``).
        :param val_size: clean validation split carved from the training set: a count, a fraction
            (< 1), or None for 10% of it, at most 1,000 (see ``students.data.clean_split_size``).
        :param train_size: keep at most this many training samples.
        :param seed: seeds the validation split, the subset and the label noise.
        :param dtype: ``float32`` or ``float64`` for the student and its data (observations stay float32).
        :param train_pool: what the student trains on: ``noisy`` (the noisy training split), ``clean``
            (the clean validation split alone), ``noisy+clean`` (both), or ``finetune`` (the noisy split,
            then the clean split for the last ``finetune_fraction`` of the horizon). The clean-data
            baselines use the last three; teachers use ``noisy``.
        :param select_fraction: share of the clean validation split held out as a ``select`` split that
            no teacher and no data pool ever uses; evaluations report ``select_acc`` on it, so that
            benchmarks select checkpoints and tune on data no method trained on (0: none).
        :param internal_features: compute the ``internal`` entry; False leaves it at zeros, for teachers
            that do not read hidden states (``Teacher.reads_internal_states``), which on a small
            student saves most of the observation's cost.
        """
        if horizon < 1 or eval_every < 1:
            raise ValueError(f"horizon and eval_every must be >= 1, got {horizon} and {eval_every}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; valid lr_schedules: {', '.join(LR_SCHEDULES)}")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.device, self.dtype = resolve_device(device), getattr(torch, dtype)
        if not 0 <= select_fraction < 1:
            raise ValueError(f"select_fraction must be in [0, 1), got {select_fraction}")
        data = load_dataset(dataset, data_root, val_size, train_size, seed, self.device, download).to(self.dtype)
        self.data = data.hold_out_for_selection(select_fraction, seed)
        noisy_labels, corrupted = corrupt_labels(self.data.train.y, self.data.num_classes, noise, noise_rate, seed)
        check_name("train_pool", train_pool, TRAIN_POOLS)
        if not 0 < finetune_fraction < 1:
            raise ValueError(f"finetune_fraction must be in (0, 1), got {finetune_fraction}")
        pool, pool_corrupted, self.phases = training_pool(
            self.data, noisy_labels, corrupted, train_pool, round((1 - finetune_fraction) * horizon)
        )
        self.student_name, self.student_kwargs = student, dict(student_kwargs or {})
        make_student(student, self.data.input_shape, self.data.num_classes, **self.student_kwargs)  # refuse misfits now
        smallest = min(size for _, _, size in self.phases)
        if not 0 < batch_size <= smallest:
            where = "the training set's size" if train_pool == "noisy" else f"the smallest data pool of train_pool {train_pool!r}"
            raise ValueError(f"batch_size must be in [1, {smallest}] ({where}), got {batch_size}")
        self.config = dict(
            dataset=dataset, student=student, noise=noise, noise_rate=noise_rate, batch_size=batch_size,
            horizon=horizon, reward=reward, threshold=threshold, eval_every=eval_every, lr=lr, momentum=momentum,
            weight_decay=weight_decay, lr_schedule=lr_schedule, val_size=val_size, train_size=train_size,
            student_kwargs=self.student_kwargs, seed=seed, dtype=dtype, train_pool=train_pool,
            finetune_fraction=finetune_fraction, select_fraction=select_fraction, internal_features=internal_features,
        )  # fmt: skip
        self.batch_size, self.horizon, self.eval_every, self.seed = batch_size, horizon, eval_every, seed
        self.sgd = SGDConfig(lr, momentum, weight_decay, lr_schedule)
        self.handle = StudentHandle(self.data, pool, pool_corrupted, self.sgd)
        self.reward_fn = make_reward(reward, horizon, self.data.num_classes, threshold)
        self.tensor_obs, self.divergence_penalty, self.internal_features = tensor_obs, divergence_penalty, internal_features
        self.action_space = spaces.Box(0.0, 1.0, (batch_size,), np.float32)
        self.observation_space = spaces.Dict(
            {key: observation_box(table, None if key == "global" else batch_size) for key, table in FEATURE_TABLES.items()}
        )
        self._bounds = {
            k: tuple(torch.as_tensor(b, device=self.device) for b in feature_bounds(t)) for k, t in FEATURE_TABLES.items()
        }
        self._no_internal = torch.zeros(self.observation_space["internal"].shape, device=self.device)
        self._seeded = False
        self.t, self._has_diverged = 0, False

    # ----------------------------------------------------------------------------- Gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is None and not self._seeded:
            seed = self.seed
        super().reset(seed=seed)
        self._seeded = True
        student_seed, order_seed, val_seed = (int(s) for s in self.np_random.integers(2**31 - 1, size=3))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(student_seed)
            model = make_student(self.student_name, self.data.input_shape, self.data.num_classes, **self.student_kwargs)
        self.handle.start(FunctionalStudent(model.to(self.device, self.dtype)), val_seed=val_seed)
        self.samplers = [
            BatchSampler(size, self.batch_size, order_seed + i, self.device, offset)
            for i, (_, offset, size) in enumerate(self.phases)
        ]
        self.features = ObservationBuilder(len(self.handle.pool), self.data.num_classes, self.device)
        self.reward_fn.reset()
        self._set_step(0)
        self._has_diverged = False
        self._bad_action_step = torch.full((), -1, device=self.device)
        chance = 1.0 / self.data.num_classes
        self.val_loss_last, self.val_acc_last, self.best_val_acc = float(np.log(self.data.num_classes)), chance, chance
        obs = self._observe()
        return obs, self._info(diverged=False)

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        if self.handle.student is None:
            raise RuntimeError("TeachingEnv.step() called before reset(); call env.reset() first")
        if self.t >= self.horizon or self._has_diverged:
            raise RuntimeError("TeachingEnv.step() called after the episode ended; call env.reset() first")
        weights, valid = self._check_action(action)
        reward, terminated, evaluation = 0.0, self.t + 1 >= self.horizon, {}
        evaluating = (self.t + 1) % self.eval_every == 0 or terminated
        if evaluating:  # the device-side action flags are read here, and only here, before anything changes
            self._raise_on_bad_action(valid)
        differentiable = isinstance(action, torch.Tensor) and action.requires_grad
        if differentiable:  # keep the action's graph: the update becomes a differentiable function of it
            weights = action.to(self.device, self.dtype)
        self.handle.update(weights, differentiable, valid)
        if valid is not None:  # remember the first step whose torch action failed its device-side check
            self._bad_action_step = torch.where((self._bad_action_step < 0) & ~valid, self.t, self._bad_action_step)
        self._set_step(self.t + 1)
        if evaluating:
            if self.handle.diverged:
                return self._diverge()
            evaluation = self.evaluate()
            self.val_loss_last, self.val_acc_last = evaluation["val_loss"], evaluation["val_acc"]
            self.best_val_acc = max(self.best_val_acc, self.val_acc_last)
            reward, reached = self.reward_fn.on_eval(self.t, self.val_acc_last, terminated)
            terminated = terminated or reached
        obs = self._observe(final=terminated)
        if evaluation:  # the running train statistics include the batch just observed
            evaluation.update(self.features.running_train_stats())
        return obs, float(reward), terminated, False, {**self._info(diverged=False), **evaluation}

    # ----------------------------------------------------------------------------- internals
    def _check_action(self, action: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weights on the device, None) for a valid host action, which is checked at once; for a torch
        tensor, its shape and dtype are checked at once and its values on the device: (weights, a
        device flag that they are finite and in [0, 1]), read at the next evaluation."""
        if isinstance(action, torch.Tensor):
            weights = action.detach()
        else:
            array = np.asarray(action)
            if array.dtype.kind not in "fiu":
                raise ValueError(f"action must be real numbers, got dtype {array.dtype}")
            weights = array
        if tuple(weights.shape) != (self.batch_size,):
            raise ValueError(f"action must have shape ({self.batch_size},) (one weight per sample), got {tuple(weights.shape)}")
        if isinstance(weights, np.ndarray):
            bad = ~(np.isfinite(weights) & (weights >= 0) & (weights <= 1))
            if bad.any():
                i = int(bad.nonzero()[0][0])
                raise ValueError(f"action weights must be finite and in [0, 1]; weight {i} is {weights[i]}")
            return torch.from_numpy(weights.astype(np.float32, copy=False)).to(self.device, self.dtype), None
        if weights.is_complex() or weights.dtype == torch.bool:
            raise ValueError(f"action must be real numbers, got dtype {weights.dtype}")
        weights = weights.to(self.device, self.dtype)
        return weights, ((weights >= 0) & (weights <= 1)).all()  # NaN and +-inf fail one of the comparisons

    def _raise_on_bad_action(self, valid: torch.Tensor | None) -> None:
        """Report a torch action that failed its device-side check since the last evaluation (its
        update was skipped, so the student lost nothing), or the current one (nothing changes)."""
        step = int(self._bad_action_step)
        if step < 0 and (valid is None or valid):
            return
        self._bad_action_step.fill_(-1)
        step = self.t if step < 0 else step
        raise ValueError(
            f"action weights must be finite and in [0, 1]; the torch action at step {step} was not, and its update "
            "was not applied (torch actions are checked on the device and reported at the next evaluation)"
        )

    def _observe(self, final: bool = False) -> dict:
        """Forward the next batch (its graph is kept for the update) and build the observation. A
        non-finite forward needs no check here: the update's loss is then not finite either."""
        if final:
            self.handle.batch_losses = None
            return self._convert(self._zero_obs())
        indices = self.sampler.next()
        logits, hidden, y = self.handle.forward_batch(indices)
        raw = {
            "global": self._global_features(),
            "samples": self.features.samples(logits.detach(), y, indices),
            "internal": self.features.internal(list(hidden.values()), y) if self.internal_features else self._no_internal,
        }
        self._last_obs = {key: clip_to_bounds(value, self._bounds[key]) for key, value in raw.items()}
        return self._convert(self._last_obs)

    def _global_features(self) -> torch.Tensor:
        """The ``global`` entry, in GLOBAL_FEATURES' order; the running train statistics stay on the device."""
        epochs_seen = math.log1p(self.t / self.sampler.batches_per_epoch)
        host = to_device(
            torch.tensor(
                [
                    self.t / self.horizon,
                    self.handle.lr_now / self.sgd.lr,
                    self.val_loss_last,
                    self.val_acc_last,
                    self.best_val_acc,
                    epochs_seen,
                ]
            ),
            self.device,
        )
        running = torch.stack([self.features.train_loss, self.features.train_acc]).float()
        return torch.cat([host[:2], running, host[2:]])

    def _zero_obs(self) -> dict[str, torch.Tensor]:
        """The terminal observation: each feature at its lowest value (in the space, and finite)."""
        return {k: torch.as_tensor(s.low, device=self.device).clamp(min=0) for k, s in self.observation_space.spaces.items()}

    def _convert(self, obs: dict[str, torch.Tensor]) -> dict:
        if self.tensor_obs:
            return obs
        return {k: v.detach().cpu().numpy() for k, v in obs.items()}

    def _diverge(self) -> tuple[dict, float, bool, bool, dict]:
        self._has_diverged, self.handle.batch_losses = True, None
        return self._convert(self._zero_obs()), float(self.divergence_penalty), True, False, self._info(diverged=True)

    def _info(self, diverged: bool) -> dict:
        info = {"step": self.t, "epoch": self.sampler.epoch, "lr": self.handle.lr_now, "diverged": diverged}
        if self.episode_in_progress:
            indices, corrupted = self.handle.batch_indices, self.handle.corrupted_in_batch()
            info["indices"], info["corrupted"] = (
                (indices, corrupted) if self.tensor_obs else (indices.cpu().numpy(), corrupted.cpu().numpy())
            )
        return info

    @property
    def episode_in_progress(self) -> bool:
        """True between ``reset`` and the episode's end (a batch is waiting for its update)."""
        return self.handle.batch_losses is not None

    @property
    def sampler(self) -> BatchSampler:
        """The batch sampler of the current phase of the episode (see ``train_pool``)."""
        return self.samplers[sum(self.t >= start for start, _, _ in self.phases[1:])]

    def _set_step(self, t: int) -> None:
        """Advance the episode's clock; the handle learns the learning rate of the next update."""
        self.t = t
        self.handle.lr_now = self.sgd.lr_at(t, self.horizon)

    # ----------------------------------------------------------------------------- checkpointing
    def __getstate__(self) -> dict[str, Any]:
        """Pickle without autograd history; the current batch's losses are recomputed on unpickling."""
        state = self.__dict__.copy()
        handle = state["handle"] = copy.copy(self.handle)
        handle.params = {n: p.detach() for n, p in self.handle.params.items()}
        handle.momentum = {n: m.detach() for n, m in self.handle.momentum.items()}
        handle.batch_losses, handle.batch_outputs, handle.last_transition, handle.batch_layers = None, None, None, None
        state["_mid_episode"] = self.episode_in_progress
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        mid_episode = state.pop("_mid_episode")
        self.__dict__.update(state)
        handle = self.handle
        handle.params = {n: p.requires_grad_() for n, p in handle.params.items()}
        if mid_episode:
            handle.refresh_batch()

    def state_dict(self) -> dict[str, Any]:
        """Everything an episode in progress depends on, as tensors and plain values (CPU), so that a
        run restored with ``load_state_dict`` continues exactly as if never interrupted."""
        if not self.episode_in_progress:
            raise RuntimeError("TeachingEnv.state_dict() needs an episode in progress (after reset, before its end)")
        return {
            "config": dict(self.config), "student": self.handle.state_dict(),
            "t": self.t, "np_random": self.np_random.bit_generator.state,
            "samplers": [s.state_dict() for s in self.samplers], "features": self.features.state_dict(),
            "reward": dict(vars(self.reward_fn)), "val": [self.val_loss_last, self.val_acc_last, self.best_val_acc],
            "obs": {k: v.detach().cpu().clone() for k, v in self._last_obs.items()},
            "bad_action_step": self._bad_action_step.cpu(),  # a bad torch action not yet reported
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> tuple[dict, dict]:
        """Restore an episode saved by ``state_dict`` (same env config); returns what ``reset``
        returns: its observation and info."""
        # internal_features changes only what the observation computes, never the student's trajectory
        # (and states saved before it existed lack it)
        changed = sorted(k for k in self.config if k != "internal_features" and state["config"].get(k) != self.config[k])
        if changed:
            raise ValueError(f"saved env state was made with a different config (differs in: {', '.join(changed)})")
        if self.handle.student is None:
            self.reset()
        self._set_step(state["t"])
        self._has_diverged = False
        self._bad_action_step = state.get("bad_action_step", torch.tensor(-1)).to(self.device)
        self.np_random.bit_generator.state = state["np_random"]
        for sampler, saved in zip(self.samplers, state["samplers"]):
            sampler.load_state_dict(saved)
        self.features.load_state_dict(state["features"])
        vars(self.reward_fn).update(state["reward"])
        self.val_loss_last, self.val_acc_last, self.best_val_acc = state["val"]
        self.handle.load_state_dict(state["student"], self.device)
        self._last_obs = {k: v.to(self.device) for k, v in state["obs"].items()}
        return self._convert(self._last_obs), self._info(diverged=False)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the validation split (the one teachers learn from), on the held-out
        ``select`` split when there is one, and on the test split (eval mode)."""
        out = {}
        splits = (("val", self.data.val), ("select", self.data.select), ("test", self.data.test))
        for split_name, split in (s for s in splits if s[1] is not None):
            loss_sum, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
            for start in range(0, len(split), EVAL_CHUNK):
                x, y = split.x[start : start + EVAL_CHUNK], split.y[start : start + EVAL_CHUNK]
                logits, _ = self.handle.student.forward(self.handle.params, self.handle.buffers, x, train=False)
                loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                correct += (logits.argmax(1) == y).sum()
            out[f"{split_name}_loss"], out[f"{split_name}_acc"] = (loss_sum / len(split)).item(), (correct / len(split)).item()
        return out
