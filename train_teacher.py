"""Train one teacher on ``Teaching-v0`` and write ``runs/<name>/``.

    python train_teacher.py --agent meta_grad                 # mnist1d, mlp, 40% symmetric noise
    python train_teacher.py --agent meta_grad --unroll 3 --dataset digits --steps 2000
    python train_teacher.py --config my_run.yaml --seed 2     # flags override the file
    python train_teacher.py --agent meta_grad --resume --out runs/my_run

Outputs: ``teacher.pt`` (checkpoint, written atomically every ``--checkpoint-every`` steps and at
the end), ``config.yaml``, ``metrics.jsonl`` (one line per evaluation) and TensorBoard events.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from agents.base import AGENTS, CheckpointError, Teacher, make_agent, read_checkpoint
from agents.diagnostics import auroc
from envs import env_factory
from envs.rewards import REWARDS
from runconfig import StudentTraining, field, parse_config, to_yaml, yaml_value
from students.data import DATASETS, load_dataset
from students.models import STUDENTS
from students.noise import NOISE_TYPES

ONLINE_AGENTS = ("meta_grad", "mwnet")  # learn jointly with the student, through the env's functional access
RL_AGENTS = ("reinforce", "ppo", "a2c")  # learn from rewards over many student episodes, through the Gym API
RL_DEFAULT_HORIZON = 200


@dataclass
class TrainConfig(StudentTraining):
    """Everything a teacher-training run depends on."""

    agent: str = field("meta_grad", "teacher to train", choices=list(AGENTS))
    dataset: str = field("mnist1d", "dataset the student learns", choices=list(DATASETS))
    student: str = field("mlp", "student network", choices=list(STUDENTS))
    student_kwargs: dict | None = field(
        None, "student constructor arguments as YAML, e.g. '{hidden: [64, 32]}'", parse=yaml_value
    )
    noise: str = field("symmetric", "label noise of the training split", choices=list(NOISE_TYPES))
    noise_rate: float = field(0.4, "fraction of training labels corrupted, in [0, 1)")
    steps: int = field(3000, "total student updates (across episodes)")
    epochs: float | None = field(None, "if set, steps = epochs x batches per epoch (overrides --steps)")
    horizon: int | None = field(
        None, f"updates per student episode (default: --steps for online teachers, {RL_DEFAULT_HORIZON} for RL teachers)"
    )
    n_envs: int = field(1, "RL teachers: student episodes run in parallel processes")
    reward: str = field("accuracy", "env reward (RL teachers learn from it)", choices=list(REWARDS))
    threshold: float = field(0.6, "validation accuracy for the threshold reward")
    unroll: int = field(1, "meta_grad: real student updates B the meta-gradient goes through")
    meta_lr: float = field(3e-3, "meta_grad/mwnet: teacher Adam learning rate")
    val_batch: int = field(256, "meta_grad/mwnet/l2rw: validation samples per meta-gradient")
    features: str = field("all", "meta_grad/RL: teacher inputs (all = internal + surface)", choices=["all", "surface", "loss"])
    rl_lr: float = field(1e-2, "reinforce: policy Adam learning rate (ppo/a2c use 3e-4)")
    seed: int = field(0, "seeds data split, label noise, student, teacher and batch order")
    device: str = field("auto", "auto, cpu or cuda", choices=["auto", "cpu", "cuda"])
    data_root: str | None = field(None, "folder holding torchvision-style datasets (e.g. ../shared/data)")
    download: bool = field(False, "let torchvision download a missing dataset")
    out: str | None = field(None, "run folder (default runs/<agent>-<dataset>-<student>-s<seed>)")
    checkpoint_every: int = field(500, "updates between atomic checkpoints (rounded up to a multiple of eval_every and unroll)")
    resume: bool = field(False, "continue the run in --out from its last checkpoint")
    progress: bool = field(True, "show a progress bar")

    def validate(self) -> None:
        positive = ("steps", "batch_size", "eval_every", "val_size", "unroll", "val_batch", "checkpoint_every", "n_envs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.noise_rate < 1:
            raise ValueError(f"--noise-rate must be in [0, 1), got {self.noise_rate}")
        if self.lr <= 0 or self.meta_lr <= 0:
            raise ValueError(f"--lr and --meta-lr must be positive, got {self.lr} and {self.meta_lr}")
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(f"--horizon must be >= 1, got {self.horizon}")
        if self.student_kwargs is not None and not isinstance(self.student_kwargs, dict):
            raise ValueError(f"--student-kwargs must be a mapping such as '{{hidden: [64, 32]}}', got {self.student_kwargs!r}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")

    @property
    def run_dir(self) -> Path:
        """``--out``, or ``runs/<agent>-<dataset>-<student>-s<seed>`` numbered -2, -3, ... so that a
        new run never lands in an old one (with ``--resume``: the latest such folder)."""
        if self.out:
            return Path(self.out)
        base = Path(f"runs/{self.agent}-{self.dataset}-{self.student}-s{self.seed}")
        candidates = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 10_000)]
        used = [c for c in candidates if (c / "teacher.pt").exists() or (c / "config.yaml").exists()]
        if self.resume:
            return used[-1] if used else base
        return next(c for c in candidates if c not in used)


def env_kwargs(cfg: Any, horizon: int) -> dict[str, Any]:
    """Keyword arguments of ``Teaching-v0`` taken from a run config."""
    return dict(
        **cfg.student_env_kwargs(), dataset=cfg.dataset, student=cfg.student, student_kwargs=cfg.student_kwargs,
        noise=cfg.noise, noise_rate=cfg.noise_rate, horizon=horizon, reward=cfg.reward, threshold=cfg.threshold,
        data_root=cfg.data_root, download=cfg.download, device=cfg.device, seed=cfg.seed,
    )  # fmt: skip


def agent_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The teacher's own config, from the fields that apply to it."""
    if cfg.agent == "meta_grad":
        return dict(unroll=cfg.unroll, meta_lr=cfg.meta_lr, val_batch=cfg.val_batch, features=cfg.features, seed=cfg.seed)
    if cfg.agent == "mwnet":
        return dict(meta_lr=cfg.meta_lr, val_batch=cfg.val_batch, seed=cfg.seed)
    if cfg.agent == "l2rw":
        return dict(val_batch=cfg.val_batch)
    if cfg.agent in RL_AGENTS and cfg.features == "loss":
        raise ValueError("RL teachers read 'all' or 'surface' features, not 'loss'")
    if cfg.agent == "reinforce":
        return dict(features=cfg.features, lr=cfg.rl_lr, seed=cfg.seed)
    if cfg.agent in RL_AGENTS:
        return dict(features=cfg.features, seed=cfg.seed)
    return {}


class RunLog:
    """metrics.jsonl plus TensorBoard, both resumable at a step (later lines are dropped)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if start_step and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        else:
            self.path.write_text("")
        self.writer = SummaryWriter(str(run_dir), purge_step=start_step or None)
        if not start_step:
            table = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(cfg).items())
            self.writer.add_text("config", "|field|value|\n|-|-|\n" + table, 0)

    def write(self, step: int, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WindowStats:
    """Weights given to clean and corrupted samples since the last evaluation."""

    def __init__(self) -> None:
        self.weights: list[np.ndarray] = []
        self.corrupted: list[np.ndarray] = []
        self.scalars: dict[str, list[float]] = {}

    def add(self, weights: torch.Tensor, corrupted: Any, scalars: dict[str, float]) -> None:
        self.weights.append(torch.as_tensor(weights).detach().cpu().numpy())
        self.corrupted.append(np.asarray(torch.as_tensor(corrupted).cpu()))
        for k, v in scalars.items():
            self.scalars.setdefault(k, []).append(v)

    def flush(self, writer: Any, step: int) -> dict[str, float]:
        if not self.weights:
            return {}
        w, c = np.concatenate(self.weights), np.concatenate(self.corrupted)
        record = {f"teacher/{k}": float(np.mean(v)) for k, v in self.scalars.items()}
        record["teacher/weight_clean"] = float(w[~c].mean()) if (~c).any() else float("nan")
        record["teacher/weight_corrupted"] = float(w[c].mean()) if c.any() else float("nan")
        record["teacher/auroc"] = auroc(w, ~c)
        writer.add_histogram("teacher/weights", w, step)
        self.__init__()
        return record


def checkpoint(teacher: Teacher, env: Any, path: Path, step: int, episode: int) -> None:
    """Atomic checkpoint of the teacher and, mid-episode, of the env's episode state."""
    extra = {"step": step, "episode": episode}
    if env.unwrapped._losses is not None:
        extra["env_state"] = env.unwrapped.state_dict()
    teacher.save(path, env, extra=extra)


def run_online(cfg: TrainConfig, run_dir: Path, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Train an online teacher (or run a fixed one) jointly with students, ``cfg.steps`` updates,
    continuing from the checkpoint ``saved`` when resuming."""
    horizon = cfg.horizon or cfg.steps
    env = gym.make("Teaching-v0", **env_kwargs(cfg, horizon), tensor_obs=True, disable_env_checker=True)
    device = env.unwrapped.device
    teacher = make_agent(cfg.agent, **agent_kwargs(cfg))
    if hasattr(teacher, "to"):
        teacher.to(device)
    if hasattr(teacher, "bind"):
        teacher.bind(env)
    teacher.train(cfg.agent in ONLINE_AGENTS)
    step, episode = 0, 0
    ckpt_path = run_dir / "teacher.pt"
    if saved is not None:
        teacher.load_state_dict(saved["state"])
        step, episode = saved["extra"]["step"], saved["extra"]["episode"]
    obs, info = env.reset(seed=cfg.seed + episode)
    if saved is not None and "env_state" in saved["extra"]:
        obs = env.unwrapped.load_state_dict(saved["extra"]["env_state"])
        info = {"corrupted": env.unwrapped.corrupted[env.unwrapped.batch_indices]}
    log = RunLog(run_dir, cfg, step)
    window, last_eval = WindowStats(), {}
    every = checkpoint_interval(cfg)
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc=f"{cfg.agent} on {cfg.dataset}", unit="step")
    start = time.perf_counter()
    while step < cfg.steps:
        weights = teacher.act(obs)
        corrupted = info["corrupted"]
        obs, reward, terminated, truncated, info = env.step(weights)
        scalars = teacher.observe(env, reward, terminated or truncated, info)
        window.add(weights, corrupted, scalars)
        step += 1
        bar.update(1)
        if "val_acc" in info:
            last_eval = {f"student/{k}": info[k] for k in ("val_loss", "val_acc", "test_loss", "test_acc")}
            running = env.unwrapped.features
            record = {
                **last_eval,
                "student/train_loss": float(running.train_loss),
                "student/train_acc": float(running.train_acc),
                "episode": episode,
            }
            record.update(window.flush(log.writer, step))
            log.write(step, record)
            bar.set_postfix(val_acc=f"{info['val_acc']:.3f}", test_acc=f"{info['test_acc']:.3f}")
        if terminated or truncated:
            if info.get("diverged"):
                tqdm.write(f"episode {episode} diverged at step {info['step']}; starting a new student")
                log.write(step, {"student/diverged": 1, "episode": episode})
            episode += 1
            obs, info = env.reset(seed=cfg.seed + episode)
        if step % every == 0 or step == cfg.steps:
            checkpoint(teacher, env, ckpt_path, step, episode)
    bar.close()
    log.close()
    return summarise(run_dir, time.perf_counter() - start)


def run_rl(cfg: TrainConfig, run_dir: Path, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Train an RL teacher over many student episodes of ``horizon`` updates (``cfg.steps`` in all),
    continuing from the checkpoint ``saved`` when resuming, then teach one fresh student with it,
    frozen, for the summary."""
    horizon = cfg.horizon or min(cfg.steps, RL_DEFAULT_HORIZON)
    make_env = env_factory(**env_kwargs(cfg, horizon))
    teacher = make_agent(cfg.agent, **agent_kwargs(cfg))
    ckpt_path = run_dir / "teacher.pt"
    done_steps = 0
    if saved is not None:
        teacher.trained_on = saved["obs_spec"]
        teacher.load_state_dict(saved["state"])
        done_steps = saved["extra"]["step"]
    probe = make_env()
    log = RunLog(run_dir, cfg, done_steps)
    bar = tqdm(total=cfg.steps, initial=done_steps, disable=not cfg.progress, desc=f"{cfg.agent} on {cfg.dataset}", unit="step")
    start = time.perf_counter()
    last_saved = [done_steps]

    def report(step: int, record: dict[str, Any]) -> None:
        log.write(step, record)
        bar.update(step - bar.n)
        if "student/test_acc" in record:
            bar.set_postfix(test_acc=f"{record['student/test_acc']:.3f}", ret=f"{record.get('teacher/return', 0):.3f}")
        if step - last_saved[0] >= cfg.checkpoint_every or step >= cfg.steps:
            teacher.save(ckpt_path, probe, extra={"step": step, "episode": 0})
            last_saved[0] = step

    if cfg.agent == "reinforce":
        steps_taken = [done_steps]

        def after_round(rounds: int, stats: dict[str, Any]) -> bool:
            """Log the round; stop once the student updates actually taken reach ``cfg.steps``
            (episodes that reach the threshold end early, so rounds differ in length)."""
            steps_taken[0] += int(round(stats["episode_steps"] * cfg.n_envs))
            record = {f"teacher/{k}": v for k, v in stats.items() if k not in ("val_acc", "test_acc")}
            record.update({f"student/{k}": stats[k] for k in ("val_acc", "test_acc") if k in stats})
            report(min(steps_taken[0], cfg.steps), {**record, "episode": rounds * cfg.n_envs})
            return steps_taken[0] < cfg.steps

        # every round takes at least one update per env, so cfg.steps rounds is an upper bound
        teacher.learn(make_env, rounds=cfg.steps, n_envs=cfg.n_envs, seed=cfg.seed, callback=after_round)
    else:
        from agents.sb3 import ProgressCallback

        callback = ProgressCallback(report, done_steps)
        teacher.learn(make_env, max(0, cfg.steps - done_steps), cfg.n_envs, tensorboard_log=str(run_dir), callback=callback)
        teacher.save(ckpt_path, probe, extra={"step": cfg.steps, "episode": 0})
    bar.close()
    log.close()
    return {**taught_student_summary(teacher, probe, cfg.seed), "seconds": time.perf_counter() - start}


def taught_student_summary(teacher: Teacher, env: Any, seed: int) -> dict[str, Any]:
    """Teach one fresh student with the frozen ``teacher``; its test accuracy and the weights' AUROC."""
    teacher.train(False)
    obs, info = env.reset(seed=seed + 10_000)
    weights, corrupted, test_accs, done = [], [], [], False
    while not done:
        w = teacher.act(obs)
        weights.append(torch.as_tensor(w).cpu().numpy())
        corrupted.append(np.asarray(info["corrupted"]))
        obs, _, done, truncated, info = env.step(w)
        done = done or truncated
        if "test_acc" in info:
            test_accs.append(info["test_acc"])
    w, c = np.concatenate(weights), np.concatenate(corrupted)
    return {"final_test_acc": test_accs[-1], "best_test_acc": max(test_accs), "auroc": auroc(w, ~c)}


def checkpoint_interval(cfg: TrainConfig) -> int:
    """``checkpoint_every`` rounded up to a multiple of ``eval_every`` and ``unroll``, so that a
    resumed run loses no half-collected meta-gradient window or evaluation window."""
    unit = math.lcm(cfg.eval_every, cfg.unroll)
    return unit * math.ceil(cfg.checkpoint_every / unit)


def summarise(run_dir: Path, seconds: float) -> dict[str, Any]:
    """Final and best test accuracy of the last episode and the teacher's AUROC, from metrics.jsonl."""
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evaluated = [r for r in records if "student/test_acc" in r]
    last_episode = [r for r in evaluated if r["episode"] == evaluated[-1]["episode"]] if evaluated else []
    aurocs = [r["teacher/auroc"] for r in records if np.isfinite(r.get("teacher/auroc", float("nan")))]
    nan = float("nan")
    return {
        "final_test_acc": last_episode[-1]["student/test_acc"] if last_episode else nan,
        "best_test_acc": max((r["student/test_acc"] for r in last_episode), default=nan),
        "best_val_acc": max((r["student/val_acc"] for r in last_episode), default=nan),
        "auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the config, prepare the run folder, train, and print and save the summary."""
    cfg = parse_config(TrainConfig, argv, __doc__.splitlines()[0])
    run_dir = cfg.run_dir
    saved = prepare_run_dir(cfg, run_dir)
    torch.manual_seed(cfg.seed)
    try:
        if cfg.epochs is not None:
            cfg.steps = steps_for_epochs(cfg)
        summary = (run_rl if cfg.agent in RL_AGENTS else run_online)(cfg, run_dir, saved)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        fail(str(e))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"done in {summary['seconds']:.0f}s: student test accuracy {summary['final_test_acc']:.4f} "
        f"(best {summary['best_test_acc']:.4f}); teacher AUROC clean-vs-corrupted {summary['auroc']:.3f}; run in {run_dir}/"
    )
    return summary


def fail(message: str) -> None:
    """Exit like argparse does on bad input: one line on stderr, exit code 2, no traceback."""
    print(f"train_teacher.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def steps_for_epochs(cfg: TrainConfig) -> int:
    """Updates in ``cfg.epochs`` passes over the training split (the sampler drops ragged tails)."""
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.val_size, cfg.train_size, cfg.seed, "cpu", cfg.download)
    return max(1, int(round(cfg.epochs * (len(data.train) // cfg.batch_size))))


def prepare_run_dir(cfg: TrainConfig, run_dir: Path) -> dict[str, Any] | None:
    """Create the run folder, or check it and read its checkpoint for --resume (returned), before
    anything is written; then write config.yaml atomically."""
    if run_dir.exists() and not run_dir.is_dir():
        fail(f"--out {run_dir} exists and is not a folder")
    if cfg.resume:
        if not (run_dir / "teacher.pt").is_file():
            fail(f"--resume needs a checkpoint, but {run_dir / 'teacher.pt'} does not exist")
        try:
            saved = read_checkpoint(run_dir / "teacher.pt")
        except CheckpointError as e:
            fail(str(e))
        if saved["agent"] != cfg.agent:
            fail(f"{run_dir / 'teacher.pt'} holds a {saved['agent']!r} teacher, not {cfg.agent!r}; pass --agent {saved['agent']}")
    else:
        saved = None
        if (run_dir / "teacher.pt").exists():
            fail(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(to_yaml(cfg))
    tmp.replace(run_dir / "config.yaml")
    return saved


if __name__ == "__main__":
    main()
