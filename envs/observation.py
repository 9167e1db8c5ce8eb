"""Observation features of ``Teaching-v0``: fixed-size and independent of the student's architecture.

Three groups, all float32 and computed on the data's device:

- ``global`` (G,): training progress, shared by the whole batch;
- ``samples`` (batch, F): surface statistics of each sample under the current student;
- ``internal`` (batch, D): statistics of each sample's hidden states in the student's
  second-to-last layer and one deeper layer. They use only norms ratios and cosine similarities
  (to running class centroids and to the other samples of the batch), so they are unchanged by any
  orthogonal rotation of a hidden layer and have the same size for every layer width.

The feature tables below are the specification; the README's tables are generated from them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch.nn import functional as F

MAX_LOSS = 100.0  # losses are clipped here so that every feature has finite bounds
MAX_LOG_NORM = 50.0

# Each feature: (name, meaning, lowest value, highest value); values are clipped to the bounds.
GLOBAL_FEATURES = (
    ("progress", "fraction of the episode's updates done, t / horizon", 0, 1),
    ("lr_ratio", "current learning rate / initial learning rate", 0, 1),
    ("train_loss", "running mean (EMA 0.9) of the training loss on the given labels", 0, MAX_LOSS),
    ("train_acc", "running mean (EMA 0.9) of the batch accuracy on the given labels", 0, 1),
    ("val_loss", "clean validation loss at the latest evaluation (log K before the first)", 0, MAX_LOSS),
    ("val_acc", "clean validation accuracy at the latest evaluation (1 / K before the first)", 0, 1),
    ("best_val_acc", "best clean validation accuracy so far in the episode", 0, 1),
    ("epochs_seen", "log(1 + passes over the training set so far): how often each sample was seen", 0, 10),
)
SAMPLE_FEATURES = (
    ("loss", "cross-entropy of the sample under its given label", 0, MAX_LOSS),
    ("loss_vs_mean", "loss minus the running mean training loss", -MAX_LOSS, MAX_LOSS),
    ("loss_history", "this sample's loss averaged (EMA 0.5) over its earlier visits; its loss on the first", 0, MAX_LOSS),
    ("p_label", "predicted probability of the given label", 0, 1),
    ("margin", "p_label minus the largest probability of another class", -1, 1),
    ("entropy", "entropy of the prediction divided by log K", 0, 1),
    ("agrees", "1 if the predicted class is the given label, else 0", 0, 1),
)
_LAYER_FEATURES = (
    ("log_norm", "log feature norm minus the batch mean of log norms", -MAX_LOG_NORM, MAX_LOG_NORM),
    ("cos_own", "cosine to the running centroid of the sample's given class", -1, 1),
    ("cos_other", "largest cosine to the running centroid of another class", -1, 1),
    ("centroid_margin", "cos_own minus cos_other", -2, 2),
    (
        "knn_agree",
        "fraction of the sample's 5 nearest batch neighbours (cosine) that share its label; an all-zero hidden "
        "state is no one's neighbour and, like a sample with no live neighbour, gets the share of the batch's "
        "other samples with its label",
        0,
        1,
    ),
)
LAYERS = (("deep", "a deeper hidden layer"), ("penult", "the second-to-last layer"))
INTERNAL_FEATURES = tuple(
    (f"{layer}_{name}", f"{text}, in {where}", low, high) for layer, where in LAYERS for name, text, low, high in _LAYER_FEATURES
)

CENTROID_MOMENTUM = 0.9
RUNNING_MOMENTUM = 0.9
LOSS_HISTORY_MOMENTUM = 0.5
NEIGHBOURS = 5
TOPK_HEAP_ROW = 64  # PyTorch's CPU topk uses a heap (partial_sort) for rows of at least 64 k elements


class ObservationBuilder:
    """Turns a student's outputs on a batch into the observation, keeping the running statistics
    (class centroids per layer, per-sample loss history, running train loss) that features need.

    Small students make the cost of an observation one of tensor-op count, not of arithmetic, so
    the two hidden layers are handled as one zero-padded (2, batch, width) stack (padding changes no
    norm or cosine) and class statistics come from one one-hot matrix, rows of a stored identity
    (``F.one_hot`` would check the labels' range, two reads back to the host on the CPU): about 40
    ops for ``samples`` and 80 for ``internal`` per step, none of which reads a value back to the host.
    """

    def __init__(self, num_train: int, num_classes: int, device: torch.device | str):
        self.num_classes = num_classes
        self.loss_history = torch.zeros(num_train, device=device)
        self.visited = torch.zeros(num_train, dtype=torch.bool, device=device)
        self.centroids: torch.Tensor | None = None  # (2, K, width): running unit-feature centroids, zero-padded
        self.widths: list[int] = []  # the true width of each layer's centroids
        self.train_loss = torch.tensor(math.log(num_classes), device=device)
        self.train_acc = torch.tensor(1.0 / num_classes, device=device)
        self.one_hot = torch.eye(num_classes, device=device, dtype=torch.float32)  # row c: class c's one-hot (no range check)

    def state_dict(self) -> dict:
        centroids = [c[:, :w].cpu() for c, w in zip(self.centroids, self.widths)] if self.centroids is not None else []
        return {
            "loss_history": self.loss_history.cpu(), "visited": self.visited.cpu(), "centroids": centroids,
            "train_loss": self.train_loss.cpu(), "train_acc": self.train_acc.cpu(),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        device = self.loss_history.device
        self.loss_history, self.visited = state["loss_history"].to(device), state["visited"].to(device)
        saved = [c.to(device) for c in state["centroids"] if c.numel()]
        self.widths = [c.shape[1] for c in saved]
        self.centroids = _stack_padded(saved) if saved else None
        self.train_loss, self.train_acc = state["train_loss"].to(device), state["train_acc"].to(device)

    def running_train_stats(self) -> dict[str, float]:
        """Running (EMA) training loss and accuracy of the batches seen, with the given labels."""
        return {"train_loss": float(self.train_loss), "train_acc": float(self.train_acc)}

    def samples(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Per-sample surface features (batch, F); also folds the batch into the running statistics."""
        log_probs = F.log_softmax(logits.float(), dim=1)
        probs = log_probs.exp()
        loss = -log_probs.gather(1, labels[:, None]).squeeze(1)
        p_label = probs.gather(1, labels[:, None]).squeeze(1)
        p_other = probs.scatter(1, labels[:, None], -1.0).amax(1)
        entropy = -(probs * log_probs).sum(1) / math.log(self.num_classes)
        agrees = (logits.argmax(1) == labels).float()
        history = torch.where(self.visited[indices], self.loss_history[indices], loss)
        features = torch.stack([loss, loss - self.train_loss, history, p_label, p_label - p_other, entropy, agrees], 1)
        self.loss_history[indices] = LOSS_HISTORY_MOMENTUM * history + (1 - LOSS_HISTORY_MOMENTUM) * loss
        self.visited[indices] = True
        self.train_loss = RUNNING_MOMENTUM * self.train_loss + (1 - RUNNING_MOMENTUM) * loss.mean()
        self.train_acc = RUNNING_MOMENTUM * self.train_acc + (1 - RUNNING_MOMENTUM) * agrees.mean()
        return features

    def internal(self, hidden_layers: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Per-sample internal-state features (batch, D) from the last two hidden layers: the deeper
        layer's features, then the second-to-last layer's (``INTERNAL_FEATURES``' order)."""
        if len(hidden_layers) < 2:
            raise ValueError(f"internal features need at least two hidden layers, the student exposes {len(hidden_layers)}")
        layers = [h.detach().float().flatten(1) for h in hidden_layers[-2:]]
        unit, norm = unit_directions(layers)
        log_norm = torch.log(norm + 1e-8)
        one_hot = self.one_hot[labels]
        counts = one_hot.sum(0)
        centroids = self._update_centroids(unit, one_hot, counts, [x.shape[1] for x in layers])
        cos = unit @ F.normalize(centroids, dim=2, eps=1e-8).transpose(1, 2)  # (2, batch, K)
        own_class = labels.expand(2, -1)[..., None]
        cos_own = cos.gather(2, own_class).squeeze(2)
        cos_other = cos.scatter(2, own_class, -2.0).amax(2)
        features = torch.stack(
            [
                log_norm - log_norm.mean(1, keepdim=True),
                cos_own,
                cos_other,
                cos_own - cos_other,
                _knn_agreement(unit, has_direction(norm), labels, counts[labels]),
            ],
            2,
        )  # (2, batch, per-layer features)
        return features.transpose(0, 1).flatten(1)

    def _update_centroids(
        self, unit: torch.Tensor, one_hot: torch.Tensor, counts: torch.Tensor, widths: list[int]
    ) -> torch.Tensor:
        """Running (EMA) centroid of the unit features of each given class (``counts`` samples of each
        in the batch), per layer; returns the pre-update ones (the batch's own class means on the first batch)."""
        batch_means = (one_hot.T @ unit) / counts.clamp(min=1)[:, None]  # (2, K, width)
        previous = self.centroids
        if previous is None or self.widths != widths:
            previous = batch_means
        self.centroids = torch.where(
            (counts > 0)[:, None], CENTROID_MOMENTUM * previous + (1 - CENTROID_MOMENTUM) * batch_means, previous
        )
        self.widths = widths
        return previous


def unit_directions(layers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit, norm): the (batch, width) hidden states of ``layers`` as one zero-padded (layers, batch,
    width) stack of unit vectors (all-zero rows stay zero), and their norms (layers, batch)."""
    h = _stack_padded(layers)
    norm = h.norm(dim=2)
    return h / (norm[..., None] + 1e-8), norm


def has_direction(norm: torch.Tensor) -> torch.Tensor:
    """Which hidden states (by their ``norm``) point somewhere: a norm that is neither zero nor
    non-finite (an infinite or NaN state's unit vector is NaN; a finite one whose float32 norm
    overflows gets a zero unit vector, which has no direction either)."""
    return torch.isfinite(norm) & (norm > 0)


def _stack_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack 2-D tensors of equal height along a new first dimension, zero-padding their widths."""
    width = max(r.shape[1] for r in rows)
    return torch.stack([F.pad(r, (0, width - r.shape[1])) for r in rows])


def _knn_agreement(
    unit: torch.Tensor, has_direction: torch.Tensor, labels: torch.Tensor, label_count: torch.Tensor
) -> torch.Tensor:
    """(layers, batch): the fraction of each sample's nearest batch neighbours (cosine, itself
    excluded) that share its label (``label_count``: how many samples of the batch, itself included, have it).

    A sample whose hidden state is all zeros (``has_direction`` False: common once ReLU units die) is
    at cosine 0 from every other, so its neighbours would be decided by how ``topk`` breaks ties. It
    is therefore no one's neighbour (its column sits below every cosine, and a sample with fewer than
    k other live samples averages over those), and its own value, like that of a sample with no live
    neighbour, is the share of the batch's other samples with its label, what neighbours drawn at
    random would give. (Exact ties between live samples, e.g. identical inputs, are topk's to break.)
    """
    n = len(labels)
    k = min(NEIGHBOURS, n - 1)
    if k <= 0:
        return torch.ones(unit.shape[:2], device=unit.device)
    nearest = nearest_neighbours(neighbour_similarity(unit, has_direction), k)
    live = nearest.values > -1.5  # a live neighbour (cosine in [-1, 1]), not a dead sample's column (-2)
    live_count = live.sum(2)
    agree = ((labels[nearest.indices] == labels[:, None]) & live).sum(2) / live_count.clamp(min=1)
    random_neighbours = (label_count - 1) / (n - 1)
    return torch.where(has_direction & (live_count > 0), agree, random_neighbours).float()


def neighbour_similarity(unit: torch.Tensor, has_direction: torch.Tensor) -> torch.Tensor:
    """(layers, batch, batch) cosines between the batch's samples, for picking neighbours: a sample
    without direction (``has_direction`` False: an all-zero hidden state, whose column is 0, or a
    non-finite one, whose column is NaN) is set to -2 in every row, below every live cosine (no one's
    neighbour), and each sample is set to -3 in its own row (not its own neighbour)."""
    similarity = (unit @ unit.transpose(1, 2)).masked_fill_(~has_direction[:, None, :], -2.0)
    similarity.diagonal(dim1=1, dim2=2).fill_(-3.0)
    return similarity


def nearest_neighbours(similarity: torch.Tensor, k: int) -> torch.return_types.topk:
    """The ``k`` largest entries of each row of ``similarity`` and their columns (``topk``)."""
    if similarity.device.type == "cpu" and similarity.shape[2] < TOPK_HEAP_ROW * k:
        # PyTorch's CPU topk selects in rows shorter than 64 k with nth_element, which mispredicts
        # branches on fresh data (measured 1.2 us per 128-long row); rows padded with a value below
        # everything else (never chosen) take its heap path instead, 3x faster in all
        similarity = F.pad(similarity, (0, TOPK_HEAP_ROW * k - similarity.shape[2]), value=-4.0)
    return similarity.topk(k, dim=2)


def feature_bounds(table: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float32 arrays of a feature table."""
    return np.array([f[2] for f in table], np.float32), np.array([f[3] for f in table], np.float32)


FEATURE_TABLES = {"global": GLOBAL_FEATURES, "samples": SAMPLE_FEATURES, "internal": INTERNAL_FEATURES}


def observation_box(table: tuple, rows: int | None) -> spaces.Box:
    """Gymnasium Box of one observation entry: the table's bounds, per row of the batch when ``rows`` is set."""
    low, high = feature_bounds(table)
    if rows is not None:
        low, high = np.tile(low, (rows, 1)), np.tile(high, (rows, 1))
    return spaces.Box(low, high, dtype=np.float32)


def clip_to_bounds(values: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Clip the last dimension of ``values`` to ``bounds`` = (low, high) tensors of a feature table;
    NaN (a feature of a degenerate student, e.g. all-zero hidden states) becomes 0."""
    low, high = bounds
    return torch.clamp(torch.nan_to_num(values, nan=0.0), low, high)


def observation_spec(env: Any) -> dict:
    """What a teacher trained on ``env`` relies on: the feature names of each entry and the batch size."""
    env = env.unwrapped
    return {
        "global": [f[0] for f in GLOBAL_FEATURES],
        "samples": [f[0] for f in SAMPLE_FEATURES],
        "internal": [f[0] for f in INTERNAL_FEATURES],
        "batch_size": int(env.batch_size),
    }


def markdown_tables() -> str:
    """The README's feature tables, generated from the tables above."""
    out = []
    for key, table in (("global", GLOBAL_FEATURES), ("samples", SAMPLE_FEATURES), ("internal", INTERNAL_FEATURES)):
        out.append(f"`{key}` ({len(table)} features{'' if key == 'global' else ' per sample'}):\n")
        out.append("| # | feature | meaning | range |\n|---|---|---|---|")
        out.extend(f"| {i} | `{name}` | {text} | [{low:g}, {high:g}] |" for i, (name, text, low, high) in enumerate(table))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_tables())
