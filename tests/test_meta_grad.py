"""Meta-gradient teachers: exact gradients (finite differences, JVP == double backward), BatchNorm
students, and that a trained teacher really helps a noisy-label student."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from agents import make_agent
from agents.loop import TeacherScalars, WeightStats, start, teach
from agents.meta_grad import MetaGradTeacher, unrolled_val_loss, validation_alignment, weight_gradient
from tests.conftest import make_tensor_env

STUDENTS = {
    "mlp": dict(student="mlp", student_kwargs={"hidden": [6, 5]}),
    "resnet20-bn": dict(student="resnet20", student_kwargs={"width": 2}),
}


def far_from_uniform(teacher: MetaGradTeacher, seed: int = 0) -> MetaGradTeacher:
    """Randomise the teacher's zero-initialised output layer, so that its weights differ strongly
    between samples (at uniform weights several wrong meta-gradient formulas coincide with the right one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = teacher.net.out.weight
        out.copy_(100.0 * torch.randn(out.shape, generator=generator, dtype=out.dtype))
    teacher.net.offset = 0.0  # weights centred on 0.5, not saturated near the initial 0.9
    return teacher


def float64_teacher(student: dict, unroll: int, method: str, seed: int = 0, **env_options):
    """A float64 env of ``student`` (batch 8, cosine schedule from lr 0.05) reset with ``seed``, and a float64
    teacher far from uniform attached to it; returns (env, teacher, first observation)."""
    env = make_tensor_env(**student, batch_size=8, dtype="float64", lr=0.05, lr_schedule="cosine", **env_options)
    teacher = far_from_uniform(MetaGradTeacher(unroll=unroll, hidden=8, method=method, seed=seed).train())
    teacher.net.double()
    teacher.attach(env.unwrapped.handle)
    obs, _ = env.reset(seed=seed)
    return env, teacher, obs


def _rollout(student: str, unroll: int, seed: int = 0):
    """A float64 env (cosine learning-rate schedule) and a teacher whose weights are far from uniform,
    after ``unroll`` real steps; returns what the meta-gradient needs."""
    env, teacher, obs = float64_teacher(STUDENTS[student], unroll, "replay", seed, weight_decay=1e-3, momentum=0.9)
    for _ in range(2):  # leave the first step, so that momentum buffers are non-zero
        obs, *_ = env.step(torch.ones(8))
    observations, transitions = [], []
    for _ in range(unroll):
        observations.append(teacher.with_alignment(obs))  # what the teacher sees, alignment input included
        obs, *_ = env.step(teacher.act(observations[-1]))
        transitions.append(env.unwrapped.handle.last_transition)
    val_indices = env.unwrapped.handle.val_indices(64)
    return env.unwrapped.handle, teacher, observations, transitions, val_indices


def _val_loss(env, teacher, observations, transitions, val_indices) -> torch.Tensor:
    weights = [teacher.weights({k: v.double() for k, v in o.items()}) for o in observations]
    return unrolled_val_loss(env, tuple(transitions), tuple(weights), val_indices)


def test_alignment_through_the_cnn_equals_one_backward_per_sample():
    """The JVP of ``validation_alignment`` runs forward-mode AD through the CNN's channels-last
    pooling; in float64 it equals <grad L_val(after), grad l_i(before)> from one reverse-mode
    gradient per sample."""
    env = make_tensor_env(student="cnn", student_kwargs={"channels": [3, 4], "fc": 6}, batch_size=8, dtype="float64")
    env.reset(seed=0)
    for _ in range(3):  # momentum buffers and the parameters away from their initialisation
        env.step(torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    handle = env.unwrapped.handle
    last, val_indices = handle.last_transition, handle.val_indices(16)
    inner, _, _ = validation_alignment(handle, last.params, handle.params, last.indices, val_indices)
    after = {n: p.detach().requires_grad_() for n, p in handle.params.items()}
    direction = torch.autograd.grad(handle.val_loss(after, val_indices), list(after.values()))
    before = {n: p.detach().requires_grad_() for n, p in last.params.items()}
    losses = handle.per_sample_losses(before, last.indices)
    expected = torch.stack([
        sum((g * d).sum() for g, d in zip(torch.autograd.grad(loss, list(before.values()), retain_graph=True), direction))
        for loss in losses
    ])  # fmt: skip
    assert float(expected.std()) > 0.1 * float(expected.abs().max()), "the samples' alignments must differ"
    torch.testing.assert_close(inner, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("student", list(STUDENTS))
@pytest.mark.parametrize("unroll", [1, 3])
def test_teacher_gradient_matches_central_finite_differences(student, unroll):
    env, teacher, observations, transitions, val_indices = _rollout(student, unroll)
    params = list(teacher.net.parameters())
    teacher.net.zero_grad()
    _val_loss(env, teacher, observations, transitions, val_indices).backward()
    analytic = [p.grad.clone() for p in params]
    # float64 central differences at eps 1e-6 are good to ~1e-10 of the loss: the tolerance follows the
    # gradient's scale, which differs by 1000x between students, and entries whose true value is zero (the
    # output bias: weights are shares of the batch) are compared within it, not counted as checked
    atol = 1e-6 * max(float(g.abs().max()) for g in analytic)
    rng = np.random.default_rng(0)
    eps, checked = 1e-6, 0
    for index, p in enumerate(params):
        for flat in rng.choice(p.numel(), size=min(3, p.numel()), replace=False):
            values = []
            for shift in (eps, -2 * eps, eps):
                with torch.no_grad():
                    p.view(-1)[flat] += shift
                values.append(_val_loss(env, teacher, observations, transitions, val_indices).item())
            numeric = (values[0] - values[1]) / (2 * eps)
            got = analytic[index].view(-1)[flat].item()
            assert got == pytest.approx(numeric, rel=1e-3, abs=atol), f"param {index}[{flat}]: analytic {got}, numeric {numeric}"
            checked += abs(numeric) > 100 * atol
    assert checked >= 5, f"only {checked} entries with a clearly non-zero gradient were compared"


@pytest.mark.parametrize("student", list(STUDENTS))
def test_jvp_path_equals_double_backward(student):
    env, teacher, observations, transitions, val_indices = _rollout(student, 1)
    weights = teacher.weights({k: v.double() for k, v in observations[0].items()})
    reference = torch.autograd.grad(unrolled_val_loss(env, tuple(transitions), (weights,), val_indices), weights)[0]
    last = transitions[0]
    assert float(weights.detach().std() / weights.detach().mean()) > 0.2, "the test needs weights far from uniform"
    assert last.lr < 0.05, "the cosine schedule has moved the learning rate"
    inner, _, _ = validation_alignment(env, last.params, env.params, last.indices, val_indices)
    fast = weight_gradient(inner, weights.detach(), last.lr)
    tolerance = dict(rtol=1e-7, atol=1e-9 * float(reference.abs().max()))
    torch.testing.assert_close(fast, reference, **tolerance)
    # the formula with the unweighted mean of the inner products (right only at uniform weights) is caught
    total = weights.detach().sum()
    wrong = -(last.lr / total) * (inner - inner.mean())
    assert not torch.allclose(wrong, reference, **tolerance), "this test cannot tell the right formula from a wrong one"


def test_replayed_updates_reproduce_the_real_ones_exactly():
    env, teacher, observations, transitions, val_indices = _rollout("mlp", 3)
    weights = [teacher.weights({k: v.double() for k, v in o.items()}).detach() for o in observations]
    params = {n: p.detach().requires_grad_() for n, p in transitions[0].params.items()}
    momentum = transitions[0].momentum
    for transition, w in zip(transitions, weights):
        params, momentum = env.replay_update(transition, params, momentum, w, create_graph=False)
    for name, p in env.params.items():
        assert torch.equal(params[name], p.detach()), name


def test_meta_step_leaves_batchnorm_running_statistics_alone(monkeypatch):
    """On a student with BatchNorm, the teacher's update (its meta-gradient's forward passes) leaves
    the running statistics exactly as the real step left them."""
    env = make_tensor_env(**STUDENTS["resnet20-bn"], batch_size=8)
    buffers = lambda: {k: v.clone() for k, v in env.unwrapped.handle.buffers.items()}  # noqa: E731
    for unroll in (1, 2):
        teacher = make_agent("meta_grad", unroll=unroll).train()
        real_observe, changed = teacher.observe, []

        def observe_and_compare(reward, done, info, real_observe=real_observe, changed=changed):
            before = buffers()
            scalars = real_observe(reward, done, info)
            changed.extend(k for k, v in buffers().items() if not torch.equal(before[k], v))
            return scalars

        monkeypatch.setattr(teacher, "observe", observe_and_compare)
        scalars = TeacherScalars()
        teach(start(env, teacher, seed=0), 2, [scalars])
        assert len(scalars.values["meta_loss"]) == 2 // unroll, "the meta steps were taken"
        assert not changed, f"unroll {unroll}: running statistics changed: {changed}"
        assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in buffers().items() if "running_mean" in k)


def test_l2rw_weights_are_in_the_box_and_need_the_handle():
    env = make_tensor_env(noise_rate=0.4)
    teacher = make_agent("l2rw", val_batch=64).attach(env.unwrapped.handle)
    obs, info = env.reset(seed=0)
    weights = teacher.act(obs)
    assert weights.shape == (16,) and weights.min() >= 0 and weights.max() == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="attach"):
        make_agent("l2rw").act(obs)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-4)])
def test_l2rw_weights_equal_a_straightforward_double_backward_implementation(momentum, weight_decay):
    """Ren et al. (2018), written out independently: eps = 0 per sample, the virtual update of the
    eps-weighted loss (with the env's momentum and weight decay), the validation loss after it, and
    w = max(0, -dL_val/d eps) scaled to a largest weight of 1."""
    env = make_tensor_env(noise_rate=0.4, dtype="float64", lr=0.1, momentum=momentum, weight_decay=weight_decay)
    handle = env.unwrapped.handle
    teacher = make_agent("l2rw", val_batch=64).attach(handle)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, *_ = env.step(torch.ones(16))
    state = handle._val_generator.get_state()
    weights = teacher.act(obs)
    handle._val_generator.set_state(state)
    val = handle.val_indices(64)
    model = handle.student.model
    names, theta = list(handle.params), [p.detach().requires_grad_() for p in handle.params.values()]
    buffers = {k: v.clone() for k, v in handle.buffers.items()}

    def loss_of(params, x, y, reduction):
        model.train()
        logits, _ = functional_call(model, {**dict(zip(names, params)), **buffers}, (x,))
        return F.cross_entropy(logits, y, reduction=reduction)

    eps = torch.zeros(16, dtype=torch.float64, requires_grad=True)
    x, y = handle.pool.x[handle.batch_indices], handle.pool.y[handle.batch_indices]
    grads = torch.autograd.grad((eps * loss_of(theta, x, y, "none")).sum(), theta, create_graph=True)
    lr = handle.lr_now
    virtual = [p - lr * (momentum * handle.momentum[n] + g + weight_decay * p) for n, p, g in zip(names, theta, grads)]
    val_loss = loss_of(virtual, handle.data.val.x[val], handle.data.val.y[val], "mean")
    expected = (-torch.autograd.grad(val_loss, eps)[0]).clamp(min=0)
    expected = expected / expected.max()
    assert 0 < int((weights == 0).sum()) < 16, "some samples are dropped, some kept"
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)


def _teach(agent: str, steps: int, seed: int) -> tuple[float, float]:
    """Final test accuracy of a student taught online by ``agent``, and the AUROC of the weights it
    gave in the second half of the run (once it has learned)."""
    env = make_tensor_env(
        dataset="mnist1d", student_kwargs={"hidden": [256, 128]}, batch_size=128, horizon=steps, eval_every=250,
        noise_rate=0.4, lr=0.1, val_size=1000,
    )  # fmt: skip
    teacher = make_agent(agent, **({"teacher_lr": 3e-3, "val_batch": 256, "seed": seed} if agent == "meta_grad" else {}))
    run = teach(start(env, teacher.train(), seed=seed), steps // 2)
    second_half = WeightStats()
    teach(run, steps - steps // 2, [second_half])
    return run.info["test_acc"], second_half.summary()["auroc"]


@pytest.mark.slow
def test_meta_grad_downweights_corrupted_labels_and_beats_uniform():
    """On 40% symmetric noise, a meta_grad teacher learns to give corrupted samples less weight
    (AUROC > 0.6 in the second half of one 1,500-update run; 0.5 is no separation) and its student
    ends with a better test accuracy than an untaught one."""
    uniform, _ = _teach("uniform", 1500, seed=0)
    taught, score = _teach("meta_grad", 1500, seed=0)
    assert score > 0.6, f"AUROC {score:.3f}"
    assert taught > uniform + 0.03, f"meta_grad {taught:.3f} vs uniform {uniform:.3f}"


@pytest.mark.parametrize("student", list(STUDENTS))
def test_fast_path_matches_the_straightforward_one_in_float32(student):
    """Speed never changes the mathematics: in float32 too, at weights far from uniform and under a
    cosine schedule, the teacher's gradient through the JVP path equals the double-backward one to 1e-4
    of the gradient's largest entry (the output bias's gradient is zero up to rounding, since the
    logits are centred, so the tolerance follows the gradient's scale, not each entry's)."""
    env = make_tensor_env(**STUDENTS[student], batch_size=8, lr=0.05, lr_schedule="cosine")
    teacher = far_from_uniform(MetaGradTeacher(unroll=1, hidden=8, seed=0).train()).attach(env.unwrapped.handle)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, *_ = env.step(torch.ones(8))
    weights = teacher.weights(teacher.with_alignment(obs))
    assert float(weights.detach().std() / weights.detach().mean()) > 0.1
    env.step(weights.detach())
    last, unwrapped = env.unwrapped.handle.last_transition, env.unwrapped.handle
    val_indices = unwrapped.val_indices(64)
    params = list(teacher.net.parameters())
    slow = torch.autograd.grad(unrolled_val_loss(unwrapped, (last,), (weights,), val_indices), params, retain_graph=True)
    inner, _, _ = validation_alignment(unwrapped, last.params, unwrapped.params, last.indices, val_indices)
    weight_grad = weight_gradient(inner, weights.detach(), last.lr)
    fast = torch.autograd.grad(weights, params, grad_outputs=weight_grad)
    fast, slow = torch.cat([g.flatten() for g in fast]), torch.cat([g.flatten() for g in slow])
    # float32 rounding differs between the two paths by ~1e-7 of the largest entry (it was ~7e-10 at an
    # entry whose true value is zero); a wrong formula differs by O(1) of it
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4 * float(slow.abs().max()))


@pytest.mark.parametrize("student", list(STUDENTS))
def test_graph_path_through_real_updates_equals_the_replay(student):
    """B = 3: back-propagating through the env's own (differentiable) updates gives the teacher the
    same gradient as replaying those updates from their recorded starting points (weights far from
    uniform, cosine schedule, so that every parameter's gradient is non-trivial)."""
    grads = {}
    for method in ("graph", "replay"):
        env, teacher, obs = float64_teacher(STUDENTS[student], 3, method, horizon=6)
        for _ in range(3):
            obs, *_ = env.step(teacher.act({k: v.double() for k, v in obs.items()}))
            teacher._window.append((env.unwrapped.handle.last_transition, teacher._pending))
        env.unwrapped.handle._val_generator.manual_seed(123)
        val_loss, grads[method] = teacher.meta_gradient()
        if method == "graph":
            assert all(p.grad_fn is None for p in env.unwrapped.handle.params.values()), "the history was cut"
    scale = max(float(g.abs().max()) for g in grads["replay"])
    names = [n for n, _ in teacher.net.named_parameters()]
    # the output bias (and a context layer whose shift stays in ReLU's linear part) only move the
    # logits' batch mean, which the centring removes: their true gradient is zero
    compared = [g for n, g in zip(names, grads["replay"]) if n.startswith("body") or n == "out.weight"]
    assert all(float(g.abs().max()) > 1e-6 * scale for g in compared), "the network's layers have gradients to compare"
    for a, b in zip(grads["graph"], grads["replay"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9 * scale)


def test_graph_path_trains_a_teacher_end_to_end():
    env = make_tensor_env(batch_size=16, horizon=30)
    teacher = MetaGradTeacher(unroll=3, seed=0).train()
    before = [p.detach().clone() for p in teacher.net.parameters()]
    scalars = TeacherScalars()
    run = teach(start(env, teacher, seed=0), 100, [scalars])
    assert run.step == 30 and run.done, "the loop stops at the end of the episode"
    assert len(scalars.values["meta_loss"]) == 10
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.net.parameters()))


def test_weight_decay_never_outweighs_tiny_meta_gradients():
    """Meta-gradients are tiny (they carry lr / sum(w)); with an L2 term inside Adam's normalisation
    the teacher shrank to its constant initial weights. Decoupled decay leaves it almost untouched."""
    teacher = MetaGradTeacher(seed=0).train()
    before = [p.detach().clone() for p in teacher.net.parameters()]
    for _ in range(1000):
        for p in teacher.net.parameters():
            p.grad = torch.full_like(p, 1e-12)
        teacher.optimizer.step()
    for a, b in zip(before, teacher.net.parameters()):
        if a.abs().max() > 0:
            assert float(b.detach().abs().max()) > 0.9 * float(a.abs().max())


@pytest.mark.parametrize("activation, recovers", [("relu", False), ("leaky_relu", True)])
def test_a_leaky_teacher_network_can_revive_a_unit_that_is_negative_for_every_input(activation, recovers):
    """Pre-trained teachers at teacher_lr 0.03 ended with every ReLU of a layer dead (constant weights);
    with ``activation: leaky_relu`` such a unit still gets a gradient, with ReLU it never does."""
    teacher = MetaGradTeacher(activation=activation, hidden=8, seed=0)
    first = teacher.net.body[0]
    with torch.no_grad():
        first.bias.fill_(-1e3)  # every unit of the first layer below zero for any input
        teacher.net.out.weight.normal_(generator=torch.Generator().manual_seed(0))
    rows = torch.randn(32, first.in_features, generator=torch.Generator().manual_seed(1))
    weights = teacher.net(rows)
    (weights * torch.linspace(-1, 1, 32)).sum().backward()
    assert (first.weight.grad.abs().max() > 0) == recovers


def test_standardised_inputs_read_where_a_sample_stands_in_its_batch_not_raw_values():
    """With ``standardise`` the per-sample inputs are z-scores over the batch: an affine change of any of them
    (another dataset's loss scale) leaves the weights as they were, up to the 1e-6 that keeps a constant
    column at 0; the global inputs still count as given."""
    env = make_tensor_env(**STUDENTS["mlp"], batch_size=16)
    obs, _ = env.reset(seed=0)
    rescaled = lambda o: {
        **o,
        "samples": 10 * o["samples"] + 3,
        "internal": 0.1 * o["internal"] - 1,
        "alignment": 5 * o["alignment"],
    }
    for standardise in (True, False):
        teacher = MetaGradTeacher(standardise=standardise, hidden=8, seed=0)
        with torch.no_grad():  # an output layer that makes the weights differ between samples
            teacher.net.out.weight.normal_(generator=torch.Generator().manual_seed(0))
        teacher.attach(env.unwrapped.handle)
        seen = teacher.with_alignment(obs)
        weights = teacher.weights(seen).detach()
        assert weights.std() > 1e-3, "the weights differ between samples"
        change = (teacher.weights(rescaled(seen)).detach() - weights).abs().max()
        assert (change < 1e-4) == standardise, f"largest change {change:.2e}"
        moved = teacher.weights({**seen, "global": seen["global"] + 0.5}).detach()
        assert (moved - weights).abs().max() > 1e-3, "the global features are read as they are"


@pytest.mark.parametrize("standardise", [False, True])
def test_local_features_read_the_per_sample_features_and_not_the_global_ones(standardise):
    """``features="local"`` feeds the samples' surface and internal features (and the alignment) to the teacher,
    without the training-progress features: changing those leaves the weights exactly as they were; changing a
    sample's internal features moves them."""
    env = make_tensor_env(**STUDENTS["mlp"], batch_size=16)
    obs, _ = env.reset(seed=0)
    teacher = MetaGradTeacher(features="local", standardise=standardise, hidden=8, seed=0)
    with torch.no_grad():
        teacher.net.out.weight.normal_(generator=torch.Generator().manual_seed(0))
    seen = teacher.attach(env.unwrapped.handle).with_alignment(obs)
    weights = teacher.weights(seen).detach()
    assert weights.std() > 1e-3, "the weights differ between samples"
    assert torch.equal(teacher.weights({**seen, "global": torch.rand_like(seen["global"])}).detach(), weights)
    internal = seen["internal"].clone()
    internal[0] = -internal[0]
    assert (teacher.weights({**seen, "internal": internal}).detach() - weights).abs().max() > 1e-4
