"""Students, non-learned teachers, diagnostics, and the README's feature tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from agents import AGENTS, make_agent
from agents.diagnostics import auroc
from envs.observation import markdown_tables
from students.functional import FunctionalStudent
from students.models import STUDENTS, make_student

SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 8, 8), "resnet20": (3, 8, 8), "resnet32": (3, 8, 8)}
SMALL = {"mlp": {"hidden": [8, 6]}, "cnn": {"channels": [4, 4], "fc": 8}, "resnet20": {"width": 2}, "resnet32": {"width": 2}}


@pytest.mark.parametrize("name", list(STUDENTS))
def test_students_return_logits_and_two_named_hidden_layers(name):
    model = make_student(name, SHAPES[name], 7, **SMALL[name])
    logits, hidden = model(torch.randn(5, *SHAPES[name]))
    assert logits.shape == (5, 7) and len(hidden) >= 2
    assert all(h.ndim == 2 and h.shape[0] == 5 for h in hidden.values())


@pytest.mark.parametrize("name", ["resnet20", "resnet32"])  # the built-in students with BatchNorm (cnn, mlp have no buffers)
def test_functional_call_updates_batchnorm_buffers_only_in_train_mode(name):
    student = FunctionalStudent(make_student(name, SHAPES[name], 7, **SMALL[name]))
    params, buffers = student.initial_state()
    before = {k: v.clone() for k, v in buffers.items()}
    x = torch.randn(6, *SHAPES[name])
    student.forward(params, buffers, x, train=False)
    assert all(torch.equal(before[k], buffers[k]) for k in buffers)
    student.per_sample_losses(params, buffers, x, torch.zeros(6, dtype=torch.long))  # works on copies
    assert all(torch.equal(before[k], buffers[k]) for k in buffers)
    student.forward(params, buffers, x, train=True)
    running = [k for k in buffers if k.endswith("running_mean")]
    assert running and all(not torch.equal(before[k], buffers[k]) for k in running)


def test_cnn_handles_signals_and_refuses_flat_inputs():
    logits, _ = make_student("cnn", (1, 40), 10)(torch.randn(2, 1, 40))
    assert logits.shape == (2, 10)
    with pytest.raises(ValueError, match="use 'mlp'"):
        make_student("cnn", (64,), 10)


@pytest.mark.parametrize("shape", [(1, 12, 12), (2, 16)])
@pytest.mark.parametrize("grad", [True, False])
def test_cnn_pools_before_relu_with_the_values_and_gradients_of_relu_then_pool(shape, grad):
    """The student pools first (channels-last on 2-D CPU maps); values and gradients are those of the
    textbook order, with and without autograd. (Forward-mode AD through it: tests/test_meta_grad.py.)"""
    torch.manual_seed(0)
    model = make_student("cnn", shape, 5, channels=[3, 4], fc=6).double()
    x = torch.randn(7, *shape, dtype=torch.float64)
    pool = F.max_pool2d if len(shape) == 3 else F.max_pool1d

    def textbook(x):
        h = pool(F.relu(model.conv1(x)), 2)
        h = pool(F.relu(model.conv2(h)), 2)
        fc = F.relu(model.fc(h.flatten(1)))
        return model.head(fc), h.flatten(2).mean(-1), fc

    with torch.set_grad_enabled(grad):
        logits, hidden = model(x)
        expected = textbook(x)
    for got, want in zip((logits, hidden["conv2"], hidden["fc"]), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.detach().abs().max()))
    if grad:
        ours = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
        reference = torch.autograd.grad(expected[0].square().sum(), list(model.parameters()))
        for got, want in zip(ours, reference):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


def test_cnn_maps_are_channels_last_on_the_cpu_even_from_one_input_channel():
    """The faster CPU layout (benchmarks/cnn_layout.py) must survive the ambiguity of a one-channel input,
    whose NCHW strides also pass as channels-last: each convolution's output has its channels innermost."""
    model = make_student("cnn", (1, 12, 12), 5, channels=[3, 4], fc=6)
    maps = []
    for conv in (model.conv1, model.conv2):
        conv.register_forward_hook(lambda module, inputs, output: maps.append(output))
    model(torch.randn(7, 1, 12, 12))
    assert [h.stride(1) for h in maps] == [1, 1]


def _obs(losses: list[float], progress: float) -> dict:
    samples = np.zeros((len(losses), 7), np.float32)
    samples[:, 0] = losses
    return {"samples": samples, "global": np.array([progress] + [0] * 7, np.float32)}


def test_self_paced_teacher_admits_the_easiest_growing_fraction():
    teacher = make_agent("spl", start_fraction=0.5)
    losses = [0.4, 0.1, 3.0, 2.0]
    assert teacher.act(_obs(losses, 0.0)).tolist() == [1, 1, 0, 0]
    assert teacher.act(_obs(losses, 1.0)).tolist() == [1, 1, 1, 1]


def test_small_loss_teacher_drops_the_highest_losses_after_warmup():
    teacher = make_agent("small_loss", forget_rate=0.5, warmup=0.5)
    assert teacher.act(_obs([0.4, 0.1, 3.0, 2.0], 0.9)).tolist() == [1, 1, 0, 0]
    assert make_agent("uniform").act(_obs([1.0] * 3, 0.5)).tolist() == [1, 1, 1]


def test_unknown_agent_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid agents: " + ", ".join(AGENTS)):
        make_agent("teacher9000")


def test_auroc_against_hand_computed_values():
    # positives 0.9, 0.4; negatives 0.5, 0.1: of 4 pairs, 3 ordered right -> 0.75
    assert auroc(np.array([0.9, 0.4, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)) == 0.75
    # a tie between classes counts one half: pairs (0.5 vs 0.5) = 0.5, (0.5 vs 0.1) = 1 -> 0.75
    assert auroc(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0], bool)) == 0.75
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1], bool)))


def test_readme_feature_tables_match_the_code():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_tables() in readme, "README feature tables are stale: run `python envs/observation.py`"
