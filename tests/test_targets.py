"""docs/results.md's targets section (suites/targets.py): which targets each setting meets, read off results
that evaluate.py's aggregation makes, and the bound it gives beside each miss."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reporting import aggregate  # noqa: E402
from suites import targets  # noqa: E402

SETTING = {"dataset": "digits", "student": "mlp", "noise": "pairflip", "noise_rate": 0.4, "student_kwargs": "null"}
WOBBLE = (0.0, 0.01, -0.01, 0.02, -0.02)  # per seed, so that the paired differences have a spread


def runs(finals: dict[str, float], auroc: dict[str, float] | None = None, wobble: dict[str, float] | None = None) -> list[dict]:
    """Five seeds of each agent at ``finals`` (mean final test accuracy) with a per-seed wobble scaled by
    ``wobble[agent]`` (1 by default), as evaluate.py records them."""
    rows = []
    for agent, final in finals.items():
        for seed, w in enumerate(WOBBLE):
            acc = final + w * (wobble or {}).get(agent, 1.0)
            rows.append({**SETTING, "agent": agent, "seed": seed, "lr": 0.03, "options": "{}", "diverged": False,
                         "final_test_acc": acc, "selected_test_acc": acc, "best_val_acc": acc,
                         "auroc": (auroc or {}).get(agent, 0.5), "seconds_per_step": 1.0, "time_ratio_to_uniform": 1.0})  # fmt: skip
    return rows


def write(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"runs": rows, "summary": aggregate(rows)}))
    return folder


def test_the_online_row_says_which_targets_are_met_and_bounds_each_miss(tmp_path):
    # meta_grad: +8 over uniform (missed), 1 point behind l2rw (missed, by less than its spread), 8 of the oracle's
    # 11 points closed (met); meta_grad's own wobble makes the paired difference from l2rw spread
    finals = {"uniform": 0.80, "l2rw": 0.89, "mwnet": 0.85, "finetune": 0.86, "meta_grad": 0.88, "oracle": 0.91}
    out = write(tmp_path / "digits", runs(finals, wobble={"meta_grad": -1.0}))
    page = "\n".join(targets.targets_section({"digits": out, "mnist": None}))
    row = next(line for line in page.splitlines() if line.startswith("| digits/mlp/pairflip 0.4 (`digits`)"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[1] == "+8.0 [+4.1, +11.9]: **missed**"  # paired spread sd 3.16: 2.776 * 3.16 / sqrt(5)
    assert cells[2] == "l2rw 89.0"  # the strongest of the rivals by mean final accuracy, not mwnet or finetune
    assert cells[3].startswith("-1.0 [") and cells[3].endswith(": **missed** (interval includes 0)")
    assert cells[4] == "73%: met"
    assert "- digits/mlp/pairflip 0.4 (`digits`): +10 is 91% of the oracle's own gain" in page
    assert "behind l2rw by 1.0 points, interval includes 0; the oracle ends only 2.0 points above l2rw." in page
    assert "| held-out setting" not in page  # no transfer suite has run: no transfer table


def test_a_setting_that_meets_every_online_target_has_no_bound_line(tmp_path):
    finals = {"uniform": 0.60, "l2rw": 0.80, "clean_only": 0.85, "meta_grad": 0.90, "oracle": 0.95}
    out = write(tmp_path / "digits", runs(finals))
    page = targets.targets_section({"digits": out})
    assert "What bounds each miss:" not in page
    assert any("| clean_only 85.0 | +5.0 [+5.0, +5.0]: met (interval excludes 0) | 86%: met |" in line for line in page)


def test_the_transfer_rows_set_frozen_teachers_beside_the_same_students_references(tmp_path):
    frozen = {f"meta_grad@held-out#{k}": 0.83 + 0.01 * k for k in (1, 2, 3)}  # +6, +7, +8 over uniform
    transfer = write(
        tmp_path / "transfer",
        runs({"uniform": 0.78, **frozen, "oracle": 0.97}, auroc={name: 0.80 for name in frozen}),
    )
    online = write(tmp_path / "transfer_online", runs({"uniform": 0.78, "meta_grad": 0.92}, auroc={"meta_grad": 0.84}))
    own = {f"meta_grad@own-setting#{k}": 0.87 for k in (1, 2, 3)}
    own_setting = write(tmp_path / "transfer_own", runs({"uniform": 0.78, **own}, auroc={name: 0.90 for name in own}))
    page = targets.targets_section({"transfer": transfer, "transfer_online": online, "transfer_own": own_setting})
    row = next(line for line in page if line.startswith("| digits/mlp/pairflip 0.4 (`transfer`)"))
    assert row == (
        "| digits/mlp/pairflip 0.4 (`transfer`) | the other three settings (3) | +7.0 [+4.5, +9.5]: **missed** | "
        "0.800: **missed** | +9.0 [+9.0, +9.0]; 0.900 | +14.0 [+14.0, +14.0]; 0.840 | +19.0 [+19.0, +19.0] |"
    )
    assert (
        "- digits/mlp/pairflip 0.4 (`transfer`): +10 missed (+7.0): online reaches it (+14.0), own-setting frozen "
        "misses it too (+9.0), +10 is 53% of the oracle's own gain (+19.0 [+19.0, +19.0]); AUROC 0.85 missed (0.800): "
        "online misses it too (0.840), own-setting frozen reaches it (0.900)."
    ) in page
    # without the reference suites the row says so, and the bound line names only the oracle
    alone = targets.targets_section({"transfer": transfer})
    assert "| - | - | +19.0 [+19.0, +19.0] |" in next(line for line in alone if line.startswith("| digits"))
    bound = "+10 missed (+7.0): +10 is 53% of the oracle's own gain (+19.0 [+19.0, +19.0]); AUROC 0.85 missed (0.800)."
    assert any(line.endswith(bound) for line in alone)


def test_nothing_run_gives_no_section():
    assert targets.targets_section({"digits": None, "transfer": None}) == []
