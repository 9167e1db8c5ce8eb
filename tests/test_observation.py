"""The observation builder against a straightforward per-sample specification of every feature
(loops over samples and classes, written from the feature tables), on hidden states of real
students over several batches, so that running statistics are exercised too: the fast batched
implementation must agree to 1e-6."""

from __future__ import annotations

import math

import pytest
import torch

from envs.observation import (
    CENTROID_MOMENTUM,
    INTERNAL_FEATURES,
    LOSS_HISTORY_MOMENTUM,
    NEIGHBOURS,
    RUNNING_MOMENTUM,
    ObservationBuilder,
)
from tests.conftest import make_tensor_env


class Specification:
    """Every feature of ``SAMPLE_FEATURES`` and ``INTERNAL_FEATURES`` computed one sample at a time."""

    def __init__(self, num_train: int, num_classes: int):
        self.k = num_classes
        self.history: dict[int, float] = {}
        self.train_loss, self.train_acc = math.log(num_classes), 1.0 / num_classes
        self.centroids: list[list[torch.Tensor] | None] = [None, None]

    def samples(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        rows, losses, hits = [], [], []
        for z, y, index in zip(logits.double(), labels.tolist(), indices.tolist()):
            p = torch.softmax(z, 0)
            loss = -math.log(p[y])
            others = [p[c] for c in range(self.k) if c != y]
            entropy = -sum(float(q * math.log(q)) for q in p if q > 0) / math.log(self.k)
            agrees = float(int(z.argmax()) == y)
            history = self.history.get(index, loss)
            rows.append([loss, loss - self.train_loss, history, p[y], p[y] - max(others), entropy, agrees])
            self.history[index] = LOSS_HISTORY_MOMENTUM * history + (1 - LOSS_HISTORY_MOMENTUM) * loss
            losses.append(loss)
            hits.append(agrees)
        self.train_loss = RUNNING_MOMENTUM * self.train_loss + (1 - RUNNING_MOMENTUM) * sum(losses) / len(losses)
        self.train_acc = RUNNING_MOMENTUM * self.train_acc + (1 - RUNNING_MOMENTUM) * sum(hits) / len(hits)
        return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)

    def internal(self, hidden: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        blocks = [self._layer(slot, h.detach().double().flatten(1), labels.tolist()) for slot, h in enumerate(hidden[-2:])]
        return torch.cat(blocks, 1)

    def _layer(self, slot: int, h: torch.Tensor, labels: list[int]) -> torch.Tensor:
        n = len(labels)
        norms = [float(row.norm()) for row in h]
        units = [row / (norm + 1e-8) for row, norm in zip(h, norms)]
        means = []
        for c in range(self.k):
            members = [u for u, y in zip(units, labels) if y == c]
            means.append(sum(members) / len(members) if members else torch.zeros(h.shape[1], dtype=h.dtype))
        previous = self.centroids[slot] or means
        self.centroids[slot] = [
            CENTROID_MOMENTUM * previous[c] + (1 - CENTROID_MOMENTUM) * means[c] if c in labels else previous[c]
            for c in range(self.k)
        ]
        cosine = lambda u, c: float(u @ c / max(float(c.norm()), 1e-8))  # noqa: E731
        mean_log_norm = sum(math.log(x + 1e-8) for x in norms) / n
        rows = []
        for i, (u, y) in enumerate(zip(units, labels)):
            own = cosine(u, previous[y])
            other = max(cosine(u, previous[c]) for c in range(self.k) if c != y)
            live = [j for j in range(n) if j != i and norms[j] > 0]  # an all-zero hidden state is no one's neighbour
            nearest = sorted(live, key=lambda j: -float(u @ units[j]))[:NEIGHBOURS]
            if n == 1:
                agree = 1.0
            elif norms[i] > 0 and nearest:
                agree = sum(labels[j] == y for j in nearest) / len(nearest)
            else:  # no direction, or no live neighbour: the share of the other samples with its label
                agree = sum(labels[j] == y for j in range(n) if j != i) / (n - 1)
            rows.append([math.log(norms[i] + 1e-8) - mean_log_norm, own, other, own - other, agree])
        return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(
    "setting",
    [
        dict(student="mlp", batch_size=64),
        dict(student="cnn", student_kwargs={"channels": [4, 8], "fc": 16}, batch_size=32),
        dict(student="mlp", batch_size=3),  # fewer neighbours than NEIGHBOURS, classes missing from every batch
    ],
    ids=["mlp", "cnn", "tiny-batch"],
)
def test_batched_features_equal_the_per_sample_specification(setting):
    env = make_tensor_env(**setting, lr=0.05).unwrapped
    env.reset(seed=0)
    handle, k = env.handle, env.data.num_classes
    fast, spec = ObservationBuilder(len(handle.pool), k, "cpu"), Specification(len(handle.pool), k)
    order = torch.randperm(len(handle.pool), generator=torch.Generator().manual_seed(0))
    size = setting["batch_size"]
    for step in range(6):
        # consecutive batches overlap by half (no sample twice within one, as the env's sampler), so
        # that loss histories are read back
        indices = order[step * (size // 2) :][:size]
        logits, hidden, labels = handle.forward_batch(indices)
        logits = logits.detach()
        got = fast.samples(logits, labels, indices), fast.internal(list(hidden.values()), labels)
        want = spec.samples(logits, labels, indices), spec.internal(list(hidden.values()), labels)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)
        assert fast.running_train_stats() == pytest.approx({"train_loss": spec.train_loss, "train_acc": spec.train_acc})
        handle.update(torch.ones(len(indices)), differentiable=False)  # the student moves between batches


def test_restored_builder_continues_identically():
    """``state_dict`` keeps each layer's centroids at their own width (the checkpoint format is the
    per-layer list), and a restored builder gives the same features as the original."""
    env = make_tensor_env(student="mlp", batch_size=16).unwrapped
    env.reset(seed=0)
    handle = env.handle
    builder = ObservationBuilder(len(handle.pool), env.data.num_classes, "cpu")
    logits, hidden, labels = handle.forward_batch(torch.arange(16))
    builder.internal(list(hidden.values()), labels)
    state = builder.state_dict()
    assert [tuple(c.shape) for c in state["centroids"]] == [(10, h.shape[1]) for h in list(hidden.values())[-2:]]
    restored = ObservationBuilder(len(handle.pool), env.data.num_classes, "cpu")
    restored.load_state_dict(state)
    batch = handle.forward_batch(torch.arange(16, 32))
    torch.testing.assert_close(
        restored.internal(list(batch[1].values()), batch[2]), builder.internal(list(batch[1].values()), batch[2])
    )


def test_all_zero_hidden_states_decide_no_feature_by_tie_breaking():
    """Dead ReLU units leave some samples with all-zero hidden states, at cosine 0 from every other
    sample. Their features follow the specification, and permuting the batch permutes the
    features exactly (no neighbour is chosen among ties, which topk may break either way)."""
    generator = torch.Generator().manual_seed(0)
    n, k = 40, 4
    labels = torch.randint(0, k, (n,), generator=generator)
    # deeper layer: two opposite clusters, so that most live neighbours are at a negative cosine, below
    # a dead sample's 0 (the dead must still not be chosen), and a minority cluster of 3 samples
    side = torch.where(torch.arange(n) < 3, 1.0, -1.0)[:, None]
    deep = side * torch.ones(n, 12) + 0.3 * torch.randn(n, 12, generator=generator)
    deep[3::4] = 0.0  # dead samples
    # second-to-last layer: only 3 live samples, fewer than the 5 neighbours asked for
    penult = torch.zeros(n, 7)
    penult[[0, 7, 20]] = torch.rand(3, 7, generator=generator) + 0.1
    hidden = [deep, penult]
    got = ObservationBuilder(n, k, "cpu").internal(hidden, labels)
    want = Specification(n, k).internal(hidden, labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for seed in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        permuted = ObservationBuilder(n, k, "cpu").internal([h[perm] for h in hidden], labels[perm])
        torch.testing.assert_close(permuted, got[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_sample_with_a_non_finite_hidden_state_is_no_ones_neighbour(value):
    """A non-finite hidden state (a sample on which the student blew up) has no direction: like an
    all-zero one, it is no one's neighbour, so the other samples' kNN agreement is what it would be
    with that sample dead (topk would otherwise rank its NaN cosines, inf / inf included, above every live one)."""
    generator = torch.Generator().manual_seed(1)
    n, k = 12, 3
    labels = torch.arange(n) % k
    hidden = [torch.randn(n, 6, generator=generator), torch.randn(n, 5, generator=generator)]
    broken, dead = [h.clone() for h in hidden], [h.clone() for h in hidden]
    for b, d in zip(broken, dead):
        b[4, 0], d[4] = value, 0.0
    knn = [i for i, (name, *_) in enumerate(INTERNAL_FEATURES) if name.endswith("knn_agree")]
    others = torch.arange(n) != 4
    got = ObservationBuilder(n, k, "cpu").internal(broken, labels)[others][:, knn]
    want = ObservationBuilder(n, k, "cpu").internal(dead, labels)[others][:, knn]
    assert torch.equal(got, want)
    assert not torch.equal(want, ObservationBuilder(n, k, "cpu").internal(hidden, labels)[others][:, knn]), (
        "sample 4 is among the live samples' neighbours when it is alive"
    )
