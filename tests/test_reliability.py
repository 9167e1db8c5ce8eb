"""Reliability: reproducible runs, crash-safe resume (SIGKILL), atomic checkpoints, one clear error
for each of many bad inputs, and divergence that never stops teacher training."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import train_teacher
from agents import CheckpointError, load_teacher
from agents.base import atomic_torch_save, read_checkpoint
from students.data import DatasetNotFoundError
from tests.conftest import make_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--student-kwargs", "{hidden: [16, 8]}", "--batch-size", "16", "--val-size", "200",
        "--eval-every", "20", "--checkpoint-every", "20", "--no-progress", "--device", "cpu"]  # fmt: skip


def _train(out: Path, *argv: str) -> dict:
    return train_teacher.main(["--out", str(out), *TINY, *argv])


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("agent", ["meta_grad", "mwnet", "l2rw", "uniform", "spl", "small_loss", "reinforce", "ppo"])
def test_same_seed_same_metrics_and_checkpoint(tmp_path, agent):
    extra = ["--steps", "60"] + (["--horizon", "20"] if agent in ("reinforce", "ppo") else [])
    a, b = _train(tmp_path / "a", "--agent", agent, *extra), _train(tmp_path / "b", "--agent", agent, *extra)
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    sa, sb = (torch.load(tmp_path / n / "teacher.pt", weights_only=True)["state"] for n in "ab")
    flat = lambda s: {k: v for k, v in torch.utils._pytree.tree_flatten_with_path(s)[0]} if s else {}  # noqa: E731
    fa, fb = flat(sa), flat(sb)
    assert fa.keys() == fb.keys()
    for key in fa:
        x, y = fa[key], fb[key]
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f"{agent}: {key} differs"


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 600  # a few seconds of training, so that the kill lands before the end on a fast machine too
    args = [sys.executable, str(ROOT / "train_teacher.py"), "--agent", "meta_grad", "--steps", str(steps), *TINY]
    subprocess.run([*args, "--out", str(tmp_path / "whole")], check=True, capture_output=True, cwd=ROOT)
    victim = subprocess.Popen(
        [*args, "--out", str(tmp_path / "cut")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoint = tmp_path / "cut" / "teacher.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it was killed: nothing was tested"
    assert checkpoint.exists()
    load_teacher(checkpoint)  # whatever moment it died, the checkpoint on disk is whole
    assert read_checkpoint(checkpoint)["extra"]["step"] < steps, "killed after its last checkpoint"
    subprocess.run([*args, "--out", str(tmp_path / "cut"), "--resume"], check=True, capture_output=True, cwd=ROOT)
    whole = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in resumed] == list(range(20, steps + 1, 20)), "no lost or duplicated steps"
    assert resumed == whole


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    _train(tmp_path / "run", "--agent", "meta_grad", "--steps", "40")
    path = tmp_path / "run" / "teacher.pt"
    before = path.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"x": torch.ones(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before and load_teacher(path).name == "meta_grad"
    assert not list(path.parent.glob(".teacher.pt.*")), "the temporary file is cleaned up"


def test_divergence_ends_episodes_but_teacher_training_continues(tmp_path, capsys):
    _train(tmp_path / "run", "--agent", "meta_grad", "--steps", "120", "--horizon", "40", "--lr", "1e4")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "diverged at step" in capsys.readouterr().out
    diverged = [r for r in records if r.get("student/diverged")]
    assert len({r["episode"] for r in diverged}) >= 2, "every episode diverged and a new student started each time"
    teacher = load_teacher(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in teacher.net.parameters()), "the teacher survived its students"


# ------------------------------------------------------------------------------------------------
# One table of bad inputs. Each case names one culprit; each gives one clear message; the CLI ones
# exit with code 2 and no traceback; an existing run folder is never touched.


def _truncated(run: Path, tmp: Path) -> Path:
    (tmp / "truncated.pt").write_bytes((run / "teacher.pt").read_bytes()[:300])
    return tmp / "truncated.pt"


def _random_bytes(run: Path, tmp: Path) -> Path:
    (tmp / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    return tmp / "random.pt"


def _edited(change):
    def make(run: Path, tmp: Path) -> Path:
        checkpoint = torch.load(run / "teacher.pt", weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, tmp / "edited.pt")
        return tmp / "edited.pt"

    return make


def _evil(run: Path, tmp: Path) -> Path:
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch evil-ran",))

    torch.save({"format": "l2t-gym-teacher", "x": Exploit()}, tmp / "evil.pt")
    return tmp / "evil.pt"


ENV_CASES = [
    ("action-short", lambda e: e.step(np.ones(15, np.float32)), ValueError, "shape (16,)"),
    ("action-2d", lambda e: e.step(np.ones((4, 4), np.float32)), ValueError, "shape (16,)"),
    ("action-nan", lambda e: e.step(np.full(16, np.nan, np.float32)), ValueError, "finite and in [0, 1]"),
    ("action-inf", lambda e: e.step(np.full(16, np.inf, np.float32)), ValueError, "is inf"),
    ("action-above-1", lambda e: e.step(np.full(16, 2.0, np.float32)), ValueError, "is 2.0"),
    ("action-negative", lambda e: e.step(np.full(16, -1.0, np.float32)), ValueError, "is -1.0"),
    ("action-strings", lambda e: e.step(np.array(["x"] * 16)), ValueError, "real numbers"),
    ("action-object", lambda e: e.step(np.array([None] * 16)), ValueError, "real numbers"),
]
CONSTRUCTION_CASES = [
    ("unknown-dataset", dict(dataset="svhn"), ValueError, "valid datasets"),
    ("unknown-student", dict(student="vit"), ValueError, "valid students"),
    ("unknown-noise", dict(noise="gauss"), ValueError, "valid noises"),
    ("unknown-reward", dict(reward="loss"), ValueError, "valid rewards"),
    ("noise-rate-1", dict(noise_rate=1.0), ValueError, "noise rate must be in [0, 1)"),
    ("noise-rate-negative", dict(noise_rate=-0.2), ValueError, "noise rate must be in [0, 1)"),
    ("batch-larger-than-train", dict(batch_size=5000), ValueError, "batch_size must be in"),
    ("missing-data-root", dict(dataset="mnist", data_root="/nonexistent/data"), DatasetNotFoundError, "--download"),
    ("empty-data-root", dict(dataset="fashion_mnist", data_root="EMPTY"), DatasetNotFoundError, "FashionMNIST/raw"),
    ("damaged-gzip", dict(dataset="mnist", data_root="DAMAGED_GZIP"), ValueError, "cannot be read (BadGzipFile"),
    ("damaged-gzip-payload", dict(dataset="mnist", data_root="DAMAGED_DEFLATE"), ValueError, "cannot be read (error: Error -3"),
]
CHECKPOINT_CASES = [
    ("truncated", _truncated, "not a readable l2t-gym checkpoint"),
    ("random-bytes", _random_bytes, "not a readable l2t-gym checkpoint"),
    ("wrong-version", _edited(lambda c: c.update(format_version=0)), "format version 0"),
    ("not-ours", _edited(lambda c: c.pop("format")), "not an l2t-gym teacher checkpoint"),
    ("unknown-agent", _edited(lambda c: c.update(agent="teacher9000")), "unknown agent 'teacher9000'"),
    ("obs-spec-mismatch", _edited(lambda c: c["obs_spec"].update(samples=["loss"])), "samples"),
    ("state-mismatch", _edited(lambda c: c["state"]["net"].pop("out.bias")), "does not fit agent"),
    ("no-extra", _edited(lambda c: c.pop("extra")), "damaged: its entries extra are missing"),
    ("config-not-a-mapping", _edited(lambda c: c.update(config=[1])), "damaged: its entries config are missing"),
    ("code-execution", _evil, "not a readable l2t-gym checkpoint"),
]
CLI_CASES = [
    ("cli-unknown-agent", ["--agent", "teacher9000"], "invalid choice: 'teacher9000'"),
    ("cli-noise-rate", ["--noise-rate", "1"], "--noise-rate must be in [0, 1)"),
    ("cli-negative-steps", ["--steps", "-5"], "--steps must be >= 1"),
    ("cli-bad-int", ["--unroll", "two"], "invalid int value: 'two'"),
    ("cli-meta-layers", ["--meta-layers", "last:0"], "meta_layers must be all, head or last:k"),
    ("cli-meta-layers-too-many", ["--meta-layers", "last:9", "--steps", "5"], "asks for 9 layers, but the student has 3"),
    ("cli-bad-device", ["--device", "tpu"], "invalid choice: 'tpu'"),
    ("cli-config-unreadable", ["--config", "BROKEN_YAML"], "cannot read --config"),
    ("cli-config-unknown-key", ["--config", "UNKNOWN_KEY_YAML"], "unknown keys: optimiser"),
    ("cli-config-missing", ["--config", "/nonexistent.yaml"], "cannot read --config"),
    ("cli-out-is-a-file", ["--out", "A_FILE"], "is not a folder"),
    ("cli-resume-nothing", ["--resume", "--out", "EMPTY"], "--resume needs a checkpoint"),
    ("cli-resume-other-agent", ["--resume", "--agent", "mwnet", "--out", "RUN"], "holds a 'meta_grad' teacher"),
    ("cli-overwrite-run", ["--out", "RUN"], "already holds a run"),
    ("cli-evaluate-unknown-agent", ["EVALUATE", "--agents", "teacher9000"], "unknown agent 'teacher9000'"),
    ("cli-evaluate-missing-teacher", ["EVALUATE", "--teachers", "/nonexistent/run"], "does not exist"),
    # values of the wrong type or out of range, from flags or YAML, are refused by name before anything is written
    ("cli-lr-nan", ["--lr", "nan"], "--lr must be finite, got nan"),
    ("cli-lr-inf", ["--lr", "inf"], "--lr must be finite, got inf"),
    ("cli-weight-decay-negative", ["--weight-decay", "-1"], "--weight-decay must be >= 0.0, got -1.0"),
    ("cli-yaml-momentum", ["--config", "MOMENTUM_YAML"], "--momentum must be in [0, 1), got -3.0"),
    ("cli-yaml-bool-int", ["--config", "BOOL_INT_YAML"], "--n-envs must be an integer, got True"),
    ("cli-yaml-string-bool", ["--config", "STRING_BOOL_YAML"], "--download must be true or false, got 'no'"),
    ("cli-yaml-bad-number", ["--config", "BAD_NUMBER_YAML"], "--teacher-lr must be a number, got 'fast'"),
    ("cli-option-of-another-agent", ["--agent", "uniform", "--unroll", "3"], "option unroll does not apply to agent 'uniform'"),
    ("cli-bad-student-kwargs", ["--student-kwargs", "{hiden: [8, 8]}"], "do not fit student 'mlp'"),
    ("cli-negative-layer-width", ["--student-kwargs", "{hidden: [-1, 8]}"], "do not fit student 'mlp'"),
    ("cli-grid-student-kwargs-not-a-mapping", ["--grid", "{student_kwargs: 5}"], "grid student_kwargs must map student"),
    ("cli-yaml-huge-integer", ["--config", "HUGE_INT_YAML"], "--lr must be finite, got an integer of 401 digits"),
    ("cli-out-below-a-file", ["--out", "BELOW_A_FILE"], "cannot write the run folder"),
    ("cli-grid-for-rl", ["--agent", "ppo", "--grid", "{noise: [pairflip]}"], "'ppo' is episodic"),
    ("cli-grid-bad-value", ["--grid", "{noise_rate: [1.5]}"], "grid noise_rate must be in [0, 1)"),
    ("cli-resume-changed-setting", ["--resume", "--out", "RUN", "--dataset", "mnist1d"], "would change it: --dataset"),
    ("cli-resume-changed-teacher", ["--resume", "--out", "RUN", "--unroll", "2"], "would change it: --unroll"),
    ("cli-resume-shorter", ["--resume", "--out", "RUN", "--steps", "20"], "would shorten it"),
    ("cli-resume-rl-changed-setting", ["--resume", "--agent", "reinforce", "--out", "RL_RUN", "--noise", "pairflip"], "--noise"),
    ("cli-evaluate-thresholds-number", ["EVALUATE", "--config", "THRESHOLDS_YAML"], "--thresholds must be a string"),
    ("cli-evaluate-suite-unreadable", ["EVALUATE", "--suite", "BROKEN_YAML"], "cannot read --suite"),  # the flag as typed
    ("cli-evaluate-train-size-0", ["EVALUATE", "--train-size", "0"], "--train-size must be >= 1"),
    ("cli-evaluate-val-too-large", ["EVALUATE", "--val-size", "5000"], "more than the"),
    ("cli-evaluate-bad-student-kwargs", ["EVALUATE", "--student-kwargs", "{hiden: [8, 8]}"], "do not fit student 'mlp'"),
    ("cli-evaluate-grid-list-of-lists", ["EVALUATE", "--grid", "[{student: [mlp]}]"], "takes one value per key; student"),
    ("cli-evaluate-repeated-agent", ["EVALUATE", "--agents", "uniform,spl,uniform"], "--agents names uniform more than once"),
    ("cli-evaluate-out-below-a-file", ["EVALUATE", "--agents", "uniform", "--out", "BELOW_A_FILE"], "cannot create --out"),
    ("cli-evaluate-grid-one-bad", ["EVALUATE", "--grid", "{dataset: [digits, mnist1d], noise_rate: [0.2, 1.0]}"], "in [0, 1)"),
    (
        "cli-evaluate-agent-option",
        ["EVALUATE", "--agents", "spl", "--agent-options", "{spl: {start_fraction: 2}}"],
        "start_fraction must be in (0.0, 1.0], got 2.0",
    ),
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    _train(run, "--agent", "meta_grad", "--steps", "40")
    return run


@pytest.fixture(scope="module")
def trained_rl_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "rl"
    _train(run, "--agent", "reinforce", "--steps", "40", "--horizon", "20")
    return run


@pytest.mark.parametrize("name,act,error,message", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_bad_actions(name, act, error, message):
    env = make_env()
    env.reset(seed=0)
    before = [p.detach().clone() for p in env.unwrapped.handle.params.values()]
    with pytest.raises(error, match=None) as info:
        act(env.unwrapped)
    assert message in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, env.unwrapped.handle.params.values())), "the student was touched"


@pytest.mark.parametrize("name,kwargs,error,message", CONSTRUCTION_CASES, ids=[c[0] for c in CONSTRUCTION_CASES])
def test_bad_env_configuration(tmp_path, name, kwargs, error, message):
    if kwargs.get("data_root") == "EMPTY":
        kwargs = {**kwargs, "data_root": str(tmp_path)}
    if kwargs.get("data_root") in ("DAMAGED_GZIP", "DAMAGED_DEFLATE"):  # every MNIST file there, none readable
        payload = bytearray(gzip.compress(b"\x00" * 10_000))
        payload[20] ^= 0xFF  # a flipped byte in the compressed stream, past gzip's header
        damaged = b"not gzip" if kwargs["data_root"] == "DAMAGED_GZIP" else bytes(payload)
        (tmp_path / "MNIST" / "raw").mkdir(parents=True)
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            (tmp_path / "MNIST" / "raw" / f"{stem}.gz").write_bytes(damaged)
        kwargs = {**kwargs, "data_root": str(tmp_path)}
    with pytest.raises(error) as info:
        make_env(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("name,make,message", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoints(tmp_path, trained_run, name, make, message):
    digest = _folder_digest(trained_run)
    path = make(trained_run, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_teacher(path, env=make_env())
    assert message in str(info.value)
    assert not Path("evil-ran").exists()
    assert _folder_digest(trained_run) == digest


@pytest.mark.parametrize("name,argv,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_lines(tmp_path, capsys, trained_run, trained_rl_run, name, argv, message):
    files = {
        "BROKEN_YAML": ("broken.yaml", "agent: [meta_grad\n"), "UNKNOWN_KEY_YAML": ("unknown.yaml", "optimiser: adam\n"),
        "A_FILE": ("a_file", "not a folder"), "MOMENTUM_YAML": ("m.yaml", "momentum: -3\n"),
        "BOOL_INT_YAML": ("b.yaml", "n_envs: true\n"), "STRING_BOOL_YAML": ("p.yaml", "download: 'no'\n"),
        "BAD_NUMBER_YAML": ("n.yaml", "teacher_lr: fast\n"), "THRESHOLDS_YAML": ("t.yaml", "thresholds: 0.5\n"),
        "HUGE_INT_YAML": ("h.yaml", f"lr: {10**400}\n"),
    }  # fmt: skip
    if "BELOW_A_FILE" in argv:
        (tmp_path / "a_file").write_text("not a folder")
    resolved = []
    for arg in argv:
        if arg in files:
            (tmp_path / files[arg][0]).write_text(files[arg][1])
            arg = str(tmp_path / files[arg][0])
        resolved.append(
            {"EMPTY": str(tmp_path / "empty"), "RUN": str(trained_run), "RL_RUN": str(trained_rl_run),
             "BELOW_A_FILE": str(tmp_path / "a_file" / "run")}.get(arg, arg)
        )  # fmt: skip
    digests = [_folder_digest(trained_run), _folder_digest(trained_rl_run)]
    with pytest.raises(SystemExit) as info:
        if resolved[0] == "EVALUATE":
            evaluate.main(["--out", str(tmp_path / "report"), *resolved[1:]])
        else:
            train_teacher.main(
                [*TINY, "--steps", "40", *(["--out", str(tmp_path / "new")] if "--out" not in resolved else []), *resolved]
            )
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, "one message"
    assert [_folder_digest(trained_run), _folder_digest(trained_rl_run)] == digests, "an existing run folder was modified"
    assert not (tmp_path / "new").exists() and not (tmp_path / "report").exists(), "a refused command created its folder"


def test_yaml_numbers_are_read_the_way_a_user_means_them(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("agent: meta_grad\nteacher_lr: 3e-4\nlr: 1\nsteps: 20\n")  # PyYAML reads 3e-4 as a string
    _train(tmp_path / "run", "--config", str(config))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "teacher_lr: 0.0003" in saved and "lr: 1.0" in saved


def test_resume_may_extend_a_finished_run_and_reads_its_own_config(tmp_path):
    _train(tmp_path / "run", "--agent", "mwnet", "--steps", "40", "--noise", "pairflip")
    before = (tmp_path / "run" / "config.yaml").read_text()
    summary = train_teacher.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "60", "--no-progress"])
    after = (tmp_path / "run" / "config.yaml").read_text()
    assert "noise: pairflip" in after and "agent: mwnet" in after and "steps: 60" in after and before != after
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][-1] == 60 and 0 <= summary["final_test_acc"] <= 1


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda run: (run / "config.yaml").write_text(""), "does not describe a run: expected a mapping"),
        (lambda run: (run / "config.yaml").write_text("[1, 2]\n"), "does not describe a run: expected a mapping"),
        (lambda run: (run / "metrics.jsonl").write_text("{broken\n" + (run / "metrics.jsonl").read_text()), "line 1 is not"),
        (
            lambda run: _edited(lambda c: c["state"]["net"].pop("out.bias"))(run, run).replace(run / "teacher.pt"),
            "the saved teacher state does not fit 'meta_grad'",
        ),
    ],
    ids=["empty-config", "config-a-list", "broken-metrics-line", "teacher-state-mismatch"],
)
def test_resume_of_a_damaged_run_is_refused_and_changes_nothing(tmp_path, capsys, trained_run, damage, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damage(run)
    digest = _folder_digest(run)
    with pytest.raises(SystemExit) as info:
        train_teacher.main(["--out", str(run), "--resume", "--steps", "60", "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err, err
    assert _folder_digest(run) == digest


def test_resume_drops_a_metrics_line_cut_by_a_crash(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4')  # what a crash mid-write leaves
    train_teacher.main(["--out", str(run), "--resume", "--steps", "60", "--no-progress"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [20, 40, 60]


def test_console_scripts_exit_0_on_success(tmp_path):
    script = Path(sys.executable).with_name("l2t-train")
    if not script.exists():
        pytest.skip("console scripts are not installed in this environment")
    done = subprocess.run([str(script), "--out", str(tmp_path / "run"), *TINY, "--agent", "uniform", "--steps", "20"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "done in" in done.stdout and "{" not in done.stderr
