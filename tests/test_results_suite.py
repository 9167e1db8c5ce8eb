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


@pytest.mark.parametrize("winner", [0, len(results.TRANSFER_CANDIDATES) - 1])
def test_transfer_tuning_reports_paired_deltas_and_picks_the_best_held_out_accuracy(tmp_path, winner):
    candidates = results.TRANSFER_CANDIDATES
    mnist1d_best = (winner + 2) % len(candidates)
    for i, options in enumerate(candidates):
        runs = []
        for dataset, uniform in (("mnist1d", 0.50), ("digits", 0.70)):
            for seed in (1000, 1001):
                decoy = 1.0 if i == (winner + 1) % len(candidates) else 0.0  # uniform's accuracy must not count
                runs.append(_row("uniform", dataset, seed, uniform + 0.01 * (seed % 2), decoy))
                for k in (1, 2):  # two pre-trainings; the winner's mean held-out accuracy is the highest,
                    # but mnist1d_best wins on mnist1d, so digits held out (judged on mnist1d alone) gets it
                    best_val = {winner: {"mnist1d": 0.70, "digits": 0.99}, mnist1d_best: {"mnist1d": 0.85, "digits": 0.5}}
                    best_val = best_val.get(i, {}).get(dataset, 0.6)
                    runs.append(
                        _row(f"meta_grad@held-out#{k}", dataset, seed, uniform + 0.01 * (seed % 2) + 0.01 * k * (i + 1), best_val)
                    )
        (tmp_path / results.candidate_folder(options)).mkdir()
        (tmp_path / results.candidate_folder(options) / "results.json").write_text(json.dumps({"runs": runs}))
    assert len({results.candidate_folder(options) for options in candidates}) == len(candidates)
    suite = tmp_path / "transfer.yaml"
    suite.write_text(yaml.safe_dump({"agent_options": {"meta_grad": dict(candidates[winner])}}))
    lines = results.transfer_tuning_table(tmp_path, suite)
    rows = lines[2 : 2 + len(candidates)]
    for i, (row, options) in enumerate(zip(rows, candidates)):  # Δ = mean over k = 1, 2 of 0.01 k (i + 1), in points
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == results.candidate_label(options)
        criterion = {winner: 84.5, mnist1d_best: 67.5}.get(i, 60.0)  # mean held-out accuracy of the taught runs only
        assert cells[1] == f"{criterion:.1f}", row
        assert cells[2:] == [f"{1.5 * (i + 1):+.1f}"] * 2, row
    assert lines[2 + len(candidates)] == ""
    winner_label = results.candidate_label(candidates[winner])
    assert f"Chosen: {winner_label}; `suites/results/transfer.yaml` uses it." in lines[-2]
    assert (
        f"mnist1d/mlp/symmetric 0.4: {winner_label}; digits/mlp/symmetric 0.4: {results.candidate_label(candidates[mnist1d_best])} ("
        in lines[-2]
    )
    suite.write_text(yaml.safe_dump({"agent_options": {"meta_grad": {**candidates[winner], "hidden": 32}}}))
    assert "transfer.yaml` uses hidden 32 instead." in results.transfer_tuning_table(tmp_path, suite)[-2]


def test_a_candidate_that_leaves_teacher_lr_out_pre_trains_at_meta_grads_default_not_at_transfer_yamls():
    """Each candidate's runs replace meta_grad's options of transfer.yaml as a whole: the decay-only
    candidates run at meta_grad's default teacher_lr even though transfer.yaml sets another."""
    assert "teacher_lr" in yaml.safe_load(results.TRANSFER_SUITE.read_text())["agent_options"]["meta_grad"]
    for options in results.TRANSFER_CANDIDATES:
        argv = results.transfer_tuning_argv(options, Path("out"))
        cfg = results.evaluate.parse_args(argv)
        assert cfg.agent_options == {"meta_grad": options}
        resolved = results.evaluate.resolved_options("meta_grad", cfg.agent_options["meta_grad"])
        assert resolved["teacher_lr"] == options.get(
            "teacher_lr", results.evaluate.resolved_options("meta_grad", {})["teacher_lr"]
        )
        assert (cfg.seed, cfg.pretrain_seed, cfg.agents) == (
            results.TRANSFER_TUNING_SEED,
            results.TRANSFER_TUNING_PRETRAIN_SEED,
            "uniform",
        )
    assert results.candidate_folder({"meta_weight_decay": 0.3}) == "decay-0.3"  # the folders of earlier tuning runs
