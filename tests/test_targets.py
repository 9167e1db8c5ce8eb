"""docs/results.md's targets section (suites/targets.py): which targets each setting meets, read off results
that evaluate.py's aggregation makes, and what is set beside each miss."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reporting import aggregate  # noqa: E402
from suites import targets  # noqa: E402

PAIRFLIP = {"dataset": "digits", "student": "mlp", "noise": "pairflip", "noise_rate": 0.4, "student_kwargs": "null"}
SYMMETRIC = {**PAIRFLIP, "noise": "symmetric"}
WOBBLE = (0.0, 0.01, -0.01, 0.02, -0.02)  # per seed, so that the paired differences have a spread


def runs(finals: dict[str, float], auroc: dict[str, float] | None = None, wobble: dict[str, float] | None = None,
         setting: dict | None = None) -> list[dict]:  # fmt: skip
    """Five seeds of each agent at ``finals`` (mean final test accuracy) with a per-seed wobble scaled by
    ``wobble[agent]`` (1 by default), as evaluate.py records them."""
    rows = []
    for agent, final in finals.items():
        for seed, w in enumerate(WOBBLE):
            acc = final + w * (wobble or {}).get(agent, 1.0)
            rows.append({**(setting or PAIRFLIP), "agent": agent, "seed": seed, "lr": 0.03, "options": "{}",
                         "diverged": False, "n_clean": 100, "n_train": 1237, "final_test_acc": acc,
                         "selected_test_acc": acc, "best_val_acc": acc, "auroc": (auroc or {}).get(agent, 0.5),
                         "seconds_per_step": 1.0, "time_ratio_to_uniform": 1.0})  # fmt: skip
    return rows


def write(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"runs": rows, "summary": aggregate(rows)}))
    return folder


def row_of(page: list[str], start: str) -> list[str]:
    line = next(line for line in page if line.startswith(start))
    return [cell.strip() for cell in line.split("|")[1:-1]]


def test_the_online_row_says_which_targets_are_met_and_sets_the_oracle_beside_each_miss(tmp_path):
    # pair-flip: meta_grad +8 over uniform (its interval reaches +10), 1 point behind l2rw (its interval reaches 0),
    # 73% of the oracle's gap closed; meta_grad's reversed wobble spreads its paired differences (sd 3.16 points).
    # symmetric, in the same suite: every target met, l2rw now the weakest rival
    pairflip = {"uniform": 0.80, "l2rw": 0.89, "mwnet": 0.85, "finetune": 0.86, "meta_grad": 0.88, "oracle": 0.91}
    symmetric = {"uniform": 0.60, "l2rw": 0.70, "clean_only": 0.85, "meta_grad": 0.90, "oracle": 0.95}
    rows = runs(pairflip, wobble={"meta_grad": -1.0}) + runs(symmetric, setting=SYMMETRIC)
    page = targets.targets_section({"digits": write(tmp_path / "digits", rows), "mnist": None})
    cells = row_of(page, "| digits/mlp/pairflip 0.4 (`digits`)")
    assert cells[1:] == [
        "100 / 1237",
        "+8.0 [+4.1, +11.9]: **missed** by the mean only",  # 2.776 * 3.16 / sqrt(5) = 3.9
        "l2rw 89.0",  # the strongest of the rivals by mean final accuracy, not mwnet or finetune
        "-1.0 [-4.9, +2.9]: **missed** by the mean only",
        "73%: met",
        "+11.0 [+11.0, +11.0]",
    ]
    assert row_of(page, "| digits/mlp/symmetric 0.4 (`digits`)")[3:6] == ["clean_only 85.0", "+5.0 [+5.0, +5.0]: met", "86%: met"]
    misses = page[
        page.index("Misses (in the mean), with the oracle's headroom and whether the reference teachers reach the target:") :
    ]
    assert misses[2:4] == [
        "- digits/mlp/pairflip 0.4 (`digits`): +10 is 91% of the oracle's own gain (+11.0 [+11.0, +11.0]); `meta_grad` takes 73% of it.",
        "- digits/mlp/pairflip 0.4 (`digits`): behind l2rw by 1.0 points (-1.0 [-4.9, +2.9]); the oracle ends 2.0 points above l2rw.",
    ]
    assert not any("symmetric" in line for line in misses)  # the setting that meets every target has no line
    assert not any(line.startswith("| held-out setting") for line in page)  # no transfer suite has run


def test_verdicts_compare_at_the_precision_shown_and_read_the_whole_interval():
    # 0.9 - 0.8 is 0.09999... in floating point: shown as +10.0, it meets +10
    assert targets.verdict({"mean": 0.9 - 0.8, "ci95": 0.0, "n": 5}, targets.GAIN) == "met"
    assert targets.verdict({"mean": 0.12, "ci95": 0.03, "n": 5}, targets.GAIN) == "met by the mean only"
    assert targets.verdict({"mean": 0.08, "ci95": 0.03, "n": 5}, targets.GAIN) == "**missed** by the mean only"
    assert targets.verdict({"mean": 0.08, "ci95": 0.01, "n": 5}, targets.GAIN) == "**missed**"
    assert targets.verdict({"mean": 0.12, "ci95": float("nan"), "n": 1}, targets.GAIN) == "met"  # no interval: the mean


def test_the_transfer_rows_set_frozen_teachers_beside_the_same_students_references(tmp_path):
    frozen = {f"meta_grad@held-out#{k}": 0.83 + 0.01 * k for k in (1, 2, 3)}  # +6, +7, +8 over uniform
    aurocs = dict(zip(frozen, (0.80, 0.86, 0.83)))
    transfer = write(tmp_path / "transfer", runs({"uniform": 0.78, **frozen, "oracle": 0.97}, auroc=aurocs))
    online = write(tmp_path / "transfer_online", runs({"uniform": 0.78, "meta_grad": 0.92}, auroc={"meta_grad": 0.84}))
    own = {f"meta_grad@own-setting#{k}": 0.87 for k in (1, 2, 3)}
    own_setting = write(tmp_path / "transfer_own", runs({"uniform": 0.78, **own}, auroc=dict.fromkeys(own, 0.90)))
    page = targets.targets_section({"transfer": transfer, "transfer_online": online, "transfer_own": own_setting})
    assert row_of(page, "| digits/mlp/pairflip 0.4 (`transfer`)")[1:] == [
        "100 / 1237",
        "the other three settings (3 pre-trainings)",
        "+7.0 [+4.5, +9.5]: **missed**",  # over the 3 pre-trainings: 4.303 * 1 / sqrt(3) = 2.5
        "0.830 (0.80, 0.86, 0.83): **missed** by the mean only",  # one pre-training reaches 0.85
        "+9.0 [+9.0, +9.0]; 0.900",
        "+14.0 [+14.0, +14.0]; 0.840",
        "+19.0 [+19.0, +19.0]",
    ]
    assert page[-2] == (
        "- digits/mlp/pairflip 0.4 (`transfer`): +10 missed (+7.0): online reaches it (+14.0), own-setting frozen "
        "misses it too (+9.0), +10 is 53% of the oracle's own gain (+19.0 [+19.0, +19.0]); AUROC 0.85 missed (0.830): "
        "online misses it too (0.840), own-setting frozen reaches it (0.900)."
    )
    # without the reference suites the row says so, and the miss names only the oracle
    alone = targets.targets_section({"transfer": transfer})
    assert row_of(alone, "| digits")[5:] == ["-", "-", "+19.0 [+19.0, +19.0]"]
    assert alone[-2].endswith(
        "+10 missed (+7.0): +10 is 53% of the oracle's own gain (+19.0 [+19.0, +19.0]); AUROC 0.85 missed (0.830)."
    )


def test_the_mnist_transfer_reads_its_online_reference_from_its_own_suite(tmp_path):
    frozen = {f"meta_grad@pre-trained#{k}": 0.90 for k in (1, 2, 3)}
    finals = {"uniform": 0.80, **frozen, "meta_grad": 0.88, "oracle": 0.95}
    mnist = write(tmp_path / "transfer_mnist", runs(finals, auroc={**dict.fromkeys(frozen, 0.93), "meta_grad": 0.97}))
    online_elsewhere = write(tmp_path / "transfer_online", runs({"uniform": 0.80, "meta_grad": 0.99}))
    page = targets.targets_section({"transfer_mnist": mnist, "transfer_online": online_elsewhere})
    cells = row_of(page, "| digits/mlp/pairflip 0.4 (`transfer_mnist`)")
    assert cells[2:] == [
        "all four mnist1d / digits settings (3 pre-trainings)",
        "+10.0 [+10.0, +10.0]: met",
        "0.930 (0.93, 0.93, 0.93): met",
        "-",
        "+8.0 [+8.0, +8.0]; 0.970",  # the suite's own meta_grad, not transfer_online's
        "+15.0 [+15.0, +15.0]",
    ]
    assert not any(line.startswith("Misses") for line in page)


def test_nothing_run_gives_no_section():
    assert targets.targets_section({"digits": None, "transfer": None}) == []
