"""Layer-restricted meta-gradients (``meta_grad --meta-layers``): exact through the restricted update
(finite differences in float64, written independently of the code under test), the closed-form head
path equal to the generic one, the env's graph path equal to the replay, and bad specs refused."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from agents.meta_grad import (
    MetaGradTeacher,
    head_alignment,
    meta_parameters,
    unrolled_val_loss,
    validation_alignment,
    weight_gradient,
)
from tests.conftest import make_tensor_env
from tests.test_meta_grad import STUDENTS, _rollout, far_from_uniform


def restricted_val_loss(handle, transition, weights: torch.Tensor, val_indices: torch.Tensor, layers: frozenset) -> torch.Tensor:
    """L_val after the update of ``transition`` taken with ``weights`` in ``layers`` only, the other
    parameters at the values the real update gave them: the definition, spelled out with
    ``functional_call`` and the momentum-SGD formula (no code of the package's own update)."""
    model, sgd = handle.student.model.train(), handle.sgd
    scratch = lambda: {n: b.clone() for n, b in handle.buffers.items()}  # noqa: E731
    before = {n: p.detach().clone().requires_grad_() for n, p in transition.params.items()}
    logits, _ = functional_call(model, (before, scratch()), (handle.pool.x[transition.indices],))
    losses = F.cross_entropy(logits, handle.pool.y[transition.indices], reduction="none")
    grads = dict(zip(before, torch.autograd.grad((weights * losses).sum() / weights.sum(), list(before.values()))))
    after = {}
    for name, p in before.items():
        if name in layers:
            step = sgd.momentum * transition.momentum[name] + grads[name] + sgd.weight_decay * p.detach()
            after[name] = p.detach() - transition.lr * step
        else:
            after[name] = handle.params[name].detach()
    val_logits, _ = functional_call(model, (after, scratch()), (handle.data.val.x[val_indices],))
    return F.cross_entropy(val_logits, handle.data.val.y[val_indices]).detach()


@pytest.mark.parametrize("student", list(STUDENTS))
@pytest.mark.parametrize("spec", ["head", "last:2"])
def test_restricted_gradient_matches_finite_differences_of_the_restricted_update(student, spec):
    handle, teacher, observations, transitions, val_indices = _rollout(student, 1)
    last = transitions[0]
    weights = teacher.weights({k: v.double() for k, v in observations[0].items()}).detach()
    assert float(weights.std() / weights.mean()) > 0.2, "the test needs weights far from uniform"
    layers = meta_parameters(handle.params, spec)
    if spec == "head":
        inner, _ = head_alignment(handle, last, handle.params, val_indices)
    else:
        inner, _ = validation_alignment(handle, last.params, handle.params, last.indices, val_indices, layers)
    analytic = weight_gradient(inner, weights, last.lr)
    eps = 1e-6
    numeric = torch.empty_like(weights)
    for i in range(len(weights)):
        shift = torch.zeros_like(weights)
        shift[i] = eps
        up = restricted_val_loss(handle, last, weights + shift, val_indices, layers)
        down = restricted_val_loss(handle, last, weights - shift, val_indices, layers)
        numeric[i] = (up - down) / (2 * eps)
    scale = float(numeric.abs().max())
    assert scale > 0, "the restricted update moves the validation loss"
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-6 * scale)
    # the restriction is real: the gradient through every layer is a different vector
    full_inner, _ = validation_alignment(handle, last.params, handle.params, last.indices, val_indices)
    full = weight_gradient(full_inner, weights, last.lr)
    assert not torch.allclose(full, analytic, rtol=1e-3, atol=1e-3 * scale), "the test cannot tell restricted from full"


@pytest.mark.parametrize("student", list(STUDENTS))
def test_closed_form_head_path_equals_the_generic_restricted_jvp(student):
    handle, _, _, transitions, val_indices = _rollout(student, 1)
    last = transitions[0]
    head = meta_parameters(handle.params, "head")
    assert head == {"head.weight", "head.bias"}
    closed, closed_loss = head_alignment(handle, last, handle.params, val_indices)
    generic, generic_loss = validation_alignment(handle, last.params, handle.params, last.indices, val_indices, head)
    torch.testing.assert_close(closed, generic, rtol=1e-9, atol=1e-12 * float(generic.abs().max()))
    torch.testing.assert_close(closed_loss, generic_loss)


def test_all_layers_named_one_by_one_is_the_full_path():
    handle, _, _, transitions, val_indices = _rollout("mlp", 1)
    last = transitions[0]
    every = meta_parameters(handle.params, "last:3")  # the mlp has two hidden layers and a head
    assert every == set(handle.params) and meta_parameters(handle.params, "all") is None
    full, _ = validation_alignment(handle, last.params, handle.params, last.indices, val_indices)
    named, _ = validation_alignment(handle, last.params, handle.params, last.indices, val_indices, every)
    torch.testing.assert_close(named, full, rtol=0, atol=0)


@pytest.mark.parametrize("student", list(STUDENTS))
@pytest.mark.parametrize("spec", ["head", "last:2"])
def test_restricted_graph_path_equals_the_restricted_replay(student, spec):
    """B = 3: the env keeps the graph of the chosen layers' updates only, and back-propagating through
    them gives the teacher the same gradient as replaying those layers with the others held at their
    real values."""
    grads = {}
    for method in ("graph", "replay"):
        env = make_tensor_env(**STUDENTS[student], batch_size=8, dtype="float64", lr=0.05, lr_schedule="cosine", horizon=6)
        teacher = far_from_uniform(MetaGradTeacher(unroll=3, hidden=8, method=method, meta_layers=spec, seed=0).train())
        teacher.net.double()
        teacher.attach(env.unwrapped.handle)
        obs, _ = env.reset(seed=0)
        for _ in range(3):
            obs, *_ = env.step(teacher.act({k: v.double() for k, v in obs.items()}))
            teacher._window.append((env.unwrapped.handle.last_transition, teacher._pending))
        if method == "graph":
            layers = teacher.meta_layers()
            carrying = {n for n, p in env.unwrapped.handle.params.items() if p.grad_fn is not None}
            assert carrying == layers, "only the chosen layers keep the teacher's graph"
        env.unwrapped.handle._val_generator.manual_seed(123)
        _, grads[method] = teacher.meta_gradient()
    scale = max(float(g.abs().max()) for g in grads["replay"])
    assert scale > 0
    for a, b in zip(grads["graph"], grads["replay"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9 * scale)


def test_restricted_replay_differs_from_the_full_one():
    """The replay really holds the other layers at their real values (B = 3 through the head only is
    not B = 3 through everything)."""
    handle, teacher, observations, transitions, val_indices = _rollout("mlp", 3)
    weights = tuple(teacher.weights({k: v.double() for k, v in o.items()}) for o in observations)
    params = list(teacher.net.parameters())
    head = meta_parameters(handle.params, "head")
    restricted = torch.autograd.grad(
        unrolled_val_loss(handle, tuple(transitions), weights, val_indices, head), params, retain_graph=True
    )
    full = torch.autograd.grad(unrolled_val_loss(handle, tuple(transitions), weights, val_indices), params)
    restricted, full = torch.cat([g.flatten() for g in restricted]), torch.cat([g.flatten() for g in full])
    assert not torch.allclose(restricted, full, rtol=1e-3, atol=1e-3 * float(full.abs().max()))


@pytest.mark.parametrize("spec", ["last:0", "last:", "last:x", "heads", "last:-1", ""])
def test_malformed_meta_layers_are_refused_when_the_teacher_is_built(spec):
    with pytest.raises(ValueError, match="meta_layers must be all, head or last:k"):
        MetaGradTeacher(meta_layers=spec)


def test_more_layers_than_the_student_has_are_refused_with_the_count():
    handle, *_ = _rollout("mlp", 1)
    with pytest.raises(ValueError, match="asks for 4 layers, but the student has 3"):
        meta_parameters(handle.params, "last:4")
