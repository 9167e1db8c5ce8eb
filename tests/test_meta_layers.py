"""Layer-restricted meta-gradients (``meta_grad --meta-layers``): exact through the restricted update
(finite differences in float64, written independently of the code under test), the closed-form head
path equal to the generic one, the env's graph path equal to the replay, and bad specs refused. The
per-layer closed form of the B = 1 meta-gradient (``--method layerwise``) equals the JVP, and where it
does not apply the teacher falls back to the JVP."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

import agents.meta_grad
from agents import make_agent
from agents.meta_grad import (
    MetaGradTeacher,
    affine_layers_covering,
    head_alignment,
    meta_parameters,
    unrolled_val_loss,
    validation_alignment,
    weight_gradient,
)
from tests.conftest import make_tensor_env
from tests.test_meta_grad import STUDENTS, _rollout, far_from_uniform, float64_teacher


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
        inner, _, _ = head_alignment(handle, last, handle.params, val_indices)
    else:
        inner, _, _ = validation_alignment(handle, last.params, handle.params, last.indices, val_indices, layers)
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
    full_inner, _, _ = validation_alignment(handle, last.params, handle.params, last.indices, val_indices)
    full = weight_gradient(full_inner, weights, last.lr)
    assert not torch.allclose(full, analytic, rtol=1e-3, atol=1e-3 * scale), "the test cannot tell restricted from full"


@pytest.mark.parametrize("student", list(STUDENTS))
def test_closed_form_head_path_equals_the_generic_restricted_jvp(student):
    handle, _, _, transitions, val_indices = _rollout(student, 1)
    last = transitions[0]
    head = meta_parameters(handle.params, "head")
    assert head == {"head.weight", "head.bias"}
    closed, closed_loss, _ = head_alignment(handle, last, handle.params, val_indices)
    generic, generic_loss, _ = validation_alignment(handle, last.params, handle.params, last.indices, val_indices, head)
    torch.testing.assert_close(closed, generic, rtol=1e-9, atol=1e-12 * float(generic.abs().max()))
    torch.testing.assert_close(closed_loss, generic_loss)


def test_all_layers_named_one_by_one_is_the_full_path():
    handle, _, _, transitions, val_indices = _rollout("mlp", 1)
    last = transitions[0]
    every = meta_parameters(handle.params, "last:3")  # the mlp has two hidden layers and a head
    assert every == set(handle.params) and meta_parameters(handle.params, "all") is None
    full, _, _ = validation_alignment(handle, last.params, handle.params, last.indices, val_indices)
    named, _, _ = validation_alignment(handle, last.params, handle.params, last.indices, val_indices, every)
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


def restricted_unrolled_reference(handle, transitions, weights, val_indices, layers: frozenset) -> float:
    """L_val after the recorded updates replayed with ``weights`` in ``layers`` only, every other
    parameter at the value the real updates gave it: the definition for B > 1, spelled out
    independently of the package (``functional_call`` and the momentum-SGD formula)."""
    model, sgd = handle.student.model.train(), handle.sgd
    scratch = lambda: {n: b.clone() for n, b in handle.buffers.items()}  # noqa: E731
    chosen = {n: transitions[0].params[n].detach() for n in layers}
    momentum = {n: transitions[0].momentum[n].detach() for n in layers}
    for transition, w in zip(transitions, weights):
        merged = {n: (chosen[n] if n in layers else p.detach()).clone().requires_grad_() for n, p in transition.params.items()}
        logits, _ = functional_call(model, (merged, scratch()), (handle.pool.x[transition.indices],))
        losses = F.cross_entropy(logits, handle.pool.y[transition.indices], reduction="none")
        grads = dict(zip(merged, torch.autograd.grad((w * losses).sum() / w.sum(), list(merged.values()))))
        for n in layers:
            momentum[n] = sgd.momentum * momentum[n] + grads[n] + sgd.weight_decay * merged[n].detach()
            chosen[n] = merged[n].detach() - transition.lr * momentum[n]
    final = {n: chosen[n] if n in layers else p.detach() for n, p in handle.params.items()}
    val_logits, _ = functional_call(model, (final, scratch()), (handle.data.val.x[val_indices],))
    return float(F.cross_entropy(val_logits, handle.data.val.y[val_indices]))


@pytest.mark.parametrize("student", list(STUDENTS))
def test_restricted_b3_gradient_matches_finite_differences_of_an_independent_replay(student):
    """B = 3 through the last two layers: the teacher's gradient (the package's restricted replay,
    which the env's graph path equals) against central finite differences of the definition."""
    handle, teacher, observations, transitions, val_indices = _rollout(student, 3)
    layers = meta_parameters(handle.params, "last:2")
    obs = [{k: v.double() for k, v in o.items()} for o in observations]
    params = list(teacher.net.parameters())
    weights = tuple(teacher.weights(o) for o in obs)
    analytic = torch.autograd.grad(unrolled_val_loss(handle, tuple(transitions), weights, val_indices, layers), params)
    rng = np.random.default_rng(0)
    eps, checked = 1e-6, 0
    for index, p in zip((0, 1, len(params) - 2), params[:2] + params[-2:-1]):  # first layer, output weight
        for flat in rng.choice(p.numel(), size=min(3, p.numel()), replace=False):
            values = []
            for shift in (eps, -2 * eps, eps):
                with torch.no_grad():
                    p.view(-1)[flat] += shift
                    w = [teacher.weights(o) for o in obs]
                values.append(restricted_unrolled_reference(handle, transitions, w, val_indices, layers))
            numeric = (values[0] - values[1]) / (2 * eps)
            got = analytic[index].view(-1)[flat].item()
            assert got == pytest.approx(numeric, rel=1e-4, abs=1e-9), f"param {index}[{flat}]: {got} vs {numeric}"
            checked += abs(numeric) > 1e-8
    assert checked >= 3, "the finite differences compared some non-zero gradients"


def test_the_teacher_takes_the_closed_form_for_the_head_and_checks_its_premise(monkeypatch):
    env = make_tensor_env(batch_size=16)
    teacher = MetaGradTeacher(meta_layers="head", unroll=1, seed=0).train().attach(env.unwrapped.handle)
    obs, _ = env.reset(seed=0)
    env.step(teacher.act(obs))
    transition = env.unwrapped.handle.last_transition
    assert teacher.head_closed_form(transition)

    def generic(*args, **kwargs):
        raise AssertionError("the generic JVP ran")

    monkeypatch.setattr(agents.meta_grad, "validation_alignment", generic)
    teacher._window.append((transition, teacher._pending))
    teacher.meta_step()  # takes the closed form: the generic path would raise
    broken = MetaGradTeacher(meta_layers="head", unroll=1, seed=0).attach(env.unwrapped.handle)
    scrambled = dataclasses.replace(transition, head_input=transition.head_input.flip(0))
    with pytest.warns(UserWarning, match="not its head's input"):
        assert not broken.head_closed_form(scrambled)


def test_a_non_finite_meta_gradient_leaves_the_teacher_and_its_optimiser_untouched(monkeypatch):
    env = make_tensor_env(batch_size=16)
    teacher = MetaGradTeacher(unroll=1, seed=0).train().attach(env.unwrapped.handle)
    obs, _ = env.reset(seed=0)
    for _ in range(3):  # three meta steps: the optimiser has a step count and moments to keep
        obs, reward, terminated, truncated, info = env.step(teacher.act(obs))
        teacher.observe(reward, terminated, info)
    before = [p.detach().clone() for p in teacher.net.parameters()]
    state = {k: v.clone() for k, v in teacher.optimizer.state[teacher.net.out.weight].items()}
    nan_grads = [torch.full_like(p, float("nan")) for p in teacher.net.parameters()]
    monkeypatch.setattr(teacher, "meta_gradient", lambda: (torch.tensor(1.0), nan_grads))
    scalars = teacher.meta_step()
    assert float(scalars["meta_skipped"]) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.net.parameters()))
    after = teacher.optimizer.state[teacher.net.out.weight]
    assert float(state["step"]) == 3
    assert all(torch.equal(state[k], after[k]) for k in state), "step count and moments unchanged"
    ones = [torch.ones_like(p) for p in teacher.net.parameters()]
    monkeypatch.setattr(teacher, "meta_gradient", lambda: (torch.tensor(1.0), ones))
    assert float(teacher.meta_step()["meta_skipped"]) == 0.0
    assert not torch.equal(before[0], next(teacher.net.parameters())), "a finite gradient does move the teacher"


LAYERWISE_STUDENTS = {
    "mlp": dict(student="mlp", student_kwargs={"hidden": [6, 5]}),
    "cnn-2d": dict(student="cnn", student_kwargs={"channels": [3, 4], "fc": 6}),  # digits: 1 x 8 x 8, channels-last
    "cnn-1d": dict(dataset="mnist1d", student="cnn", student_kwargs={"channels": [3, 4], "fc": 6}),
}
SPREAD = [1.0, 0.0, 0.3, 1e-9, 0.8, 0.05, 1.0, 0.6]  # orders of magnitude apart, one exactly 0
BELOW_EPS = [1e-10] * 8  # sum under WEIGHT_SUM_EPS: the weighted mean's denominator is the clamp


def _traced_update(student: str, weights: torch.Tensor):
    """A float64 env (momentum, weight decay, cosine schedule) whose last update was taken with ``weights``
    and recorded layer by layer (``handle.traced_layers``); returns (handle, that update, validation batch)."""
    env = make_tensor_env(
        **LAYERWISE_STUDENTS[student],
        batch_size=8,
        dtype="float64",
        momentum=0.9,
        weight_decay=1e-3,
        lr=0.05,
        lr_schedule="cosine",
    )
    env.reset(seed=0)
    handle = env.unwrapped.handle
    handle.traced_layers = affine_layers_covering(handle.student.model, None)  # from the next batch's forward on
    for _ in range(3):
        env.step(torch.full((8,), 0.5, dtype=torch.float64))
    env.step(weights)
    return handle, handle.last_transition, handle.val_indices(16)


@pytest.mark.parametrize("student", list(LAYERWISE_STUDENTS))
@pytest.mark.parametrize("spec", ["all", "last:2"])
@pytest.mark.parametrize("weights", [SPREAD, BELOW_EPS], ids=["spread", "below-eps"])
def test_layerwise_inner_products_equal_the_jvp_at_weights_far_from_uniform(student, spec, weights):
    """The per-layer closed form divides the recorded gradients of the *weighted* loss by each sample's share
    w_i / max(S, eps): at weights that differ by orders of magnitude (one of them exactly 0, whose alignment is
    not needed and comes out 0), and at weights whose sum is below eps, it equals the JVP of the unweighted
    per-sample losses, in float64."""
    weights = torch.tensor(weights, dtype=torch.float64)
    handle, last, val_indices = _traced_update(student, weights)
    layers = meta_parameters(handle.params, spec)
    assert agents.meta_grad.records_cover(last, handle.params, layers)
    fast, fast_loss, fast_grad = agents.meta_grad.layerwise_alignment(handle, last, weights, handle.params, val_indices, layers)
    exact, exact_loss, exact_grad = validation_alignment(handle, last.params, handle.params, last.indices, val_indices, layers)
    assert float(exact.std()) > 0.1 * float(exact.abs().max()), "the samples' alignments must differ"
    kept = weights > 0
    torch.testing.assert_close(fast[kept], exact[kept], rtol=1e-9, atol=1e-9 * float(exact.abs().max()))
    if not kept.all():
        assert float(fast[~kept].abs().max()) == 0.0
    assert torch.equal(fast_loss, exact_loss) and fast_grad.keys() == exact_grad.keys()


@pytest.mark.parametrize("student", ["mlp", "cnn-2d"])
def test_the_teacher_gradient_by_layerwise_equals_the_jvp_one(student):
    """End to end, through the teacher's own meta step: two identical teachers, far from uniform, on two
    identical float64 envs, one by the JVP and one by the per-layer closed form, get the same gradient."""
    grads = {}
    for method in ("jvp", "layerwise"):
        env, teacher, obs = float64_teacher(LAYERWISE_STUDENTS[student], 1, method)
        for _ in range(2):
            obs, *_ = env.step(teacher.act({k: v.double() for k, v in obs.items()}))
        weights = teacher._pending.detach()
        assert float(weights.std() / weights.mean()) > 0.2, "the test needs weights far from uniform"
        teacher._window.append((env.unwrapped.handle.last_transition, teacher._pending))
        env.unwrapped.handle._val_generator.manual_seed(123)
        _, grads[method] = teacher.meta_gradient()
    assert env.unwrapped.handle.layerwise_fits, "the closed form was taken"
    scale = max(float(g.abs().max()) for g in grads["jvp"])
    assert scale > 0
    for a, b in zip(grads["layerwise"], grads["jvp"]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * scale)


def test_the_teacher_takes_the_layerwise_path_checks_it_once_and_falls_back_where_it_does_not_fit(monkeypatch):
    """``method layerwise``: on a student's first traced update the teacher checks the closed form against the
    JVP (and trusts it afterwards, never running the JVP); on a student it does not fit (here a record whose
    output gradients belong to other samples, as a layer mixing the batch would give) it returns the JVP's
    values, warns, and stops recording that student's layers; a BatchNorm student is never recorded."""
    env = make_tensor_env(batch_size=16)
    handle = env.unwrapped.handle
    teacher = MetaGradTeacher(unroll=1, method="layerwise", seed=0).train().attach(handle)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(teacher.act(obs))
        teacher.observe(reward, terminated, info)
    assert handle.layerwise_fits is True

    def refused(*args, **kwargs):
        raise AssertionError("this path ran")

    with monkeypatch.context() as patched:
        patched.setattr(agents.meta_grad, "validation_alignment", refused)
        obs, reward, terminated, truncated, info = env.step(teacher.act(obs))
        teacher.observe(reward, terminated, info)  # a checked student: the closed form alone
    obs, _ = env.reset(seed=1)  # a new student: checked again, on a record made not to fit
    env.step(teacher.act(obs))
    obs, *_ = env.step(teacher.act(obs))
    last = handle.last_transition
    last.layers[0].output_grad = last.layers[0].output_grad.flip(0)
    val_indices = handle.val_indices(teacher.hp.val_batch)
    with pytest.warns(UserWarning, match="differ from the JVP's"):
        got = teacher.one_step_alignment(last, teacher._pending.detach(), val_indices, None)
    expected = validation_alignment(handle, last.params, handle.params, last.indices, val_indices)
    assert torch.equal(got[0], expected[0]), "it returned the JVP's inner products"
    assert handle.layerwise_fits is False
    teacher.act(obs)
    assert handle.traced_layers is None, "a student the closed form does not fit is no longer recorded"
    state = handle.state_dict()
    handle.layerwise_fits = None
    handle.load_state_dict(state, torch.device("cpu"))
    assert handle.layerwise_fits is False, "the verdict survives a checkpoint, as the student does"
    bn = make_tensor_env(batch_size=16, student="resnet20", student_kwargs={"width": 2})
    teacher = MetaGradTeacher(unroll=1, method="layerwise", seed=0).train().attach(bn.unwrapped.handle)
    obs, _ = bn.reset(seed=0)
    bn.step(teacher.act(obs))
    assert bn.unwrapped.handle.traced_layers is None and bn.unwrapped.handle.last_transition.layers is None


def test_layerwise_needs_the_meta_layers_in_affine_layers():
    """Parameters outside Linear / Conv layers (here a LayerNorm's) make ``layerwise`` refuse with a warning,
    unless the meta-gradient leaves them out (``last:k``); BatchNorm refuses silently (it mixes samples)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2, bias=False))
    with pytest.warns(UserWarning, match="1.bias is not in one"):
        assert agents.meta_grad.affine_layers_covering(model, None) is None
    assert agents.meta_grad.affine_layers_covering(model, frozenset({"2.weight"})) == {"2"}
    assert agents.meta_grad.affine_layers_covering(torch.nn.Linear(3, 2), None) == {""}
    with_bn = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    assert agents.meta_grad.affine_layers_covering(with_bn, frozenset({"0.weight", "0.bias"})) is None
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    tied[2].weight = tied[0].weight  # one parameter in two layers: a record would find it under one name only
    with pytest.warns(UserWarning, match="0.weight and 2.weight are one"):
        assert agents.meta_grad.affine_layers_covering(tied, None) is None


def test_layerwise_records_only_what_its_meta_gradient_reads():
    """``last:2`` records the last two layers and no others; the head's closed form, once its premise is checked,
    needs no records; a frozen teacher stops the recording; a differentiable (B > 1) update records nothing."""
    env = make_tensor_env(batch_size=16)
    handle = env.unwrapped.handle
    teacher = MetaGradTeacher(unroll=1, method="layerwise", meta_layers="last:2", seed=0).train().attach(handle)
    obs, _ = env.reset(seed=0)
    for _ in range(2):
        obs, *_ = env.step(teacher.act(obs))
    assert handle.traced_layers == {"layers.1", "head"}
    assert [r.name for r in handle.last_transition.layers] == ["layers.1", "head"]
    teacher.train(False).act(obs)
    assert handle.traced_layers is None, "a frozen teacher reads no records"
    head = MetaGradTeacher(unroll=1, method="layerwise", meta_layers="head", seed=0).train().attach(handle)
    obs, _ = env.reset(seed=1)
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(head.act(obs))
        head.observe(reward, terminated, info)
    head.act(obs)
    assert handle.traced_layers is None, "the head's closed form reads the real forward's outputs, not records"
    handle.traced_layers = frozenset({"layers.0", "layers.1", "head"})
    env.step(torch.full((16,), 0.5))  # the next batch's forward is recorded
    env.step(torch.full((16,), 0.5, requires_grad=True))
    assert handle.last_transition.layers is None, "a differentiable update records nothing"


def test_mwnet_takes_the_layerwise_path_when_asked():
    """Meta-Weight-Net's one-step meta-gradient by the per-layer closed form: checked against the JVP on the
    first recorded update, and taken."""
    env = make_tensor_env(batch_size=16)
    teacher = make_agent("mwnet", method="layerwise").train().attach(env.unwrapped.handle)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(teacher.act(obs))
        teacher.observe(reward, terminated, info)
    assert env.unwrapped.handle.layerwise_fits is True


def test_a_pickled_env_records_the_traced_layers_as_the_original():
    """Pickling drops the current batch's records with its autograd history; the unpickled env re-forwards the
    batch with the same layers traced, so its next update's records equal the original's."""
    import pickle

    env = make_tensor_env(batch_size=8, dtype="float64")
    env.reset(seed=0)
    handle = env.unwrapped.handle
    handle.traced_layers = frozenset({"layers.1", "head"})
    weights = torch.tensor(SPREAD, dtype=torch.float64)
    env.step(weights)
    clone = pickle.loads(pickle.dumps(env))
    assert clone.unwrapped.handle.traced_layers == handle.traced_layers
    env.step(weights)
    clone.step(weights)
    ours, theirs = handle.last_transition.layers, clone.unwrapped.handle.last_transition.layers
    assert [r.name for r in ours] == [r.name for r in theirs] == ["layers.1", "head"]
    for a, b in zip(ours, theirs):
        assert float(a.output_grad.abs().max()) > 0
        torch.testing.assert_close(a.input, b.input, rtol=0, atol=0)
        torch.testing.assert_close(a.output_grad, b.output_grad, rtol=1e-12, atol=1e-12 * float(a.output_grad.abs().max()))
