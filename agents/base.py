"""The interface every teacher shares, the agent registry, and the checkpoint format.

A teacher maps an observation of ``Teaching-v0`` to one weight per sample (``act``). Online
learners also update themselves after every env step (``observe``). Learned teachers save a
checkpoint holding their tensors, class, config, the observation spec they were trained on and
library versions; ``load_teacher`` refuses one that does not fit the env it is meant for.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from envs.observation import observation_spec
from runconfig import check_fields
from students.data import check_name
from students.handle import StudentHandle

CHECKPOINT_FORMAT = "l2t-gym-teacher"
CHECKPOINT_VERSION = 2  # 2: typed teacher options (one teacher_lr), env state held by the StudentHandle
# what every checkpoint holds beside its format marker, version and agent, and of which types (``Teacher.save``)
CHECKPOINT_ENTRIES = {"config": dict, "obs_spec": (dict, type(None)), "state": dict, "extra": dict}
# the names of teacher-input sets that include the observation's internal-state features (meta_grad's
# and the RL teachers' ``features`` option): "all" (with surface and global) and "local" (with surface)
INTERNAL_INPUTS = frozenset({"all", "local"})

# name -> "module:Class". A new teacher is one file in agents/ and one line here.
AGENTS: dict[str, str] = {
    "uniform": "agents.heuristics:UniformTeacher",
    "clean_only": "agents.clean_data:CleanOnly",
    "uniform_plus_clean": "agents.clean_data:UniformPlusClean",
    "finetune": "agents.clean_data:Finetune",
    "oracle": "agents.heuristics:OracleReference",
    "spl": "agents.heuristics:SelfPacedTeacher",
    "small_loss": "agents.heuristics:SmallLossTeacher",
    "meta_grad": "agents.meta_grad:MetaGradTeacher",
    "mwnet": "agents.meta_grad:MetaWeightNetTeacher",
    "l2rw": "agents.meta_grad:ReweightTeacher",
    "reinforce": "agents.reinforce:ReinforceTeacher",
    "ppo": "agents.sb3:PPOTeacher",
    "a2c": "agents.sb3:A2CTeacher",
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the env it is loaded for."""


@dataclasses.dataclass
class NoOptions:
    """The options of a teacher that has none."""


KINDS = {
    "fixed": "acts by a fixed rule (it may read the student through the handle, but learns nothing)",
    "online": "learns jointly with the student it teaches (meta-gradients through the handle); can also run frozen",
    "episodic": "learns over many student episodes from rewards, through the Gym API only; needs training first",
}


class Teacher:
    """Base class of all teachers. A subclass sets ``name``, ``kind`` (one of ``KINDS``), its typed
    ``Options`` dataclass (whose fields become CLI flags), and implements ``act``.

    The loop (``agents.loop.teach``) calls ``act(obs)`` -> ``env.step`` -> ``observe(reward, done, info)``.
    Teachers that read the student beyond the observation set ``needs_handle`` and receive the env's
    ``StudentHandle`` once through ``attach``. Learned teachers keep tensors (``state_dict``) that
    ``save`` writes; online learners update themselves in ``observe`` while ``training`` is True.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "fixed"
    Options: ClassVar[type] = NoOptions
    needs_handle: ClassVar[bool] = False
    needs_batch_size: ClassVar[bool] = False  # the teacher's network is tied to the batch size it was built for
    env_overrides: ClassVar[dict[str, Any]] = {}  # Teaching-v0 arguments this agent needs (clean-data baselines)
    # whether it reads the observation's internal-state features: True, False, or the name of the option
    # (its teacher inputs) whose value, one of INTERNAL_INPUTS, means it does
    reads_internal: ClassVar[bool | str] = True
    # options added after checkpoints of this agent were first written, with the value that reproduces
    # a teacher saved without them (its config lacks the key)
    legacy_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        try:
            self.options = check_fields(self.Options(**options))
        except TypeError as e:  # an option this teacher does not have
            known = ", ".join(f.name for f in dataclasses.fields(self.Options)) or "none"
            raise ValueError(f"agent {self.name!r} got an unknown option ({e}); its options: {known}") from None
        self.config = dataclasses.asdict(self.options)  # what re-creates this teacher (saved in checkpoints)
        self.training = False
        self.handle: StudentHandle | None = None
        self.trained_on: dict | None = None  # observation spec of the env it learned on
        self.trained_env: dict | None = None  # config of that env (dataset, student, noise, ...)

    @classmethod
    def reads_internal_states(cls, options: dict[str, Any]) -> bool:
        """Whether a teacher with ``options`` reads the observation's ``internal`` entry (see
        ``reads_internal``): the env computes it only for those that do."""
        if isinstance(cls.reads_internal, str):
            default = {f.name: f.default for f in dataclasses.fields(cls.Options)}[cls.reads_internal]
            return options.get(cls.reads_internal, default) in INTERNAL_INPUTS
        return cls.reads_internal

    @classmethod
    def env_settings(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The ``Teaching-v0`` arguments a teacher with ``options`` needs: its ``env_overrides``, and
        no internal-state features when it does not read them."""
        return {**cls.env_overrides, **({} if cls.reads_internal_states(options) else {"internal_features": False})}

    def attach(self, handle: StudentHandle) -> Teacher:
        """Receive the env's student handle (``env.unwrapped.handle``); kept for the env's life."""
        self.handle = handle
        return self

    def act(self, obs: dict) -> torch.Tensor:
        """One weight in [0, 1] per sample of the observed batch, shape (batch_size,)."""
        raise NotImplementedError

    def observe(self, reward: float, done: bool, info: dict) -> dict[str, float]:
        """Called after every ``env.step``; online learners update here. Returns scalars to log."""
        return {}

    def train(self, mode: bool = True) -> Teacher:
        """Switch online learning on or off (frozen teachers only act)."""
        self.training = mode
        return self

    def to(self, device: torch.device | str) -> Teacher:
        """Move the teacher's tensors to ``device`` (nothing to move by default)."""
        return self

    def train_episodes(
        self, make_env: Callable[[], Any], steps: int, done_steps: int, n_envs: int,
        report: Callable[[int, dict[str, Any]], None], log_dir: str | None = None,
    ) -> None:  # fmt: skip
        """Episodic teachers: learn over fresh student episodes until ``steps`` student updates in
        all (``done_steps`` of them already taken by a resumed run), calling ``report(step, record)``
        as episodes finish."""
        raise NotImplementedError(f"{self.name!r} is a {self.kind} teacher; only episodic teachers train over episodes")

    def seeds_met(self, first_seed: int, n_envs: int) -> list[int]:
        """Episodic teachers: the range of env seeds their training episodes were reset with (the data
        split and noise are those of ``first_seed``), so that evaluation can avoid them."""
        return [first_seed, first_seed + n_envs - 1]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def check_env(self, env: Any) -> None:
        """Raise ``CheckpointError`` (a trained teacher) or ``ValueError`` (an option) naming the difference
        if this teacher cannot act on ``env``; the CLIs call it before anything trains."""
        if self.trained_on is None:
            return
        current = observation_spec(env)
        for key, trained in self.trained_on.items():
            if key == "batch_size" and not self.needs_batch_size:
                continue
            if current.get(key) != trained:
                raise CheckpointError(
                    f"teacher {self.name!r} was trained on observations with {key} = {trained}, "
                    f"but this env has {key} = {current.get(key)}; train a teacher for this env or use a matching one"
                )

    def save(self, path: str | Path, env: Any = None, extra: dict[str, Any] | None = None) -> Path:
        """Write the checkpoint atomically (temporary file, then rename) and return its path."""
        spec = observation_spec(env) if env is not None else self.trained_on
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "agent": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "config": self.config,
            "obs_spec": spec,
            "env_config": dict(env.unwrapped.config) if env is not None else self.trained_env,
            "state": self.state_dict(),
            "extra": extra or {},
            "versions": library_versions(),
        }
        return atomic_torch_save(checkpoint, Path(path))


def library_versions() -> dict[str, str]:
    """Versions recorded in every checkpoint, so a mismatch can be named when it is loaded."""
    import gymnasium

    from envs import __version__

    return {"l2t_gym": __version__, "torch": str(torch.__version__), "gymnasium": gymnasium.__version__, "numpy": np.__version__}


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def agent_class(name: str) -> type[Teacher]:
    """The class registered under ``name``."""
    check_name("agent", name, list(AGENTS))
    module, cls = AGENTS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_agent(name: str, **config: Any) -> Teacher:
    """Build the teacher registered as ``name`` with ``config``."""
    return agent_class(name)(**config)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint file or a ``runs/<name>/`` folder; never executes code."""
    path = Path(path)
    file = path / "teacher.pt" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no teacher checkpoint at {file} (expected a runs/<name>/ folder or its teacher.pt)")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"{file} is not a readable l2t-gym checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file} is not an l2t-gym teacher checkpoint (no '{CHECKPOINT_FORMAT}' format marker)")
    if checkpoint.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{file} has checkpoint format version {checkpoint.get('format_version')}, this l2t-gym reads version "
            f"{CHECKPOINT_VERSION}; re-train the teacher or use the l2t-gym version that wrote it "
            f"({checkpoint.get('versions', {}).get('l2t_gym')})"
        )
    if checkpoint.get("agent") not in AGENTS:
        raise CheckpointError(f"{file} holds an unknown agent {checkpoint.get('agent')!r}; known agents: {', '.join(AGENTS)}")
    damaged = [
        key for key, kinds in CHECKPOINT_ENTRIES.items() if key not in checkpoint or not isinstance(checkpoint[key], kinds)
    ]
    if damaged:
        raise CheckpointError(f"{file} is damaged: its entries {', '.join(damaged)} are missing or of the wrong type")
    return checkpoint


def load_teacher(path: str | Path, env: Any = None, device: str | torch.device = "cpu") -> Teacher:
    """Load any saved teacher; with ``env``, refuse it unless it can act on that env."""
    checkpoint = read_checkpoint(path)
    teacher = make_agent(checkpoint["agent"], **{**agent_class(checkpoint["agent"]).legacy_options, **checkpoint["config"]})
    teacher.trained_on, teacher.trained_env = checkpoint["obs_spec"], checkpoint.get("env_config")
    try:
        teacher.load_state_dict(checkpoint["state"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the saved state does not fit agent {checkpoint['agent']!r}: {e}") from e
    teacher.to(device)
    if env is not None:
        teacher.check_env(env)
    return teacher


def as_tensor_obs(obs: dict, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Observation entries as float32 tensors on ``device`` (no copy when they already are)."""
    return {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in obs.items()}


SET_BY_THE_RUN = ("seed",)  # options the CLIs fill from the run itself, never flags


def option_fields() -> list[tuple[str, Any, Any]]:
    """One optional field per teacher option in the registry, for ``dataclasses.make_dataclass``: the
    CLIs' teacher flags. Its help names the agents that have the option (each group of agents that
    describe it alike before their description) and their defaults; an unset flag (None) leaves
    each agent at its own default."""
    merged: dict[str, dict[str, Any]] = {}
    for agent in AGENTS:
        options = agent_class(agent).Options
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            if f.name in SET_BY_THE_RUN:
                continue
            entry = merged.setdefault(f.name, {"type": hints[f.name], "helps": {}, "defaults": {}, "choices": []})
            entry["helps"].setdefault(f.metadata["help"], []).append(agent)
            entry["defaults"][agent] = f.default
            entry["choices"] += [c for c in f.metadata.get("choices", []) if c not in entry["choices"]]
    fields = []
    for option, entry in merged.items():
        meta = {
            "help": "; ".join(f"{'/'.join(agents)}: {text}" for text, agents in entry["helps"].items()),
            "default_text": ", ".join(f"{agent} {value}" for agent, value in entry["defaults"].items()),
        }
        if entry["choices"]:
            meta["choices"] = entry["choices"]
        fields.append((option, typing.Optional[entry["type"]], dataclasses.field(default=None, metadata=meta)))  # noqa: UP045
    return fields


def options_for(agent: str, values: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """The options of ``agent`` among ``values`` (flag name -> value, None = unset), plus the run's
    ``seed`` where the agent takes one; a ValueError names an option that was set but does not apply."""
    own = {f.name for f in dataclasses.fields(agent_class(agent).Options)}
    foreign = sorted(k for k, v in values.items() if v is not None and k not in own)
    if foreign:
        valid = ", ".join(sorted(own - set(SET_BY_THE_RUN))) or "none"
        raise ValueError(f"option {', '.join(foreign)} does not apply to agent {agent!r} (its options: {valid})")
    chosen = {k: v for k, v in values.items() if v is not None}
    if seed is not None and "seed" in own:
        chosen["seed"] = seed
    return chosen
