"""evaluate.py: end-to-end outputs, statistics against hand-computed values, workers, bad input."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import evaluate
import reporting
import train_teacher
from envs.teaching import TeachingEnv

SMALL = ["--dataset", "digits", "--student-kwargs", "{hidden: [16, 8]}", "--batch-size", "16", "--val-size", "200",
         "--steps", "40", "--eval-every", "20", "--thresholds", "0.3,0.99", "--no-progress"]  # fmt: skip


def _evaluate(tmp_path, *argv: str, name: str = "report") -> list[dict]:
    return evaluate.main(["--out", str(tmp_path / name), *SMALL, *argv])


def test_small_suite_runs_end_to_end_and_writes_every_output(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("agents: uniform,spl,l2rw,meta_grad\nseeds: 2\ngrid:\n  noise: [symmetric, pairflip]\n")
    rows = evaluate.main(["--suite", str(suite), "--out", str(tmp_path / "r"), *SMALL])
    out = tmp_path / "r"
    assert len(rows) == 4 * 2 * 2
    for name in ("report.md", "results.csv", "results.json", "curves.png", "weights.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 16 and {"agent", "seed", "final_test_acc", "auroc", "steps_to_0.3", "cfg_steps"} <= set(table[0])
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 16 and len(data["summary"]) == 8
    report = (out / "report.md").read_text()
    for noise in ("symmetric", "pairflip"):
        section = report.split(f"## digits / mlp / {noise} 0.4")[1].split("##")[0]
        rows_md = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| agent")]
        assert len(rows_md) == 4
        accs = [float(line.split("|")[5].split()[0]) for line in rows_md]
        assert accs == sorted(accs, reverse=True), "the table is sorted by test accuracy at best validation accuracy"
    assert "best_test_acc" not in report and "oracle_best_test_acc" in table[0], "no selection on test in the report"
    assert (
        "train 1237 (noisy labels), clean 100 (what teachers and clean-data baselines use) + 100 held out for selection" in report
    )


def test_statistics_match_hand_computed_values():
    s = reporting.summarise([1.0, 2.0, 3.0, float("nan")])  # NaN (never reached) is left out
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == 1.0
    assert s["ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) = 4.302653
    single = reporting.summarise([0.7])
    assert single["mean"] == 0.7 and math.isnan(single["std"]) and math.isnan(single["ci95"])
    curve = [(100, 0.4, 0.41), (200, 0.55, 0.5), (300, 0.7, 0.69)]
    assert reporting.steps_to_threshold(curve, 0.5) == 200
    assert reporting.steps_to_threshold(curve, 0.7) == 300
    assert math.isnan(reporting.steps_to_threshold(curve, 0.8))
    assert reporting.selected_test_acc([(1, 0.5, 0.3), (2, 0.7, 0.6), (3, 0.7, 0.9), (4, 0.6, 0.95)]) == 0.6  # first best val
    rows = [
        {
            "agent": "uniform",
            "seconds_per_step": 1.0,
            "dataset": "d",
            "student": "s",
            "noise": "n",
            "noise_rate": 0.4,
            "student_kwargs": "null",
        },
        {
            "agent": "uniform",
            "seconds_per_step": 3.0,
            "dataset": "d",
            "student": "s",
            "noise": "n",
            "noise_rate": 0.4,
            "student_kwargs": "null",
        },
        {
            "agent": "x",
            "seconds_per_step": 4.0,
            "dataset": "d",
            "student": "s",
            "noise": "n",
            "noise_rate": 0.4,
            "student_kwargs": "null",
        },
    ]
    reporting.add_uniform_ratio(rows)
    assert [r["time_ratio_to_uniform"] for r in rows] == [0.5, 1.5, 2.0]


def _deterministic(rows: list[dict]) -> list[dict]:
    timing = ("seconds_per_step", "time_ratio_to_uniform")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_workers_do_not_change_results(tmp_path):
    one = _evaluate(tmp_path, "--agents", "uniform,meta_grad", "--seeds", "2", "--workers", "1", name="one")
    two = _evaluate(tmp_path, "--agents", "uniform,meta_grad", "--seeds", "2", "--workers", "2", name="two")
    assert json.dumps(_deterministic(one), sort_keys=True) == json.dumps(_deterministic(two), sort_keys=True)  # NaN-safe


def test_transfer_of_a_trained_teacher_is_reported_by_pair(tmp_path, monkeypatch, capsys):
    run = tmp_path / "teacher"
    train_teacher.main(["--agent", "meta_grad", "--out", str(run), "--dataset", "digits", "--student-kwargs", "{hidden: [16, 8]}",
                        "--batch-size", "16", "--val-size", "200", "--steps", "40", "--eval-every", "20", "--no-progress"])  # fmt: skip
    target = ["--agents", "uniform", "--teachers", str(run), "--dataset", "mnist1d", "--student", "cnn",
              "--student-kwargs", "{channels: [4, 8], fc: 16}", "--batch-size", "16", "--steps", "40", "--eval-every", "20",
              "--no-progress", "--seeds", "2"]  # fmt: skip
    with pytest.raises(SystemExit) as refused:  # the teacher met seed 0 (its data split, noise draw and student): in-sample
        evaluate.main(["--out", str(tmp_path / "in-sample"), *target, "--seed", "0"])
    assert refused.value.code == 2 and "would be in-sample: pass --seed 1 or higher" in capsys.readouterr().err
    rows = evaluate.main(["--out", str(tmp_path / "t"), *target, "--seed", "1"])
    transferred = [r for r in rows if r["teacher_path"]]
    assert transferred and transferred[0]["trained_on"] == "digits/mlp/symmetric 0.4 (seeds 0-0)" and not transferred[0]["online"]
    report = (tmp_path / "t" / "report.md").read_text()
    assert (
        "## Transfer pairs" in report
        and "digits/mlp/symmetric 0.4 (seeds 0-0) | mnist1d/cnn/symmetric 0.4 (1-2) | frozen" in report
    )
    assert not (tmp_path / "in-sample").exists()
    moved = tmp_path / "elsewhere" / "teacher"  # the same teacher, from another checkout's folder
    shutil.copytree(run, moved)
    real_run_job, calls = evaluate.run_job, []
    monkeypatch.setattr(evaluate, "run_job", lambda job: calls.append(job.agent) or real_run_job(job))
    again = evaluate.main(
        ["--out", str(tmp_path / "t"), *[str(moved) if a == str(run) else a for a in target], "--seed", "1", "--resume"]
    )
    assert calls == [], "found by the teacher's content: nothing re-runs"
    assert {r["teacher_path"] for r in again if r["teacher_path"]} == {str(moved)}, "the rows name where the teacher is now"


def _exit_2(capsys, tmp_path, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        _evaluate(tmp_path, *argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, f"one line, no usage block: {err!r}"
    return err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--agents", "uniform,teacher9000"], "unknown agent 'teacher9000'"),
        (["--agents", "ppo"], "cannot start untrained"),
        (["--agents", "", "--teachers", ""], "nothing to evaluate"),
        (["--teachers", "runs/does-not-exist"], "does not exist"),
        (["--grid", "{noise: []}"], "the grid is empty"),
        (["--pretrain-on", "own"], "--pretrain-on sets the pre-trainings of --leave-one-out, which is not given"),
        (["--leave-one-out", "meta_grad"], "at least two settings (or --pretrain-on own or grid)"),
        (
            ["--leave-one-out", "meta_grad", "--pretrain-on", "other-datasets", "--grid", "{noise: [symmetric, pairflip]}"],
            "--pretrain-on other-datasets: no setting of the grid on another dataset than digits/mlp/symmetric 0.4's",
        ),
        (["--leave-one-out", "meta_grad", "--pretrain-on", "grid"], "--pretrain-grid sets the pre-trainings of --leave-one-out"),
        (["--leave-one-out", "meta_grad", "--pretrain-on", "own", "--pretrain-grid", "{dataset: [mnist1d]}"], "give all three"),
        (
            ["--pretrain-grid", "{dataset: [mnist1d]}"],
            "--pretrain-grid sets the pre-trainings of --leave-one-out --pretrain-on grid",
        ),
        (["--leave-one-out", "meta_grad", "--pretrain-on", "grid", "--pretrain-grid", "[]"], "--pretrain-grid is empty"),
        (
            [
                "--leave-one-out",
                "meta_grad",
                "--pretrain-on",
                "grid",
                "--pretrain-grid",
                "{dataset: [mnist]}",
                "--data-root",
                "/nonexistent",
            ],
            "--pretrain-grid: ",  # its data is missing: refused before the tuning or anything else trains
        ),
        (
            [
                "--leave-one-out",
                "meta_grad",
                "--pretrain-on",
                "grid",
                "--pretrain-grid",
                "[{dataset: mnist1d}, {dataset: digits}]",
            ],
            "--pretrain-grid holds digits/mlp/symmetric 0.4, a setting of --grid: its teachers would not be evaluated",
        ),
        (
            ["--leave-one-out", "meta_grad", "--pretrain-on", "grid", "--pretrain-grid", "{dataset: [imagenet]}"],
            "--pretrain-grid: grid dataset must be one of",
        ),
        (
            ["--leave-one-out", "meta_grad", "--pretrain-on", "own", "--pretrain-seed", "0"],
            "the pre-trainings meet seeds 0..149, which overlap the reported seeds 0..2: the frozen teachers would",
        ),
        (
            ["--leave-one-out", "meta_grad", "--pretrain-on", "own", "--pretrain-seed", "997", "--tune", "{lr: [0.1]}"],
            "overlap the tuning seeds 1000..1001",
        ),
        (["--grid", "{optimizer: [sgd]}"], "unknown keys optimizer"),
        (["--grid", "{dataset: [imagenet]}"], "grid dataset must be one of mnist1d, digits"),
        (["--grid", "{noise_rate: 0.2}"], "noise_rate must be a list of values"),
        (["--grid", "{noise_rate: [1.5]}"], "grid noise_rate must be in [0, 1)"),
        (["--grid", "[{dataset: digits}, 3]"], "a list of settings must hold mappings"),
        (["--val-size", "5000"], "more than the"),
        (["--batch-size", "5000"], "batch_size must be in"),
        (["--noise-rate", "1.0"], "--noise-rate must be in [0, 1)"),
        (["--lr", "nan"], "--lr must be finite"),
        (["--agents", "uniform,clean_only", "--val-size", "10"], "smallest data pool of train_pool 'clean'"),
        (["--agent-options", "{mwnet: {hidden: 0}}", "--agents", "mwnet"], "hidden must be >= 1"),
        (["--agent-options", "{meta_grad: {meta_layers: 'last:9'}}", "--agents", "meta_grad"], "asks for 9 layers"),
        (["--agent-options", "{meta_grad@x: {meta_layers: 'last:9'}}", "--agents", "meta_grad,meta_grad@x"], "asks for 9 layers"),
        (["--leave-one-out", "meta_grad"], "at least two settings"),
        (["--pretrain-seeds", "3"], "--leave-one-out, which is not given"),
        (["--leave-one-out", "uniform", "--grid", "{noise: [symmetric, pairflip]}"], "not one"),
        (["--pretrain-options", "{digits/mlp/symmetric 0.4: {teacher_lr: 0.01}}"], "--leave-one-out, which is not given"),
        (
            [
                "--leave-one-out",
                "meta_grad",
                "--grid",
                "[{student_kwargs: {hidden: [16, 8]}}, {student_kwargs: {hidden: [12, 8]}}]",
                "--pretrain-options",
                "{digits/mlp/symmetric 0.4: {teacher_lr: 0.01}}",
            ],
            "two settings of the grid share one",
        ),
        (
            [
                "--leave-one-out",
                "meta_grad",
                "--grid",
                "{noise: [symmetric, pairflip]}",
                "--pretrain-options",
                "{digits/mlp/none 0.4: {teacher_lr: 0.01}}",
            ],
            "setting 'digits/mlp/none 0.4', which is not in the grid: digits/mlp/symmetric 0.4, ",
        ),
        (
            [
                "--leave-one-out",
                "meta_grad",
                "--grid",
                "{noise: [symmetric, pairflip]}",
                "--pretrain-options",
                "{digits/mlp/pairflip 0.4: {teacher_lr: -1}}",
            ],
            "teacher_lr must be > 0",
        ),
        (
            [
                "--leave-one-out",
                "meta_grad",
                "--grid",
                "{noise: [symmetric, pairflip]}",
                "--pretrain-options",
                "{digits/mlp/pairflip 0.4: 0.01}",
            ],
            "must map setting -> {option: value}",
        ),
        (
            ["--agents", "uniform,mwnet@g", "--agent-options", "{mwnet@g: {method: graph}}"],
            "--agent-options mwnet@g: method must be one of auto, jvp, layerwise; got 'graph'",  # names the entry
        ),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--thresholds", "half"], "--thresholds must be comma-separated numbers"),
    ],
)
def test_bad_input_exits_2_with_one_message(capsys, tmp_path, argv, message):
    err = _exit_2(capsys, tmp_path, *argv)
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()


def test_teacher_that_cannot_act_on_the_target_fails_before_training(capsys, tmp_path):
    run = tmp_path / "ppo"
    train_teacher.main(["--agent", "ppo", "--out", str(run), "--dataset", "digits", "--student-kwargs", "{hidden: [16, 8]}",
                        "--batch-size", "16", "--val-size", "200", "--steps", "40", "--horizon", "20", "--eval-every", "20",
                        "--no-progress"])  # fmt: skip
    err = _exit_2(capsys, tmp_path, "--agents", "uniform", "--teachers", str(run), "--batch-size", "32")
    assert "batch_size = 16" in err and "batch_size = 32" in err


def test_auroc_and_weights_are_recorded_per_run(tmp_path):
    rows = _evaluate(tmp_path, "--agents", "uniform,small_loss", "--seeds", "1")
    by_agent = {r["agent"]: r for r in rows}
    assert by_agent["uniform"]["auroc"] == 0.5
    assert by_agent["small_loss"]["weight_clean"] > by_agent["small_loss"]["weight_corrupted"]
    assert np.isfinite(by_agent["small_loss"]["steps_to_0.3"]) and np.isnan(by_agent["small_loss"]["steps_to_0.99"])


def test_paired_differences_against_hand_computed_values():
    """Differences are paired by seed (an unpaired seed is left out); a tie is within half a point."""
    reference = [{"seed": s, "selected_test_acc": a} for s, a in [(0, 0.50), (1, 0.60), (2, 0.70), (3, 0.10)]]
    rows = [{"seed": s, "selected_test_acc": a} for s, a in [(0, 0.60), (1, 0.602), (2, 0.65), (9, 0.99)]]
    result = reporting.paired(rows, reference)
    diffs = np.array([0.10, 0.002, -0.05])
    assert result["n"] == 3 and result["mean"] == pytest.approx(diffs.mean())
    assert result["ci95"] == pytest.approx(4.302653 * diffs.std(ddof=1) / math.sqrt(3), rel=1e-6)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 1, 1)
    assert reporting.fmt_paired(result).endswith("(1/1/1)")


def test_clean_data_baselines_are_compared_and_paired(tmp_path):
    rows = _evaluate(tmp_path, "--agents", "uniform,clean_only,finetune,small_loss,oracle", "--seeds", "2")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "clean_only (clean data)" in report and "*oracle (reference: reads the noise mask)*" in report
    summary = json.loads((tmp_path / "report" / "results.json").read_text())["summary"]
    line = next(s for s in summary if s["agent"] == "small_loss")
    assert line["best_clean"] in ("clean_only", "finetune") and line["vs_best_clean"]["n"] == 2
    assert line["vs_uniform"]["n"] == 2
    oracle = {r["seed"]: r for r in rows if r["agent"] == "oracle"}
    assert all(r["weight_corrupted"] == 0 and r["weight_clean"] == 1 and r["auroc"] == 1 for r in oracle.values())


def test_tuning_chooses_by_validation_on_disjoint_seeds_and_is_reported(tmp_path, capsys):
    rows = _evaluate(tmp_path, "--agents", "uniform,mwnet", "--seeds", "1", "--tune", "{lr: [0.0001, 0.1], teacher_lr: [0.001, 0.01]}",
                     "--tune-seeds", "1")  # fmt: skip
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    chosen = {t["agent"]: t for t in data["tuning"]}
    assert chosen["uniform"]["lr"] == 0.1 and chosen["uniform"]["candidates"] == 2  # lr 1e-4 barely moves in 40 steps
    assert chosen["mwnet"]["candidates"] == 4 and chosen["mwnet"]["teacher_lr"] in (0.001, 0.01)
    assert {r["agent"]: r["lr"] for r in rows} == {"uniform": 0.1, "mwnet": chosen["mwnet"]["lr"]}
    assert {r["seed"] for r in rows} == {0}
    tuning_seeds = {json.loads(line)["row"]["seed"] for line in (tmp_path / "report" / "runs.jsonl").read_text().splitlines()}
    assert tuning_seeds == {0, 1000}
    assert "## Tuned values" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(SystemExit) as refused:
        _evaluate(tmp_path, "--agents", "uniform", "--tune", "{lr: [0.1]}", "--tune-seed", "0", name="overlap")
    assert (
        refused.value.code == 2
        and "tuning seeds 0..1 overlap the reported seeds 0..2; move --tune-seed" in capsys.readouterr().err
    )


def test_tuning_maximises_the_held_out_accuracy_the_reported_metric_reads():
    """--tune-by best_val_acc picks the candidate whose held-out accuracy peaked highest, final_val_acc the
    one that ended highest (a run that peaks early and then fits its noisy labels loses there)."""

    def tuning_run(lr: float, seed: int, best: float, final: float) -> dict:
        row = {"dataset": "digits", "student": "mlp", "noise": "symmetric", "noise_rate": 0.4, "student_kwargs": "null",
               "agent": "uniform", "seed": seed, "lr": lr, "options": "{}", "best_val_acc": best, "final_val_acc": final}  # fmt: skip
        return {"row": row}

    runs = [tuning_run(0.03, 1000, 0.97, 0.80), tuning_run(0.03, 1001, 0.95, 0.84),  # peaks high, ends low
            tuning_run(0.1, 1000, 0.94, 0.90), tuning_run(0.1, 1001, 0.93, 0.91)]  # fmt: skip
    for criterion, lr, score in (("best_val_acc", 0.03, 0.96), ("final_val_acc", 0.1, 0.905)):
        cfg = evaluate.parse_args(["--tune-by", criterion, *SMALL])
        chosen, (table,) = evaluate.choose(cfg, runs)
        assert list(chosen.values()) == [(lr, ())] and table["score"] == pytest.approx(score), criterion
        assert table["runner_up"] == pytest.approx({"best_val_acc": 0.935, "final_val_acc": 0.82}[criterion])
    tied = [tuning_run(0.1, 1000, 0.9, 0.9), tuning_run(0.03, 1000, 0.9, 0.9)]
    chosen, (table,) = evaluate.choose(evaluate.parse_args(SMALL), tied)
    assert list(chosen.values()) == [(0.1, ())] and table["runner_up"] == table["score"], "a tie goes to the first candidate"


def test_an_interrupted_benchmark_resumes_with_only_the_missing_runs(tmp_path, monkeypatch, capsys):
    argv = ["--agents", "uniform,small_loss", "--seeds", "2"]
    whole = _evaluate(tmp_path, *argv, name="whole")
    real_run_job, calls = evaluate.run_job, []

    def crash_on_third(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_run_job(job)

    monkeypatch.setattr(evaluate, "run_job", crash_on_third)
    with pytest.raises(SystemExit) as interrupted:  # Ctrl-C: one line, exit 130, finished runs kept
        _evaluate(tmp_path, *argv, name="cut")
    assert interrupted.value.code == 130
    assert len((tmp_path / "cut" / "runs.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit) as refused:  # an existing benchmark is not overwritten
        _evaluate(tmp_path, *argv, name="cut")
    assert refused.value.code == 2 and "already holds a benchmark; pass --resume" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(evaluate, "run_job", lambda job: calls.append(job) or real_run_job(job))
    resumed = _evaluate(tmp_path, *argv, "--resume", name="cut")
    assert len(calls) == 2, "only the missing runs ran"
    assert json.dumps(_deterministic(resumed), sort_keys=True) == json.dumps(_deterministic(whole), sort_keys=True)


def test_leave_one_setting_out_transfer_pretrains_without_the_target(tmp_path):
    rows = _evaluate(tmp_path, "--agents", "uniform", "--seeds", "1", "--grid", "{noise: [symmetric, pairflip]}",
                     "--leave-one-out", "meta_grad", "--pretrain-steps", "40",
                     "--agent-options", "{meta_grad: {meta_layers: head, hidden: 16, init_weight: null}}",
                     "--pretrain-options", "{digits/mlp/pairflip 0.4: {hidden: 12, teacher_lr: 0.01}}")  # fmt: skip
    held_out = [r for r in rows if r["agent"] == "meta_grad@held-out"]
    assert {(r["noise"], r["trained_on"]) for r in held_out} == {
        ("symmetric", "digits/mlp/pairflip 0.4 (seeds 10000-10000)"),
        ("pairflip", "digits/mlp/symmetric 0.4 (seeds 10000-10000)"),
    }
    assert all(not r["online"] for r in held_out), "evaluated frozen"
    assert "## Transfer pairs" in (tmp_path / "report" / "report.md").read_text()
    pretrained = list((tmp_path / "report" / "pretrained").iterdir())
    assert len(pretrained) == 2
    options = {}  # the pre-trained teachers have the options given to the --leave-one-out agent, per held-out setting over them
    for run in pretrained:
        config = yaml.safe_load((run / "config.yaml").read_text())
        options[run.name.split("-without-")[1].rsplit("-", 1)[0]] = (
            config["meta_layers"],
            config["hidden"],
            config["teacher_lr"],
        )
    assert options == {"digits-mlp-symmetric0.4": ("head", 16, None), "digits-mlp-pairflip0.4": ("head", 12, 0.01)}


def test_the_own_setting_reference_pretrains_on_the_setting_itself(tmp_path):
    """``--pretrain-on own``: each setting's teachers pre-train on that setting alone (other seeds), the reference the
    leave-one-out teachers are read against; one setting is enough."""
    rows = _evaluate(tmp_path, "--agents", "uniform", "--seeds", "2", "--grid", "{noise: [symmetric, pairflip]}",
                     "--leave-one-out", "meta_grad", "--pretrain-on", "own", "--pretrain-steps", "40", "--pretrain-seeds", "2",
                     "--agent-options", "{meta_grad: {meta_layers: head, hidden: 16}}")  # fmt: skip
    own = [r for r in rows if r["agent"].startswith("meta_grad@own-setting#")]
    assert {(r["agent"], r["noise"], r["trained_on"]) for r in own} == {
        (f"meta_grad@own-setting#{k + 1}", noise, f"digits/mlp/{noise} 0.4 (seeds {10000 + k}-{10000 + k})")
        for k in range(2)
        for noise in ("symmetric", "pairflip")
    }
    assert all(not r["online"] for r in own), "evaluated frozen"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Pre-trained teachers" in report and "## Transfer pairs" not in report, "no change of setting: no transfer"
    assert sorted(p.name.split("-on-")[1].rsplit("-", 1)[0] for p in (tmp_path / "report" / "pretrained").iterdir()) == [
        "digits-mlp-pairflip0.4",
        "digits-mlp-pairflip0.4",
        "digits-mlp-symmetric0.4",
        "digits-mlp-symmetric0.4",
    ]
    spread = (tmp_path / "report" / "report.md").read_text().split("## Between pre-trainings", 1)[1]
    assert "| meta_grad@own-setting (#1, 2) |" in spread, "the spread between the pre-trainings on the setting itself"
    one = _evaluate(tmp_path, "--agents", "uniform", "--seeds", "1", "--leave-one-out", "meta_grad", "--pretrain-on", "own",
                    "--pretrain-steps", "40", "--agent-options", "{meta_grad: {meta_layers: head, hidden: 16}}", name="one")  # fmt: skip
    assert {r["agent"] for r in one} == {"uniform", "meta_grad@own-setting"}


def test_the_report_groups_the_pre_trainings_of_every_pretrain_on_mode():
    """reporting.pretraining_groups names evaluate.py's labels itself (it cannot import evaluate): they must agree."""
    line = {"dataset": "digits", "student": "mlp", "noise": "symmetric", "noise_rate": 0.4, "student_kwargs": "null",
            "vs_uniform_final": {"mean": 0.1}}  # fmt: skip
    for label, _ in evaluate.PRETRAIN_ON.values():
        groups = reporting.pretraining_groups([{**line, "agent": f"meta_grad@{label}#{k}"} for k in (2, 1)])
        assert [k for numbered in groups.values() for k, _ in numbered] == [1, 2], label


def test_leave_one_dataset_out_pretrains_on_the_other_datasets_settings_only(tmp_path):
    grid = "[{dataset: digits, noise: symmetric}, {dataset: digits, noise: pairflip}, {dataset: mnist1d}]"
    rows = _evaluate(tmp_path, "--agents", "uniform", "--seeds", "1", "--grid", grid, "--leave-one-out", "meta_grad",
                     "--pretrain-on", "other-datasets", "--pretrain-steps", "40",
                     "--agent-options", "{meta_grad: {meta_layers: head, hidden: 16}}")  # fmt: skip
    trained_on = {(r["dataset"], r["noise"]): r["trained_on"] for r in rows if r["agent"] == "meta_grad@held-out-dataset"}
    assert trained_on == {
        ("digits", "symmetric"): "mnist1d/mlp/symmetric 0.4 (seeds 10000-10000)",
        ("digits", "pairflip"): "mnist1d/mlp/symmetric 0.4 (seeds 10000-10000)",
        ("mnist1d", "symmetric"): "digits/mlp/symmetric 0.4; digits/mlp/pairflip 0.4 (seeds 10000-10000)",
    }
    folders = sorted(
        p.name.split("-without-dataset-")[1].rsplit("-", 1)[0] for p in (tmp_path / "report" / "pretrained").iterdir()
    )
    assert folders == ["digits-mlp-pairflip0.4", "digits-mlp-symmetric0.4", "mnist1d-mlp-symmetric0.4"]


def test_a_pretraining_setting_that_differs_only_by_empty_student_arguments_is_the_same_student():
    setting = {"dataset": "digits", "student": "mlp", "noise": "symmetric", "noise_rate": 0.4, "student_kwargs": None}
    assert evaluate.same_student({**setting, "student_kwargs": {}}) == evaluate.same_student(setting)
    assert evaluate.same_student({**setting, "student_kwargs": {"hidden": [8]}}) != evaluate.same_student(setting)


def test_teachers_pre_trained_on_a_grid_of_their_own_teach_every_setting_of_the_grid(tmp_path):
    """``--pretrain-on grid``: every setting's teachers pre-train on --pretrain-grid's settings, none of which the grid holds
    (here: teachers of digits students pre-trained on mnist1d only, two pre-trainings, reported as @pre-trained#k)."""
    rows = _evaluate(tmp_path, "--agents", "uniform", "--seeds", "1", "--grid", "{noise: [symmetric, pairflip]}",
                     "--leave-one-out", "meta_grad", "--pretrain-on", "grid", "--pretrain-grid", "{dataset: [mnist1d], noise: [symmetric, pairflip]}",
                     "--pretrain-steps", "40", "--pretrain-seeds", "2", "--agent-options", "{meta_grad: {meta_layers: head, hidden: 16}}")  # fmt: skip
    pretrained = {(r["agent"], r["noise"], r["trained_on"]) for r in rows if "@" in r["agent"]}
    assert pretrained == {
        (
            f"meta_grad@pre-trained#{k + 1}",
            noise,
            f"mnist1d/mlp/symmetric 0.4; mnist1d/mlp/pairflip 0.4 (seeds {10000 + k}-{10000 + k})",
        )
        for k in range(2)
        for noise in ("symmetric", "pairflip")
    }
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Transfer pairs" in report and "| meta_grad@pre-trained (#1, 2) |" in report.split("## Between pre-trainings", 1)[1]
    folders = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "report" / "pretrained").iterdir())
    assert folders == [
        f"{i}-meta_grad-on-grid-digits-mlp-{noise}0.4" for i, noise in ((0, "symmetric"), (1, "pairflip")) for _ in range(2)
    ]


def test_an_interrupted_pretraining_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    argv = ["--agents", "uniform", "--seeds", "1", "--leave-one-out", "meta_grad", "--pretrain-on", "own",
            "--pretrain-steps", "560", "--agent-options", "{meta_grad: {meta_layers: head, hidden: 16}}"]  # fmt: skip
    whole = _evaluate(tmp_path, *argv, name="whole")
    real_step, steps = TeachingEnv.step, itertools.count(1)

    def killed_after_the_first_checkpoint(self, action):  # train_teacher checkpoints every 500 updates
        if next(steps) == 530:
            raise KeyboardInterrupt("simulated kill")
        return real_step(self, action)

    monkeypatch.setattr(TeachingEnv, "step", killed_after_the_first_checkpoint)
    with pytest.raises(SystemExit) as interrupted:
        _evaluate(tmp_path, *argv, name="cut")
    assert interrupted.value.code == 130 and "(last checkpoint: step 500)" in capsys.readouterr().err
    taken = []
    monkeypatch.setattr(TeachingEnv, "step", lambda self, action: taken.append(1) or real_step(self, action))
    resumed = _evaluate(tmp_path, *argv, "--resume", name="cut")
    assert len(taken) == (560 - 500) + 2 * 40, "the pre-training went on from its checkpoint; then the two students"
    same = lambda rows: json.dumps([{k: v for k, v in r.items() if k != "teacher_path"} for r in _deterministic(rows)])
    assert same(resumed) == same(whole), "as if never interrupted"


def test_several_pretrainings_per_held_out_setting_on_disjoint_seeds_and_their_spread(tmp_path):
    rows = _evaluate(tmp_path, "--agents", "uniform", "--seeds", "2", "--grid", "{noise: [symmetric, pairflip]}",
                     "--leave-one-out", "meta_grad", "--pretrain-steps", "60", "--pretrain-seeds", "2",
                     "--agent-options", "{meta_grad: {meta_layers: head, hidden: 16}}")  # fmt: skip
    trained_on = {(r["agent"], r["noise"]): r["trained_on"] for r in rows if "@held-out" in r["agent"]}
    assert trained_on == {  # 60 updates in episodes of 40: two episodes, so the second pre-training starts at 10002
        ("meta_grad@held-out#1", "symmetric"): "digits/mlp/pairflip 0.4 (seeds 10000-10001)",
        ("meta_grad@held-out#2", "symmetric"): "digits/mlp/pairflip 0.4 (seeds 10002-10003)",
        ("meta_grad@held-out#1", "pairflip"): "digits/mlp/symmetric 0.4 (seeds 10000-10001)",
        ("meta_grad@held-out#2", "pairflip"): "digits/mlp/symmetric 0.4 (seeds 10002-10003)",
    }
    assert len(list((tmp_path / "report" / "pretrained").iterdir())) == 4
    report = (tmp_path / "report" / "report.md").read_text()
    spread = report.split("## Between pre-trainings", 1)[1].split("\n## ", 1)[0]
    for noise in ("symmetric", "pairflip"):  # each pre-training's mean paired difference, then their mean
        deltas = []
        for k in (1, 2):
            mine = sorted(
                (r["seed"], r["final_test_acc"]) for r in rows if (r["agent"], r["noise"]) == (f"meta_grad@held-out#{k}", noise)
            )
            base = sorted((r["seed"], r["final_test_acc"]) for r in rows if (r["agent"], r["noise"]) == ("uniform", noise))
            deltas.append(100 * float(np.mean([a[1] - b[1] for a, b in zip(mine, base)])))
        line = next(x for x in spread.splitlines() if f"/{noise} 0.4 |" in x)
        assert f"| meta_grad@held-out (#1, 2) | {deltas[0]:+.1f}, {deltas[1]:+.1f} | {np.mean(deltas):+.1f} [" in line


def test_variants_of_one_agent_run_side_by_side_with_their_own_options(tmp_path):
    rows = _evaluate(tmp_path, "--agents", "uniform,spl,spl@late", "--agent-options", "{spl@late: {start_fraction: 0.9}}",
                     "--seeds", "1")  # fmt: skip
    by_agent = {r["agent"]: r for r in rows}
    assert set(by_agent) == {"uniform", "spl", "spl@late"}
    assert by_agent["spl@late"]["weight_clean"] > by_agent["spl"]["weight_clean"], "the variant kept more of each batch"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_on_a_machine_without_a_gpu_is_refused_before_anything_runs(capsys, tmp_path):
    err = _exit_2(capsys, tmp_path, "--agents", "uniform", "--device", "cuda")
    assert "torch.cuda.is_available() is False" in err and not (tmp_path / "report").exists()


def test_runs_recorded_before_an_option_existed_resume_and_other_values_re_run(tmp_path, monkeypatch):
    """A run key written before an option existed lacks it; one written while it existed holds it at its
    legacy value (``legacy_options``: what the agent did before): both name the same run. A key holding
    another value of such an option (recorded with the same --agent-options) names another run."""
    argv = ["--agents", "meta_grad", "--seeds", "1"]
    _evaluate(tmp_path, *argv)
    log = tmp_path / "report" / "runs.jsonl"
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    resolved = json.loads(record["key"])[-1]["resolved"]
    assert "activation" not in resolved and resolved["alignment"] is True, "legacy values are left out, others kept"
    real_run_job, calls = evaluate.run_job, []
    monkeypatch.setattr(evaluate, "run_job", lambda job: calls.append(job.agent) or real_run_job(job))

    def recorded_with(**options) -> None:
        fields = json.loads(record["key"])
        fields[-1]["resolved"] = {**{k: v for k, v in resolved.items() if k not in options}, **options}
        log.write_text(json.dumps({**record, "key": json.dumps(fields, sort_keys=True)}) + "\n")

    recorded_with(activation="relu")  # while the option existed, at its legacy value
    _evaluate(tmp_path, *argv, "--resume")
    assert calls == [], "a run recorded with activation relu is reused"
    for options in ({"activation": "leaky_relu"}, {"alignment": False}):  # not today's resolved options
        recorded_with(**options)
        _evaluate(tmp_path, *argv, "--resume")
        assert calls == ["meta_grad"], f"a run recorded with {options} is not reused"
        calls.clear()


def test_a_changed_default_re_runs_on_resume(tmp_path, monkeypatch):
    """Run keys hold every option an agent is built with, so that ``--resume`` after a default changed
    (e.g. a new version of a teacher) re-runs its jobs instead of reusing results of the old default."""
    from agents.heuristics import SmallLossOptions, SmallLossTeacher

    argv = ["--agents", "uniform,small_loss", "--seeds", "1"]
    _evaluate(tmp_path, *argv)
    real_run_job, calls = evaluate.run_job, []
    monkeypatch.setattr(evaluate, "run_job", lambda job: calls.append(job.agent) or real_run_job(job))
    _evaluate(tmp_path, *argv, "--resume")
    assert calls == [], "nothing changed: every run is reused"
    fields = [
        (f.name, f.type, dataclasses.field(default=0.2 if f.name == "forget_rate" else f.default))
        for f in dataclasses.fields(SmallLossOptions)
    ]
    monkeypatch.setattr(SmallLossTeacher, "Options", dataclasses.make_dataclass("SmallLossOptions", fields))
    rows = _evaluate(tmp_path, *argv, "--resume")
    assert calls == ["small_loss"], "only the agent whose default changed runs again"
    assert len(rows) == 2 and not (tmp_path / "report" / "errors.jsonl").exists()


def test_an_option_set_to_none_resolves_to_its_default_in_keys_and_digests():
    """None means "the default" for flags and agents alike, so a key or digest holds the default the run used."""
    default = evaluate.resolved_options("meta_grad", {})
    assert evaluate.resolved_options("meta_grad", {"init_weight": None, "teacher_lr": None}) == default
    assert evaluate.resolved_options("meta_grad", {"teacher_lr": 0.01})["teacher_lr"] == 0.01 != default["teacher_lr"]


def test_a_run_recorded_with_its_data_folder_is_reused_from_another_checkout(tmp_path, monkeypatch):
    """Run keys once held --data-root; the same files read from another checkout's path are the same
    run, so a recorded key with a data folder is reused on --resume."""
    argv = ["--agents", "uniform", "--seeds", "1"]
    _evaluate(tmp_path, *argv)
    log = tmp_path / "report" / "runs.jsonl"
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    fields = json.loads(record["key"])
    assert "data_root" not in fields[-1]
    fields[-1]["data_root"] = "/another/checkout/shared/data"
    log.write_text(json.dumps({**record, "key": json.dumps(fields, sort_keys=True)}) + "\n")
    real_run_job, calls = evaluate.run_job, []
    monkeypatch.setattr(evaluate, "run_job", lambda job: calls.append(job.agent) or real_run_job(job))
    _evaluate(tmp_path, *argv, "--resume")
    assert calls == [], "a run recorded with a data folder is reused"


@pytest.fixture
def handed(monkeypatch) -> list[list[str]]:
    """The argv of every pre-training evaluate.py starts, each finishing at once (a summary, no teacher)."""
    calls = []

    def pre_train(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "summary.json").write_text("{}")

    monkeypatch.setattr(train_teacher, "main", pre_train)
    return calls


def test_a_pre_training_from_another_data_folder_is_the_same_pre_training(tmp_path, handed):
    """The pre-training's folder digest does not hold --data-root, while the pre-training is still
    handed the folder to read."""
    grid = json.dumps([{"noise": "symmetric"}, {"noise": "pairflip"}])
    folders = []
    for root in ("/one/checkout/data", "/another/checkout/data"):
        cfg = evaluate.parse_args(["--grid", grid, "--leave-one-out", "meta_grad", "--data-root", root, *SMALL])
        runs = evaluate.pretrain_held_out(cfg, tmp_path / root.split("/")[1])
        folders.append([Path(path).name for by_label in runs.values() for path in by_label.values()])
    assert folders[0] == folders[1] and len(folders[0]) == 2
    assert [a[a.index("--data-root") + 1] for a in handed] == ["/one/checkout/data"] * 2 + ["/another/checkout/data"] * 2


def test_an_option_written_out_at_its_resolved_value_is_the_same_pre_training(tmp_path, handed):
    """The pre-training's digest holds the agent's options resolved, not the flags that set them: an
    option written out at the value it resolves to reuses the pre-training, and another value makes
    another one, which is handed that value's flag."""
    grid = json.dumps([{"noise": "symmetric"}, {"noise": "pairflip"}])
    default_unroll = evaluate.resolved_options("meta_grad", {})["unroll"]
    folders = []
    for options in ({}, {"meta_grad": {"unroll": default_unroll}}, {"meta_grad": {"unroll": default_unroll + 1}}):
        cfg = evaluate.parse_args(
            ["--grid", grid, "--leave-one-out", "meta_grad", "--agent-options", json.dumps(options), *SMALL]
        )
        runs = evaluate.pretrain_held_out(cfg, tmp_path)
        folders.append(sorted(Path(path).name for by_label in runs.values() for path in by_label.values()))
    assert folders[0] == folders[1] and len(folders[0]) == 2
    assert not set(folders[2]) & set(folders[0])
    assert len(handed) == 4, "the written-out default reused both pre-trainings; the other value made two more"
    assert all("--unroll" not in argv for argv in handed[:2])
    assert all(argv[argv.index("--unroll") + 1] == str(default_unroll + 1) for argv in handed[2:])


def test_mwnet_runs_recorded_before_its_method_option_keep_their_keys():
    """mwnet's ``method`` came later: at its legacy value (auto, the JVP its old runs took) a key leaves it out,
    as those runs' keys do; another value is written out, so it names another run."""
    assert "method" not in evaluate.recorded_options("mwnet", {})
    assert "method" not in evaluate.recorded_options("mwnet", {"method": "auto"})
    assert evaluate.recorded_options("mwnet", {"method": "layerwise"})["method"] == "layerwise"
