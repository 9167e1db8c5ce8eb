"""``meta_grad``'s alignment input: each sample's output-layer gradient cosine to the clean validation
gradient, checked against per-sample gradients from autograd (float64, a trained student, a
non-trivial spread of cosines); the validation gradient a B = 1 meta step took is reused only at the
parameters it was taken at; students it cannot read are refused before anything trains."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

import agents.meta_grad
import train_teacher
from agents.base import load_teacher
from agents.meta_grad import MetaGradTeacher, MetaWeightNetTeacher
from students.models import make_student
from tests.conftest import make_tensor_env
from tests.test_train_teacher import TINY_ARGS

STUDENT = dict(student="mlp", student_kwargs={"hidden": [6, 5]})


def reference_cosines(handle, params, batch: torch.Tensor, val_indices: torch.Tensor) -> torch.Tensor:
    """cos(grad_head l_i, grad_head L_val) from one reverse-mode gradient per sample, written without
    the package's closed forms. The losses come from one forward of the whole batch, so that a
    BatchNorm student's per-sample gradients are those of the real step (the batch's statistics)."""
    head = ("head.weight", "head.bias")
    detached = {n: p.detach().requires_grad_(n in head) for n, p in params.items()}
    val_loss = handle.val_loss(detached, val_indices)
    val_grad = torch.cat([g.flatten() for g in torch.autograd.grad(val_loss, [detached[n] for n in head])])
    losses = handle.per_sample_losses(detached, batch)
    cosines = []
    for loss in losses:
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [detached[n] for n in head], retain_graph=True)])
        cosines.append(F.cosine_similarity(grad, val_grad, dim=0))
    return torch.stack(cosines)


def trained_env(steps: int = 30, student: dict = STUDENT):
    """A float64 env whose student took ``steps`` updates, so that its errors and the cosines are spread."""
    env = make_tensor_env(**student, batch_size=16, dtype="float64", lr=0.1)
    env.reset(seed=0)
    for _ in range(steps):
        env.step(torch.ones(16, dtype=torch.float64))
    return env


def recording_val_indices(handle, monkeypatch) -> list[torch.Tensor]:
    """Every validation batch ``handle`` draws from now on, in order."""
    drawn, draw = [], handle.val_indices

    def record(size: int) -> torch.Tensor:
        drawn.append(draw(size))
        return drawn[-1]

    monkeypatch.setattr(handle, "val_indices", record)
    return drawn


@pytest.mark.parametrize("student", [STUDENT, dict(student="resnet20", student_kwargs={"width": 4})], ids=["mlp", "batchnorm"])
def test_alignment_is_the_cosine_of_per_sample_output_layer_gradients(monkeypatch, student):
    env = trained_env(student=student)
    handle = env.unwrapped.handle
    teacher = MetaGradTeacher(seed=0, val_batch=32).attach(handle)
    drawn = recording_val_indices(handle, monkeypatch)
    got = teacher.alignment_input()
    assert len(drawn) == 1, "a frozen teacher takes one validation forward per batch"
    expected = reference_cosines(handle, handle.params, handle.batch_indices, drawn[0])
    assert float(expected.max() - expected.min()) > 0.5, "the test needs cosines spread over samples"
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_b1_meta_step_hands_its_validation_gradient_to_the_next_action_and_only_there(monkeypatch):
    env = trained_env()
    handle = env.unwrapped.handle
    teacher = MetaGradTeacher(unroll=1, seed=0, val_batch=32).train().attach(handle)
    teacher.net.double()
    obs, _ = env.reset(seed=1)
    obs, *_ = env.step(torch.ones(16, dtype=torch.float64))
    drawn = recording_val_indices(handle, monkeypatch)
    obs, reward, done, _, info = env.step(teacher.act(obs))
    teacher.observe(reward, done, info)  # the meta step: its validation gradient is at the current parameters
    assert len(drawn) == 2, "one validation batch for the action, one for the meta step"
    reused = teacher.alignment_input()
    assert len(drawn) == 2, "the next action reuses the meta step's validation gradient"
    expected = reference_cosines(handle, handle.params, handle.batch_indices, drawn[1])
    torch.testing.assert_close(reused, expected, rtol=1e-9, atol=1e-12)
    env.step(torch.ones(16, dtype=torch.float64))  # new parameters: the kept gradient no longer applies
    fresh = teacher.alignment_input()
    assert len(drawn) == 3
    torch.testing.assert_close(fresh, reference_cosines(handle, handle.params, handle.batch_indices, drawn[2]))


def test_the_action_reads_the_alignment_input():
    """The teacher network's last input column is the alignment: changing it changes the weights."""
    env = trained_env(steps=5)
    teacher = MetaGradTeacher(seed=0).attach(env.unwrapped.handle)
    with torch.no_grad():
        teacher.net.out.weight.normal_(generator=torch.Generator().manual_seed(0))
    obs = teacher.with_alignment(env.unwrapped._last_obs)
    flipped = {**obs, "alignment": -obs["alignment"]}
    assert not torch.allclose(teacher.weights(obs), teacher.weights(flipped))
    assert MetaGradTeacher(alignment=False).net.body[0].in_features == teacher.net.body[0].in_features - 1
    assert MetaWeightNetTeacher().net.body[0].in_features == 1, "Meta-Weight-Net reads the loss alone"


def test_a_student_whose_head_is_not_a_linear_layer_is_refused_before_training(monkeypatch):
    def wrapped_head(*args, **kwargs) -> nn.Module:
        model = make_student(*args, **kwargs)
        model.head = nn.Sequential(model.head)
        return model

    env = make_tensor_env(**STUDENT, batch_size=16)
    monkeypatch.setattr(agents.meta_grad, "make_student", wrapped_head)
    with pytest.raises(ValueError, match="alignment needs a student whose last hidden state feeds an nn.Linear"):
        MetaGradTeacher().check_env(env)
    MetaGradTeacher(alignment=False).check_env(env)


def test_a_linear_head_fed_by_another_state_than_the_last_hidden_one_is_refused_before_training(monkeypatch):
    def reports_another_state(*args, **kwargs) -> nn.Module:
        model = make_student(*args, **kwargs)
        forward = model.forward

        def scaled_last_hidden(x):
            logits, hidden = forward(x)
            last = list(hidden)[-1]
            return logits, {**hidden, last: 2 * hidden[last]}

        model.forward = scaled_last_hidden
        return model

    env = make_tensor_env(**STUDENT, batch_size=16)
    MetaGradTeacher().check_env(env)  # the built-in student passes
    monkeypatch.setattr(agents.meta_grad, "make_student", reports_another_state)
    with pytest.raises(ValueError, match="alignment needs a student whose last hidden state feeds an nn.Linear"):
        MetaGradTeacher().check_env(env)


def test_a_resumed_env_keeps_the_validation_gradient_and_a_fresh_student_never_inherits_it(monkeypatch):
    env = trained_env()
    handle = env.unwrapped.handle
    teacher = MetaGradTeacher(unroll=1, seed=0, val_batch=32).train().attach(handle)
    teacher.net.double()
    obs, reward, done, _, info = env.step(teacher.act(env.unwrapped._last_obs))
    teacher.observe(reward, done, info)  # leaves the validation gradient at the current parameters on the handle
    expected = teacher.alignment_input()
    state = env.unwrapped.state_dict()

    resumed_env = make_tensor_env(**STUDENT, batch_size=16, dtype="float64", lr=0.1)
    resumed_env.reset(seed=5)
    resumed_env.unwrapped.load_state_dict(state)
    resumed = MetaGradTeacher(unroll=1, seed=0, val_batch=32).attach(resumed_env.unwrapped.handle)
    drawn = recording_val_indices(resumed_env.unwrapped.handle, monkeypatch)
    torch.testing.assert_close(resumed.alignment_input(), expected, rtol=0, atol=0)
    assert not drawn, "the resumed run reuses the saved validation gradient, as the uninterrupted one did"

    resumed_env.reset(seed=0)  # a new student: nothing computed for the old one applies
    drawn = recording_val_indices(resumed_env.unwrapped.handle, monkeypatch)
    resumed.alignment_input()
    assert len(drawn) == 1, "a new student gets a fresh validation gradient"


def forget_alignment(run_dir) -> None:
    """Make ``run_dir`` look like a run begun before the alignment input existed: neither its
    config.yaml nor its checkpoint's teacher config knows the option."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    del config["alignment"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    checkpoint = torch.load(run_dir / "teacher.pt", weights_only=True)
    del checkpoint["config"]["alignment"]
    torch.save(checkpoint, run_dir / "teacher.pt")


def test_teachers_and_runs_saved_before_the_alignment_input_still_load_and_resume(tmp_path):
    args = ["--agent", "meta_grad", "--no-alignment", *TINY_ARGS]
    train_teacher.main(["--out", str(tmp_path / "old"), *args])
    forget_alignment(tmp_path / "old")
    teacher = load_teacher(tmp_path / "old")
    assert not teacher.hp.alignment, "a saved teacher without the option is one without the input"
    train_teacher.main(["--out", str(tmp_path / "old"), "--resume", "--steps", "80", "--no-progress"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "old" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 80 and not load_teacher(tmp_path / "old").hp.alignment
