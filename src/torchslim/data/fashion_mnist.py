"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files, gzip)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from torchslim.data.idx import read_idx
from torchslim.data.spec import DataBundle, InputSpec
from torchslim.errors import DataError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "TORCHSLIM_DATA"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Statistics of the full 60k training images in [0, 1]; fixed so every subset is fed alike.
MEAN, STD = 0.2860, 0.3530
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def data_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _hint(root: Path) -> str:
    return (
        f"Install the data with `sudo apt-get install dataset-fashion-mnist` (files go to {DEFAULT_DIR}), "
        f"or set {ENV_VAR} to a folder holding {', '.join(FILES.values())}. Looked in {root}."
    )


def load_arrays(root: Path | None = None) -> dict[str, np.ndarray]:
    root = Path(root) if root else data_dir()
    hint = _hint(root)
    arrays = {key: read_idx(root / name, hint) for key, name in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {split} files in {root} do not fit together: images "
                f"{list(images.shape)}, labels {list(labels.shape)}. {hint}"
            )
        if labels.max(initial=0) > 9:
            raise DataError(f"Fashion-MNIST {split} labels in {root} go up to {labels.max()}, expected 0..9. {hint}")
    return arrays


def _tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(images).float().div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def load(
    val_size: int = 5000,
    split_seed: int = 0,
    train_subset: int | None = None,
    eval_subset: int | None = None,
    root: Path | None = None,
) -> DataBundle:
    """Deterministic splits: a seeded permutation of the 60k training images gives train and
    validation; the official 10k test set is the held-out set. Subsets take the first N."""
    arrays = load_arrays(root)
    n = len(arrays["train_labels"])
    if not 0 < val_size < n:
        raise DataError(f"data.val_size must be between 1 and {n - 1}, got {val_size}.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).numpy()
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset:
        train_idx = train_idx[:train_subset]
    test_images, test_labels = arrays["test_images"], arrays["test_labels"]
    if eval_subset:
        val_idx = val_idx[:eval_subset]
        test_images, test_labels = test_images[:eval_subset], test_labels[:eval_subset]
    images, labels = arrays["train_images"], arrays["train_labels"]
    return DataBundle(
        train=_tensors(images[train_idx], labels[train_idx]),
        val=_tensors(images[val_idx], labels[val_idx]),
        test=_tensors(test_images, test_labels),
        input=InputSpec(shape=[None, 1, 28, 28], pixel_scale=1 / 255, mean=[MEAN], std=[STD]),
        num_classes=10,
        description=f"Fashion-MNIST ({len(train_idx)} train / {len(val_idx)} val / {len(test_labels)} test)",
    )
