"""The teacher registry is the one place a teacher is declared: every registered agent is built, run
through the one teaching loop, saved and reloaded; a new teacher needs one file and one registry
line, and both CLIs pick it up (flags, help, per-kind behaviour) without being touched."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest
import torch

import evaluate
import train_teacher
from agents.base import AGENTS, KINDS, Teacher, agent_class, load_teacher, make_agent
from agents.loop import Curve, WeightStats, start, teach
from envs import env_factory
from runconfig import field
from tests.conftest import TINY, make_tensor_env

CLI_TINY = ["--dataset", "digits", "--student-kwargs", "{hidden: [16, 8]}", "--batch-size", "16", "--val-size", "200",
            "--steps", "40", "--eval-every", "20", "--no-progress", "--device", "cpu"]  # fmt: skip
SMALL = {"ppo": {"n_steps": 16, "minibatch_size": 8, "n_epochs": 1}, "a2c": {"n_steps": 16}}


@pytest.mark.parametrize("agent", list(AGENTS))
def test_every_registered_agent_builds_runs_saves_and_reloads(tmp_path, agent):
    cls = agent_class(agent)
    assert cls.name == agent and cls.kind in KINDS and dataclasses.is_dataclass(cls.Options)
    teacher = make_agent(agent, **SMALL.get(agent, {}))
    if cls.kind == "episodic":
        teacher.train_episodes(env_factory(**{**TINY, "horizon": 16}), 16, 0, 1, lambda step, record: None)
    env = make_tensor_env()
    stats, curve = WeightStats(), Curve()
    run = teach(start(env, teacher.train(cls.kind == "online"), seed=0), 40, [stats, curve])
    assert run.step == 40 and len(curve.points) == 2
    w, _ = stats.arrays()
    assert w.shape == (40 * 16,) and ((w >= 0) & (w <= 1)).all()
    teacher.save(tmp_path / "t.pt", env)
    loaded = load_teacher(tmp_path / "t.pt", env=env)
    assert type(loaded) is cls and loaded.config == teacher.config
    obs, _ = env.reset(seed=1)
    loaded.train(False)
    if loaded.needs_handle:
        loaded.attach(env.unwrapped.handle)
    teacher.train(False)
    torch.testing.assert_close(torch.as_tensor(loaded.act(obs)), torch.as_tensor(teacher.act(obs)))


@dataclasses.dataclass
class ToyOptions:
    keep_every: int = field(2, "keep one sample in this many", low=1)


class ToyTeacher(Teacher):
    """Keeps every ``keep_every``-th sample of the batch: declared outside ``agents/`` for this test."""

    name = "toy"
    Options = ToyOptions

    def act(self, obs: dict) -> torch.Tensor:
        keep = torch.zeros(obs["samples"].shape[0])
        keep[:: self.options.keep_every] = 1.0
        return keep


@pytest.fixture
def toy_registered(monkeypatch):
    module = types.ModuleType("toy_teacher_module")
    module.ToyTeacher = ToyTeacher
    monkeypatch.setitem(sys.modules, "toy_teacher_module", module)
    monkeypatch.setitem(AGENTS, "toy", "toy_teacher_module:ToyTeacher")


def test_a_new_teacher_is_one_class_and_one_registry_line(toy_registered, tmp_path, capsys):
    summary = train_teacher.main(["--agent", "toy", "--keep-every", "4", "--out", str(tmp_path / "run"), *CLI_TINY])
    assert 0 <= summary["final_test_acc"] <= 1
    assert load_teacher(tmp_path / "run").options.keep_every == 4
    rows = evaluate.main(
        ["--agents", "uniform,toy", "--agent-options", "{toy: {keep_every: 3}}", "--seeds", "1", "--out", str(tmp_path / "eval"),
         *[a for a in CLI_TINY if a != "--no-progress"], "--no-progress"]
    )  # fmt: skip
    toy = next(r for r in rows if r["agent"] == "toy")
    assert toy["steps"] == 40 and abs(toy["weight_clean"] - 1 / 3) < 0.1
    with pytest.raises(SystemExit):
        train_teacher.main(["--agent", "meta_grad", "--keep-every", "4", "--out", str(tmp_path / "bad"), *CLI_TINY])
    assert "option keep_every does not apply to agent 'meta_grad'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_help_names_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train_teacher.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.1) (default" not in text and "(default: None) (default" not in text
    # agents that describe an option alike share one description; the others get their own
    assert "meta_grad/mwnet/reinforce: teacher learning rate (Adam); ppo/a2c: teacher learning rate (SB3's" in text
    assert "graph, replay; mwnet: path of its one-step meta-gradient: auto (jvp), jvp, or layerwise" in text
    assert "meta_grad 0.03, mwnet 0.003, reinforce 0.01, ppo 0.0003, a2c 0.0003" in text


def test_both_clis_share_one_env_setting_with_one_set_of_defaults():
    train = {f.name: f.default for f in dataclasses.fields(train_teacher.config_class())}
    bench = {f.name: f.default for f in dataclasses.fields(evaluate.EvalConfig)}
    for name in ("dataset", "student", "noise", "noise_rate", "seed", "device", "data_root", "batch_size", "lr", "val_size"):
        assert train[name] == bench[name], name
    assert json.dumps(train["device"]) == '"auto"'


@pytest.mark.parametrize(
    "agent,options,reads",
    [
        ("meta_grad", {}, True),
        ("meta_grad", {"features": "surface"}, False),
        ("meta_grad", {"features": "local"}, True),
        ("meta_grad", {"features": "loss"}, False),
        ("mwnet", {}, False),
        ("l2rw", {}, False),
        ("reinforce", {}, True),
        ("ppo", {"features": "surface"}, False),
        ("uniform", {}, False),
        ("small_loss", {}, False),
        ("oracle", {}, False),
    ],
)
def test_the_env_computes_internal_states_only_for_teachers_that_read_them(agent, options, reads):
    settings = agent_class(agent).env_settings(options)
    assert settings.get("internal_features", True) is reads
    env = make_tensor_env(**settings)
    teacher = make_agent(agent, **options)
    if teacher.kind == "episodic":  # acts only once trained
        obs, _ = env.reset(seed=0)
    else:
        obs = teach(start(env, teacher.train(teacher.kind == "online"), seed=0), 3).obs  # it acts on what it gets
    assert bool(obs["internal"].abs().sum() > 0) is reads


def test_a_clean_data_baseline_keeps_its_data_pool_and_drops_internal_states():
    assert agent_class("finetune").env_settings({}) == {
        "train_pool": "finetune",
        "finetune_fraction": 0.2,
        "internal_features": False,
    }


def test_without_internal_states_every_other_entry_is_unchanged():
    full, lean = make_tensor_env(), make_tensor_env(internal_features=False)
    for env in (full, lean):
        env.reset(seed=3)
    weights = torch.linspace(0.1, 1.0, 16)
    for _ in range(5):
        a, b = full.step(weights)[0], lean.step(weights)[0]
        assert torch.equal(a["samples"], b["samples"]) and torch.equal(a["global"], b["global"])
        assert torch.equal(b["internal"], torch.zeros_like(b["internal"]))
    assert all(
        torch.equal(full.unwrapped.handle.params[k], lean.unwrapped.handle.params[k]) for k in full.unwrapped.handle.params
    )


def test_an_episode_saved_before_the_internal_features_switch_still_resumes():
    env = make_tensor_env(internal_features=False)
    env.reset(seed=0)
    env.step(torch.ones(16))
    state = env.unwrapped.state_dict()
    del state["config"]["internal_features"]  # as written by earlier versions
    obs, _ = make_tensor_env(internal_features=False).unwrapped.load_state_dict(state)
    assert torch.equal(obs["samples"], env.unwrapped.state_dict()["obs"]["samples"])
    state["config"]["lr"] = 0.5  # any other difference is still refused
    with pytest.raises(ValueError, match="differs in: lr"):
        make_tensor_env(internal_features=False).unwrapped.load_state_dict(state)
