"""Datasets, splits, the sampler and label noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from students.data import BatchSampler, DatasetNotFoundError, load_dataset
from students.noise import corrupt_labels


@pytest.mark.parametrize("name", ["mnist1d", "digits"])
def test_offline_datasets_split_and_normalise(name):
    data = load_dataset(name, val_size=300, seed=0)
    assert len(data.val) == 300 and data.num_classes == 10
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.long
    assert abs(float(data.train.x.mean())) < 1e-3 and abs(float(data.train.x.std()) - 1) < 1e-2
    assert data.train.x.shape[1:] == data.test.x.shape[1:]


def test_split_depends_on_seed_and_train_size_caps():
    a, b = load_dataset("digits", val_size=100, seed=0), load_dataset("digits", val_size=100, seed=1)
    assert not torch.equal(a.val.y, b.val.y)
    assert len(load_dataset("digits", val_size=100, train_size=250).train) == 250


def test_real_mnist_loads_from_data_root(mnist_root):
    data = load_dataset("mnist", data_root=mnist_root, val_size=5000)
    assert data.input_shape == (1, 28, 28)
    assert len(data.train) == 55_000 and len(data.test) == 10_000
    counts = torch.bincount(torch.cat([data.train.y, data.val.y]))
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match=r"(?s)" + str(tmp_path.resolve()).replace("\\", "\\\\") + ".*--download"):
        load_dataset(name, data_root=tmp_path)


@pytest.mark.parametrize("name,cls", [("mnist", "MNIST"), ("cifar10", "CIFAR10")])
def test_a_download_that_fails_says_so_without_a_traceback(tmp_path, monkeypatch, name, cls):
    import torchvision

    class Offline:
        base_folder = "cifar-10-batches-py"

        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")  # what torchvision raises with no network

    monkeypatch.setattr(torchvision.datasets, cls, Offline)
    with pytest.raises(DatasetNotFoundError, match="--download failed .*Error downloading"):
        load_dataset(name, data_root=tmp_path, download=True)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnist3d'; valid datasets: mnist1d, digits"):
        load_dataset("mnist3d")


def test_sampler_reshuffles_each_epoch_and_is_seeded():
    sampler = BatchSampler(10, 5, seed=3)
    first, second = torch.cat([sampler.next(), sampler.next()]), torch.cat([sampler.next(), sampler.next()])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    again = BatchSampler(10, 5, seed=3)
    assert torch.equal(torch.cat([again.next(), again.next()]), first)
    with pytest.raises(ValueError, match="batch_size must be in"):
        BatchSampler(10, 11, seed=0)


@pytest.mark.parametrize("noise", ["symmetric", "pairflip"])
def test_noise_rate_and_mask(noise):
    labels = torch.arange(20_000) % 10
    noisy, mask = corrupt_labels(labels, 10, noise, 0.4, seed=0)
    rate = mask.float().mean().item()
    assert abs(rate - 0.4) < 4 * np.sqrt(0.4 * 0.6 / len(labels))  # within sampling error
    assert torch.equal(mask, noisy != labels)  # every flagged label really moved, nothing else did
    if noise == "pairflip":
        assert torch.equal(noisy[mask], (labels[mask] + 1) % 10)
    else:  # the new class is uniform over the 9 others
        offsets = torch.bincount((noisy[mask] - labels[mask]) % 10, minlength=10)[1:].float()
        assert (offsets / offsets.sum() - 1 / 9).abs().max() < 0.02


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_noise_rate_outside_unit_interval_is_refused(rate):
    with pytest.raises(ValueError, match=r"noise rate must be in \[0, 1\)"):
        corrupt_labels(torch.zeros(10, dtype=torch.long), 10, "symmetric", rate, seed=0)


def test_unknown_noise_lists_valid_ones():
    with pytest.raises(ValueError, match="valid noises: none, symmetric, pairflip"):
        corrupt_labels(torch.zeros(10, dtype=torch.long), 10, "gaussian", 0.2, seed=0)


def test_clean_split_size_is_a_count_a_fraction_or_the_default_and_never_exceeds_training():
    assert len(load_dataset("digits").val) == 144  # default: 10% of digits' 1437 training images
    assert len(load_dataset("mnist1d").val) == 800  # 10% of 8000
    assert len(load_dataset("digits", val_size=0.05).val) == 72
    assert len(load_dataset("digits", val_size=150).val) == 150
    with pytest.raises(ValueError, match="more than the 437 left for training"):
        load_dataset("digits", val_size=1000)
    with pytest.raises(ValueError, match="whole count"):
        load_dataset("digits", val_size=10.5)
    with pytest.raises(ValueError, match="larger than the training split kept by train_size"):
        load_dataset("digits", val_size=300, train_size=100)
