"""The typed contract between ``Teaching-v0`` and the teachers that differentiate through the student.

The env owns one ``StudentHandle`` for its whole life (``env.unwrapped.handle``) and keeps the
student's functional state in it: parameters, BatchNorm buffers, momentum, the current batch and
the last update taken. Teachers that need more than the Gym API receive the handle once
(``Teacher.attach(handle)``) and call only what is documented here; RL teachers never need it.

The graph-carrying weights of the B > 1 (``graph``) path are part of this contract: an action that
``requires_grad`` makes the env build its update differentiably, so ``params`` then carry the
teacher's graph until the teacher calls ``detach()``. So is ``traced_layers``: a teacher that names
some of the student's affine layers there gets, with each later update that is not differentiable,
those layers' inputs and the gradients at their outputs (``Transition.layers``), the makings of every
sample's gradient without a per-sample backward. The batch a forward has already taken is not
recorded, so the first update after the teacher names them (and each episode's first) has none.
Whether the records fit the student (``layerwise_fits``, the teacher's check) is kept with its state.
Everything else leaves the student's state untouched (BatchNorm statistics included).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from students.data import Dataset, Split, to_device
from students.functional import FunctionalStudent, Params, SGDConfig, sgd_update
from students.models import head_input

# modules whose output is an affine function of their parameters, computed sample by sample: for these the
# per-sample gradient of a loss is the layer's input times the gradient at its output (``LayerRecord``).
# Exact types: a subclass (weight standardisation, a parametrisation) need not be affine in its parameters.
AFFINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerRecord:
    """One call of an affine layer in a traced batch forward: the layer, its input, and (once the real
    update has back-propagated) the gradient of the update's weighted loss with respect to its output."""

    name: str  # the layer's module name (its parameters are name.weight, name.bias)
    module: nn.Module
    input: torch.Tensor
    output_grad: torch.Tensor | None = None


@dataclass(frozen=True)
class Transition:
    """What one real student update started from; a meta-gradient teacher replays it differentiably."""

    params: Params  # parameters before the update
    momentum: Params  # momentum buffers before the update
    indices: torch.Tensor  # the batch, as indices into the training split
    lr: float  # the learning rate the update used
    logits: torch.Tensor  # the batch's logits under ``params`` (from the real forward, detached)
    head_input: torch.Tensor  # the batch's last hidden state, the output layer's input (detached)
    layers: tuple[LayerRecord, ...] | None = None  # the affine layers' inputs and output gradients, when traced


class StudentHandle:
    """Differentiable access to the student an env trains (see the module docstring)."""

    def __init__(self, data: Dataset, pool: Split, corrupted: torch.Tensor, sgd: SGDConfig):
        """:param pool: what the student trains on, with the labels it is given (batch indices index it);
        :param corrupted: which of those labels are wrong (diagnostics only)."""
        self.data, self.pool, self.corrupted, self.sgd = data, pool, corrupted, sgd
        self.student: FunctionalStudent | None = None
        self.params: Params = {}
        self.buffers: Params = {}
        self.momentum: Params = {}
        self.batch_indices: torch.Tensor | None = None  # the batch the next update will take
        self.batch_losses: torch.Tensor | None = None  # its per-sample losses, with the graph to ``params``
        self.batch_outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # its (logits, head input), detached
        # the clean validation loss's gradient with respect to the output layer at the current parameters, when
        # a teacher took it (kept here, with what it describes, until the next update; saved with the state)
        self.val_head_grad: Params | None = None
        # which parameters a differentiable update keeps the graph for (None: all); a teacher whose
        # meta-gradient goes through some layers only sets it, and the others' updates stay fixed
        self.differentiable_params: frozenset[str] | None = None
        # the affine layers (module names) whose inputs and output gradients a teacher reads from the real
        # update (``Transition.layers``): batch forwards record them; None records nothing; cleared with every student
        self.traced_layers: frozenset[str] | None = None
        # whether those layers' records gave this student's per-sample inner products (checked once against the JVP by
        # the teacher that reads them; None: not yet)
        self.layerwise_fits: bool | None = None
        self.batch_layers: list[LayerRecord] | None = None
        self.last_transition: Transition | None = None
        self.lr_now = sgd.lr  # learning rate of the next update (the env sets it as its schedule advances)
        # set on the device when an update met a non-finite loss (the student diverged); read at evaluations,
        # so that a step never waits for the device
        self.diverged = torch.zeros((), dtype=torch.bool, device=pool.y.device)
        self._val_generator = torch.Generator()

    def start(self, student: FunctionalStudent, val_seed: int) -> None:
        """A fresh student: initial parameters, zero momentum, validation batches reseeded."""
        self.student = student
        params, self.buffers = student.initial_state()
        self.params = {n: p.requires_grad_() for n, p in params.items()}
        self.momentum = {n: torch.zeros_like(p) for n, p in params.items()}
        self.batch_indices, self.batch_losses, self.batch_outputs, self.last_transition = None, None, None, None
        self.val_head_grad = None
        self.diverged = torch.zeros_like(self.diverged)
        self.differentiable_params, self.traced_layers, self.batch_layers, self.layerwise_fits = None, None, None, None
        self._val_generator.manual_seed(val_seed)

    # ------------------------------------------------------------------ what the env does with it
    def forward_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Forward the batch ``indices`` (train mode; BatchNorm statistics advance, as in real training)
        and keep its per-sample losses for the update; returns (logits, hidden states, given labels)."""
        self.batch_indices = indices
        return self._forward_losses(self.buffers)

    def refresh_batch(self) -> None:
        """Recompute the current batch's losses and outputs from ``params`` (after they lost their
        autograd history, or were restored), leaving the BatchNorm statistics untouched."""
        self._forward_losses({n: b.clone() for n, b in self.buffers.items()})

    def _forward_losses(self, buffers: Params) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Forward the current batch under ``params`` and keep its losses and outputs for the update."""
        x, y = self.pool.x[self.batch_indices], self.pool.y[self.batch_indices]
        self.batch_layers = None if self.traced_layers is None else []
        with recording_layers(self.student.model, self.traced_layers, self.batch_layers):
            logits, hidden = self.student.forward(self.params, buffers, x, train=True)
        self.batch_losses = F.cross_entropy(logits, y, reduction="none")
        self.batch_outputs = (logits.detach(), head_input(hidden).detach())
        return logits, hidden, y

    def update(self, weights: torch.Tensor, differentiable: bool, valid: torch.Tensor | None = None) -> None:
        """The real update on the weighted mean loss of the current batch. With ``differentiable`` the
        new parameters keep the graph to ``weights`` (until ``detach``). An update whose loss is not
        finite, or whose weights are not ``valid`` (a device-side verdict on the action), changes
        nothing; a non-finite loss also sets ``diverged``. Nothing here waits for the device."""
        loss = FunctionalStudent.weighted_loss(self.batch_losses, weights)
        finite = torch.isfinite(loss)
        apply = finite if valid is None else finite & valid
        self.diverged |= ~finite if valid is None else ~finite & valid  # a bad action is the teacher's fault
        if differentiable:  # records of a differentiable update would hold its graph, and no one reads them
            self.batch_layers = None
        grads = torch.autograd.grad(loss, list(self.params.values()), create_graph=differentiable)
        layers = None if self.batch_layers is None else tuple(self.batch_layers)
        self.last_transition = Transition(
            self.params, self.momentum, self.batch_indices, self.lr_now, *self.batch_outputs, layers
        )
        with torch.set_grad_enabled(differentiable):
            params, momentum = sgd_update(self.params, self.momentum, dict(zip(self.params, grads)), self.lr_now, self.sgd)
            params = {n: torch.where(apply, p, self.params[n]) for n, p in params.items()}
            momentum = {n: torch.where(apply, m, self.momentum[n]) for n, m in momentum.items()}
        keep = self.differentiable_params if differentiable else frozenset()
        self.params = {n: p if keep is None or n in keep else p.detach().requires_grad_() for n, p in params.items()}
        self.momentum = {n: m if keep is None or n in keep else m.detach() for n, m in momentum.items()}
        self.batch_losses, self.val_head_grad, self.batch_layers = None, None, None

    # ------------------------------------------------------------------ what teachers may call
    def detach(self) -> None:
        """Cut the autograd history that differentiable updates left on the student's state (after a
        teacher back-propagated through them); the current batch's losses are recomputed from the
        detached parameters (BatchNorm statistics untouched)."""
        self.params = {n: p.detach().requires_grad_() for n, p in self.params.items()}
        self.momentum = {n: m.detach() for n, m in self.momentum.items()}
        if self.batch_losses is not None:
            self.refresh_batch()

    def per_sample_losses(self, params: Params, indices: torch.Tensor) -> torch.Tensor:
        """Training losses of the samples ``indices`` under ``params`` (train mode, so BatchNorm uses
        batch statistics; the running statistics are left untouched)."""
        return self.student.per_sample_losses(params, self.buffers, self.pool.x[indices], self.pool.y[indices])

    def replay_update(
        self, transition: Transition, params: Params, momentum: Params, weights: torch.Tensor, create_graph: bool
    ) -> tuple[Params, Params]:
        """The update of ``transition`` applied to ``params``/``momentum`` with ``weights``, as a
        differentiable function (the same operations as the real update)."""
        loss = FunctionalStudent.weighted_loss(self.per_sample_losses(params, transition.indices), weights)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        return sgd_update(params, momentum, dict(zip(params, grads)), transition.lr, self.sgd)

    def val_indices(self, size: int) -> torch.Tensor:
        """A random batch of ``size`` clean validation indices (reseeded with every new student)."""
        size = min(size, len(self.data.val))
        return to_device(torch.randperm(len(self.data.val), generator=self._val_generator)[:size], self.data.val.y.device)

    def val_loss(self, params: Params, indices: torch.Tensor) -> torch.Tensor:
        """Mean clean validation loss of ``indices`` under ``params`` (train mode, buffers untouched)."""
        return self.student.per_sample_losses(params, self.buffers, self.data.val.x[indices], self.data.val.y[indices]).mean()

    def val_outputs(self, params: Params, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, head input) of the validation samples ``indices`` under ``params`` (train mode,
        buffers untouched), for meta-gradients through the output layer alone."""
        scratch = {n: b.clone() for n, b in self.buffers.items()}
        logits, hidden = self.student.forward(params, scratch, self.data.val.x[indices], train=True)
        return logits, head_input(hidden)

    def corrupted_in_batch(self) -> torch.Tensor:
        """Which given labels of the current batch are wrong. A diagnostic: only the ``oracle``
        reference reads it, never a teacher."""
        return self.corrupted[self.batch_indices]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The student's state as CPU tensors."""
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}
        return {
            "params": cpu(self.params), "buffers": cpu(self.buffers), "momentum": cpu(self.momentum),
            "val_generator": self._val_generator.get_state(), "batch_indices": self.batch_indices.cpu(),
            "diverged": self.diverged.cpu(),
            **({"val_head_grad": cpu(self.val_head_grad)} if self.val_head_grad is not None else {}),
            **({"traced_layers": sorted(self.traced_layers)} if self.traced_layers is not None else {}),
            **({"layerwise_fits": self.layerwise_fits} if self.layerwise_fits is not None else {}),
        }  # fmt: skip

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore ``state_dict``; the current batch's losses are recomputed without touching the
        saved BatchNorm statistics (which already saw that batch)."""
        to = lambda d: {k: v.to(device) for k, v in d.items()}
        self.params = {k: v.requires_grad_() for k, v in to(state["params"]).items()}
        self.buffers, self.momentum = to(state["buffers"]), to(state["momentum"])
        self._val_generator.set_state(state["val_generator"])
        self.batch_indices, self.last_transition = state["batch_indices"].to(device), None
        # a divergence not yet read at an evaluation (absent from states saved before it was kept)
        self.diverged = state.get("diverged", torch.zeros((), dtype=torch.bool)).to(device)
        self.val_head_grad = to(state["val_head_grad"]) if "val_head_grad" in state else None
        # the current batch is recorded again, so that the next update has the records it had before the checkpoint
        self.traced_layers = frozenset(state["traced_layers"]) if "traced_layers" in state else None
        self.layerwise_fits = state.get("layerwise_fits")
        self.refresh_batch()


@contextmanager
def recording_layers(model: nn.Module, names: frozenset[str] | None, records: list[LayerRecord] | None) -> Iterator[None]:
    """Within the block, each call of one of ``model``'s affine layers named in ``names`` appends a
    ``LayerRecord`` to ``records`` (its output gradient filled in by the next backward through it);
    nothing when ``records`` is None."""
    if records is None:
        yield
        return

    def record(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        entry = LayerRecord(name, module, inputs[0].detach())
        records.append(entry)
        if output.requires_grad:
            output.register_hook(lambda grad: setattr(entry, "output_grad", grad))

    hooks = [
        module.register_forward_hook(partial(record, name))
        for name, module in model.named_modules()
        if name in names and type(module) in AFFINE_LAYERS
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
