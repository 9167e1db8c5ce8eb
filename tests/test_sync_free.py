"""A teaching step never waits for the device: between evaluations, no tensor is read back to the
host (``.item()``, ``bool(tensor)``, ``float``, ``.tolist()``, ``.cpu()``, ...). On a GPU each of
those is a host-device sync; on the CPU the same calls are counted through patched tensor methods.
The checks a step needs (action values, finite loss) are device-side flags read at evaluations."""

from __future__ import annotations

import traceback

import pytest
import torch

from agents import make_agent
from agents.loop import start, teach
from tests.conftest import make_tensor_env

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu")


def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch every method that reads a tensor back to the host; returns the list the calls go to
    (each as 'method at file:line' of the caller)."""
    calls: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            calls.append(f"{_name} at {caller.filename}:{caller.lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


TEACHERS = [
    ("uniform", {}),
    ("meta_grad", {}),  # B = 5: the graph path
    ("meta_grad", {"unroll": 1}),  # the JVP path, handing its validation gradient to the alignment input
    ("meta_grad", {"unroll": 1, "meta_layers": "head"}),  # the closed form
    ("meta_grad", {"unroll": 1, "method": "layerwise"}),  # per-layer closed form (checked on the first traced update)
    ("meta_grad", {"unroll": 3}),
    ("meta_grad", {"unroll": 3, "meta_layers": "last:2"}),
    ("mwnet", {}),
    ("l2rw", {}),
]


@pytest.mark.parametrize(
    "agent,options", TEACHERS, ids=[f"{a}-{'-'.join(map(str, o.values())) or 'default'}" for a, o in TEACHERS]
)
@pytest.mark.parametrize("student", [{}, {"student": "resnet20", "student_kwargs": {"width": 2}}], ids=["mlp", "resnet-bn"])
def test_a_teaching_step_reads_nothing_back_to_the_host(monkeypatch, agent, options, student):
    env = make_tensor_env(**student, horizon=40, eval_every=20)
    teacher = make_agent(agent, **options)
    run = start(env, teacher.train(teacher.kind == "online"), seed=0)
    teach(run, 4)  # first-use paths (lazy initialisation, optimiser state, layerwise's check) are not a step's cost
    if options.get("method") == "layerwise":  # the steps below take the per-layer closed form, or BatchNorm's JVP
        traced = run.env.unwrapped.handle.traced_layers
        assert run.env.unwrapped.handle.layerwise_fits and traced if not student else traced is None
    calls = count_host_reads(monkeypatch)
    teach(run, 12)  # steps 5..16: no evaluation among them
    assert not calls, f"{len(calls)} host reads in 12 teaching steps: {calls[:5]}"
    teach(run, 4)  # through the evaluation at step 20, where the flags are read: the counter does count
    assert calls, "the patched methods saw no call at an evaluation; the count above proves nothing"


def test_a_bad_torch_action_is_skipped_on_the_device_and_reported_at_the_next_evaluation():
    env = make_tensor_env(eval_every=5, reward="accuracy").unwrapped  # no early end at a threshold
    env.reset(seed=0)
    env.step(torch.ones(16))
    before = {k: v.detach().clone() for k, v in env.handle.params.items()}
    bad = torch.ones(16)
    bad[3] = float("nan")
    env.step(bad)  # step 2: nothing is read back here, so no error yet ...
    assert all(torch.equal(before[k], v) for k, v in env.handle.params.items()), "... but its update was skipped"
    env.step(torch.ones(16))
    env.step(torch.ones(16))
    t = env.t
    with pytest.raises(ValueError, match="the torch action at step 1 was not"):
        env.step(torch.ones(16))  # its update would end in an evaluation: the flags are read first
    assert env.t == t, "the reporting step changed nothing"
    env.step(torch.ones(16))  # the env goes on; the report is not repeated
    env.step(torch.ones(16))
    bad_now = torch.ones(16)
    bad_now[0] = 2.0
    for _ in range(3):
        env.step(torch.ones(16))
    with pytest.raises(ValueError, match="the torch action at step 9 was not"):
        env.step(bad_now)  # a bad action at an evaluating step is refused before anything changes
    assert env.t == 9


def test_a_non_finite_loss_changes_nothing_and_ends_the_episode_at_the_next_evaluation():
    env = make_tensor_env(eval_every=5).unwrapped
    env.reset(seed=0)
    env.step(torch.ones(16))
    params = env.handle.params
    with torch.no_grad():
        params["head.weight"][0, 0] = float("inf")  # the next batch's losses are not finite
    env.handle.refresh_batch()
    before = {k: v.detach().clone() for k, v in env.handle.params.items()}
    _, _, terminated, _, info = env.step(torch.ones(16))
    assert not terminated and not info["diverged"], "divergence is read at evaluations only"
    assert all(torch.equal(before[k], v) for k, v in env.handle.params.items()), "the update changed nothing"
    for _ in range(2):
        _, _, terminated, _, info = env.step(torch.ones(16))
    _, reward, terminated, _, info = env.step(torch.ones(16))  # step 5 evaluates
    assert terminated and info["diverged"] and reward == env.divergence_penalty


def test_a_pending_bad_action_and_divergence_survive_a_checkpoint():
    """A saved episode keeps the device-side flags not yet read, so a resumed run still reports them."""
    env = make_tensor_env(eval_every=5, reward="accuracy").unwrapped
    env.reset(seed=0)
    bad = torch.ones(16)
    bad[0] = -1.0
    env.step(bad)
    env.handle.diverged.fill_(True)  # as after a non-finite loss
    resumed = make_tensor_env(eval_every=5, reward="accuracy").unwrapped
    resumed.load_state_dict(env.state_dict())
    for _ in range(3):
        resumed.step(torch.ones(16))
    with pytest.raises(ValueError, match="the torch action at step 0 was not"):
        resumed.step(torch.ones(16))
    _, _, terminated, _, info = resumed.step(torch.ones(16))
    assert terminated and info["diverged"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: torch.cuda.set_sync_debug_mode")
@pytest.mark.parametrize(
    "agent,options", TEACHERS[:5], ids=["uniform", "meta_grad", "meta_grad-B1", "meta_grad-head", "meta_grad-layerwise"]
)
def test_on_a_gpu_a_teaching_step_never_synchronises(agent, options):
    env = make_tensor_env(device="cuda", horizon=40, eval_every=20)
    run = start(env, make_agent(agent, **options).to("cuda").train(agent != "uniform"), seed=0)
    teach(run, 4)
    torch.cuda.set_sync_debug_mode("error")
    try:
        teach(run, 12)
    finally:
        torch.cuda.set_sync_debug_mode("default")
