"""train_teacher.py: outputs, resume after an interruption, and refusal of bad input."""

from __future__ import annotations

import json

import pytest
import torch

import train_teacher
from agents import CheckpointError, load_teacher
from envs.teaching import TeachingEnv
from tests.conftest import make_env

TINY_ARGS = ["--dataset", "digits", "--student-kwargs", "{hidden: [16, 8]}", "--batch-size", "16", "--val-size", "200",
             "--steps", "60", "--eval-every", "20", "--checkpoint-every", "20", "--no-progress", "--device", "cpu"]  # fmt: skip


def _run(tmp_path, *extra: str, name: str = "run") -> dict:
    return train_teacher.main(["--out", str(tmp_path / name), *TINY_ARGS, *extra])


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("agent", ["meta_grad", "mwnet", "l2rw", "uniform", "spl"])
def test_run_writes_every_output(tmp_path, agent):
    summary = _run(tmp_path, "--agent", agent)
    run = tmp_path / "run"
    for name in ("teacher.pt", "config.yaml", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    records = _metrics(run)
    assert [r["step"] for r in records] == [20, 40, 60]
    assert {"student/test_acc", "student/val_acc", "teacher/auroc", "teacher/weight_clean"} <= set(records[-1])
    assert 0 <= summary["final_test_acc"] <= 1
    teacher = load_teacher(run, env=make_env(batch_size=16))
    assert teacher.name == agent


def test_meta_grad_logs_its_meta_loss_and_unroll_is_respected(tmp_path):
    _run(tmp_path, "--agent", "meta_grad", "--unroll", "3")
    record = _metrics(tmp_path / "run")[-1]
    assert record["teacher/meta_loss"] > 0
    assert load_teacher(tmp_path / "run").hp.unroll == 3


def killed_at(monkeypatch: pytest.MonkeyPatch, step: int):
    """Make every env's step number ``step`` raise KeyboardInterrupt (a simulated kill); returns the real
    ``TeachingEnv.step``, to put back."""
    real_step = TeachingEnv.step

    def step_or_die(self, action):
        if self.t == step:
            raise KeyboardInterrupt("simulated kill")
        return real_step(self, action)

    monkeypatch.setattr(TeachingEnv, "step", step_or_die)
    return real_step


@pytest.mark.parametrize("method", [[], ["--unroll", "1", "--method", "layerwise"]], ids=["default", "layerwise"])
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys, method):
    """Also for ``layerwise``, whose records of the current batch the checkpoint must bring back (without them
    the first update after resuming takes the JVP, which differs from the closed form by rounding)."""
    reference = _run(tmp_path, "--agent", "meta_grad", *method, name="whole")
    real_step = killed_at(monkeypatch, 45)
    with pytest.raises(SystemExit) as interrupted:
        _run(tmp_path, "--agent", "meta_grad", *method, name="cut")
    monkeypatch.setattr(TeachingEnv, "step", real_step)
    assert interrupted.value.code == 130
    assert "interrupted at step 45 (last checkpoint: step 40); resume with --resume" in capsys.readouterr().err
    assert [r["step"] for r in _metrics(tmp_path / "cut")] == [20, 40]
    config = tmp_path / "other.yaml"
    config.write_text("noise: pairflip\n")
    with pytest.raises(SystemExit):  # a setting changed through --config is refused too
        train_teacher.main(["--out", str(tmp_path / "cut"), "--resume", "--config", str(config)])
    assert "would change it: --noise ('symmetric' -> 'pairflip')" in capsys.readouterr().err
    resumed = train_teacher.main(["--out", str(tmp_path / "cut"), "--resume", "--no-progress"])  # the run's own --steps 60
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "whole")  # no lost or duplicated steps, same values
    assert resumed["final_test_acc"] == reference["final_test_acc"]
    a, b = (torch.load(tmp_path / n / "teacher.pt", weights_only=True)["state"]["net"] for n in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interruption_before_the_first_checkpoint_does_not_suggest_resuming(tmp_path, monkeypatch, capsys):
    killed_at(monkeypatch, 5)
    with pytest.raises(SystemExit) as interrupted:
        _run(tmp_path, "--agent", "meta_grad", name="early")
    assert interrupted.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted at step 5 before its first checkpoint: nothing to resume" in err and "--resume" not in err


def _exit_message(capsys, tmp_path, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.main(["--out", str(tmp_path / "bad"), *TINY_ARGS, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, f"one line, no usage block: {err!r}"
    return err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--agent", "teacher9000"], "invalid choice: 'teacher9000'"),  # unknown agent
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),  # unknown dataset
        (["--noise-rate", "1.5"], r"--noise-rate must be in [0, 1)"),  # rate out of range
        (["--steps", "0"], "--steps must be >= 1"),  # nothing to do
        (["--steps", "ten"], "invalid int value: 'ten'"),  # not a number
        (["--student-kwargs", "[1"], "not valid YAML"),  # broken YAML flag
        (["--student-kwargs", "[1, 2]"], "--student-kwargs must be a mapping"),  # YAML of the wrong kind
        (["--batch-size", "100000"], "batch_size must be in"),  # larger than the training set
        (["--dataset", "mnist", "--data-root", "/nonexistent"], "--download"),  # missing data
        (["--resume"], "--resume needs a checkpoint"),  # nothing to resume
        (["--agent", "meta_grad", "--method", "jvp"], "pass unroll 1 with it"),  # the one-step path at the default B = 5
        (["--agent", "uniform", "--method", "layerwise"], "option method does not apply to agent 'uniform'"),
        (["--agent", "mwnet", "--method", "graph"], "method must be one of auto, jvp, layerwise; got 'graph'"),
    ],
)
def test_bad_flags_exit_2_with_one_clear_message(capsys, tmp_path, argv, message):
    err = _exit_message(capsys, tmp_path, *argv)
    assert message in err and "Traceback" not in err


def test_config_file_is_read_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("agent: mwnet\nseed: 3\nsteps: 40\n")
    _run(tmp_path, "--config", str(config), "--seed", "4")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "agent: mwnet" in saved and "seed: 4" in saved and "steps: 60" in saved  # TINY_ARGS' --steps wins too


@pytest.mark.parametrize(
    "text,message",
    [
        ("agent: [unclosed\n", "cannot read --config"),
        ("meta_lr: 3\n", "unknown keys: meta_lr"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_bad_config_files_are_refused(capsys, tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert message in _exit_message(capsys, tmp_path, "--config", str(config))


def test_existing_run_is_never_overwritten_and_out_must_be_a_folder(capsys, tmp_path):
    _run(tmp_path, "--agent", "mwnet")
    before = (tmp_path / "run" / "teacher.pt").read_bytes()
    with pytest.raises(SystemExit):
        _run(tmp_path, "--agent", "mwnet")
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "teacher.pt").read_bytes() == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        _run(tmp_path, name="file")
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "random", "empty"])
def test_corrupt_checkpoint_gives_a_clear_error(capsys, tmp_path, damage):
    _run(tmp_path, "--agent", "meta_grad")
    path = tmp_path / "run" / "teacher.pt"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "random": bytes(range(256)) * 8, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="not a readable l2t-gym checkpoint"):
        load_teacher(path)
    with pytest.raises(SystemExit):
        _run(tmp_path, "--agent", "meta_grad", "--resume")
    err = capsys.readouterr().err
    assert "not a readable l2t-gym checkpoint" in err and err.count("\n") == 1, "torch's own message folded onto one line"


def test_checkpoint_for_another_env_is_refused_by_name(tmp_path):
    _run(tmp_path, "--agent", "meta_grad")
    checkpoint = torch.load(tmp_path / "run" / "teacher.pt", weights_only=True)
    checkpoint["obs_spec"]["internal"] = checkpoint["obs_spec"]["internal"][:-1]
    torch.save(checkpoint, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="internal"):
        load_teacher(tmp_path / "other.pt", env=make_env())
    checkpoint["format_version"] = 99
    torch.save(checkpoint, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_teacher(tmp_path / "future.pt")


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (exec, ("import os; os.environ['L2T_PWNED'] = '1'",))

    torch.save({"format": "l2t-gym-teacher", "payload": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_teacher(tmp_path / "evil.pt")
    import os

    assert "L2T_PWNED" not in os.environ


def test_default_run_folders_are_numbered_instead_of_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*TINY_ARGS, "--agent", "uniform", "--steps", "20"]
    for _ in range(2):
        train_teacher.main(argv)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["uniform-digits-mlp-s0", "uniform-digits-mlp-s0-2"]
    assert (
        train_teacher.parse_config(train_teacher.config_class(), [*argv, "--resume"], "").run_dir.name
        == "uniform-digits-mlp-s0-2"
    )


def test_pretraining_over_a_grid_cycles_settings_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    grid = ["--grid", "[{noise: symmetric}, {noise: pairflip, noise_rate: 0.2}, {dataset: mnist1d}]", "--horizon", "20"]
    whole = _run(tmp_path, "--agent", "meta_grad", *grid, "--steps", "120", name="whole")
    records = _metrics(tmp_path / "whole")
    assert [r["episode"] for r in records] == [0, 1, 2, 3, 4, 5]
    checkpoint = torch.load(tmp_path / "whole" / "teacher.pt", weights_only=True)
    assert checkpoint["extra"]["settings"] == ["digits/mlp/symmetric 0.4", "digits/mlp/pairflip 0.2", "mnist1d/mlp/symmetric 0.4"]
    real_step = TeachingEnv.step

    def crash_at_10_of_the_third_episode(self, action):
        if self.t == 10 and self.config["dataset"] == "mnist1d":
            raise KeyboardInterrupt("simulated kill")
        return real_step(self, action)

    monkeypatch.setattr(TeachingEnv, "step", crash_at_10_of_the_third_episode)
    with pytest.raises(SystemExit):
        _run(tmp_path, "--agent", "meta_grad", *grid, "--steps", "120", name="cut")
    monkeypatch.setattr(TeachingEnv, "step", real_step)
    resumed = _run(tmp_path, "--agent", "meta_grad", *grid, "--steps", "120", "--resume", name="cut")
    assert _metrics(tmp_path / "cut") == records and resumed["final_test_acc"] == whole["final_test_acc"]
