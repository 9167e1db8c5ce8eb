"""Benchmark teachers on fresh students, and transfer trained teachers to new students.

    python evaluate.py --agents uniform,spl,l2rw,mwnet,meta_grad --dataset mnist1d --seeds 3 --out reports/quick
    python evaluate.py --agents uniform --teachers runs/meta_grad-mnist1d-mlp-s0 --dataset mnist \\
        --student cnn --data-root ../shared/data --out reports/transfer          # a frozen teacher, transferred
    python evaluate.py --suite suites/quick.yaml --workers 2 --out reports/quick

For every setting x agent x seed a fresh student is trained in ``Teaching-v0``. Agents named in
``--agents`` start untrained: non-learned ones just act, meta-gradient ones (``l2rw``, ``mwnet``,
``meta_grad``) learn online jointly with the student. Teachers loaded from ``--teachers`` run frozen
(pure transfer) unless ``--online``. Outputs in ``--out``: report.md, results.csv, results.json and
PNG plots.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import multiprocessing
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from scipy import stats as scipy_stats
from tqdm import tqdm

from agents.base import AGENTS, CheckpointError, Teacher, agent_class, load_teacher, make_agent, options_for
from agents.loop import Curve, WeightStats, start, teach
from envs import env_factory
from runconfig import EnvSetting, StudentTraining, field, parse_config
from students.data import DATASETS, DatasetNotFoundError, check_name
from students.models import STUDENTS
from students.noise import NOISE_TYPES

GRID_KEYS = ("dataset", "student", "noise", "noise_rate")


@dataclass
class EvalConfig(EnvSetting, StudentTraining):
    """A benchmark: which teachers, on which settings, over how many seeds (``seed``, ``seed + 1``, ...)."""

    agents: str = field(
        "uniform,spl,l2rw,mwnet,meta_grad", "comma-separated agents to run untrained (online learners learn as they teach)"
    )
    agent_options: dict | None = field(
        None, "options per agent as YAML, e.g. '{meta_grad: {teacher_lr: 0.001}, l2rw: {val_batch: 128}}'"
    )
    teachers: str | None = field(
        None, "comma-separated runs/<name> folders (or teacher.pt files) of trained teachers, run frozen"
    )
    online: bool = field(False, "let loaded online teachers keep learning during evaluation")
    grid: dict | None = field(
        None,
        "settings grid as YAML, e.g. '{dataset: [mnist1d, digits], noise_rate: [0.2, 0.4]}' (overrides the single setting above)",
    )
    seeds: int = field(3, "seeds per (setting, agent)", low=1)
    steps: int = field(2000, "student updates per run", low=1)
    thresholds: str = field("0.5,0.6", "validation accuracies for steps-to-threshold, comma-separated")
    workers: int = field(1, "parallel worker processes over (setting, agent, seed) jobs", low=1)
    threads: int = field(1, "torch threads per job (fixed, so results do not depend on --workers)", low=1)
    out: str = field("reports/latest", "output folder")
    progress: bool = field(True, "show a progress bar")

    def validate(self) -> None:
        for agent in self.agent_names:
            check_name("agent", agent, list(AGENTS))
            if agent_class(agent).kind == "episodic":
                raise ValueError(
                    f"agent {agent!r} learns over many episodes and cannot start untrained: train it with train_teacher.py and pass --teachers runs/..."
                )
        options = self.agent_options or {}
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise ValueError(f"agent_options must map agent -> {{option: value}}, got {options!r}")
        for agent, values in options.items():
            if agent not in self.agent_names:
                raise ValueError(f"agent_options names {agent!r}, which is not in --agents ({self.agents})")
            make_agent(agent, **options_for(agent, values))  # refuses unknown options and bad values by name
        if not self.agent_names and not self.teacher_paths:
            raise ValueError("nothing to evaluate: --agents and --teachers are both empty")
        for path in self.teacher_paths:
            if not Path(path).exists():
                raise ValueError(f"--teachers: {path} does not exist (expected a runs/<name>/ folder or a teacher.pt)")
        try:
            _ = self.threshold_values
        except ValueError as e:
            raise ValueError(f"--thresholds must be comma-separated numbers, got {self.thresholds!r}") from e

    @property
    def agent_names(self) -> list[str]:
        return [a.strip() for a in self.agents.split(",") if a.strip()]

    @property
    def teacher_paths(self) -> list[str]:
        return [t.strip() for t in (self.teachers or "").split(",") if t.strip()]

    @property
    def threshold_values(self) -> list[float]:
        return [float(t) for t in self.thresholds.split(",") if t.strip()]


# ------------------------------------------------------------------------------------------ grid
def settings_grid(cfg: EvalConfig) -> list[dict[str, Any]]:
    """The env settings to run: the single one of the flags, or the product of ``grid``'s axes
    (axes it leaves out keep the flags' value; ``student_kwargs`` may map student -> kwargs)."""
    base = {k: getattr(cfg, k) for k in (*GRID_KEYS, "student_kwargs")}
    grid = cfg.grid or {}
    if not isinstance(grid, dict):
        raise ValueError(f"grid must be a mapping of setting -> list of values, got {grid!r}")
    unknown = sorted(set(grid) - set(GRID_KEYS) - {"student_kwargs"})
    if unknown:
        raise ValueError(f"grid: unknown keys {', '.join(unknown)}; valid: {', '.join(GRID_KEYS)}, student_kwargs")
    axes = {k: grid.get(k, [base[k]]) for k in GRID_KEYS}
    empty = [k for k, v in axes.items() if not v]
    if empty:
        raise ValueError(f"the grid is empty: no values for {', '.join(empty)}")
    per_student = grid.get("student_kwargs") or {}
    return [
        {"dataset": d, "student": s, "noise": n, "noise_rate": r, "student_kwargs": per_student.get(s, base["student_kwargs"])}
        for d, s, n, r in itertools.product(*(axes[k] for k in GRID_KEYS))
    ]


@dataclass(frozen=True)
class Job:
    """One student trained by one teacher: the unit of work and of parallelism."""

    setting: dict[str, Any]
    agent: str  # agent name, or "name@path" for a loaded teacher
    teacher_path: str | None
    seed: int
    cfg: EvalConfig


def env_for(job: Job) -> gym.Env:
    """A fresh ``Teaching-v0`` for the job's setting and seed (tensor observations, in-process)."""
    cfg = job.cfg
    return env_factory(
        **job.setting,
        **cfg.student_env_kwargs(),
        horizon=cfg.steps,
        data_root=cfg.data_root,
        download=cfg.download,
        device=cfg.device,
        seed=job.seed,
        tensor_obs=True,
        disable_env_checker=True,
    )()


def build_teacher(job: Job, env: Any) -> Teacher:
    """The job's teacher: loaded and checked against the env, or fresh; online learners in train mode."""
    if job.teacher_path is not None:
        teacher = load_teacher(job.teacher_path, env=env, device=env.unwrapped.device)
        return teacher.train(job.cfg.online and teacher.kind == "online")
    options = options_for(job.agent, (job.cfg.agent_options or {}).get(job.agent, {}), seed=job.seed)
    teacher = make_agent(job.agent, **options).to(env.unwrapped.device)
    return teacher.train(teacher.kind == "online")


def run_job(job: Job) -> dict[str, Any]:
    """Train one fresh student under the job's teacher; its metrics, curve and weight samples."""
    torch.set_num_threads(job.cfg.threads)
    torch.manual_seed(job.seed)
    env = env_for(job)
    teacher = build_teacher(job, env)
    stats, curve = WeightStats(), Curve()
    run = teach(start(env, teacher, job.seed), job.cfg.steps, [stats, curve])
    w, c = stats.arrays()
    curve = curve.points
    row = {
        "agent": job.agent, "seed": job.seed, **{k: job.setting[k] for k in GRID_KEYS},
        "student_kwargs": json.dumps(job.setting.get("student_kwargs")), "teacher_path": job.teacher_path or "",
        "trained_on": describe_training(teacher) if job.teacher_path else "", "online": teacher.training,
        "steps": run.step, "diverged": bool(run.info.get("diverged")),
        "final_test_acc": curve[-1][2] if curve else float("nan"), "best_test_acc": max((t for _, _, t in curve), default=float("nan")),
        "final_val_acc": curve[-1][1] if curve else float("nan"), "seconds_per_step": run.seconds / max(run.step, 1),
        **stats.summary(),
    }  # fmt: skip
    for threshold in job.cfg.threshold_values:
        row[f"steps_to_{threshold:g}"] = steps_to_threshold(curve, threshold)
    rng = np.random.default_rng(job.seed)
    sample = rng.choice(len(w), size=min(4000, len(w)), replace=False)
    return {"row": row, "curve": curve, "weights": w[sample].tolist(), "corrupted": c[sample].tolist()}


def describe_training(teacher: Teacher) -> str:
    """``dataset/student/noise<rate>`` of the env a loaded teacher was trained on."""
    env = teacher.trained_env or {}
    return f"{env.get('dataset', '?')}/{env.get('student', '?')}/{env.get('noise', '?')}{env.get('noise_rate', '')}"


# ------------------------------------------------------------------------------------------ statistics
def steps_to_threshold(curve: list[tuple[int, float, float]], threshold: float) -> float:
    """The first evaluated step at which validation accuracy reached ``threshold`` (NaN if never)."""
    return next((float(step) for step, val_acc, _ in curve if val_acc >= threshold), float("nan"))


def summarise(values: list[float]) -> dict[str, float]:
    """Mean, sample std (ddof 1), the half-width of a 95% t confidence interval, and n, over the
    finite values."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": float("nan"), "n": 0}
    std = float(x.std(ddof=1)) if n > 1 else float("nan")
    half = float(scipy_stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(x.mean()), "std": std, "ci95": half, "n": n}


def add_uniform_ratio(rows: list[dict[str, Any]]) -> None:
    """Each run's time per step divided by the mean time per step of ``uniform`` in its setting."""

    def key(r):
        return tuple(r[k] for k in GRID_KEYS) + (r["student_kwargs"],)

    uniform: dict[tuple, list[float]] = {}
    for r in rows:
        if r["agent"] == "uniform":
            uniform.setdefault(key(r), []).append(r["seconds_per_step"])
    for r in rows:
        base = uniform.get(key(r))
        r["time_ratio_to_uniform"] = r["seconds_per_step"] / float(np.mean(base)) if base else float("nan")


def aggregate(rows: list[dict[str, Any]], thresholds: list[float]) -> list[dict[str, Any]]:
    """One line per (setting, agent): each metric's mean, std, 95% CI and n."""
    metrics = ["final_test_acc", "best_test_acc", "auroc", "seconds_per_step", "time_ratio_to_uniform"]
    metrics += [f"steps_to_{t:g}" for t in thresholds]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((*(r[k] for k in GRID_KEYS), r["student_kwargs"], r["agent"]), []).append(r)
    table = []
    for group_rows in groups.values():
        first = group_rows[0]
        line = {k: first[k] for k in (*GRID_KEYS, "student_kwargs", "agent", "trained_on", "online")}
        for m in metrics:
            line[m] = summarise([r[m] for r in group_rows])
        line["reached"] = {f"{t:g}": sum(np.isfinite(r[f"steps_to_{t:g}"]) for r in group_rows) for t in thresholds}
        table.append(line)
    return table


# ------------------------------------------------------------------------------------------ outputs
def fmt(stat: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std [±CI]`` of a ``summarise`` result, for the report's tables."""
    if stat["n"] == 0:
        return "-"
    text = f"{scale * stat['mean']:.{digits}f}"
    if stat["n"] > 1:
        text += f" ± {scale * stat['std']:.{digits}f} [±{scale * stat['ci95']:.{digits}f}]"
    return text


def write_report(out: Path, cfg: EvalConfig, table: list[dict[str, Any]]) -> None:
    """report.md: the settings, one table per setting sorted by test accuracy, the transfer pairs."""
    thresholds = cfg.threshold_values
    lines = ["# Teacher benchmark", "", "## Settings", ""]
    skip = {"agents", "teachers", "out", "progress", "workers"}
    lines += [f"- `{f.name}`: {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name not in skip]
    lines += [
        "",
        "Values: mean ± std [95% CI half-width] over seeds. Accuracies in %. `time x` is the time per student step relative to `uniform`.",
        "",
    ]
    by_setting: dict[tuple, list[dict[str, Any]]] = {}
    for line in table:
        by_setting.setdefault(tuple(line[k] for k in (*GRID_KEYS, "student_kwargs")), []).append(line)
    header = (
        "| agent | final test acc | best test acc | " + " | ".join(f"steps to {t:g}" for t in thresholds) + " | AUROC | time x |"
    )
    for setting, lines_ in by_setting.items():
        dataset, student, noise, rate, kwargs = setting
        lines += [f"## {dataset} / {student} / {noise} {rate}" + (f" ({kwargs})" if kwargs != "null" else ""), "", header]
        lines.append("|" + "---|" * (5 + len(thresholds)))
        for line in sorted(lines_, key=lambda r: -np.nan_to_num(r["final_test_acc"]["mean"], nan=-1)):
            steps = [
                f"{fmt(line[f'steps_to_{t:g}'], digits=0)} ({line['reached'][f'{t:g}']}/{line['final_test_acc']['n']})"
                for t in thresholds
            ]
            lines.append(
                f"| {line['agent']} | {fmt(line['final_test_acc'], 100, 1)} | {fmt(line['best_test_acc'], 100, 1)} | "
                + " | ".join(steps)
                + f" | {fmt(line['auroc'], 1, 3)} | {fmt(line['time_ratio_to_uniform'], 1, 2)} |"
            )
        lines.append("")
    transfers = [line for line in table if line["trained_on"]]
    if transfers:
        lines += [
            "## Transfer pairs",
            "",
            "| teacher | trained on | evaluated on | mode | final test acc | AUROC |",
            "|---|---|---|---|---|---|",
        ]
        for line in transfers:
            target = f"{line['dataset']}/{line['student']}/{line['noise']}{line['noise_rate']}"
            mode = "online" if line["online"] else "frozen"
            lines.append(
                f"| {line['agent']} | {line['trained_on']} | {target} | {mode} | {fmt(line['final_test_acc'], 100, 1)} | {fmt(line['auroc'], 1, 3)} |"
            )
        lines.append("")
    lines += ["Plots: `curves.png` (test accuracy over steps), `weights.png` (weights of clean vs corrupted samples).", ""]
    (out / "report.md").write_text("\n".join(lines))


def write_tables(out: Path, cfg: EvalConfig, rows: list[dict[str, Any]], table: list[dict[str, Any]]) -> None:
    """results.csv and results.json: one row per run with every setting (and the aggregates in JSON)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress",)}
    full_rows = [{**{f"cfg_{k}": v for k, v in settings.items() if k not in GRID_KEYS}, **r} for r in rows]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(full_rows[0]))
        writer.writeheader()
        writer.writerows(full_rows)
    (out / "results.json").write_text(
        json.dumps({"config": settings, "runs": full_rows, "summary": table}, indent=2, default=str)
    )


def setting_label(row: dict[str, Any]) -> str:
    """A short name of a run's setting, for plot titles."""
    return f"{row['dataset']}/{row['student']}/{row['noise']} {row['noise_rate']}"


def write_plots(out: Path, results: list[dict[str, Any]]) -> None:
    """curves.png (test accuracy over steps, one panel per setting) and weights.png (clean vs corrupted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = sorted({r["row"]["agent"] for r in results})
    settings = sorted({setting_label(r["row"]) for r in results})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.2), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings):
        for agent in agents:
            curves = [
                r["curve"] for r in results if r["row"]["agent"] == agent and setting_label(r["row"]) == setting and r["curve"]
            ]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = [s for s, _, _ in curves[0][:length]]
            acc = np.array([[t for _, _, t in c[:length]] for c in curves]) * 100
            mean, std = acc.mean(0), acc.std(0)
            ax.plot(steps, mean, label=agent)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set(xlabel="student update", title=setting)
    axes[0][0].set_ylabel("test accuracy (%), mean ± std over seeds")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(agents), figsize=(3 * len(agents), 3), squeeze=False, sharey=True)
    for ax, agent in zip(axes[0], agents):
        w = np.concatenate([r["weights"] for r in results if r["row"]["agent"] == agent])
        c = np.concatenate([r["corrupted"] for r in results if r["row"]["agent"] == agent]).astype(bool)
        bins = np.linspace(0, 1, 21)
        ax.hist(w[~c], bins=bins, alpha=0.6, density=True, label="clean")
        ax.hist(w[c], bins=bins, alpha=0.6, density=True, label="corrupted")
        ax.set(title=agent, xlabel="weight")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def make_jobs(cfg: EvalConfig) -> list[Job]:
    """Every (setting, seed, agent or loaded teacher) job of the benchmark, in a fixed order."""
    jobs = []
    for setting in settings_grid(cfg):
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            jobs += [Job(setting, agent, None, seed, cfg) for agent in cfg.agent_names]
            jobs += [
                Job(setting, f"{load_name(p)}@{Path(p).name if Path(p).is_dir() else Path(p).parent.name}", p, seed, cfg)
                for p in cfg.teacher_paths
            ]
    if not jobs:
        raise ValueError("the grid is empty: nothing to run")
    return jobs


def load_name(path: str) -> str:
    """The agent name stored in a checkpoint (for labelling loaded teachers)."""
    from agents.base import read_checkpoint

    return read_checkpoint(path)["agent"]


def check_teachers_fit(jobs: list[Job]) -> None:
    """Fail before any training if a loaded teacher cannot act on one of the settings."""
    seen = set()
    for job in jobs:
        key = (job.teacher_path, json.dumps(job.setting, sort_keys=True))
        if job.teacher_path is None or key in seen:
            continue
        seen.add(key)
        env = env_for(job)
        try:
            load_teacher(job.teacher_path, env=env)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (setting {job.setting['dataset']}/{job.setting['student']})") from e


def run_all(jobs: list[Job], workers: int, progress: bool) -> list[dict[str, Any]]:
    """Run every job (in ``workers`` processes), results in job order."""
    bar = tqdm(total=len(jobs), disable=not progress, desc="students", unit="run")
    if workers == 1:
        results = []
        for job in jobs:
            results.append(run_job(job))
            bar.update(1)
    else:
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            results = []
            for result in pool.imap(run_job, jobs):
                results.append(result)
                bar.update(1)
    bar.close()
    return results


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse, check everything that can fail before training, run the jobs, write the outputs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--config" if a == "--suite" else a for a in argv]  # a suite is a config file with a grid
    cfg = parse_config(EvalConfig, argv, __doc__.splitlines()[0] + " (--suite FILE.yaml: a --config file with a grid)")
    out = Path(cfg.out)
    try:
        for setting in settings_grid(cfg):
            check_name("dataset", setting["dataset"], DATASETS)
            check_name("student", setting["student"], list(STUDENTS))
            check_name("noise", setting["noise"], NOISE_TYPES)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        jobs = make_jobs(cfg)
        check_teachers_fit(jobs)
    except (ValueError, CheckpointError, DatasetNotFoundError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    results = run_all(jobs, cfg.workers, cfg.progress)
    rows = [r["row"] for r in results]
    add_uniform_ratio(rows)
    table = aggregate(rows, cfg.threshold_values)
    out.mkdir(parents=True, exist_ok=True)
    write_tables(out, cfg, rows, table)
    write_report(out, cfg, table)
    write_plots(out, results)
    print((out / "report.md").read_text())
    return rows


def cli() -> None:
    """Console-script entry point: exit status 0 on success (``main`` returns the rows)."""
    main()


if __name__ == "__main__":
    cli()
