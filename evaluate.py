"""Benchmark teachers on fresh students, honestly, and transfer trained teachers to new students.

    python evaluate.py --agents uniform,clean_only,finetune,l2rw,mwnet,meta_grad,oracle --dataset digits --seeds 5
    python evaluate.py --suite suites/results.yaml                   # the published tables (docs/results.md)
    python evaluate.py --agents uniform --teachers runs/meta_grad-mnist1d-mlp-s0 --dataset mnist \\
        --student cnn --data-root ../shared/data --seed 100 --out reports/transfer   # a frozen teacher, transferred

For every setting x agent x seed a fresh student is trained in ``Teaching-v0`` for the same number of
updates. Agents named in ``--agents`` start untrained: fixed ones just act, online ones (``mwnet``,
``meta_grad``) learn jointly with the student; the clean-data baselines (``clean_only``,
``uniform_plus_clean``, ``finetune``) train on the clean split directly; ``oracle`` is a reference.
Teachers loaded from ``--teachers`` run frozen (pure transfer) unless ``--online``, and never on the
seeds they were trained with. ``--tune`` picks each agent's student learning rate (and teacher
learning rate) per setting by validation accuracy on tuning seeds disjoint from the reported ones.
Outputs in ``--out``: report.md, results.csv, results.json, PNG plots, runs.jsonl (each finished
run, appended as it ends, so ``--resume`` re-runs only what is missing), errors.jsonl (the error of
each run that failed) and, with ``--leave-one-out``, the pre-trained teachers in pretrained/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents.base import AGENTS, CheckpointError, Teacher, agent_class, load_teacher, make_agent, options_for, read_checkpoint
from agents.loop import Curve, WeightStats, start, teach
from envs import env_factory
from reporting import (
    TUNING_CRITERIA,
    add_uniform_ratio,
    aggregate,
    curve_summary,
    steps_to_threshold,
    summarise,
    write_plots,
    write_report,
    write_tables,
)
from runconfig import (
    GRID_KEYS,
    EnvSetting,
    StudentTraining,
    coerce,
    exit_on_bad_input,
    field,
    parse_config,
    setting_label,
    settings_grid,
    yaml_value,
)
from students.data import DatasetNotFoundError, check_name
from sweeps import BACKENDS, Sweep, checkpoint_file, read_finished

# --leave-one-out pre-trains, per held-out setting, on: (the label of its teachers, the infix of their folders)
PRETRAIN_ON = {
    "others": ("held-out", "without"),  # the grid's other settings
    "other-datasets": ("held-out-dataset", "without-dataset"),  # the grid's settings on another dataset
    "own": ("own-setting", "on"),  # the setting itself (the reference)
    "grid": ("pre-trained", "on-grid"),  # --pretrain-grid's settings, none of the grid's (transfer to settings never seen)
}
TUNABLE = {"lr": float, "teacher_lr": float}  # student learning rate; teacher learning rate of learned teachers


@dataclass
class EvalConfig(EnvSetting, StudentTraining):
    """A benchmark: which teachers, on which settings, over how many seeds (``seed``, ``seed + 1``, ...)."""

    agents: str = field(
        "uniform,clean_only,uniform_plus_clean,finetune,spl,l2rw,mwnet,meta_grad,oracle",
        "comma-separated agents to run untrained (online learners learn as they teach); NAME@LABEL is a variant of "
        "NAME with its own --agent-options entry, e.g. meta_grad@surface",
    )
    agent_options: dict | None = field(
        None, "options per agent as YAML, e.g. '{meta_grad: {teacher_lr: 0.001}, l2rw: {val_batch: 128}}'"
    )
    teachers: str | None = field(
        None, "comma-separated runs/<name> folders (or teacher.pt files) of trained teachers, run frozen"
    )
    online: bool = field(False, "let loaded online teachers keep learning during evaluation")
    grid: Any = field(
        None,
        "settings grid as YAML, e.g. '{dataset: [mnist1d, digits], noise_rate: [0.2, 0.4]}', or a list of settings "
        "(overrides the single setting above)",
        parse=yaml_value,
    )
    leave_one_out: str | None = field(
        None,
        "pre-train this agent on all settings of the grid but one (--pretrain-on picks which: by default all the "
        "others), and evaluate it frozen on the one left out (its --agent-options entry applies to the pre-trainings, and to its "
        "online runs if it is in --agents too)",
    )
    pretrain_on: str = field(
        "others",
        "--leave-one-out: what each setting's teachers pre-train on: others (the grid's other settings: transfer), "
        "other-datasets (the grid's settings on another dataset: transfer to a dataset never seen) or own (the setting "
        "itself, on the pre-training seeds: the reference, what a frozen teacher pre-trained alike reaches with no "
        "change of setting), or grid (the settings of --pretrain-grid, for every setting of the grid)",
        choices=list(PRETRAIN_ON),
    )
    pretrain_grid: Any = field(
        None,
        "--pretrain-on grid: the settings every setting's teachers pre-train on, as YAML like --grid (none of them a "
        "setting of --grid: a teacher is evaluated on settings it never met)",
        parse=yaml_value,
    )
    pretrain_steps: int = field(6000, "--leave-one-out: student updates of each pre-training (episodes of --steps)", low=1)
    pretrain_seed: int = field(10_000, "--leave-one-out: seed of the pre-trainings (disjoint from the reported seeds)", low=0)
    pretrain_seeds: int = field(
        1,
        "--leave-one-out: pre-trainings per held-out setting, on disjoint seed ranges; each is reported as "
        "<agent>@held-out#k (@held-out-dataset#k, @own-setting#k, @pre-trained#k with --pretrain-on other-datasets, own, "
        "grid), and the report "
        "adds the spread between them "
        "(a transfer result varies with the pre-training)",
        low=1,
    )
    pretrain_options: dict | None = field(
        None,
        "--leave-one-out: options of the pre-trainings per held-out setting, over its --agent-options entry, as YAML "
        "'{dataset/student/noise rate: {option: value}}', e.g. '{digits/mlp/symmetric 0.4: {teacher_lr: 0.03}}' "
        "(for options chosen without the held-out setting's students; with --pretrain-on own, the options of the "
        "pre-trainings on that setting)",
    )
    seeds: int = field(3, "reported seeds per (setting, agent): seed, seed + 1, ...", low=1)
    steps: int = field(2000, "student updates per run", low=1)
    tune: dict | None = field(
        None, "tuning grid as YAML, e.g. '{lr: [0.02, 0.05, 0.1], teacher_lr: [0.001, 0.003, 0.01]}' (lr and teacher_lr)"
    )
    tune_seeds: int = field(2, "tuning seeds per candidate", low=1)
    tune_by: str = field(
        "best_val_acc",
        "tuning criterion, on the held-out selection split: best_val_acc (its best accuracy over the run, for results "
        "read at the best held-out accuracy) or final_val_acc (its accuracy at the end, for results read at the end)",
        choices=list(TUNING_CRITERIA),
    )
    tune_seed: int = field(1000, "first tuning seed (tuning seeds must not overlap the reported ones)", low=0)
    thresholds: str = field("0.5,0.6", "validation accuracies for steps-to-threshold (CSV/JSON), comma-separated")
    workers: int = field(1, "parallel worker processes over (setting, agent, seed) jobs (--backend processes)", low=1)
    backend: str = field("processes", "where jobs run: processes (local workers) or ray (Ray tasks)", choices=list(BACKENDS))
    ray_address: str | None = field(None, "Ray cluster to join (host:port or auto; default $RAY_ADDRESS, else a local Ray)")
    job_cpus: float = field(1.0, "--backend ray: CPUs each job reserves", above=0.0)
    job_gpus: float = field(0.0, "--backend ray: GPUs each job reserves", low=0.0)
    threads: int = field(1, "torch threads per job (fixed, so results do not depend on --workers)", low=1)
    out: str = field("reports/latest", "output folder")
    resume: bool = field(False, "reuse the finished runs in --out/runs.jsonl and run only the missing ones")
    progress: bool = field(True, "show a progress bar")

    def validate(self) -> None:
        if not self.agent_names and not self.teacher_paths:
            raise ValueError("nothing to evaluate: --agents and --teachers are both empty")
        for flag, names in (("--agents", self.agent_names), ("--teachers", self.teacher_paths)):
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:  # a repeat would count each seed's run twice in every interval
                raise ValueError(f"{flag} names {', '.join(repeated)} more than once")
        for agent in self.agent_names:
            check_name("agent", base_agent(agent), list(AGENTS))
            if agent_class(base_agent(agent)).kind == "episodic":
                raise ValueError(
                    f"agent {agent!r} learns over many episodes and cannot start untrained: train it with train_teacher.py and pass --teachers runs/..."
                )
        options = self.agent_options or {}
        if not all(isinstance(v, dict) for v in options.values()):
            raise ValueError(f"--agent-options must map agent -> {{option: value}}, got {options!r}")
        for agent, values in options.items():
            if agent not in self.agent_names and agent != self.leave_one_out:
                raise ValueError(
                    f"--agent-options names {agent!r}, which is neither in --agents ({self.agents}) nor --leave-one-out"
                )
            try:  # refuses bad options by name
                make_agent(base_agent(agent), **options_for(base_agent(agent), values))
            except ValueError as e:
                raise ValueError(f"--agent-options {agent}: {e}") from None
        for path in self.teacher_paths:
            if not Path(path).exists():
                raise ValueError(f"--teachers: {path} does not exist (expected a runs/<name>/ folder or a teacher.pt)")
        try:
            values = self.threshold_values
        except ValueError as e:
            raise ValueError(f"--thresholds must be comma-separated numbers, got {self.thresholds!r}") from e
        for value in values:
            coerce("--thresholds", value, float, {"low": 0, "high": 1})
        _ = self.tune_grid
        _ = self.settings
        if self.leave_one_out is None and self.pretrain_seeds > 1:
            raise ValueError("--pretrain-seeds sets the pre-trainings of --leave-one-out, which is not given")
        if self.leave_one_out is None and self.pretrain_on != "others":
            raise ValueError("--pretrain-on sets the pre-trainings of --leave-one-out, which is not given")
        if self.leave_one_out is not None:
            self._check_pretrain_seeds()
            check_name("agent", self.leave_one_out, list(AGENTS))
            if agent_class(self.leave_one_out).kind != "online":
                raise ValueError(f"--leave-one-out pre-trains an online teacher; {self.leave_one_out!r} is not one")
            if self.pretrain_on == "others" and len(self.settings) < 2:
                raise ValueError("--leave-one-out needs a grid of at least two settings (or --pretrain-on own or grid)")
            alone = [setting_label(s) for s in self.settings if not pretraining_settings("other-datasets", s, self.settings)]
            if self.pretrain_on == "other-datasets" and alone:
                raise ValueError(f"--pretrain-on other-datasets: no setting of the grid on another dataset than {alone[0]}'s")
        if (self.pretrain_on == "grid") != (self.pretrain_grid is not None):
            raise ValueError(
                "--pretrain-grid sets the pre-trainings of --leave-one-out --pretrain-on grid: give all three or neither"
            )
        if self.pretrain_grid is not None and not self.pretrain_settings:
            raise ValueError("--pretrain-grid is empty: no setting to pre-train on")
        evaluated = [same_student(s) for s in self.settings]
        met = [setting_label(s) for s in self.pretrain_settings if same_student(s) in evaluated]
        if met:
            raise ValueError(
                f"--pretrain-grid holds {met[0]}, a setting of --grid: its teachers would not be evaluated on settings they never met"
            )
        self._check_pretrain_options()
        if self.tune and self.tune_seed < self.seed + self.seeds and self.seed < self.tune_seed + self.tune_seeds:
            raise ValueError(
                f"tuning seeds {self.tune_seed}..{self.tune_seed + self.tune_seeds - 1} overlap the reported seeds "
                f"{self.seed}..{self.seed + self.seeds - 1}; move --tune-seed"
            )

    @property
    def pretrain_episodes(self) -> int:
        """Student episodes (of --steps updates) in one pre-training: one with seed s meets seeds s .. s + this - 1."""
        return -(-self.pretrain_steps // self.steps)

    def _check_pretrain_seeds(self) -> None:
        """The pre-trainings' seeds (data splits, noise draws, students) disjoint from the reported and tuning ones:
        refused before anything trains, not after the pre-trainings (a loaded teacher's own check)."""
        last = self.pretrain_seed + self.pretrain_seeds * self.pretrain_episodes - 1
        for name, first, count in (
            ("reported", self.seed, self.seeds),
            ("tuning", self.tune_seed, self.tune_seeds if self.tune else 0),
        ):
            if count and self.pretrain_seed <= first + count - 1 and first <= last:
                raise ValueError(
                    f"the pre-trainings meet seeds {self.pretrain_seed}..{last}, which overlap the {name} seeds "
                    f"{first}..{first + count - 1}: the frozen teachers would teach students of their own training; move --pretrain-seed"
                )

    def _check_pretrain_options(self) -> None:
        """--pretrain-options: only with --leave-one-out, keyed by settings of the grid, with options its agent has."""
        if not self.pretrain_options:
            return
        if self.leave_one_out is None:
            raise ValueError("--pretrain-options sets the pre-trainings of --leave-one-out, which is not given")
        labels = [setting_label(s) for s in self.settings]
        if len(set(labels)) < len(labels):
            raise ValueError(
                "--pretrain-options names settings by dataset/student/noise rate, and two settings of the grid share one"
            )
        for label, values in self.pretrain_options.items():
            if label not in labels:
                raise ValueError(f"--pretrain-options names the setting {label!r}, which is not in the grid: {', '.join(labels)}")
            if not isinstance(values, dict):
                raise ValueError(f"--pretrain-options must map setting -> {{option: value}}, got {values!r} for {label!r}")
            make_agent(self.leave_one_out, **options_for(self.leave_one_out, self.held_out_options(label)))  # bad options by name

    def held_out_options(self, label: str) -> dict[str, Any]:
        """The --leave-one-out agent's options for the pre-trainings held out from the setting ``label``."""
        return held_out_options(self.agent_options, self.pretrain_options, self.leave_one_out, label)

    @property
    def settings(self) -> list[dict[str, Any]]:
        return settings_grid(self, self.grid)

    @property
    def pretrain_settings(self) -> list[dict[str, Any]]:
        """The settings of --pretrain-grid (none without it)."""
        if self.pretrain_grid is None:
            return []
        try:
            return settings_grid(self, self.pretrain_grid)
        except ValueError as e:
            raise ValueError(f"--pretrain-grid: {e}") from e

    @property
    def agent_names(self) -> list[str]:
        return [a.strip() for a in self.agents.split(",") if a.strip()]

    @property
    def teacher_paths(self) -> list[str]:
        return [t.strip() for t in (self.teachers or "").split(",") if t.strip()]

    @property
    def threshold_values(self) -> list[float]:
        return [float(t) for t in self.thresholds.split(",") if t.strip()]

    @property
    def tune_grid(self) -> dict[str, list[float]]:
        """``--tune`` checked: lists of finite positive numbers for ``lr`` and ``teacher_lr``."""
        grid = self.tune or {}
        unknown = sorted(set(grid) - set(TUNABLE))
        if unknown:
            raise ValueError(f"--tune: unknown keys {', '.join(unknown)}; tunable: {', '.join(TUNABLE)}")
        checked = {}
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"--tune: {key} must be a non-empty list, got {values!r}")
            checked[key] = [coerce(f"--tune {key}", v, float, {"above": 0.0}) for v in values]
        return checked


# ------------------------------------------------------------------------------------------ grid and jobs
@dataclass(frozen=True)
class Job:
    """One student trained by one teacher: the unit of work and of parallelism."""

    setting: dict[str, Any]
    agent: str  # agent name, or "name@run" for a loaded teacher
    teacher_path: str | None
    seed: int
    cfg: EvalConfig
    lr: float  # the student's learning rate (tuned per agent and setting)
    options: tuple[tuple[str, Any], ...] = ()  # the agent's options beyond --agent-options (tuned)
    stage: str = "report"  # or "tune"
    teacher_digest: str | None = None  # content hash of a loaded teacher (computed where the file is)

    @property
    def key(self) -> str:
        """Identifies the job in runs.jsonl: everything that changes its result, so that ``--resume``
        after an edited config re-runs what changed instead of mixing old and new runs (not where the
        data is read from: the same files from another checkout's path are the same run)."""
        cfg = self.cfg
        training = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(StudentTraining) if f.name != "lr"}
        context = {
            **training, "steps": cfg.steps, "thresholds": cfg.thresholds, "device": cfg.device, "threads": cfg.threads,
            "online": cfg.online, "agent_options": (cfg.agent_options or {}).get(self.agent),
            "teacher": self.teacher_digest, "select_fraction": cfg.select_fraction,
            "resolved": None if self.teacher_path else recorded_options(self.agent_name, self.agent_options),
        }  # fmt: skip
        fields = [self.stage, self.setting, self.agent, self.seed, self.lr, dict(self.options), context]
        return json.dumps(fields, sort_keys=True, default=str)  # already what canonical_key makes of it

    @property
    def label(self) -> str:
        return f"{setting_label(self.setting)} {self.agent} seed {self.seed} ({self.stage})"

    @property
    def env_overrides(self) -> dict[str, Any]:
        """What its agent needs of the env (the clean-data baselines' data pool; no internal-state
        features for teachers that do not read them); loaded teachers get the full default env."""
        if self.teacher_path is not None:
            return {}
        return agent_class(self.agent_name).env_settings(self.agent_options)

    @property
    def agent_options(self) -> dict[str, Any]:
        """The options its agent is built with: ``--agent-options`` for its label, then tuned values."""
        return {**(self.cfg.agent_options or {}).get(self.agent, {}), **dict(self.options)}

    @property
    def agent_name(self) -> str:
        return base_agent(self.agent)


def same_student(setting: dict[str, Any]) -> dict[str, Any]:
    """``setting`` as the env reads it: no student arguments and empty ones build the same student."""
    return {**setting, "student_kwargs": setting.get("student_kwargs") or None}


def held_out_options(agent_options: dict | None, pretrain_options: dict | None, agent: str, label: str) -> dict[str, Any]:
    """The options of ``agent``'s pre-trainings held out from the setting ``label``: its --agent-options entry,
    then that setting's --pretrain-options entry over it."""
    return {**((agent_options or {}).get(agent) or {}), **((pretrain_options or {}).get(label) or {})}


def resolved_options(agent: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option ``agent`` is built with from ``options`` (None: its default), its defaults included: a run
    key or a pre-training digest holding them makes ``--resume`` re-run what a changed default changes."""
    return dataclasses.asdict(agent_class(agent).Options(**options_for(agent, options)))


def without_legacy_values(agent: str, resolved: dict[str, Any]) -> dict[str, Any]:
    """``resolved`` less the options at the value that reproduces the agent from before they existed
    (``Teacher.legacy_options``): a run recorded then and one recorded now with that value did the same."""
    legacy = agent_class(agent).legacy_options
    return {name: value for name, value in resolved.items() if name not in legacy or legacy[name] != value}


def recorded_options(agent: str, options: dict[str, Any]) -> dict[str, Any]:
    """What a run key or a pre-training digest holds of ``agent``'s options: all of them resolved, less
    those at their legacy value."""
    return without_legacy_values(agent, resolved_options(agent, options))


def canonical_key(key: str) -> str:
    """A run key (``Job.key``, or one read from runs.jsonl) with its resolved options less their legacy
    values, so that adding an option to an agent leaves the keys of the runs it does not change valid,
    and without the data folder that keys once held (a run from another checkout is the same run).
    Only these are touched: a legacy value written out in --agent-options still makes another key (a
    re-run, never a wrong reuse); keys of other formats are returned as they are."""
    try:
        fields = json.loads(key)
    except json.JSONDecodeError:
        return key
    context = fields[-1] if isinstance(fields, list) and len(fields) > 2 else None
    if isinstance(context, dict):
        context.pop("data_root", None)
        if context.get("resolved") is not None and base_agent(fields[2]) in AGENTS:
            context["resolved"] = without_legacy_values(base_agent(fields[2]), context["resolved"])
    return json.dumps(fields, sort_keys=True, default=str)


def base_agent(label: str) -> str:
    """The registered agent of a label: ``meta_grad`` for ``meta_grad``, for the variant
    ``meta_grad@surface`` (options from ``--agent-options``) and for a loaded ``meta_grad@run``."""
    return label.split("@")[0]


def env_for(job: Job) -> gym.Env:
    """A fresh ``Teaching-v0`` for the job's setting and seed (tensor observations, in-process), with
    the data pool its agent needs (the clean-data baselines train on the clean split)."""
    cfg = job.cfg
    return env_factory(
        **job.setting,
        **{**cfg.student_env_kwargs(), "lr": job.lr},
        horizon=cfg.steps,
        data_root=cfg.data_root,
        download=cfg.download,
        device=cfg.device,
        seed=job.seed,
        tensor_obs=True,
        disable_env_checker=True,
        **job.env_overrides,
    )()


def build_teacher(job: Job, env: Any, checkpoint: str | None = None) -> Teacher:
    """The job's teacher: loaded (from ``checkpoint``, a local copy, when given) and checked against
    the env, or fresh; online learners in train mode."""
    if job.teacher_path is not None:
        teacher = load_teacher(checkpoint or job.teacher_path, env=env, device=env.unwrapped.device)
        return teacher.train(job.cfg.online and teacher.kind == "online")
    teacher = make_agent(job.agent_name, **options_for(job.agent_name, job.agent_options, seed=job.seed))
    teacher = teacher.to(env.unwrapped.device)
    return teacher.train(teacher.kind == "online")


def run_job(job: Job, checkpoint: str | None = None) -> dict[str, Any]:
    """Train one fresh student under the job's teacher; its metrics, curve and weight samples.
    ``checkpoint``: a local copy of the loaded teacher (on a Ray worker)."""
    torch.set_num_threads(job.cfg.threads)
    torch.manual_seed(job.seed)
    env = env_for(job)
    teacher = build_teacher(job, env, checkpoint)
    stats, curve = WeightStats(), Curve()
    run = teach(start(env, teacher, job.seed), job.cfg.steps, [stats, curve])
    w, c = stats.arrays()
    points, data, diverged = curve.points, env.unwrapped.data, bool(run.info.get("diverged"))
    row = {
        "agent": job.agent, "seed": job.seed, **{k: job.setting[k] for k in GRID_KEYS},
        "student_kwargs": json.dumps(job.setting.get("student_kwargs")), "teacher_path": job.teacher_path or "",
        "trained_on": describe_training(checkpoint or job.teacher_path) if job.teacher_path else "", "online": teacher.training,
        "lr": job.lr, "options": json.dumps(dict(job.options)),
        "n_train": len(data.train), "n_clean": len(data.val), "n_select": len(data.select) if data.select else 0,
        "n_test": len(data.test),
        "steps": run.step, "diverged": diverged, **curve_summary(points, diverged, 1.0 / data.num_classes),
        "seconds_per_step": run.seconds / max(run.step, 1), **stats.summary(),
    }  # fmt: skip
    for threshold in job.cfg.threshold_values:
        row[f"steps_to_{threshold:g}"] = steps_to_threshold(points, threshold)
    rng = np.random.default_rng(job.seed)
    sample = rng.choice(len(w), size=min(4000, len(w)), replace=False)
    return {"key": job.key, "row": row, "curve": points, "weights": w[sample].tolist(), "corrupted": c[sample].tolist()}


def describe_training(path: str) -> str:
    """The settings a loaded teacher was trained on (``dataset/student/noise rate``, ``; ``-separated)
    and the seeds it met."""
    checkpoint = read_checkpoint(path)
    extra = checkpoint["extra"]
    settings = "; ".join(extra.get("settings") or [setting_label(checkpoint["env_config"])])
    lo, hi = extra.get("seeds_used", [None, None])
    return f"{settings} (seeds {lo}-{hi})" if lo is not None else f"{settings} (seeds not recorded)"


def checkpoint_digest(path: str) -> str:
    """A short content hash of a loaded teacher's checkpoint (part of its jobs' identity)."""
    return hashlib.sha256(checkpoint_file(path).read_bytes()).hexdigest()[:16]


def tuning_candidates(cfg: EvalConfig, agent: str) -> list[tuple[float, tuple[tuple[str, Any], ...]]]:
    """(student lr, agent options) pairs of the tuning grid that apply to ``agent``."""
    grid = cfg.tune_grid
    lrs = grid.get("lr", [cfg.lr])
    has_teacher_lr = any(f.name == "teacher_lr" for f in dataclasses.fields(agent_class(base_agent(agent)).Options))
    teacher_lrs = grid.get("teacher_lr") if has_teacher_lr else None
    if not teacher_lrs:
        return [(lr, ()) for lr in lrs]
    return [(lr, (("teacher_lr", t),)) for lr in lrs for t in teacher_lrs]


def tuning_jobs(cfg: EvalConfig) -> list[Job]:
    """Every tuning job: setting x agent x candidate x tuning seed."""
    seeds = range(cfg.tune_seed, cfg.tune_seed + cfg.tune_seeds)
    return [
        Job(setting, agent, None, seed, cfg, lr, options, stage="tune")
        for setting in cfg.settings
        for agent in cfg.agent_names
        for lr, options in tuning_candidates(cfg, agent)
        for seed in seeds
    ]


def choose(cfg: EvalConfig, results: list[dict[str, Any]]) -> tuple[dict[tuple, tuple], list[dict[str, Any]]]:
    """Per (setting, agent), the candidate with the best mean of ``--tune-by`` (a held-out accuracy) over
    the tuning seeds (the first one on ties); and a table of the choices for the report, with the
    runner-up's score, so that a choice made by a tie or a sample or two shows as one."""
    scores: dict[tuple, dict[tuple, list[float]]] = {}
    for r in results:
        row = r["row"]
        setting = json.dumps(
            {k: row[k] for k in GRID_KEYS} | {"student_kwargs": json.loads(row["student_kwargs"])}, sort_keys=True
        )
        candidate = (row["lr"], tuple(sorted(json.loads(row["options"]).items())))
        scores.setdefault((setting, row["agent"]), {}).setdefault(candidate, []).append(row[cfg.tune_by])
    chosen, table = {}, []
    for (setting, agent), by_candidate in scores.items():
        means = {c: summarise(v)["mean"] for c, v in by_candidate.items()}
        ranked = sorted(means, key=lambda c: -np.nan_to_num(means[c], nan=-1.0))  # stable: the first one on ties
        best = ranked[0]
        chosen[(setting, agent)] = best
        s = json.loads(setting)
        table.append({
            "setting": f"{s['dataset']}/{s['student']}/{s['noise']} {s['noise_rate']}", "agent": agent, "lr": best[0],
            **dict(best[1]), "score": means[best], "runner_up": means[ranked[1]] if len(ranked) > 1 else None,
            "candidates": len(by_candidate),
        })  # fmt: skip
    return chosen, table


def report_jobs(cfg: EvalConfig, chosen: dict[tuple, tuple], held_out: dict[str, dict[str, str]] | None = None) -> list[Job]:
    """Every reported (setting, seed, agent or loaded teacher) job, at the tuned values where tuned;
    ``held_out`` maps a setting (JSON) to the teachers pre-trained without it (label -> run folder)."""
    labels = teacher_labels(cfg.teacher_paths)  # each checkpoint is read and hashed once, not once per job
    pretrained = [path for runs in (held_out or {}).values() for path in runs.values()]
    digests = {path: checkpoint_digest(path) for path in [*labels, *pretrained]}
    jobs = []
    for setting in cfg.settings:
        key = json.dumps(setting, sort_keys=True)
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            for agent in cfg.agent_names:
                lr, options = chosen.get((key, agent), (cfg.lr, ()))
                jobs.append(Job(setting, agent, None, seed, cfg, lr, options))
            for path, label in labels.items():
                jobs.append(Job(setting, label, path, seed, cfg, cfg.lr, teacher_digest=digests[path]))
            for label, path in (held_out or {}).get(key, {}).items():
                jobs.append(Job(setting, label, path, seed, cfg, cfg.lr, teacher_digest=digests[path]))
    return jobs


def teacher_labels(paths: list[str]) -> dict[str, str]:
    """``agent@run`` for each loaded teacher, numbered where two runs share a folder name."""
    names = [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in paths]
    return {
        path: f"{read_checkpoint(path)['agent']}@{name}" + (f"-{i + 1}" if names.count(name) > 1 else "")
        for i, (path, name) in enumerate(zip(paths, names))
    }


def as_flags(values: dict[str, Any]) -> list[str]:
    """``values`` as train_teacher.py flags: None is skipped (the default, as in validation), a bool
    is --name or --no-name, a string goes as it is, anything else as JSON (the flags read YAML)."""
    flags = []
    for name, value in values.items():
        flag = name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags += [f"--{flag}", value if isinstance(value, str) else json.dumps(value)]
    return flags


def pretrain_held_out(cfg: EvalConfig, out: Path) -> dict[str, dict[str, str]]:
    """For every setting S of the grid, ``--pretrain-seeds`` teachers of the ``--leave-one-out`` agent,
    each pre-trained by train_teacher.py on the settings ``--pretrain-on`` gives (``pretraining_settings``;
    episodes of ``--steps`` updates, cycling) in ``out/pretrained/``, on disjoint seed ranges; a finished
    one is reused, an interrupted one resumed from its last checkpoint. Returns setting (JSON) -> {label:
    run folder}, the label ``<agent>@<PRETRAIN_ON's label>`` (``#k`` with several)."""
    import train_teacher

    student = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(StudentTraining)}
    data = ["--data-root", cfg.data_root] if cfg.data_root else []
    data += ["--download"] if cfg.download else []
    paths: dict[str, dict[str, str]] = {}
    label, infix = PRETRAIN_ON[cfg.pretrain_on]
    for i, setting in enumerate(cfg.settings):
        others = pretraining_settings(cfg.pretrain_on, setting, cfg.settings, cfg.pretrain_settings)
        options = cfg.held_out_options(setting_label(setting))
        resolved = recorded_options(cfg.leave_one_out, options)
        folder = f"{i}-{cfg.leave_one_out}-{infix}-{setting_label(setting).replace('/', '-').replace(' ', '')}"
        for k in range(cfg.pretrain_seeds):
            argv = [
                "--agent", cfg.leave_one_out, "--grid", json.dumps(others), "--steps", str(cfg.pretrain_steps),
                "--horizon", str(cfg.steps), "--seed", str(cfg.pretrain_seed + k * cfg.pretrain_episodes), "--device", cfg.device,
                "--threads", str(cfg.threads), "--no-progress", *as_flags(student),
            ]  # fmt: skip
            # another pre-training, or one under other defaults, never reuses this one; the agent's options
            # count as resolved, so one written out at the value it resolves to is the same pre-training; where
            # its data is read from is not part of it (the same pre-training from another checkout is the same one)
            digest = hashlib.sha256(json.dumps([argv, resolved], sort_keys=True, default=str).encode()).hexdigest()[:8]
            run = out / "pretrained" / f"{folder}-{digest}"
            if not (run / "summary.json").exists():  # not finished: an interrupted one goes on from its checkpoint
                resume = ["--resume"] if (run / "teacher.pt").exists() else []
                if not resume:
                    shutil.rmtree(run, ignore_errors=True)
                train_teacher.main([*argv, *as_flags(options), *data, "--out", str(run), *resume])
            name = f"{cfg.leave_one_out}@{label}" + (f"#{k + 1}" if cfg.pretrain_seeds > 1 else "")
            paths.setdefault(json.dumps(setting, sort_keys=True), {})[name] = str(run)
    return paths


def pretraining_settings(
    mode: str, held_out: dict[str, Any], settings: list[dict[str, Any]], pretrain_grid: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The settings a teacher for ``held_out`` (of the grid ``settings``) pre-trains on under ``--pretrain-on mode``
    (``PRETRAIN_ON``; ``pretrain_grid``: the settings of --pretrain-grid)."""
    if mode == "grid":
        return list(pretrain_grid or [])
    if mode == "own":
        return [held_out]
    if mode == "other-datasets":
        return [s for s in settings if s["dataset"] != held_out["dataset"]]
    return [s for s in settings if s != held_out]


def check_before_training(cfg: EvalConfig, jobs: list[Job]) -> None:
    """Fail before any training if a setting cannot be built for an agent (batch larger than a data
    pool, validation split too large, missing data, ...), if a loaded teacher cannot act on a
    setting, or if it would meet a student of its own training (same seeds)."""
    seen = set()
    for job in jobs:
        # a fresh agent is checked per label (its options may differ from another agent's on the same env)
        agent = job.agent if job.teacher_path is None else None
        key = (job.teacher_path, agent, json.dumps(job.setting, sort_keys=True), json.dumps(job.env_overrides, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        where = f"setting {job.setting['dataset']}/{job.setting['student']}, agent {job.agent}"
        try:
            env = env_for(job)
        except ValueError as e:
            raise ValueError(f"{e} ({where})") from e
        try:
            if job.teacher_path is not None:
                load_teacher(job.teacher_path, env=env)
            else:
                make_agent(job.agent_name, **options_for(job.agent_name, job.agent_options)).check_env(env)
        except (CheckpointError, ValueError) as e:
            raise type(e)(f"{e} ({where})") from e
    for path in {job.teacher_path for job in jobs if job.teacher_path is not None}:
        lo, hi = read_checkpoint(path)["extra"].get("seeds_used", [None, None])
        ours = range(cfg.seed, cfg.seed + cfg.seeds)
        if lo is not None and any(lo <= s <= hi for s in ours):
            raise ValueError(
                f"--teachers {path} was trained on seeds {lo}..{hi} (data split, noise, students, batch order); evaluating it "
                f"on seeds {ours.start}..{ours.stop - 1} would be in-sample: pass --seed {hi + 1} or higher"
            )


def check_pretraining_settings(cfg: EvalConfig) -> None:
    """Fail before any training if a setting of --pretrain-grid cannot be built (missing data, a split too large)."""
    for setting in cfg.pretrain_settings:
        try:
            env_for(Job(setting, cfg.leave_one_out, None, cfg.pretrain_seed, cfg, cfg.lr))
        except (ValueError, DatasetNotFoundError) as e:
            raise type(e)(f"--pretrain-grid: {e} (setting {setting_label(setting)})") from e


def failed_jobs(out: Path, missing: list[Job]) -> list[dict[str, str]]:
    """The latest recorded error of every job that did not finish (``errors.jsonl``)."""
    errors = read_finished(out / "errors.jsonl", canonical_key)
    return [{"job": job.label, "error": errors.get(job.key, {}).get("error", "did not finish")} for job in missing]


def parse_args(argv: list[str]) -> EvalConfig:
    """The benchmark's configuration from command-line arguments (a suite is a config file with a grid)."""
    return parse_config(
        EvalConfig, argv, __doc__.splitlines()[0] + " (--suite FILE.yaml: a --config file with a grid)", ("--suite", "--config")
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse, check everything that can fail before training, tune, run the jobs, write the outputs."""
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(cfg.out)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        if (out / "runs.jsonl").exists() and not cfg.resume:
            raise ValueError(f"{out} already holds a benchmark; pass --resume to complete it or choose another --out")
        tuning = tuning_jobs(cfg) if cfg.tune else []
        jobs = report_jobs(cfg, {})
        if not jobs:
            raise ValueError("the grid is empty: nothing to run")
        check_before_training(cfg, tuning + jobs)
        check_pretraining_settings(cfg)
        sweep = Sweep(cfg.backend, cfg.workers, cfg.ray_address, cfg.job_cpus, cfg.job_gpus)
        sweep.connect()
    except (ValueError, CheckpointError, DatasetNotFoundError) as e:
        exit_on_bad_input("evaluate.py", str(e))
    torch.set_num_threads(cfg.threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        exit_on_bad_input("evaluate.py", f"cannot create --out {out}: {e}")
    try:
        return benchmark(cfg, sweep, out, tuning)
    except KeyboardInterrupt:
        done = len(read_finished(out / "runs.jsonl", canonical_key))
        print(f"evaluate.py: interrupted; {done} finished runs are kept; resume with --resume --out {out}", file=sys.stderr)
        sys.exit(130)


def benchmark(cfg: EvalConfig, sweep: Sweep, out: Path, tuning: list[Job]) -> list[dict[str, Any]]:
    """Tune, pre-train held-out teachers, run the reported jobs and write every output."""
    chosen, choices, held_out = {}, [], None
    if tuning:
        finished = sweep.run(tuning, run_job, out, "tuning", cfg.progress, canonical_key)
        chosen, choices = choose(cfg, [finished[job.key] for job in tuning if job.key in finished])
    if cfg.leave_one_out:
        held_out = pretrain_held_out(cfg, out)
        try:
            check_before_training(cfg, [job for job in report_jobs(cfg, {}, held_out) if job.teacher_path])
        except (ValueError, CheckpointError) as e:
            exit_on_bad_input("evaluate.py", str(e))
    jobs = report_jobs(cfg, chosen, held_out)
    finished = sweep.run(jobs, run_job, out, "students", cfg.progress, canonical_key)
    results = [finished[job.key] for job in jobs if job.key in finished]
    failures = failed_jobs(out, [job for job in tuning + jobs if job.key not in finished])
    for job, result in zip((job for job in jobs if job.key in finished), results):
        result["row"]["teacher_path"] = job.teacher_path or ""  # a reused run names where its teacher is now
    rows = [r["row"] for r in results]
    add_uniform_ratio(rows)
    table = aggregate(rows)
    config = dataclasses.asdict(cfg)
    write_tables(out, config, rows, table, choices)
    write_report(out, config, table, choices, failures)
    write_plots(out, results)
    print((out / "report.md").read_text())
    return rows


def cli() -> None:
    """Console-script entry point: exit status 0 on success (``main`` returns the rows)."""
    main()


if __name__ == "__main__":
    cli()
