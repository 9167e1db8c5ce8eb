"""Sweeps that survive a crash and outgrow one machine: kill-and-resume, failing jobs, and the Ray
backend (a local Ray, shared by the tests of one session), which gives the same rows as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "digits", "--student-kwargs", "{hidden: [16, 8]}", "--batch-size", "16", "--val-size", "200",
         "--steps", "40", "--eval-every", "20", "--no-progress", "--device", "cpu"]  # fmt: skip
DETERMINISTIC = lambda rows: json.dumps(  # noqa: E731
    [{k: v for k, v in r.items() if k not in ("seconds_per_step", "time_ratio_to_uniform")} for r in rows], sort_keys=True
)


def _evaluate(out: Path, *argv: str) -> list[dict]:
    return evaluate.main(["--out", str(out), *SMALL, *argv])


def test_a_failing_job_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    real_run_job = evaluate.run_job

    def fail_for_seed_1_of_spl(job, checkpoint=None):
        if job.agent == "spl" and job.seed == 1:
            raise RuntimeError("simulated failure")
        return real_run_job(job, checkpoint)

    monkeypatch.setattr(evaluate, "run_job", fail_for_seed_1_of_spl)
    rows = _evaluate(tmp_path / "r", "--agents", "uniform,spl", "--seeds", "2")
    assert len(rows) == 3
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Failed runs" in report and "spl seed 1 (report): RuntimeError: simulated failure" in report
    monkeypatch.setattr(evaluate, "run_job", real_run_job)
    rows = _evaluate(tmp_path / "r", "--agents", "uniform,spl", "--seeds", "2", "--resume")
    assert len(rows) == 4 and "## Failed runs" not in (tmp_path / "r" / "report.md").read_text(), "resume retried it"


def test_when_every_job_fails_the_report_says_so_and_draws_no_plots(tmp_path, monkeypatch):
    def fail(job, checkpoint=None):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(evaluate, "run_job", fail)
    assert _evaluate(tmp_path / "r", "--agents", "uniform", "--seeds", "2") == []
    report = (tmp_path / "r" / "report.md").read_text()
    assert report.count("RuntimeError: simulated failure") == 2 and "Plots:" not in report
    assert not list((tmp_path / "r").glob("*.png"))


def test_resume_skips_log_lines_that_are_not_run_records(tmp_path):
    rows = _evaluate(tmp_path / "r", "--agents", "uniform", "--seeds", "2")
    log = tmp_path / "r" / "runs.jsonl"
    first, second = log.read_text().splitlines()
    log.write_text("\n".join([first, '{"no": "key"}', "[1, 2]", ""]))  # the second run's record lost, two stray lines
    resumed = _evaluate(tmp_path / "r", "--agents", "uniform", "--seeds", "2", "--resume")
    assert DETERMINISTIC(resumed) == DETERMINISTIC(rows)
    assert len(evaluate.read_finished(log)) == 2


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_equals_an_uninterrupted_sweep(tmp_path):
    argv = [sys.executable, str(ROOT / "evaluate.py"), *SMALL, "--agents", "uniform,small_loss,spl", "--seeds", "3"]
    whole = _evaluate(tmp_path / "whole", *argv[2:])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*argv, "--out", str(tmp_path / "cut")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = tmp_path / "cut" / "runs.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(log.read_text().splitlines())
    assert 3 <= done < 9, f"killed mid-way ({done} of 9 runs finished)"
    resumed = _evaluate(tmp_path / "cut", *argv[2:], "--resume")
    assert DETERMINISTIC(resumed) == DETERMINISTIC(whole)


@pytest.fixture(scope="session")
def local_ray():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_backend_equals_one_process_row_for_row(tmp_path, local_ray):
    argv = ["--agents", "uniform,meta_grad", "--seeds", "2", "--grid", "{noise: [symmetric, pairflip]}"]
    one = _evaluate(tmp_path / "one", *argv, "--workers", "1")
    on_ray = _evaluate(tmp_path / "ray", *argv, "--backend", "ray", "--job-cpus", "1")
    assert DETERMINISTIC(on_ray) == DETERMINISTIC(one)


@pytest.mark.slow
def test_loaded_teachers_reach_ray_workers_through_the_object_store(tmp_path, local_ray):
    import train_teacher

    train_teacher.main(["--agent", "mwnet", "--out", str(tmp_path / "teacher"), *SMALL])
    argv = ["--agents", "uniform", "--teachers", str(tmp_path / "teacher"), "--seed", "1", "--seeds", "1"]
    one = _evaluate(tmp_path / "one", *argv)
    on_ray = _evaluate(tmp_path / "ray", *argv, "--backend", "ray")
    assert DETERMINISTIC(on_ray) == DETERMINISTIC(one)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backend", "spark"], "invalid choice: 'spark'"),
        (["--backend", "ray", "--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster at '127.0.0.1:1'"),
        (["--job-gpus", "1"], "--job-gpus applies to --backend ray"),
    ],
)
def test_bad_backend_input_exits_2_with_one_message(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        _evaluate(tmp_path / "r", "--agents", "uniform", *argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_ray_job_gpus_beyond_the_cluster_is_refused(tmp_path, capsys, local_ray):
    with pytest.raises(SystemExit) as info:
        _evaluate(tmp_path / "r", "--agents", "uniform", "--backend", "ray", "--job-gpus", "64")
    assert info.value.code == 2 and "asks for 64 GPU" in capsys.readouterr().err
