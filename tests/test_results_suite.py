"""suites/results.py's generated statements: the transfer-tuning table and the choice it makes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("results_suite", ROOT / "suites" / "results.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def _row(agent: str, dataset: str, seed: int, final: float, best_val: float) -> dict:
    setting = {"dataset": dataset, "student": "mlp", "noise": "symmetric", "noise_rate": 0.4}
    return {**setting, "agent": agent, "seed": seed, "final_test_acc": final, "best_val_acc": best_val}


@pytest.mark.parametrize("winner", [0, len(results.TRANSFER_DECAYS) - 1])
def test_transfer_tuning_reports_paired_deltas_and_picks_the_best_held_out_accuracy(tmp_path, winner):
    decays = results.TRANSFER_DECAYS
    mnist1d_best = (winner + 2) % len(decays)
    for i, decay in enumerate(decays):
        runs = []
        for dataset, uniform in (("mnist1d", 0.50), ("digits", 0.70)):
            for seed in (1000, 1001):
                decoy = 1.0 if i == (winner + 1) % len(decays) else 0.0  # uniform's accuracy must not count
                runs.append(_row("uniform", dataset, seed, uniform + 0.01 * (seed % 2), decoy))
                for k in (1, 2):  # two pre-trainings; the winner's mean held-out accuracy is the highest,
                    # but mnist1d_best wins on mnist1d, so digits held out (judged on mnist1d alone) gets it
                    best_val = {winner: {"mnist1d": 0.70, "digits": 0.99}, mnist1d_best: {"mnist1d": 0.85, "digits": 0.5}}
                    best_val = best_val.get(i, {}).get(dataset, 0.6)
                    runs.append(
                        _row(f"meta_grad@held-out#{k}", dataset, seed, uniform + 0.01 * (seed % 2) + 0.01 * k * (i + 1), best_val)
                    )
        (tmp_path / f"decay-{decay:g}").mkdir()
        (tmp_path / f"decay-{decay:g}" / "results.json").write_text(json.dumps({"runs": runs}))
    lines = results.transfer_tuning_table(tmp_path)
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(decays)
    for i, row in enumerate(rows):  # Δ = mean over pre-trainings k = 1, 2 of 0.01 k (i + 1), in points
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2:] == [f"{1.5 * (i + 1):+.1f}"] * 2, row
    used = yaml.safe_load((ROOT / "suites" / "results" / "transfer.yaml").read_text())["agent_options"]["meta_grad"]
    verdict = "uses it" if used["meta_weight_decay"] == decays[winner] else "instead"
    assert f"Chosen: {decays[winner]:g};" in lines[-2] and verdict in lines[-2]
    assert f"mnist1d/mlp/symmetric 0.4 {decays[winner]:g}; digits/mlp/symmetric 0.4 {decays[mnist1d_best]:g}." in lines[-2]
