"""Statistics and outputs of a benchmark (``evaluate.py``): aggregates over seeds, differences paired
by seed against ``uniform`` and against the best clean-data baseline, report.md, CSV/JSON, plots.

Every headline number is selected on the clean validation split, never on the test set: the final
test accuracy, and the test accuracy at the evaluation with the best validation accuracy. (The max
over test evaluations is kept only as ``oracle_best_test_acc`` in the CSV/JSON, for diagnostics.)
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from runconfig import setting_label

SETTING_KEYS = ("dataset", "student", "noise", "noise_rate", "student_kwargs")
CLEAN_BASELINES = ("clean_only", "uniform_plus_clean", "finetune")
HEADLINE = "selected_test_acc"  # test accuracy at the best validation accuracy
FINAL = "final_test_acc"  # no selection at all: the comparison with the clean-data baselines, which train on the clean split
TIE = 0.005  # |difference| up to half a point of accuracy counts as a tie
# what --tune maximises: the held-out accuracy the reported metric reads (at its best, or at the end)
TUNING_CRITERIA = {"best_val_acc": "best validation accuracy", "final_val_acc": "final validation accuracy"}
METRICS = ("final_test_acc", "selected_test_acc", "best_val_acc", "auroc", "seconds_per_step", "time_ratio_to_uniform")


def steps_to_threshold(curve: list[tuple[int, float, float]], threshold: float) -> float:
    """The first evaluated step at which validation accuracy reached ``threshold`` (NaN if never)."""
    return next((float(step) for step, val_acc, _ in curve if val_acc >= threshold), float("nan"))


def selected_test_acc(curve: list[tuple[int, float, float]]) -> float:
    """Test accuracy at the evaluation with the best validation accuracy (the first such one)."""
    if not curve:
        return float("nan")
    best = max(range(len(curve)), key=lambda i: (curve[i][1], -i))
    return curve[best][2]


def curve_summary(
    curve: list[tuple[int, float, float]], diverged: bool = False, chance: float = float("nan")
) -> dict[str, float]:
    """The metrics of one student's (step, val_acc, test_acc) evaluations. A student that diverged
    ends at ``chance`` (its last evaluation came before the divergence and would flatter it); the
    test accuracy at the best validation accuracy is what early stopping would have kept."""
    nan = float("nan")
    return {
        "final_test_acc": chance if diverged else (curve[-1][2] if curve else nan),
        "selected_test_acc": selected_test_acc(curve),
        "final_val_acc": chance if diverged else (curve[-1][1] if curve else nan),
        "best_val_acc": max((v for _, v, _ in curve), default=nan),
        "oracle_best_test_acc": max((t for _, _, t in curve), default=nan),
    }


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


def paired(rows: list[dict[str, Any]], reference: list[dict[str, Any]], metric: str = HEADLINE) -> dict[str, Any]:
    """Differences ``rows - reference`` of ``metric`` paired by seed: their ``summarise`` plus wins /
    ties / losses (a tie is within ``TIE``)."""
    by_seed = {r["seed"]: r[metric] for r in reference}
    diffs = [r[metric] - by_seed[r["seed"]] for r in rows if r["seed"] in by_seed]
    diffs = [d for d in diffs if np.isfinite(d)]
    return {
        **summarise(diffs),
        "wins": sum(d > TIE for d in diffs),
        "ties": sum(abs(d) <= TIE for d in diffs),
        "losses": sum(d < -TIE for d in diffs),
    }


def setting_key(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in SETTING_KEYS)


def add_uniform_ratio(rows: list[dict[str, Any]]) -> None:
    """Each run's time per step divided by the mean time per step of ``uniform`` in its setting."""
    uniform: dict[tuple, list[float]] = {}
    for r in rows:
        if r["agent"] == "uniform":
            uniform.setdefault(setting_key(r), []).append(r["seconds_per_step"])
    for r in rows:
        base = uniform.get(setting_key(r))
        r["time_ratio_to_uniform"] = r["seconds_per_step"] / float(np.mean(base)) if base else float("nan")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (setting, agent): each metric's mean, std, 95% CI and n, and the paired
    differences against ``uniform`` (final and at best validation) and against the setting's best
    clean-data baseline on final test accuracy. The clean-data baselines train on the clean split, so
    their validation accuracy is partly a training accuracy and selecting on it would misjudge them:
    against them only the unselected final accuracy is compared, and the best of them is the one with
    the highest mean final test accuracy (the comparator least favourable to teachers)."""
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault(setting_key(r), {}).setdefault(r["agent"], []).append(r)
    table = []
    for agents in groups.values():
        baselines = [a for a in CLEAN_BASELINES if a in agents]
        best_clean = max(baselines, key=lambda a: summarise([r[FINAL] for r in agents[a]])["mean"], default=None)
        for agent, group in agents.items():
            first = group[0]
            line = {
                k: first.get(k, 0)
                for k in (*SETTING_KEYS, "agent", "trained_on", "online", "n_train", "n_clean", "n_select", "n_test")
            }
            line.update({m: summarise([r[m] for r in group]) for m in METRICS})
            line["seeds"] = sorted(r["seed"] for r in group)
            line["lr"], line["options"] = first["lr"], first["options"]
            vs_uniform = "uniform" in agents and agent != "uniform"
            line["vs_uniform"] = paired(group, agents["uniform"]) if vs_uniform else None
            line["vs_uniform_final"] = paired(group, agents["uniform"], FINAL) if vs_uniform else None
            vs_clean = best_clean is not None and agent != best_clean and agent not in CLEAN_BASELINES
            line["best_clean"] = best_clean
            line["vs_best_clean"] = paired(group, agents[best_clean], FINAL) if vs_clean else None
            line["diverged"] = sum(bool(r["diverged"]) for r in group)
            table.append(line)
    return table


# ------------------------------------------------------------------------------------------ outputs
def fmt(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std [±CI]`` of a ``summarise`` result, for the report's tables."""
    if not stat or stat["n"] == 0:
        return "-"
    text = f"{scale * stat['mean']:.{digits}f}"
    if stat["n"] > 1:
        text += f" ± {scale * stat['std']:.{digits}f} [±{scale * stat['ci95']:.{digits}f}]"
    return text


def fmt_difference(stat: dict[str, Any], scale: float = 100, digits: int = 1) -> str:
    """``+d [lo, hi]`` (95% interval) of a mean difference times ``scale`` (by default in accuracy points), to
    ``digits`` decimals; ``+d`` alone for one value."""
    mean = scale * stat["mean"]
    if stat["n"] < 2:
        return f"{mean:+.{digits}f}"
    half = scale * stat["ci95"]
    return f"{mean:+.{digits}f} [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]"


def fmt_paired(stat: dict[str, Any] | None) -> str:
    """``+d [lo, hi] (W/T/L)`` of a ``paired`` result, in accuracy points."""
    if not stat or stat["n"] == 0:
        return "-"
    return f"{fmt_difference(stat)} ({stat['wins']}/{stat['ties']}/{stat['losses']})"


def agent_label(line: dict[str, Any]) -> str:
    if line["agent"] == "oracle":
        return "*oracle (reference: reads the noise mask)*"
    if line["agent"] in CLEAN_BASELINES:
        return f"{line['agent']} (clean data)"
    return line["agent"]


def write_report(
    out: Path, config: dict[str, Any], table: list[dict[str, Any]], tuning: list[dict[str, Any]], failures: list[dict[str, str]]
) -> None:
    """report.md: the settings, one table per setting sorted by test accuracy at best validation
    accuracy, paired differences, the tuned values, the pre-trained teachers (transfer pairs when a teacher
    changes setting) with their seeds, and the
    jobs that failed (left out of every statistic above)."""
    skip = {"agents", "teachers", "out", "progress", "workers", "resume", "backend", "ray_address", "job_cpus", "job_gpus"}
    lines = ["# Teacher benchmark", "", "## Settings", ""]
    lines += [f"- `{k}`: {v}" for k, v in config.items() if k not in skip]
    lines += [
        "",
        "Accuracies in %: mean ± std [95% t-interval half-width] over seeds. **final** is the test accuracy at the end "
        "(a student that diverged counts at chance); **@ best val** is the test accuracy at the evaluation with the best "
        "accuracy on the held-out selection split (part of the clean data that no method trains or meta-learns on; "
        "without one, the validation split). **Δ** columns are differences paired by seed, mean "
        f"[95% interval] (wins/ties/losses; a tie is within {100 * TIE:.1f} points): against `uniform` on both metrics, "
        "and against the setting's best clean-data baseline on the final accuracy (the best of them is the one with the "
        "highest mean final accuracy, the comparator least favourable to teachers). `div.`: diverged students. "
        "`time x`: time per student step relative to `uniform`. The oracle is a reference that reads the corruption "
        "mask, not a teacher.",
        "",
    ]
    by_setting: dict[tuple, list[dict[str, Any]]] = {}
    for line in table:
        by_setting.setdefault(tuple(line[k] for k in SETTING_KEYS), []).append(line)
    header = (
        "| agent | final | Δ final vs uniform | Δ final vs best clean | @ best val | Δ @ best val vs uniform | AUROC | div. "
        "| time x |"
    )
    for setting, group in by_setting.items():
        dataset, student, noise, rate, kwargs = setting
        first = group[0]
        title = f"## {dataset} / {student} / {noise} {rate}" + (f" ({kwargs})" if kwargs != "null" else "")
        sizes = (
            f"train {first['n_train']} (noisy labels), clean {first['n_clean']} (what teachers and clean-data baselines use) "
            f"+ {first['n_select']} held out for selection and tuning only, test {first['n_test']}"
        )
        seeds = ", ".join(map(str, first["seeds"]))
        lines += [title, "", f"{sizes}; seeds {seeds}; best clean-data baseline: {first['best_clean'] or '-'}", "", header]
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for line in sorted(group, key=lambda r: -np.nan_to_num(r[HEADLINE]["mean"], nan=-1)):
            lines.append(
                f"| {agent_label(line)} | {fmt(line[FINAL], 100, 1)} | {fmt_paired(line['vs_uniform_final'])} | "
                f"{fmt_paired(line['vs_best_clean'])} | {fmt(line[HEADLINE], 100, 1)} | {fmt_paired(line['vs_uniform'])} | "
                f"{fmt(line['auroc'], 1, 3)} | {line['diverged']}/{len(line['seeds'])} | {fmt(line['time_ratio_to_uniform'], 1, 2)} |"
            )
        lines.append("")
    if tuning:
        criterion = TUNING_CRITERIA[config.get("tune_by", "best_val_acc")]
        lines += [
            "## Tuned values",
            "",
            f"Chosen per (setting, agent) by mean {criterion} on the tuning seeds (disjoint from the reported ones).",
            "",
            f"| setting | agent | lr | teacher_lr | {criterion.replace('validation', 'val')} (tuning) | runner-up | candidates |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in tuning:
            runner_up = "-" if t.get("runner_up") is None else f"{100 * t['runner_up']:.1f}"
            lines.append(
                f"| {t['setting']} | {t['agent']} | {t['lr']:g} | {t.get('teacher_lr', '-')} | "
                f"{100 * t['score']:.1f} | {runner_up} | {t['candidates']} |"
            )
        lines.append("")
    transfers = [line for line in table if line["trained_on"]]
    if transfers:
        # a teacher pre-trained on the very setting it teaches (e.g. --pretrain-on own) is no transfer
        moved = any(line["trained_on"].rsplit(" (seeds ", 1)[0] != setting_label(line) for line in transfers)
        lines += [
            "## Transfer pairs" if moved else "## Pre-trained teachers",
            "",
            "| teacher | trained on (seeds) | evaluated on (seeds) | mode | test @ best val | Δ vs uniform | AUROC |",
            "|---|---|---|---|---|---|---|",
        ]
        for line in transfers:
            target = setting_label(line)
            mode = "online" if line["online"] else "frozen"
            seeds = f"{min(line['seeds'])}-{max(line['seeds'])}"
            lines.append(
                f"| {line['agent']} | {line['trained_on']} | {target} ({seeds}) | {mode} | {fmt(line[HEADLINE], 100, 1)} | "
                f"{fmt_paired(line['vs_uniform'])} | {fmt(line['auroc'], 1, 3)} |"
            )
        lines.append("")
    lines += pretraining_spread(transfers)
    if failures:
        lines += ["## Failed runs", "", f"{len(failures)} run(s) failed and are left out of every statistic above:", ""]
        lines += [f"- {f['job']}: {f['error']}" for f in failures] + [""]
    if table:
        lines += ["Plots: `curves.png` (test accuracy over steps), `weights.png` (weights of clean vs corrupted samples).", ""]
    atomic_write(out / "report.md", "\n".join(lines))


def pretraining_groups(lines: list[dict[str, Any]]) -> dict[tuple[tuple, str], list[tuple[int, dict[str, Any]]]]:
    """Summary lines of teachers pre-trained several times (evaluate.py's ``<agent>@held-out#k``,
    ``@held-out-dataset#k``, ``@own-setting#k`` and ``@pre-trained#k``) with a paired Δ against uniform, grouped by (setting, teacher), as (k, line) in
    the order of k."""
    groups: dict[tuple[tuple, str], list[tuple[int, dict[str, Any]]]] = {}
    for line in lines:
        several = re.fullmatch(r"(.+@(?:held-out|held-out-dataset|own-setting|pre-trained))#(\d+)", line["agent"])
        if several and line["vs_uniform_final"]:
            groups.setdefault((setting_key(line), several[1]), []).append((int(several[2]), line))
    return {key: sorted(numbered, key=lambda pair: pair[0]) for key, numbered in groups.items()}


def over_pretrainings(group: list[dict[str, Any]], key: str) -> dict[str, float]:
    """``summarise`` of the pre-trainings' mean paired differences ``key`` (a 95% t-interval over the pre-trainings)."""
    return summarise([line[key]["mean"] for line in group])


def pretraining_spread(transfers: list[dict[str, Any]]) -> list[str]:
    """For teachers pre-trained several times (``<agent>#k``): each pre-training's mean paired Δ against
    uniform, and their mean with a 95% t-interval over the pre-trainings. A re-run of the pre-training
    is what varies there; the per-teacher intervals above cover student seeds only."""
    groups = pretraining_groups(transfers)
    if not groups:
        return []
    lines = [
        "## Between pre-trainings",
        "",
        "Each pre-training's mean Δ against `uniform` (paired by student seed), in the order of their numbers #k, then "
        "their mean [95% t-interval over the pre-trainings].",
        "",
        "| evaluated on | teacher | Δ final vs uniform, each | mean over pre-trainings | Δ @ best val vs uniform, each "
        "| mean over pre-trainings | AUROC, each |",
        "|---|---|---|---|---|---|---|",
    ]
    for (_, agent), numbered in groups.items():
        group = [line for _, line in numbered]
        cells = []
        for key in ("vs_uniform_final", "vs_uniform"):
            cells += [
                ", ".join(f"{100 * line[key]['mean']:+.1f}" for line in group),
                fmt_difference(over_pretrainings(group, key)),
            ]
        aurocs = ", ".join(f"{line['auroc']['mean']:.2f}" for line in group)
        numbers = ", ".join(str(k) for k, _ in numbered)
        lines.append(f"| {setting_label(group[0])} | {agent} (#{numbers}) | " + " | ".join(cells) + f" | {aurocs} |")
    return [*lines, ""]


def write_tables(
    out: Path, config: dict[str, Any], rows: list[dict[str, Any]], table: list[dict[str, Any]], tuning: list
) -> None:
    """results.csv and results.json: one row per run with every setting (and the aggregates in JSON)."""
    settings = {k: v for k, v in config.items() if k != "progress"}
    full_rows = [{**{f"cfg_{k}": v for k, v in settings.items() if k not in SETTING_KEYS}, **r} for r in rows]
    fields = list(dict.fromkeys(k for r in full_rows for k in r))

    def write_csv(path: Path) -> None:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(full_rows)

    write_atomically(out / "results.csv", write_csv)
    payload = {"config": settings, "runs": full_rows, "summary": table, "tuning": tuning}
    atomic_write(out / "results.json", json.dumps(payload, indent=2, default=str))


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``write_atomically``)."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``: a crash leaves
    the old file or none, never part of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def write_plots(out: Path, results: list[dict[str, Any]]) -> None:
    """curves.png (test accuracy over steps, one panel per setting) and weights.png (clean vs corrupted);
    none when no run finished."""
    if not results:
        return
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
    write_atomically(out / "curves.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    fig, axes = plt.subplots(1, len(agents), figsize=(3 * len(agents), 3), squeeze=False, sharey=True)
    for ax, agent in zip(axes[0], agents):
        w = np.concatenate([r["weights"] for r in results if r["row"]["agent"] == agent])
        c = np.concatenate([r["corrupted"] for r in results if r["row"]["agent"] == agent]).astype(bool)
        bins = np.linspace(0, 1, 21)
        for values, label in ((w[~c], "clean"), (w[c], "corrupted")):
            if len(values):  # the clean-data baselines see no corrupted labels
                ax.hist(values, bins=bins, alpha=0.6, density=True, label=label)
        ax.set(title=agent, xlabel="weight")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    write_atomically(out / "weights.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
