"""Datasets as device-resident tensors with a clean validation split, and a seeded index sampler.

Every dataset is loaded once per process (cached), split into train / clean validation / test,
normalised with training statistics, and moved to the requested device. Batches are index
tensors into the training split, so labels, noise masks and teacher weights are indexed on the
device without a DataLoader in the hot path.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist1d", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100")

# Where torchvision-style datasets live below --data-root, and the raw files each one needs.
_IDX_FILES = {
    "mnist": ("MNIST", "https://yann.lecun.com/exdb/mnist/"),
    "fashion_mnist": ("FashionMNIST", "https://github.com/zalandoresearch/fashion-mnist"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where we looked; the message says where and how to get them."""


@dataclass(frozen=True)
class Split:
    """Inputs and labels of one split, as tensors on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    """Train / clean validation / test splits of one dataset, normalised, on one device; optionally
    a clean ``select`` split held out of the validation data, which no method may train on (it only
    selects checkpoints and tunes hyper-parameters)."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    select: Split | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, dtype: torch.dtype) -> Dataset:
        """The same dataset with inputs of ``dtype`` (labels stay int64)."""
        if dtype == self.train.x.dtype:
            return self
        cast = lambda s: Split(s.x.to(dtype), s.y) if s is not None else None
        return dataclasses.replace(
            self, train=cast(self.train), val=cast(self.val), test=cast(self.test), select=cast(self.select)
        )

    def hold_out_for_selection(self, fraction: float, seed: int) -> Dataset:
        """The same dataset with ``fraction`` of the clean validation split moved to ``select``."""
        if fraction == 0:
            return self
        n = len(self.val)
        count = round(fraction * n)
        if not 1 <= count < n:
            raise ValueError(
                f"select_fraction {fraction} of the {n} clean samples leaves {count} for selection and {n - count} for the "
                "methods; both need at least one"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7)).to(self.val.y.device)
        pick = lambda idx: Split(self.val.x[idx], self.val.y[idx])
        return dataclasses.replace(self, val=pick(order[count:]), select=pick(order[:count]))


def check_name(kind: str, name: str, valid: tuple[str, ...] | list[str]) -> None:
    """Raise a ValueError that lists the valid names when ``name`` is not one of them."""
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


def load_dataset(
    name: str = "mnist1d",
    data_root: str | Path | None = None,
    val_size: float | None = None,
    train_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    download: bool = False,
) -> Dataset:
    """Load ``name``, carve a clean validation split of ``val_size`` from its training set, normalise.

    :param val_size: a count (>= 1), a fraction of the training set (< 1), or None for the default
        (``DEFAULT_VAL_FRACTION`` of it, at most ``DEFAULT_VAL_CAP``, as in Meta-Weight-Net).
    :param train_size: keep at most this many training samples (after the validation split).
    :param seed: seeds the train/validation split and the subset; the files themselves are fixed.
    :param download: let torchvision download missing files (never done unless asked).
    """
    check_name("dataset", name, DATASETS)
    x_train, y_train, x_test, y_test = _load_arrays(name, str(data_root) if data_root else None, download)
    n = len(y_train)
    val_size = clean_split_size(val_size, n, name)
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_size is not None:
        if train_size <= 0:
            raise ValueError(f"train_size must be positive, got {train_size}")
        train_idx = train_idx[:train_size]
        if val_size > len(train_idx):
            raise ValueError(
                f"the clean validation split ({val_size}) would be larger than the training split kept by train_size "
                f"({len(train_idx)}); lower val_size or raise train_size"
            )
    mean, std = _normalisation(x_train[train_idx])

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        xs = torch.as_tensor((x - mean) / std, dtype=torch.float32, device=device)
        return Split(xs, torch.as_tensor(y, dtype=torch.long, device=device))

    return Dataset(
        name=name,
        train=split(x_train[train_idx], y_train[train_idx]),
        val=split(x_train[val_idx], y_train[val_idx]),
        test=split(x_test, y_test),
        num_classes=int(max(y_train.max(), y_test.max())) + 1,
    )


DEFAULT_VAL_FRACTION, DEFAULT_VAL_CAP = 0.1, 1000


def clean_split_size(val_size: float | None, n: int, name: str = "the dataset") -> int:
    """Samples of the clean validation split carved from ``n`` training samples: a count, a fraction,
    or the default; never more than what is left for training (a ValueError says so)."""
    if val_size is None:
        return max(1, min(DEFAULT_VAL_CAP, round(DEFAULT_VAL_FRACTION * n)))
    if not val_size > 0:
        raise ValueError(f"val_size must be a positive count or a fraction in (0, 1), got {val_size}")
    if val_size < 1:
        count = max(1, round(val_size * n))
    elif float(val_size).is_integer():
        count = int(val_size)
    else:
        raise ValueError(f"val_size must be a whole count (>= 1) or a fraction in (0, 1), got {val_size}")
    if count > n - count:
        raise ValueError(
            f"val_size {val_size} would keep {count} of {name}'s {n} training samples as clean validation data, "
            f"more than the {n - count} left for training; use at most {n // 2} (or a fraction <= 0.5)"
        )
    return count


def _normalisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std for images (N, C, H, W), one scalar pair otherwise."""
    axes = (0, 2, 3) if x.ndim == 4 else tuple(range(x.ndim))
    mean = x.mean(axis=axes, keepdims=True)[0]
    std = x.std(axis=axes, keepdims=True)[0] + 1e-8
    return mean, std


@functools.lru_cache(maxsize=8)
def _load_arrays(name: str, data_root: str | None, download: bool) -> tuple[np.ndarray, ...]:
    """Raw (x_train, y_train, x_test, y_test) as float32 / int64 arrays; images are (N, C, H, W)."""
    if name == "mnist1d":
        return _mnist1d()
    if name == "digits":
        return _digits()
    if name in _IDX_FILES:
        return _idx_dataset(name, data_root, download)
    return _cifar(name, data_root, download)


def _mnist1d() -> tuple[np.ndarray, ...]:
    """MNIST-1D generated locally (Greydanus 2020): 8,000 train / 2,000 test signals of length 40."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 10_000
    # make_dataset reseeds the global numpy and random generators; keep the caller's state intact.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    as_signal = lambda x: x.astype(np.float32)[:, None, :]  # (N, 1 channel, 40)
    return as_signal(data["x"]), data["y"].astype(np.int64), as_signal(data["x_test"]), data["y_test"].astype(np.int64)


def _digits() -> tuple[np.ndarray, ...]:
    """scikit-learn's bundled 8x8 handwritten digits, split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(12345).permutation(len(y))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a damaged or cut gzip stream, an unreadable file
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim < 1:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _idx_dataset(name: str, data_root: str | None, download: bool) -> tuple[np.ndarray, ...]:
    """MNIST / Fashion-MNIST from ``<data_root>/<Folder>/raw/*-ubyte[.gz]`` (torchvision's layout)."""
    folder, source = _IDX_FILES[name]
    root = Path(data_root or "data")
    raw = root / folder / "raw"
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

    def find(stem: str) -> Path | None:
        return next((p for p in (raw / stem, raw / f"{stem}.gz") if p.is_file()), None)

    if any(find(s) is None for s in stems) and download:
        import torchvision

        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        try:
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
        except (RuntimeError, OSError) as e:  # no network, a mirror down, a full disk
            raise DatasetNotFoundError(f"dataset {name!r}: --download failed ({e}); source: {source}") from None
    paths = [find(s) for s in stems]
    if any(p is None for p in paths):
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise DatasetNotFoundError(
            f"dataset {name!r}: missing {', '.join(missing)} (plain or .gz) in {raw.resolve()}. "
            f"Pass --data-root pointing at the folder that holds {folder}/raw/, or add --download "
            f"to fetch it with torchvision (source: {source})."
        )
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in paths)
    to_images = lambda x: (x.astype(np.float32) / 255.0)[:, None]
    return to_images(x_train), y_train.astype(np.int64), to_images(x_test), y_test.astype(np.int64)


def _cifar(name: str, data_root: str | None, download: bool) -> tuple[np.ndarray, ...]:
    """CIFAR-10/100 through torchvision from ``data_root``; downloads only when asked."""
    import torchvision

    root = Path(data_root or "data")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:  # not there, or a --download that failed (no network)
        raise DatasetNotFoundError(
            f"dataset {name!r} not found under {root.resolve()} (torchvision's {cls.base_folder}/)"
            + (f" and --download failed ({e})" if download else "")
            + ". Pass --data-root pointing at the folder that holds it, or add --download to fetch it."
        ) from e
    as_images = lambda d: np.asarray(d.data, dtype=np.float32).transpose(0, 3, 1, 2) / 255.0
    labels = lambda d: np.asarray(d.targets, dtype=np.int64)
    return as_images(train), labels(train), as_images(test), labels(test)


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait for the device: CUDA copies are
    staged in pinned memory and asynchronous (a plain copy from pageable memory synchronises)."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class BatchSampler:
    """Seeded mini-batches of training indices; reshuffles every epoch, drops the ragged tail.

    Indices are generated on the CPU by a private ``torch.Generator`` (so results do not depend on
    the device) and moved to the data's device once per epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, device: str | torch.device = "cpu", offset: int = 0):
        """Batches of indices ``offset .. offset + num_samples - 1``."""
        if not 0 < batch_size <= num_samples:
            raise ValueError(f"batch_size must be in [1, {num_samples}] (the training set's size), got {batch_size}")
        self.num_samples, self.batch_size, self.device, self.offset = num_samples, batch_size, device, offset
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_per_epoch = num_samples // batch_size
        self._epoch_batches: list[torch.Tensor] = []
        self.epoch = 0

    def state_dict(self) -> dict:
        remaining = (
            torch.stack(self._epoch_batches).cpu() if self._epoch_batches else torch.zeros(0, self.batch_size, dtype=torch.long)
        )
        return {"generator": self.generator.get_state(), "remaining": remaining, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._epoch_batches = list(state["remaining"].to(self.device).unbind(0))
        self.epoch = state["epoch"]

    def next(self) -> torch.Tensor:
        """The next batch of indices, shape (batch_size,), on the data's device."""
        if not self._epoch_batches:
            order = to_device(torch.randperm(self.num_samples, generator=self.generator) + self.offset, self.device)
            usable = order[: self.batches_per_epoch * self.batch_size]
            self._epoch_batches = list(usable.view(self.batches_per_epoch, self.batch_size).unbind(0))[::-1]
            self.epoch += 1
        return self._epoch_batches.pop()
