"""Train one teacher on ``Teaching-v0`` and write ``runs/<name>/``.

    python train_teacher.py --agent meta_grad                 # mnist1d, mlp, 40% symmetric noise
    python train_teacher.py --agent meta_grad --unroll 3 --dataset digits --steps 2000
    python train_teacher.py --config my_run.yaml --seed 2     # flags override the file
    python train_teacher.py --resume --out runs/my_run        # continue (or --steps N to extend) a run

Outputs: ``teacher.pt`` (checkpoint, written atomically every ``--checkpoint-every`` steps and at
the end), ``config.yaml``, ``metrics.jsonl`` (one line per evaluation), TensorBoard events, and
``summary.json`` (the final line's numbers) once the run ends.
Teacher flags come from the agents' own option classes (``agents/``); each says which agents take it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import gymnasium as gym
import numpy as np
import torch
import yaml
from tqdm import tqdm

from agents.base import AGENTS, CheckpointError, Teacher, agent_class, make_agent, option_fields, options_for, read_checkpoint
from agents.loop import Callback, Curve, TeacherScalars, TeachingRun, WeightStats, start, teach
from envs import env_factory
from envs.rewards import REWARDS
from reporting import atomic_write, curve_summary
from runconfig import (
    YAML_ERRORS,
    EnvSetting,
    StudentTraining,
    build_parser,
    check_fields,
    exit_on_bad_input,
    explicit_values,
    field,
    parse_config,
    setting_label,
    settings_grid,
    to_yaml,
    yaml_value,
)
from students.data import DatasetNotFoundError, load_dataset

RL_DEFAULT_HORIZON = 200
# where the data is read from is not part of the run (evaluate.py resumes its pre-trainings from any checkout)
RESUME_MAY_CHANGE = ("steps", "epochs", "resume", "progress", "threads", "checkpoint_every", "out", "data_root", "download")


@dataclasses.dataclass
class TrainRun(EnvSetting, StudentTraining):
    """Everything a teacher-training run depends on, besides the teacher's own options."""

    steps: int = field(3000, "total student updates (across episodes)", low=1)
    epochs: float | None = field(None, "if set, steps = epochs x batches per epoch (overrides --steps)", above=0.0)
    horizon: int | None = field(
        None,
        f"updates per student episode (default: --steps; with --grid, --steps / (2 x its settings); for episodic RL "
        f"teachers, --steps up to {RL_DEFAULT_HORIZON})",
        low=1,
    )
    grid: Any = field(
        None,
        "pre-train over a distribution of students: a settings grid as YAML, e.g. '{dataset: [mnist1d, digits], "
        "noise: [symmetric, pairflip]}', or a list of settings; episodes cycle through them (fixed and online teachers)",
        parse=yaml_value,
    )
    n_envs: int = field(1, "episodic teachers: student episodes run in parallel processes", low=1)
    reward: str = field("accuracy", "env reward (RL teachers learn from it)", choices=list(REWARDS))
    threshold: float = field(0.6, "validation accuracy for the threshold reward", low=0.0, high=1.0)
    threads: int = field(1, "torch threads (1 is fastest for the small default students on a busy machine)", low=1)
    out: str | None = field(None, "run folder (default runs/<agent>-<dataset>-<student>-s<seed>)")
    checkpoint_every: int = field(
        500,
        "updates between atomic checkpoints (online teachers: rounded up to a multiple of eval_every and unroll; "
        "episodic ones save at the first episode end after each interval)",
        low=1,
    )
    resume: bool = field(False, "continue the run in --out (default: the latest matching run) from its last checkpoint")
    progress: bool = field(True, "show a progress bar")

    @property
    def teacher_options(self) -> dict[str, Any]:
        """The chosen agent's options (the run's seed included); refuses options it does not take."""
        values = {name: getattr(self, name) for name, *_ in option_fields()}
        return options_for(self.agent, values, seed=self.seed)

    @property
    def kind(self) -> str:
        return agent_class(self.agent).kind

    def validate(self) -> None:
        _ = self.teacher_options
        if self.grid is not None and self.kind == "episodic":
            raise ValueError(f"--grid pre-trains fixed and online teachers; {self.agent!r} is episodic (one setting per run)")
        _ = self.settings

    @property
    def settings(self) -> list[dict[str, Any]]:
        """The env settings episodes cycle through: the grid's, or the one of the flags."""
        return settings_grid(self, self.grid)

    def episode_horizon(self) -> int:
        """Updates per episode: --horizon; by default the whole run, or with a grid enough for every
        setting to be visited twice."""
        if self.horizon:
            return self.horizon
        return self.steps if self.grid is None else max(1, self.steps // (2 * len(self.settings)))

    @property
    def run_dir(self) -> Path:
        """``--out``, or ``runs/<agent>-<dataset>-<student>-s<seed>`` numbered -2, -3, ... so that a
        new run never lands in an old one (with ``--resume``: the latest such folder)."""
        if self.out:
            return Path(self.out)
        base = Path(f"runs/{self.agent}-{self.dataset}-{self.student}-s{self.seed}")
        candidates = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 10_000)]
        used = [c for c in candidates if (c / "teacher.pt").exists()]
        if self.resume:
            return used[-1] if used else base
        return next(c for c in candidates if c not in used)


def config_class() -> type:
    """``TrainRun`` plus one flag per teacher option in the registry (built when parsing, so that a
    newly registered teacher brings its agent name and flags)."""
    agent = ("agent", str, field("meta_grad", "teacher to train", choices=list(AGENTS)))
    return dataclasses.make_dataclass("TrainConfig", [agent, *option_fields()], bases=(TrainRun,))


def env_kwargs(cfg: Any, horizon: int, setting: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of ``Teaching-v0`` taken from a run config (and one setting of its grid),
    with the data pool its agent needs."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EnvSetting)} | (setting or {})
    return dict(
        **values, **cfg.student_env_kwargs(), horizon=horizon, reward=cfg.reward, threshold=cfg.threshold,
        **agent_class(cfg.agent).env_settings(cfg.teacher_options),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ callbacks
def metrics_until(path: Path, step: int) -> list[str]:
    """The lines of a run's metrics.jsonl up to ``step`` (none when it does not exist; a last line
    that a crash cut short is dropped); ValueError, naming the file, on any other broken line."""
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()] if path.exists() else []
    kept = []
    for number, line in lines:
        try:
            record = json.loads(line)
            if record["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if number < lines[-1][0] or not isinstance(e, json.JSONDecodeError):
                raise ValueError(f"{path} line {number} is not a metrics record ({type(e).__name__}: {e})") from None
    return kept


class RunLog(Callback):
    """metrics.jsonl plus TensorBoard, one record per evaluation (student, teacher scalars, weights);
    resumable at a step (later lines are dropped)."""

    def __init__(self, run_dir: Path, cfg: Any, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        kept = metrics_until(self.path, start_step) if start_step else []
        atomic_write(self.path, "".join(line + "\n" for line in kept))
        self.writer = SummaryWriter(str(run_dir), purge_step=start_step or None)
        if not start_step:
            table = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(cfg).items())
            self.writer.add_text("config", "|field|value|\n|-|-|\n" + table, 0)
        self.weights, self.scalars = WeightStats(), TeacherScalars()

    def write(self, step: int, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def on_step(self, run: TeachingRun) -> None:
        self.weights.on_step(run)
        self.scalars.on_step(run)
        info = run.info
        if "val_acc" in info:
            keys = ("val_loss", "val_acc", "select_loss", "select_acc", "test_loss", "test_acc", "train_loss", "train_acc")
            record = {f"student/{k}": info[k] for k in keys if k in info}
            record["episode"] = run.episode
            record.update({f"teacher/{k}": v for k, v in self.scalars.flush().items()})
            record.update({f"teacher/{k}": v for k, v in self.weights.summary().items()})
            self.writer.add_histogram("teacher/weights", self.weights.arrays()[0], run.step)
            self.weights.clear()
            self.write(run.step, record)
        if info.get("diverged"):
            tqdm.write(f"episode {run.episode} diverged at step {info['step']}; starting a new student")
            self.write(run.step, {"student/diverged": 1, "episode": run.episode})


class Checkpoints(Callback):
    """Atomic checkpoint of the teacher and, mid-episode, of the env's episode state, every
    ``every`` steps and at ``last``. It records the seeds the teacher met (data split and noise of
    ``seed``, students reset with ``seed + episode``) so that evaluation can refuse them."""

    def __init__(self, path: Path, every: int, last: int, seed: int, settings: list[dict[str, Any]], saved: int):
        self.path, self.every, self.last, self.seed = path, every, last, seed
        self.settings = [setting_label(s) for s in settings]
        self.saved = saved  # the step of the last checkpoint written (a resumed run's starting step)

    def on_step(self, run: TeachingRun) -> None:
        if run.step % self.every == 0 or run.step == self.last:
            episode = run.episode + run.done  # a finished episode resumes with the next
            extra = {"step": run.step, "episode": episode, "seeds_used": [self.seed, self.seed + run.episode]}
            extra["settings"] = self.settings
            if not run.done:
                extra["env_state"] = run.env.unwrapped.state_dict()
            run.teacher.save(self.path, run.env, extra=extra)
            self.saved = run.step


class ProgressBar(Callback):
    """A tqdm bar of student updates with the latest accuracies."""

    def __init__(self, total: int, initial: int, description: str, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=description, unit="step")

    def on_step(self, run: TeachingRun) -> None:
        self.bar.update(1)
        if "val_acc" in run.info:
            self.bar.set_postfix(val_acc=f"{run.info['val_acc']:.3f}", test_acc=f"{run.info['test_acc']:.3f}")


# ------------------------------------------------------------------------------------------ runs
def build_online(cfg: Any) -> tuple[list[gym.Env], Teacher]:
    """One env per setting (every setting is built, so checked, before anything is written) and the
    teacher of a run that teaches one student at a time (fixed and online kinds)."""
    envs = [
        gym.make("Teaching-v0", **env_kwargs(cfg, cfg.episode_horizon(), s), tensor_obs=True, disable_env_checker=True)
        for s in cfg.settings
    ]
    teacher = make_agent(cfg.agent, **cfg.teacher_options).to(envs[0].unwrapped.device)
    for env in envs:
        teacher.check_env(env)
    return envs, teacher.train(cfg.kind == "online")


def run_online(cfg: Any, run_dir: Path, envs: list[gym.Env], teacher: Teacher, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Teach students one after another for ``cfg.steps`` updates (episode e on setting e mod K, reset
    with seed + e), the teacher learning online, continuing from the checkpoint ``saved`` when resuming."""
    step, episode = 0, 0
    if saved is not None:  # the teacher's state is restored already (main)
        step, episode = saved["extra"]["step"], saved["extra"]["episode"]
    log = RunLog(run_dir, cfg, step)
    bar = ProgressBar(
        cfg.steps, step, f"{cfg.agent} on {len(envs)} setting(s)" if cfg.grid else f"{cfg.agent} on {cfg.dataset}", cfg.progress
    )
    checkpoints = Checkpoints(run_dir / "teacher.pt", checkpoint_interval(cfg), cfg.steps, cfg.seed, cfg.settings, step)
    started, run = time.perf_counter(), None
    try:
        while step < cfg.steps:
            env = envs[episode % len(envs)]
            run = start(env, teacher, cfg.seed + episode)
            run.step, run.episode = step, episode
            if saved is not None and "env_state" in saved["extra"]:
                try:
                    run.obs, run.next_info = env.unwrapped.load_state_dict(saved["extra"]["env_state"])
                except (KeyError, TypeError, ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{run_dir / 'teacher.pt'}: its env state does not fit this run ({e!r})") from None
            saved = None
            teach(run, cfg.steps - step, [log, checkpoints, bar])  # to the end of this episode at most
            step, episode = run.step, run.episode + 1
    except KeyboardInterrupt:
        raise Interrupted(run.step if run is not None else step, checkpoints.saved) from None
    finally:
        bar.bar.close()
        log.writer.close()
    return run_summary(run_dir, time.perf_counter() - started)


def run_episodic(cfg: Any, run_dir: Path, probe: gym.Env, teacher: Teacher, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Train an episodic (RL) teacher over many student episodes (``cfg.steps`` updates in all),
    continuing from the checkpoint ``saved`` when resuming, then teach one fresh student with it,
    frozen, for the summary."""
    make_env = env_factory(**env_kwargs(cfg, rl_horizon(cfg)))
    done_steps = 0
    if saved is not None:  # the teacher's state is restored already (main)
        done_steps = saved["extra"]["step"]
    log = RunLog(run_dir, cfg, done_steps)
    bar = ProgressBar(cfg.steps, done_steps, f"{cfg.agent} on {cfg.dataset}", cfg.progress).bar
    last_saved = [done_steps]
    started = time.perf_counter()

    def report(step: int, record: dict[str, Any]) -> None:
        log.write(step, record)
        bar.update(step - bar.n)
        if "student/test_acc" in record:
            bar.set_postfix(test_acc=f"{record['student/test_acc']:.3f}", ret=f"{record.get('teacher/return', 0):.3f}")
        if step - last_saved[0] >= cfg.checkpoint_every or step >= cfg.steps:
            extra = {"step": step, "episode": 0, "seeds_used": teacher.seeds_met(cfg.seed, cfg.n_envs)}
            teacher.save(run_dir / "teacher.pt", probe, extra=extra)
            last_saved[0] = step

    try:
        teacher.train_episodes(make_env, cfg.steps, done_steps, cfg.n_envs, report, log_dir=str(run_dir))
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(bar.n, last_saved[0]) from None
    extra = {"step": cfg.steps, "episode": 0, "seeds_used": teacher.seeds_met(cfg.seed, cfg.n_envs)}
    teacher.save(run_dir / "teacher.pt", probe, extra=extra)
    bar.close()
    log.writer.close()
    return {**taught_student_summary(teacher, probe, cfg.seed), "seconds": time.perf_counter() - started}


def taught_student_summary(teacher: Teacher, env: gym.Env, seed: int) -> dict[str, Any]:
    """Teach one fresh student with the frozen ``teacher``; its test accuracy and the weights' AUROC."""
    teacher.train(False)
    stats, curve = WeightStats(), Curve()
    run = teach(start(env, teacher, seed + 1_000_000), env.unwrapped.horizon, [stats, curve])
    chance = 1.0 / env.unwrapped.data.num_classes
    summary = curve_summary(curve.points, bool(run.info.get("diverged")), chance)
    return {k: summary[k] for k in ("final_test_acc", "selected_test_acc", "best_val_acc")} | {"auroc": stats.summary()["auroc"]}


def rl_horizon(cfg: Any) -> int:
    return cfg.horizon or min(cfg.steps, RL_DEFAULT_HORIZON)


def checkpoint_interval(cfg: Any) -> int:
    """``checkpoint_every`` rounded up to a multiple of ``eval_every`` and ``unroll``, so that a
    resumed run loses no half-collected meta-gradient window or evaluation window."""
    unit = math.lcm(cfg.eval_every, getattr(cfg, "unroll", None) or 1)
    return unit * math.ceil(cfg.checkpoint_every / unit)


def run_summary(run_dir: Path, seconds: float) -> dict[str, Any]:
    """Final test accuracy of the last episode, the test accuracy at its best validation accuracy,
    and the teacher's mean AUROC, from metrics.jsonl."""
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evaluated = [r for r in records if "student/test_acc" in r]
    last_episode = [r for r in evaluated if r["episode"] == evaluated[-1]["episode"]] if evaluated else []
    aurocs = [r["teacher/auroc"] for r in records if np.isfinite(r.get("teacher/auroc", float("nan")))]
    selection = lambda r: r.get("student/select_acc", r["student/val_acc"])  # noqa: E731  (the held-out split when there is one)
    summary = curve_summary([(r["step"], selection(r), r["student/test_acc"]) for r in last_episode])
    return {
        **{k: summary[k] for k in ("final_test_acc", "selected_test_acc", "best_val_acc")},
        "auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------ main
class Interrupted(Exception):
    """Ctrl-C during training; the last checkpoint (at ``checkpoint`` updates) is intact."""

    def __init__(self, step: int, checkpoint: int):
        self.step, self.checkpoint = step, checkpoint


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2, no traceback (``runconfig.exit_on_bad_input``)."""
    exit_on_bad_input("train_teacher.py", message)


def steps_for_epochs(cfg: Any) -> int:
    """Updates in ``cfg.epochs`` passes over the training split (the sampler drops ragged tails)."""
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.val_size, cfg.train_size, cfg.seed, "cpu", cfg.download)
    return max(1, int(round(cfg.epochs * (len(data.train) // cfg.batch_size))))


def resumed_config(cfg: Any, argv: list[str], run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """For ``--resume``: the run's own config.yaml, with only ``RESUME_MAY_CHANGE`` taken from the
    command line (other flags that differ are refused by name), and its checkpoint. Reads only."""
    checkpoint_file, config_file = run_dir / "teacher.pt", run_dir / "config.yaml"
    if not checkpoint_file.is_file():
        fail(f"--resume needs a checkpoint, but {checkpoint_file} does not exist")
    try:
        saved = read_checkpoint(checkpoint_file)
        stored = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except CheckpointError as e:
        fail(str(e))
    except (OSError, *YAML_ERRORS) as e:
        fail(f"--resume cannot read {config_file}: {e}")
    if not isinstance(stored, dict):
        fail(f"{config_file} does not describe a run: expected a mapping of settings, got {stored!r}")
    try:
        metrics_until(run_dir / "metrics.jsonl", saved["extra"]["step"])
    except (OSError, ValueError) as e:
        fail(f"--resume cannot continue the run's log: {e}")
    if saved["agent"] != cfg.agent and ("--agent" in argv or saved["agent"] != stored.get("agent")):
        fail(f"{checkpoint_file} holds a {saved['agent']!r} teacher, not {cfg.agent!r}; pass --agent {saved['agent']}")
    stored = {**agent_class(saved["agent"]).legacy_options, **stored}  # a run begun before those options existed
    given = explicit_values(build_parser(type(cfg), ""), type(cfg), argv)  # flags and --config, not defaults
    changed = sorted(name for name in set(given) - set(RESUME_MAY_CHANGE) if stored.get(name) != getattr(cfg, name, None))
    if changed:
        flags = ", ".join(f"--{n.replace('_', '-')} ({stored.get(n)!r} -> {getattr(cfg, n)!r})" for n in changed)
        fail(f"--resume continues the run as it was configured; these flags would change it: {flags}")
    kept = {name: getattr(cfg, name) for name in RESUME_MAY_CHANGE if name in given}  # e.g. --steps to extend the run
    try:
        merged = check_fields(type(cfg)(**{**stored, **kept, "resume": True}))
    except (TypeError, ValueError) as e:
        fail(f"{config_file} does not describe a run of this version: {e}")
    merged.out = str(run_dir)
    return merged, saved


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse and check everything (building the env and teacher), then prepare the run folder,
    train, and print and save the summary. A refused command writes nothing (but for a resume whose
    checkpoint holds an env state that no longer loads: that is found once config.yaml and the run's log
    are rewritten)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(config_class(), argv, __doc__.splitlines()[0])
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        fail(f"--out {run_dir} exists and is not a folder")
    saved = None
    if cfg.resume:
        cfg, saved = resumed_config(cfg, argv, run_dir)
    elif (run_dir / "teacher.pt").exists():
        fail(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:
        if cfg.epochs is not None:
            cfg.steps = steps_for_epochs(cfg)
        if cfg.kind == "episodic":
            env = env_factory(**env_kwargs(cfg, rl_horizon(cfg)))()
            teacher = make_agent(cfg.agent, **cfg.teacher_options)
            teacher.check_env(env)
        else:
            env, teacher = build_online(cfg)  # one env per setting
        if saved is not None and saved["extra"]["step"] > cfg.steps:
            raise ValueError(f"the run already took {saved['extra']['step']} steps; --steps {cfg.steps} would shorten it")
        if saved is not None:
            teacher.trained_on = saved["obs_spec"]  # an SB3 teacher rebuilds its policy for that batch size
            try:
                teacher.load_state_dict(saved["state"])
            except (RuntimeError, KeyError, ValueError, TypeError) as e:
                raise CheckpointError(
                    f"{run_dir / 'teacher.pt'}: the saved teacher state does not fit {cfg.agent!r}: {e}"
                ) from None
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / "config.yaml", to_yaml(cfg))
        except OSError as e:
            raise ValueError(f"cannot write the run folder --out {run_dir}: {e}") from None
        summary = (run_episodic if cfg.kind == "episodic" else run_online)(cfg, run_dir, env, teacher, saved)
    except (ValueError, DatasetNotFoundError, CheckpointError) as e:
        fail(str(e))
    except Interrupted as e:
        resume = (
            f"(last checkpoint: step {e.checkpoint}); resume with --resume --out {run_dir}"
            if (run_dir / "teacher.pt").exists()
            else "before its first checkpoint: nothing to resume; run the command again"
        )
        print(f"train_teacher.py: interrupted at step {e.step} {resume}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # outside the training loop: while building, or in an RL run's final summary
        saved = (run_dir / "teacher.pt").exists()
        where = f"the last checkpoint is kept; resume with --resume --out {run_dir}" if saved else "nothing was trained"
        print(f"train_teacher.py: interrupted; {where}", file=sys.stderr)
        sys.exit(130)
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    print(
        f"done in {summary['seconds']:.0f}s: student test accuracy {summary['final_test_acc']:.4f} "
        f"(at best validation accuracy {summary['selected_test_acc']:.4f}); "
        f"teacher AUROC clean-vs-corrupted {summary['auroc']:.3f}; run in {run_dir}/"
    )
    return summary


def cli() -> None:
    """Console-script entry point: exit status 0 on success (``main`` returns the summary)."""
    main()


if __name__ == "__main__":
    cli()
