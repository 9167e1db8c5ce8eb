"""L2T-DIN meta-gradient teachers (Fan et al. 2020), with Meta-Weight-Net and Learning-to-Reweight
as special cases.

A teacher network reads each sample's internal-state and surface features (plus the broadcast
global features) and gives it a weight in (0, 1). It learns jointly with the student: every
``unroll`` = B real student updates, it takes the exact gradient of the clean validation loss
after those updates with respect to its own parameters, through the updates themselves (momentum
SGD and weight decay as the env applied them), then an Adam step. The observation features are
inputs, not differentiated through (as in Meta-Weight-Net).

B = 1 needs no double backward (method ``jvp``): with theta' = update(theta, w), dL_val/dw_i is a
linear function of the inner products <grad L_val(theta'), grad l_i(theta)> (see
``weight_gradient``), and those n inner products are one forward-mode JVP of the per-sample losses
along grad L_val(theta'). Method ``layerwise`` gets them without the JVP, from what the real update
already computed: for a layer z = f(a; W, b) affine in its parameters and computed sample by sample
(``nn.Linear``, ``nn.Conv*``), sample i's gradient paired with a direction (G_W, G_b) is
<dl_i/dz_i, f(a_i; G_W, G_b)>, one forward of the layer with the direction as its parameters, whose
input and output gradient the env recorded during the real step (``Transition.layers``). Students
with BatchNorm (which mixes the samples of a batch) or layers of other kinds take the JVP instead,
and the closed form is checked against the JVP on each student's first traced update. ``auto``
keeps the JVP at B = 1, so that the committed B = 1 runs reproduce bit for bit (the two differ by
float rounding only). B > 1 (method ``graph``) hands the env weights that carry their graph, so
the real updates are built differentiably (``create_graph``) and the validation loss back-propagates
through them directly; ``replay`` instead recomputes the B updates from their recorded starting
points (the straightforward reference both fast paths are tested against).

``meta_layers`` restricts the meta-gradient to the student's last layers (as FaMUS, Xu et al. 2021):
the teacher then gets the exact gradient of L_val through an update in which only those layers
depend on the weights, the other layers' update counting as fixed. ``head`` (the output layer) is
the cheap case: its per-sample gradients are e_i [h_i, 1] (e_i = softmax - one-hot, h_i the head's
input), so the alignments come in closed form from the logits and hidden states the real forward
already computed, plus one validation forward (``head_alignment``): B = 1 costs little more than
the real step.

Defaults, chosen as ``--tune`` chooses, by the mean best accuracy on the held-out selection split,
on tuning students (seeds 1000-1004, never reported; ``suites/defaults_mnist1d.yaml`` and
``suites/defaults_digits.yaml``, student lr 0.1 and 0.03):

- ``alignment`` (on): one more input per sample, the cosine between its output-layer gradient and
  the clean validation loss's at the current parameters (the signal Learning to Reweight acts on,
  made scale-free); the teacher learns what to make of it together with the other features. At B = 1
  the last meta step has already taken that validation gradient, so it costs no extra forward; at
  B > 1 each action takes one validation forward for it.
  Held-out accuracy with and without it (both at teacher_lr 0.03 and B = 1): mnist1d pair-flip
  62.1 / 57.1, symmetric 59.4 / 59.0; digits pair-flip 96.0 / 91.4, symmetric 96.8 / 95.8. Its
  final test accuracy is higher on pair-flip (60.6 / 53.4, 93.8 / 90.9) but lower on symmetric
  noise (54.2 / 58.5, 89.6 / 92.3): there its students end less steadily. The suites tune lr and
  teacher_lr per setting, not this switch.
- ``teacher_lr`` 0.03 (with the alignment input, at B = 1): mean held-out accuracy 78.6 against 77.7
  for 0.01, the two values compared here. The suites tune it over {0.001, 0.003, 0.01, 0.03} on one
  tuning seed per setting; at B = 5 they chose, for the best held-out accuracy, 0.001, 0.003, 0.01,
  0.01 and 0.003, for the final one 0.003, 0.003, 0.01, 0.01 and 0.003 (mnist1d symmetric,
  pair-flip; digits symmetric, pair-flip; MNIST; ``docs/results.md``), often by a tie.
- ``unroll`` 5: on the same tuning students (both yamls with ``--agents meta_grad,meta_grad@B1
  --agent-options '{meta_grad@B1: {unroll: 1}}'``) B = 5's mean best held-out accuracy is 80.3 against
  78.6 for B = 1 (mnist1d symmetric 64.4 / 59.4, pair-flip 64.5 / 62.1; digits 97.2 / 96.8, 95.2 /
  96.0); it ends with final held-out accuracy on symmetric noise 60.0 against 52.3 (mnist1d) and 95.8
  against 89.2 (digits), level on pair-flip (59.6 / 59.8, 91.8 / 92.0), with higher AUROC in all four
  (e.g. 0.98 against 0.87 on digits / symmetric), at 1.0x to 1.2x B = 1's cost per student update
  (``benchmarks/teach_step.py`` as committed in ef51852: 6.54x against 6.39x a plain step on mlp /
  mnist1d, 4.15x against 3.38x on cnn / MNIST): one meta step every five updates through all five of them, instead
  of one through each. B = 1 (``jvp``, no double backward) stays the cheap path for ``--meta-layers
  head``; the layers suites pass ``unroll: 1``. The transfer search, run at B = 1 before this default
  changed, tries B = 5 in its last two coordinates, and every transfer teacher is now pre-trained at B = 5
  with these defaults and a teacher_lr of 0.001 or 0.003.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from agents.base import Teacher, as_tensor_obs
from envs.observation import GLOBAL_FEATURES, INTERNAL_FEATURES, SAMPLE_FEATURES
from runconfig import field
from students.functional import WEIGHT_SUM_EPS, Params, parameter_layers, sgd_update
from students.handle import AFFINE_LAYERS, StudentHandle, Transition
from students.models import head_input, make_student

# PyTorch's own forward-AD decompositions call the deprecated torch.jit.script on first use; the
# warning is about PyTorch internals, not about anything a user of this package can change.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

FEATURE_SETS = ("all", "local", "surface", "loss")  # agents.base.INTERNAL_INPUTS: those that read internal states
# the teacher network's hidden activation; a leaky one keeps a unit that a large step pushed below zero for
# every input able to recover (with plain ReLU it is dead for good)
ACTIVATIONS = {"relu": F.relu, "leaky_relu": F.leaky_relu}
METHODS = ("auto", "jvp", "layerwise", "graph", "replay")
ONE_STEP_METHODS = ("jvp", "layerwise")  # the B = 1 meta-gradient from inner products, no double backward
ALIGNMENT_HELP = (
    "one more input per sample: the cosine between its output-layer gradient and the clean validation loss's "
    "(needs a student whose output layer is an nn.Linear named head, as the built-in ones)"
)
HEAD = ("head.weight", "head.bias")
META_LAYERS_HELP = (
    "student layers the meta-gradient goes through: all, head (the output layer) or last:k (the last k modules "
    "with parameters, BatchNorm's included); the other layers' update counts as fixed. head is closed-form "
    "(little more than the real step) at unroll 1 only"
)


def parse_meta_layers(spec: str) -> int | None:
    """How many of the student's last layers ``spec`` names (None: all of them)."""
    if spec == "all":
        return None
    if spec == "head":
        return 1
    prefix, _, count = spec.partition(":")
    if prefix == "last" and count.isdigit() and int(count) >= 1:
        return int(count)
    raise ValueError(f"meta_layers must be all, head or last:k with an integer k >= 1, got {spec!r}")


def meta_parameters(params: Params, spec: str) -> frozenset[str] | None:
    """Names of the student parameters the meta-gradient goes through under ``spec`` (None: all)."""
    count = parse_meta_layers(spec)
    if count is None:
        return None
    if spec == "head" and any(name.startswith("head.") for name in params):  # the built-in students name it
        return frozenset(name for name in params if name.startswith("head."))
    layers = parameter_layers(params)
    if count > len(layers):
        raise ValueError(
            f"meta_layers {spec!r} asks for {count} layers, but the student has {len(layers)} layers with parameters"
        )
    return frozenset(name for layer in layers[-count:] for name in layer)


def teacher_inputs(obs: dict[str, torch.Tensor], features: str) -> torch.Tensor:
    """Per-sample input rows (..., batch, in_dim), also for stacked observations: ``all`` = samples + internal + global,
    ``local`` = samples + internal (no training-progress features, whose values differ between datasets), ``surface`` =
    samples + global, ``loss`` = the loss alone (Meta-Weight-Net's input)."""
    samples = obs["samples"]
    if features == "loss":
        return samples[..., :1]
    if features == "local":
        return torch.cat([samples, obs["internal"]], -1)
    broadcast = obs["global"].unsqueeze(-2).expand(*samples.shape[:-1], -1)
    parts = [samples, obs["internal"], broadcast] if features == "all" else [samples, broadcast]
    return torch.cat(parts, -1)


def standardised_within_batch(rows: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """``rows`` (..., batch, in_dim) with the columns where ``per_sample`` (in_dim,) is True centred on their
    batch mean and divided by their batch standard deviation (a column constant over the batch becomes 0);
    the others (the broadcast global features) unchanged."""
    centred = rows - rows.mean(-2, keepdim=True)
    scaled = centred / (centred.square().mean(-2, keepdim=True).sqrt() + 1e-6)
    return torch.where(per_sample, scaled, rows)


def input_size(features: str) -> int:
    """Width of the rows ``teacher_inputs`` builds for ``features``."""
    sizes = {
        "loss": 1,
        "local": len(SAMPLE_FEATURES) + len(INTERNAL_FEATURES),
        "surface": len(SAMPLE_FEATURES) + len(GLOBAL_FEATURES),
    }
    return sizes.get(features, len(SAMPLE_FEATURES) + len(INTERNAL_FEATURES) + len(GLOBAL_FEATURES))


class WeightNet(nn.Module):
    """Per-sample MLP -> logit -> sigmoid weight; with ``context``, each hidden row also sees the
    batch mean of the hidden rows (a permutation-invariant view of the whole batch).

    The env normalises weights by their sum, so only their ratios matter; the logits are therefore
    centred on the batch mean plus a fixed offset (logit of ``init_weight``). That removes the one
    direction the meta-gradient cannot see, which otherwise drifts the sigmoid into saturation.
    """

    def __init__(self, in_dim: int, hidden: int, layers: int, context: bool, init_weight: float, activation: str = "relu"):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        dims = [in_dim] + [hidden] * layers
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.context = nn.Linear(hidden, hidden) if context else None
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.offset = float(torch.logit(torch.tensor(init_weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.body:
            h = self.activation(layer(h))
        if self.context is not None:
            h = self.activation(h + self.context(h.mean(0, keepdim=True)))
        logits = self.out(h).squeeze(1)
        return torch.sigmoid(logits - logits.mean() + self.offset)


@dataclass
class MetaGradOptions:
    """Options of the L2T-DIN teacher (``meta_grad``)."""

    features: str = field(
        "all",
        "teacher inputs: all = per-sample surface + internal + global, local = per-sample surface + internal, surface = "
        "per-sample surface + global, or loss alone",
        choices=list(FEATURE_SETS),
    )
    hidden: int = field(64, "hidden units of the teacher network", low=1)
    layers: int = field(2, "hidden layers of the teacher network", low=1)
    context: bool = field(True, "each sample's hidden row also sees the batch mean of the hidden rows")
    unroll: int = field(5, "real student updates B the meta-gradient goes through", low=1)
    teacher_lr: float = field(0.03, "teacher learning rate (Adam)", above=0.0)
    meta_weight_decay: float = field(1e-4, "teacher weight decay (decoupled, AdamW)", low=0.0)
    val_batch: int = field(256, "clean validation samples per meta-gradient", low=1)
    method: str = field(
        "auto",
        "meta-gradient path: auto (jvp for B = 1, else graph), jvp, layerwise (B = 1: the per-sample inner products from "
        "the real step's per-layer inputs and output gradients, no JVP), graph, replay",
        choices=list(METHODS),
    )
    meta_layers: str = field("all", META_LAYERS_HELP)
    init_weight: float = field(0.9, "initial weight of every sample", above=0.0, below=1.0)
    alignment: bool = field(True, ALIGNMENT_HELP)
    standardise: bool = field(
        False,
        "each per-sample input standardised over its batch (the global ones as they are): the teacher reads where a "
        "sample stands in its batch, not raw values, whose scale differs between datasets and students",
    )
    activation: str = field("relu", "hidden activation of the teacher network", choices=list(ACTIVATIONS))
    seed: int = field(0, "seeds the teacher network's initialisation", low=0)


class MetaGradTeacher(Teacher):
    """L2T-DIN: weights from internal + surface features and each sample's alignment with the clean
    validation gradient, trained by exact meta-gradients through the last ``unroll`` real student updates."""

    reads_internal = "features"
    # teachers (and run keys) from before the alignment input and the activation and standardise options existed
    legacy_options = {"alignment": False, "activation": "relu", "standardise": False}

    name = "meta_grad"
    kind = "online"
    Options = MetaGradOptions
    needs_handle = True

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.hp = self.network_options()
        if self.hp.method in ONE_STEP_METHODS and self.hp.unroll != 1:
            raise ValueError(
                f"method {self.hp.method!r} computes the one-step (B = 1) meta-gradient, and unroll is {self.hp.unroll} "
                f"(meta_grad's default is {MetaGradOptions().unroll}): pass unroll 1 with it, or method 'graph', "
                "'replay' or 'auto'"
            )
        parse_meta_layers(self.hp.meta_layers)  # refuse a malformed spec now, not at the first meta step
        self._layers: tuple[tuple[str, ...], frozenset[str] | None] | None = None  # (student's names, chosen)
        self._head_checked: tuple[Any, bool] = (None, False)  # (student, whether head_alignment applies to it)
        self._traced: tuple[Any, frozenset[str] | None] = (None, None)  # (student, the layers layerwise records on it)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hp.seed)
            self.net = WeightNet(
                input_size(self.hp.features) + self.hp.alignment,
                self.hp.hidden,
                self.hp.layers,
                self.hp.context,
                self.hp.init_weight,
                self.hp.activation,
            )
        # decoupled weight decay: meta-gradients are tiny (they carry lr / sum(w) factors), so an L2 term
        # inside Adam's normalisation would outweigh them and shrink the teacher to its initial
        # constant weights (measured: a pre-trained teacher collapsed to all-0.9 weights)
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=self.hp.teacher_lr, weight_decay=self.hp.meta_weight_decay, fused=True
        )
        self.device = torch.device("cpu")
        self._window: deque[tuple[Transition, torch.Tensor]] = deque()
        self._pending: torch.Tensor | None = None

    def network_options(self) -> MetaGradOptions:
        """Every setting of the teacher network and its meta-gradient (special cases fix some)."""
        return self.options

    @property
    def method(self) -> str:
        chosen = self.hp.method
        return ("jvp" if self.hp.unroll == 1 else "graph") if chosen == "auto" else chosen

    def meta_layers(self) -> frozenset[str] | None:
        """The student parameters the meta-gradient goes through (None: all), resolved on the
        attached student."""
        names = tuple(self.handle.params)
        if self._layers is None or self._layers[0] != names:
            self._layers = (names, meta_parameters(self.handle.params, self.hp.meta_layers))
        return self._layers[1]

    def head_closed_form(self, transition: Transition) -> bool:
        """Whether the meta-gradient goes through the output layer alone and that layer is an
        ``nn.Linear`` named ``head`` fed by the last hidden state (the built-in students), so that
        ``head_alignment`` applies. The last premise is checked once per student, on the real
        forward's own numbers (one host read per student); a student that breaks it gets the
        generic path, which is exact for any student."""
        head = getattr(self.handle.student.model, "head", None)
        if not isinstance(head, nn.Linear) or head.bias is None or self.meta_layers() != {"head.weight", "head.bias"}:
            return False
        if self._head_checked[0] is not self.handle.student:
            params = transition.params
            fits = head_reads_last_hidden(transition.logits, transition.head_input, params["head.weight"], params["head.bias"])
            if not fits:
                warnings.warn(
                    "the student's last hidden state is not its head's input: meta_layers 'head' takes the generic path",
                    stacklevel=3,
                )
            self._head_checked = (self.handle.student, fits)
        return self._head_checked[1]

    def check_env(self, env: Any) -> None:
        """Also refuse, before anything trains, ``meta_layers`` asking for more layers than the env's
        student has, and ``alignment`` on a student whose last hidden state does not feed an
        ``nn.Linear`` named ``head`` (checked on a forward of two training samples)."""
        super().check_env(env)
        u = env.unwrapped
        student = make_student(u.student_name, u.data.input_shape, u.data.num_classes, **u.student_kwargs)
        meta_parameters(dict(student.named_parameters()), self.hp.meta_layers)
        if self.hp.alignment:
            head = getattr(student, "head", None)
            fits = isinstance(head, nn.Linear) and head.bias is not None
            if fits:
                with torch.no_grad():
                    logits, hidden = student.to(u.device, u.dtype)(u.data.train.x[:2])
                fits = head_reads_last_hidden(logits, head_input(hidden), head.weight, head.bias)
            if not fits:
                raise ValueError(
                    f"alignment needs a student whose last hidden state feeds an nn.Linear named head; "
                    f"{u.student_name!r} does not: pass alignment false"
                )

    def to(self, device: torch.device | str) -> MetaGradTeacher:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    # ------------------------------------------------------------------ acting
    def weights(self, obs: dict) -> torch.Tensor:
        """Weights as a differentiable function of the teacher's parameters; with ``alignment``,
        ``obs`` carries the ``alignment`` entry that ``with_alignment`` adds."""
        obs = as_tensor_obs(obs, self.device)
        inputs = teacher_inputs(obs, self.hp.features)
        if self.hp.alignment:
            inputs = torch.cat([inputs, obs["alignment"].to(inputs.dtype)[:, None]], 1)
        if self.hp.standardise:
            inputs = standardised_within_batch(inputs, self.per_sample_columns(inputs.device))
        return self.net(inputs.to(self.net.out.weight.dtype))

    def per_sample_columns(self, device: torch.device) -> torch.Tensor:
        """Which columns of the teacher's input rows vary between samples: all but the broadcast global
        features (which ``teacher_inputs`` puts after the per-sample ones, before the alignment input)."""
        width = input_size(self.hp.features)
        columns = torch.ones(width + self.hp.alignment, dtype=torch.bool, device=device)
        columns[width - (0 if self.hp.features in ("loss", "local") else len(GLOBAL_FEATURES)) : width] = False
        return columns

    def with_alignment(self, obs: dict) -> dict:
        """``obs`` with, when the teacher reads it and ``obs`` lacks it, the ``alignment`` entry of the
        batch it shows (the student's current batch)."""
        if not self.hp.alignment or "alignment" in obs:
            return obs
        return {**as_tensor_obs(obs, self.device), "alignment": self.alignment_input().to(self.device)}

    def alignment_input(self) -> torch.Tensor:
        """(batch,): the cosine between each current sample's output-layer gradient and the clean
        validation loss's, at the student's current parameters. A B = 1 meta step has already left
        that validation gradient on the handle (``val_head_grad``); otherwise one validation forward."""
        handle = self.handle
        if handle is None:
            raise RuntimeError(f"{self.name} with alignment reads the student: call teacher.attach(env.unwrapped.handle) first")
        if handle.val_head_grad is None:
            handle.val_head_grad, _ = head_validation_gradient(handle, handle.params, handle.val_indices(self.hp.val_batch))
        logits, hidden = handle.batch_outputs
        return head_gradient_cosine(output_errors(logits, handle.pool.y[handle.batch_indices]), hidden, handle.val_head_grad)

    def act(self, obs: dict) -> torch.Tensor:
        if not self.training:
            if self.method == "layerwise" and self.handle is not None:  # a frozen teacher reads no records
                self.handle.traced_layers = None
            with torch.no_grad():
                return self.weights(self.with_alignment(obs))
        self._pending = self.weights(self.with_alignment(obs))
        if self.method == "layerwise" and self.handle is not None:  # the env records the next batch's layers
            self.handle.traced_layers = self.layers_to_trace()
        if self.method != "graph":
            return self._pending.detach()
        if self.handle is not None:  # the env keeps the graph of these layers' updates only
            self.handle.differentiable_params = self.meta_layers()
        return self._pending

    # ------------------------------------------------------------------ learning
    def observe(self, reward: float, done: bool, info: dict) -> dict[str, torch.Tensor]:
        """Queue the update just taken; every B updates (and at episode end) take a meta step."""
        if not self.training or self._pending is None:
            return {}
        if self.handle is None:
            raise RuntimeError(f"{self.name} learns through the student: call teacher.attach(env.unwrapped.handle) first")
        weights, self._pending = self._pending, None
        if info.get("diverged"):
            self._window.clear()
            self.handle.detach()
            return {}
        self._window.append((self.handle.last_transition, weights))
        if len(self._window) < self.hp.unroll and not done:
            return {}
        return self.meta_step()

    def meta_step(self) -> dict[str, torch.Tensor]:
        """One AdamW step on the teacher from the queued updates; returns the validation loss (device
        tensors: nothing here waits for the device). A non-finite meta-gradient (a diverging student
        gives no usable signal) skips the step, through the fused optimizer's ``found_inf`` flag."""
        val_loss, grads = self.meta_gradient()
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        for p, g in zip(self.net.parameters(), grads):
            p.grad = g
        self.optimizer.found_inf = (~finite).float()  # read by the fused kernel, as torch.amp.GradScaler does
        self.optimizer.step()
        return {"meta_loss": val_loss, "meta_skipped": self.optimizer.found_inf}

    def meta_gradient(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(L_val after the queued updates, its gradient with respect to the teacher's parameters);
        empties the queue (and, for ``graph``, cuts the student's autograd history)."""
        handle = self.handle
        transitions, weights = zip(*self._window)
        self._window.clear()
        val_indices = handle.val_indices(self.hp.val_batch)
        params = list(self.net.parameters())
        layers = self.meta_layers()
        if self.method in ONE_STEP_METHODS and len(transitions) == 1:
            last = transitions[0]
            inner, val_loss, val_grad = self.one_step_alignment(last, weights[0].detach(), val_indices, layers)
            if self.hp.alignment and all(n in val_grad for n in HEAD):  # at the current parameters: the next input's
                handle.val_head_grad = {n: val_grad[n] for n in HEAD}
            weight_grad = weight_gradient(inner, weights[0].detach(), last.lr)
            grads = torch.autograd.grad(weights[0], params, grad_outputs=weight_grad, allow_unused=True)
        elif self.method == "graph":  # the env's params carry the graph of the B weighted updates (handle contract)
            val_loss = handle.val_loss(handle.params, val_indices)
            grads = torch.autograd.grad(val_loss, params, allow_unused=True)
            handle.detach()
        else:
            val_loss = unrolled_val_loss(handle, transitions, weights, val_indices, layers)
            grads = torch.autograd.grad(val_loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return val_loss.detach(), grads

    def layers_to_trace(self) -> frozenset[str] | None:
        """The attached student's affine layers whose records ``layerwise`` reads (module names), or None where
        it does not apply: the output layer's closed form is taken instead (once its premise is checked), the
        student normalises over the batch, a parameter the meta-gradient goes through is not in an affine layer
        of its own (warned once per student), or the closed form failed its check on this student."""
        student = self.handle.student
        if self.handle.layerwise_fits is False:
            return None
        if self._head_checked == (student, True) and self.meta_layers() == set(HEAD):  # the closed form needs none
            return None
        if self._traced[0] is not student:
            self._traced = (student, affine_layers_covering(student.model, self.meta_layers()))
        return self._traced[1]

    def one_step_alignment(
        self, last: Transition, weights: torch.Tensor, val_indices: torch.Tensor, layers: frozenset[str] | None
    ) -> tuple[torch.Tensor, torch.Tensor, Params]:
        """(a, L_val(after), grad L_val(after)) for the B = 1 update ``last``, by the cheapest exact path the
        student allows: the output layer's closed form, the per-layer one (``layerwise``), or the JVP. The
        per-layer form is checked against the JVP on each student's first traced update (three host reads, once
        per student); a student it does not fit (one whose layers mix samples) gets the JVP, with a warning."""
        handle = self.handle
        if self.head_closed_form(last):
            return head_alignment(handle, last, handle.params, val_indices)

        def by_jvp() -> tuple[torch.Tensor, torch.Tensor, Params]:
            return validation_alignment(handle, last.params, handle.params, last.indices, val_indices, layers)

        if self.method == "layerwise" and handle.layerwise_fits is not False and last.layers:
            if not records_cover(last, handle.params, layers):  # a recorded layer not called, or not per sample
                warnings.warn(
                    "method 'layerwise' found no per-sample records of every layer the meta-gradient goes through on "
                    "this student: it takes the JVP",
                    stacklevel=3,
                )
                handle.layerwise_fits = False
                return by_jvp()
            fast = layerwise_alignment(handle, last, weights, handle.params, val_indices, layers)
            if handle.layerwise_fits:
                return fast
            _, val_loss, direction = fast  # the check's JVP runs along the validation gradient the fast path took
            reference = inner_products_by_jvp(handle, last.params, last.indices, direction)
            exact = (reference, val_loss, direction)
            if not bool(torch.isfinite(reference).all()):  # a diverging student tells nothing: check a later update
                return exact
            # a sample of no share needs no alignment (the closed form gives it 0): compared elsewhere
            candidate = torch.where(weight_shares(weights.to(reference.dtype)) > 0, fast[0], reference)
            fits = torch.allclose(candidate, reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()))
            if not fits:
                warnings.warn(
                    "the per-layer inner products of method 'layerwise' differ from the JVP's on this student (do its "
                    "layers mix the samples of a batch?): it takes the JVP",
                    stacklevel=3,
                )
            handle.layerwise_fits = fits  # kept with the student's state (and its checkpoints)
            return fast if fits else exact
        return by_jvp()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


def head_reads_last_hidden(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether ``logits`` are the output layer (``weight``, ``bias``) applied to the last hidden state
    ``hidden``, to float32 rounding: the premise of the closed-form output-layer gradients (``head_alignment``
    and the alignment input). One read back to the host; checked once per student."""
    with torch.no_grad():
        recomputed = F.linear(hidden, weight, bias)
    return torch.allclose(recomputed, logits, rtol=1e-4, atol=1e-5 * float(logits.abs().max()))


def weight_gradient(inner: torch.Tensor, weights: torch.Tensor, lr: float) -> torch.Tensor:
    """dL_val/dw for one update of learning rate ``lr`` taken with ``weights``, from the alignments
    ``inner`` (a_i = <grad L_val(after), grad l_i(before)>, over the layers the update is taken through).

    The update minimised L = sum_j w_j l_j / S with S = sum_j w_j, so dL_val/dw_i =
    -(lr / S) (a_i - sum_j w_j a_j / S); where S is below the clamp of the weighted mean, the
    denominator is a constant and dL_val/dw_i = -(lr / eps) a_i. No host sync either way.
    """
    total = weights.sum()
    clamped = total.clamp(min=WEIGHT_SUM_EPS)
    centred = -(lr / clamped) * (inner - (weights * inner).sum() / clamped)
    return torch.where(total > WEIGHT_SUM_EPS, centred, -(lr / WEIGHT_SUM_EPS) * inner)


def validation_alignment(
    handle: StudentHandle,
    before: Params,
    after: Params,
    indices: torch.Tensor,
    val_indices: torch.Tensor,
    layers: frozenset[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Params]:
    """(a, L_val(after), grad L_val(after)) with a_i = <grad L_val(after), grad l_i(before)> for the
    samples ``indices``, from one forward-mode JVP of the per-sample losses (no double backward);
    with ``layers``, both gradients are taken with respect to those parameters only."""
    val_loss, direction = validation_gradient(handle, after, val_indices, layers)
    return inner_products_by_jvp(handle, before, indices, direction), val_loss, direction


def inner_products_by_jvp(handle: StudentHandle, before: Params, indices: torch.Tensor, direction: Params) -> torch.Tensor:
    """<direction, grad l_i(before)> for the samples ``indices``: one forward-mode JVP of the per-sample losses
    along ``direction`` (parameters it does not name are held fixed)."""
    with fwad.dual_level():
        dual = {n: fwad.make_dual(p.detach(), direction[n]) if n in direction else p.detach() for n, p in before.items()}
        return fwad.unpack_dual(handle.per_sample_losses(dual, indices)).tangent


def validation_gradient(
    handle: StudentHandle, params: Params, val_indices: torch.Tensor, layers: frozenset[str] | None = None
) -> tuple[torch.Tensor, Params]:
    """(L_val, grad L_val) under ``params`` for the validation samples ``val_indices``, the gradient with respect
    to ``layers``' parameters (all of them when None)."""
    names = [n for n in params if layers is None or n in layers]
    params = {n: p.detach().requires_grad_(layers is None or n in layers) for n, p in params.items()}
    val_loss = handle.val_loss(params, val_indices)
    return val_loss.detach(), dict(zip(names, torch.autograd.grad(val_loss, [params[n] for n in names])))


def layer_parameters(name: str, module: nn.Module) -> dict[str, str]:
    """The student's name of each parameter of its layer ``module`` (named ``name`` in the student), keyed by
    the layer's own name for it."""
    prefix = f"{name}." if name else ""
    return {local: prefix + local for local, _ in module.named_parameters()}


def records_cover(transition: Transition, params: Params, layers: frozenset[str] | None) -> bool:
    """Whether ``transition`` recorded, with its output gradients for the whole batch, a layer for every
    parameter the meta-gradient goes through (``layers``, or all of ``params``)."""
    records = transition.layers
    if not records or any(r.output_grad is None or r.output_grad.shape[0] != len(transition.indices) for r in records):
        return False
    recorded = {name for r in records for name in layer_parameters(r.name, r.module).values()}
    return recorded >= (set(params) if layers is None else set(layers))


def layerwise_alignment(
    handle: StudentHandle,
    transition: Transition,
    weights: torch.Tensor,
    after: Params,
    val_indices: torch.Tensor,
    layers: frozenset[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Params]:
    """``validation_alignment`` from ``transition``'s layer records (see ``records_cover``), without a JVP: a
    layer's share of a_i is <dl_i/dz_i, f(a_i; G)>, its output gradient against a forward of its input with
    the direction G as its parameters. The records hold the gradients of the update's weighted loss,
    (w_i / S) dl_i/dz_i, so the sums are divided by w_i / S; a sample of weight exactly 0 gets 0 (a weight
    that underflowed to 0 passes no gradient back to the teacher)."""
    val_loss, direction = validation_gradient(handle, after, val_indices, layers)
    with torch.no_grad():
        weights = weights.to(transition.layers[0].output_grad.dtype)  # as the env's update took them
        weighted = torch.zeros_like(weights)
        for record in transition.layers:
            names = layer_parameters(record.name, record.module)
            if all(name in direction for name in names.values()):
                along = functional_call(record.module, {local: direction[name] for local, name in names.items()}, (record.input,))
                weighted = weighted + per_sample_dot(along, record.output_grad)
        share = weight_shares(weights)
        inner = torch.where(share > 0, weighted / share, torch.zeros_like(weighted))
    return inner, val_loss, direction


def weight_shares(weights: torch.Tensor) -> torch.Tensor:
    """Each sample's share w_i / max(sum w, eps) of a weighted update: the factor of its loss in the update's
    objective (``FunctionalStudent.weighted_loss``)."""
    return weights / weights.sum().clamp(min=WEIGHT_SUM_EPS)


def per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,): each sample's sum of ``a * b`` over its other dimensions, read in memory order (a channels-last
    map is not copied to NCHW, and the product is not materialised) when both share one dense layout."""
    order = sorted(range(1, a.dim()), key=a.stride, reverse=True)
    a, b = a.permute(0, *order), b.permute(0, *order)
    if a.is_contiguous() and b.is_contiguous():
        return torch.bmm(a.reshape(len(a), 1, -1), b.reshape(len(b), -1, 1)).view(-1)
    return (a * b).sum(tuple(range(1, a.dim())))


def affine_layers_covering(model: nn.Module, layers: frozenset[str] | None) -> frozenset[str] | None:
    """The names of ``model``'s affine layers (``AFFINE_LAYERS``) that hold the parameters ``layers`` (all
    of them when None), or None where those layers cannot give every sample's gradient: ``model`` normalises
    over the batch (BatchNorm: a sample's loss depends on the others'), shares a parameter between layers
    (warned), or some of those parameters sit in a layer of another kind (warned)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    shared = next((names for names in names_of.values() if len(names) > 1), None)
    if shared:  # a layer's record would be matched to the parameter's first name only
        warnings.warn(
            f"method 'layerwise' needs each parameter in one layer; {' and '.join(shared)} are one: it takes the JVP",
            stacklevel=4,
        )
        return None
    wanted = set(dict(model.named_parameters())) if layers is None else set(layers)
    owners = {}
    for name, module in model.named_modules():
        if type(module) in AFFINE_LAYERS:
            owners |= dict.fromkeys(layer_parameters(name, module).values(), name)
    missing = sorted(wanted - set(owners))
    if missing:
        warnings.warn(
            f"method 'layerwise' needs the parameters the meta-gradient goes through in Linear or Conv layers; "
            f"{missing[0]} is not in one: it takes the JVP",
            stacklevel=4,
        )
        return None
    return frozenset(owners[p] for p in wanted)


def head_alignment(
    handle: StudentHandle, transition: Transition, after: Params, val_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Params]:
    """``validation_alignment`` restricted to the output layer, in closed form: with e = softmax - one-hot,
    the gradient of l_i with respect to the head (W, b) is (e_i h_i^T, e_i), so a_i = e_i . (V h_i + v),
    where (V, v) = (e_val^T H_val, sum e_val) / m is grad L_val(after) with respect to the head. The
    batch's logits and head inputs come from the real forward (``transition``); the only new work is
    one validation forward."""
    val_grad, val_loss = head_validation_gradient(handle, after, val_indices)
    with torch.no_grad():
        err = output_errors(transition.logits, handle.pool.y[transition.indices])
        inner = head_inner_products(err, transition.head_input, val_grad)
    return inner, val_loss, val_grad


def head_validation_gradient(handle: StudentHandle, params: Params, val_indices: torch.Tensor) -> tuple[Params, torch.Tensor]:
    """(grad L_val, L_val) for the validation samples ``val_indices`` under ``params``, the gradient with
    respect to the output layer only, in closed form from one validation forward (no autograd)."""
    with torch.no_grad():
        logits, hidden = handle.val_outputs(params, val_indices)
        labels = handle.data.val.y[val_indices]
        return head_gradient(logits, hidden, labels), F.cross_entropy(logits, labels)


def output_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax - one-hot: each sample's gradient of its cross-entropy with respect to its logits (one-hots
    as rows of an identity: ``F.one_hot`` range-checks the labels, two reads back to the host on the CPU)."""
    return torch.softmax(logits, 1) - torch.eye(logits.shape[1], dtype=logits.dtype, device=logits.device)[labels]


def head_gradient(logits: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> Params:
    """The gradient of the mean cross-entropy with respect to the output layer (``head.weight``,
    ``head.bias``), in closed form from the logits and the head's input H: (e^T H / m, mean e)."""
    err = output_errors(logits, labels)
    return {"head.weight": err.T @ hidden / len(labels), "head.bias": err.mean(0)}


def head_gradient_cosine(err: torch.Tensor, hidden: torch.Tensor, direction: Params) -> torch.Tensor:
    """(batch,): the cosine between each sample's output-layer gradient (e_i h_i^T, e_i), from its
    output error e_i and the head's input h_i, and ``direction`` (an output-layer gradient), without
    forming the per-sample gradients; 0 where either is zero."""
    direction_norm = (direction["head.weight"].square().sum() + direction["head.bias"].square().sum()).sqrt()
    norms = err.norm(dim=1) * (hidden.square().sum(1) + 1).sqrt() * direction_norm
    cosine = head_inner_products(err, hidden, direction) / norms.clamp(min=1e-30)
    return cosine.nan_to_num(nan=0.0).clamp(-1, 1)  # NaN: a diverged student, whose features are 0 too


def head_inner_products(err: torch.Tensor, hidden: torch.Tensor, direction: Params) -> torch.Tensor:
    """(batch,): <(e_i h_i^T, e_i), direction> for each sample's output-layer gradient, as e_i . (W h_i + b)."""
    return ((hidden @ direction["head.weight"].T + direction["head.bias"]) * err).sum(1)


def unrolled_val_loss(
    handle: StudentHandle,
    transitions: tuple,
    weights: tuple,
    val_indices: torch.Tensor,
    layers: frozenset[str] | None = None,
) -> torch.Tensor:
    """L_val after replaying ``transitions`` with ``weights``, differentiable in the weights
    (reverse mode through every update: needs double backward). With ``layers``, only those
    parameters are replayed; the others take the values the real updates gave them."""

    def real_outside_layers(params: Params, real: Params) -> Params:
        return (
            params if layers is None else {n: p if n in layers else real[n].detach().requires_grad_() for n, p in params.items()}
        )

    first = transitions[0]
    params = {n: p.detach().requires_grad_() for n, p in first.params.items()}
    momentum = {n: m.detach() for n, m in first.momentum.items()}
    for transition, w in zip(transitions, weights):
        params, momentum = handle.replay_update(transition, real_outside_layers(params, transition.params), momentum, w, True)
    return handle.val_loss(real_outside_layers(params, handle.params), val_indices)


@dataclass
class MetaWeightNetOptions:
    """Options of Meta-Weight-Net (``mwnet``)."""

    hidden: int = field(100, "hidden units of the loss -> weight network", low=1)
    teacher_lr: float = field(3e-3, "teacher learning rate (Adam)", above=0.0)
    val_batch: int = field(256, "clean validation samples per meta-gradient", low=1)
    init_weight: float = field(0.9, "initial weight of every sample", above=0.0, below=1.0)
    meta_layers: str = field("all", META_LAYERS_HELP)
    method: str = field(
        "auto",
        "path of its one-step meta-gradient: auto (jvp), jvp, or layerwise (the per-sample inner products from the "
        "real step's per-layer inputs and output gradients, no JVP)",
        choices=["auto", *ONE_STEP_METHODS],
    )
    seed: int = field(0, "seeds the teacher network's initialisation", low=0)


class MetaWeightNetTeacher(MetaGradTeacher):
    """Meta-Weight-Net (Shu et al. 2019): loss -> 100 hidden units -> sigmoid weight, one-step
    meta-gradient. The same machinery as ``meta_grad`` with surface loss as the only input."""

    reads_internal = False  # the loss alone
    legacy_options = {"method": "auto"}  # runs (and keys) from before the option existed took the JVP

    name = "mwnet"
    Options = MetaWeightNetOptions

    def network_options(self) -> MetaGradOptions:
        return MetaGradOptions(features="loss", layers=1, context=False, unroll=1, alignment=False, **self.config)


@dataclass
class ReweightOptions:
    """Options of Learning to Reweight (``l2rw``)."""

    val_batch: int = field(256, "clean validation samples per weighting", low=1)


class ReweightTeacher(Teacher):
    """Learning to Reweight (Ren et al. 2018): no network; each batch's weights come from one
    meta-gradient step at eps = 0 of the loss sum_i eps_i l_i: w_i ∝ max(0, <grad L_val, grad l_i>).
    The env normalises weights by their sum, as Ren et al.; the action scales them to a largest
    weight of 1 (the action box), which keeps their ratios.

    Its steps rest on the few samples best aligned with the validation batch (an effective batch of
    ~30 of 128), so it wants a smaller student learning rate: at lr 0.1 with momentum 0.9 its MLP
    students on MNIST and mnist1d collapse to chance, at lr 0.02 they train normally (measured).
    Benchmarks therefore tune the student's rate per agent (``evaluate.py --tune``).
    """

    reads_internal = False

    name = "l2rw"
    kind = "fixed"  # its weights are computed afresh at every step; nothing is learned or saved
    Options = ReweightOptions
    needs_handle = True

    def act(self, obs: dict) -> torch.Tensor:
        handle = self.handle
        if handle is None:
            raise RuntimeError("l2rw computes weights from the student itself: call teacher.attach(env.unwrapped.handle) first")
        with torch.no_grad():  # the virtual update with all weights 0: momentum and weight decay only
            zero_grads = {n: torch.zeros_like(p) for n, p in handle.params.items()}
            virtual, _ = sgd_update(handle.params, handle.momentum, zero_grads, handle.lr_now, handle.sgd)
        val_indices = handle.val_indices(self.options.val_batch)
        inner, _, _ = validation_alignment(handle, handle.params, virtual, handle.batch_indices, val_indices)
        raw = inner.clamp(min=0)  # -dL_val/d(eps_i) at eps = 0 is proportional to the alignment
        top = raw.max()
        return torch.where(top > 0, raw / top.clamp(min=1e-30), torch.zeros_like(raw))
