"""docs/results.md's first section: the deep teacher's targets, read off the committed results, with the
measurement beside each that bounds a miss (the oracle's headroom; a teacher taught online, or pre-trained on
the setting itself, on the same students).

The targets (visible suite, paired 95% intervals over 5 seeds): online, ``meta_grad`` at least ``uniform`` + 10
points of final test accuracy, at least the strongest of tuned ``l2rw``, tuned ``mwnet`` and the clean-data
baselines, and half of the uniform-to-oracle gap closed; a frozen teacher pre-trained without the setting, at
least ``uniform`` + 10 points and AUROC 0.85. A mean decides whether a target is met; the interval says whether
the data separate it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from reporting import CLEAN_BASELINES, FINAL, fmt_difference, over_pretrainings, paired, pretraining_groups, setting_key
from runconfig import setting_label

GAIN, AUROC, HALF = 0.10, 0.85, 0.5  # +10 points over uniform; AUROC clean vs corrupted; share of the oracle's gap
ONLINE_SUITES = ("mnist1d", "digits", "mnist")
RIVALS = ("l2rw", "mwnet", *CLEAN_BASELINES)  # the tuned teachers and the clean-data baselines meta_grad must match
# frozen teachers that never met the setting they teach: suite, what they were pre-trained on, and the suite that
# taught the same students online (None: the suite's own meta_grad)
TRANSFERS = (
    ("transfer", "the other three settings", "transfer_online"),
    ("transfer_dataset", "the other dataset", "transfer_online"),
    ("transfer_mnist", "all four mnist1d / digits settings", None),
)
OWN_SETTING = "transfer_own"  # the same students, taught frozen by teachers pre-trained on their own setting


def separation(stat: dict[str, Any]) -> str:
    """Whether a paired difference's 95% interval excludes zero."""
    return "interval excludes 0" if stat["n"] > 1 and abs(stat["mean"]) > stat["ci95"] else "interval includes 0"


def met(reached: bool) -> str:
    return "met" if reached else "**missed**"


def read(out: Path | None) -> dict[str, Any] | None:
    """A suite's results.json, or None when it has not run."""
    return json.loads((out / "results.json").read_text()) if out is not None and (out / "results.json").exists() else None


def by_setting(results: dict[str, Any]) -> dict[tuple, dict[str, dict[str, Any]]]:
    """Summary lines by setting, then agent."""
    lines: dict[tuple, dict[str, dict[str, Any]]] = {}
    for line in results["summary"]:
        lines.setdefault(setting_key(line), {})[line["agent"]] = line
    return lines


def runs_of(results: dict[str, Any], setting: tuple, agent: str) -> list[dict[str, Any]]:
    return [run for run in results["runs"] if run["agent"] == agent and setting_key(run) == setting]


def online_records(name: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting of an online suite: meta_grad's gain, the strongest rival and meta_grad's paired difference
    from it, the share of the uniform-to-oracle gap closed, the oracle's gain."""
    records = []
    for setting, agents in by_setting(results).items():
        if not {"meta_grad", "uniform", "oracle"} <= agents.keys():
            continue
        teacher, uniform, oracle = (agents[a][FINAL]["mean"] for a in ("meta_grad", "uniform", "oracle"))
        rival = max((a for a in RIVALS if a in agents), key=lambda a: agents[a][FINAL]["mean"])
        records.append({
            "where": f"{setting_label(agents['meta_grad'])} (`{name}`)", "gain": agents["meta_grad"]["vs_uniform_final"],
            "rival": rival, "rival_final": agents[rival][FINAL]["mean"],
            "against": paired(runs_of(results, setting, "meta_grad"), runs_of(results, setting, rival), FINAL),
            "closed": (teacher - uniform) / (oracle - uniform), "oracle": agents["oracle"]["vs_uniform_final"],
            "oracle_over_rival": oracle - agents[rival][FINAL]["mean"],
        })  # fmt: skip
    return records


def transfer_records(name: str, pretrained_on: str, results: dict[str, Any], online: dict[str, Any] | None,
                     own: dict[str, Any] | None) -> list[dict[str, Any]]:  # fmt: skip
    """Per held-out setting of a transfer suite: its frozen teachers' gain (mean over the pre-trainings [interval
    over them]) and AUROC, the online and own-setting teachers of the same students, the oracle's gain."""
    own_groups = {setting: group for (setting, _), group in pretraining_groups(own["summary"]).items()} if own else {}
    taught = by_setting(online or results)
    oracles = by_setting(results)
    records = []
    for (setting, _), numbered in pretraining_groups(results["summary"]).items():
        group = [line for _, line in numbered]
        online_line = taught.get(setting, {}).get("meta_grad")
        records.append({
            "where": f"{setting_label(group[0])} (`{name}`)", "pretrained_on": f"{pretrained_on} ({len(group)})",
            "gain": over_pretrainings(group, "vs_uniform_final"), "auroc": mean_auroc(group),
            "own": [line for _, line in own_groups.get(setting, [])], "online": [online_line] if online_line else [],
            "oracle": oracles[setting]["oracle"]["vs_uniform_final"],
        })  # fmt: skip
    return records


def mean_auroc(lines: list[dict[str, Any]]) -> float:
    return float(np.mean([line["auroc"]["mean"] for line in lines]))


def reference_gain(lines: list[dict[str, Any]]) -> dict[str, float]:
    """A reference teacher's Δ final vs uniform: its interval over the students for one summary line, over the
    pre-trainings for several."""
    return lines[0]["vs_uniform_final"] if len(lines) == 1 else over_pretrainings(lines, "vs_uniform_final")


def reference(lines: list[dict[str, Any]]) -> str:
    """A reference teacher's Δ final vs uniform and its AUROC; "-" for none."""
    return f"{fmt_difference(reference_gain(lines))}; {mean_auroc(lines):.3f}" if lines else "-"


def online_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['where']} | {fmt_difference(r['gain'])}: {met(r['gain']['mean'] >= GAIN)} | {r['rival']} "
        f"{100 * r['rival_final']:.1f} | {fmt_difference(r['against'])}: {met(r['against']['mean'] >= 0)} "
        f"({separation(r['against'])}) | {100 * r['closed']:.0f}%: {met(r['closed'] >= HALF)} | {fmt_difference(r['oracle'])} |"
    )


def transfer_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['where']} | {r['pretrained_on']} | {fmt_difference(r['gain'])}: {met(r['gain']['mean'] >= GAIN)} | "
        f"{r['auroc']:.3f}: {met(r['auroc'] >= AUROC)} | {reference(r['own'])} | {reference(r['online'])} | "
        f"{fmt_difference(r['oracle'])} |"
    )


def online_bounds(r: dict[str, Any]) -> list[str]:
    """What bounds each online target a setting misses."""
    lines = []
    if r["gain"]["mean"] < GAIN:
        lines.append(
            f"- {r['where']}: {share_of_oracle(r)}; `meta_grad` takes {r['gain']['mean'] / r['oracle']['mean']:.0%} of it."
        )
    if r["against"]["mean"] < 0:
        lines.append(
            f"- {r['where']}: behind {r['rival']} by {-100 * r['against']['mean']:.1f} points, {separation(r['against'])}; "
            f"the oracle ends only {100 * r['oracle_over_rival']:.1f} points above {r['rival']}."
        )
    if r["closed"] < HALF:
        lines.append(f"- {r['where']}: closes {r['closed']:.0%} of the gap to the oracle.")
    return lines


def share_of_oracle(r: dict[str, Any]) -> str:
    """+10 points as a share of the oracle's mean gain (or that it lies above it)."""
    share = GAIN / r["oracle"]["mean"]
    where = "lies above" if share > 1 else f"is {share:.0%} of"
    return f"+{100 * GAIN:.0f} {where} the oracle's own gain ({fmt_difference(r['oracle'])})"


def transfer_bounds(r: dict[str, Any]) -> list[str]:
    """What bounds each transfer target a held-out setting misses: whether the same students' reference teachers
    (online from scratch; pre-trained on the setting itself, frozen) reach it, and the oracle's gain."""
    references = [(what, lines) for what, lines in (("online", r["online"]), ("own-setting frozen", r["own"])) if lines]
    targets = (
        (f"+{100 * GAIN:.0f}", GAIN, r["gain"]["mean"], lambda lines: reference_gain(lines)["mean"], lambda v: f"{100 * v:+.1f}"),
        (f"AUROC {AUROC}", AUROC, r["auroc"], mean_auroc, lambda v: f"{v:.3f}"),
    )
    parts = []
    for target, limit, value, of, shown in targets:
        if value >= limit:
            continue
        says = [
            f"{what} {'reaches it' if of(lines) >= limit else 'misses it too'} ({shown(of(lines))})" for what, lines in references
        ]
        if limit == GAIN:
            says.append(share_of_oracle(r))
        parts.append(f"{target} missed ({shown(value)})" + (": " + ", ".join(says) if says else ""))
    return [f"- {r['where']}: " + "; ".join(parts) + "."] if parts else []


def targets_section(outputs: dict[str, Path | None]) -> list[str]:
    """The section: the online and the transfer targets, one row per setting whose suites have run, then what
    bounds each miss."""
    online = [r for name in ONLINE_SUITES if (results := read(outputs.get(name))) for r in online_records(name, results)]
    own = read(outputs.get(OWN_SETTING))
    transfers = [
        r
        for name, pretrained_on, taught in TRANSFERS
        if (results := read(outputs.get(name)))
        for r in transfer_records(name, pretrained_on, results, read(outputs.get(taught)) if taught else None, own)
    ]
    if not online and not transfers:
        return []
    lines = [
        "## Against the targets",
        "",
        "Read off the suites below: the online rows from the `mnist1d`, `digits` and `mnist` suites (the first "
        "protocol), the transfer rows from the transfer suites (Δ: final test accuracy over `uniform`, points, mean "
        f"[95% interval]). A target is met by its mean: +{100 * GAIN:.0f} points over `uniform`; at least the "
        "strongest of `l2rw`, `mwnet` and the clean-data baselines (the one with the highest mean final accuracy); "
        f"{100 * HALF:.0f}% of the uniform-to-oracle gap closed; for a frozen teacher that never met the setting, "
        f"AUROC {AUROC} too. Beside each, what bounds a miss: the oracle's own gain, and for the frozen teachers the "
        "same students taught online by `meta_grad` from scratch and taught frozen by teachers pre-trained on their "
        "own setting.",
        "",
    ]
    if online:
        lines += [
            "| setting (suite) | `meta_grad` Δ vs uniform | strongest rival, final | `meta_grad` − rival, paired "
            "| gap to the oracle closed | oracle Δ vs uniform |",
            "|---|---|---|---|---|---|",
            *map(online_row, online),
            "",
        ]
    if transfers:
        lines += [
            "| held-out setting (suite) | frozen teachers pre-trained on (how many) | Δ vs uniform | AUROC "
            "| own-setting frozen: Δ; AUROC | online from scratch: Δ; AUROC | oracle Δ vs uniform |",
            "|---|---|---|---|---|---|---|",
            *map(transfer_row, transfers),
            "",
        ]
    bounds = [line for r in online for line in online_bounds(r)] + [line for r in transfers for line in transfer_bounds(r)]
    if bounds:
        lines += ["What bounds each miss:", "", *bounds, ""]
    return lines
