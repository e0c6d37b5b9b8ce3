"""Checks of a user's datasets before anything trains on them: every split has items, each item is
an `(input, target)` pair of tensors (numpy arrays and Python numbers are converted, with a note),
inputs agree in shape and dtype, targets are numbers. Each message names the split, the item and
the fix. Only a sample of items is read (the first, the last and some between): datasets may be
large and lazily loaded."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch.utils.data import Dataset

from torchslim.errors import DataError
from torchslim.log import console

SAMPLE = 32  # items read per split


def sample_indices(n: int, k: int = SAMPLE) -> list[int]:
    """The first, the last and evenly spaced items between: at most `k` indices of `n`."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _tensor(value, split: str, index: int, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise DataError(
                f"data: the {split} split's item {index} has a {what} that is a numpy array of Python objects "
                f"(shape {list(value.shape)}); give numbers of one dtype (e.g. np.float32)."
            )
        return torch.from_numpy(value)
    if isinstance(value, (numbers.Number, np.number)) and not isinstance(value, bool):
        return torch.as_tensor(value)
    raise DataError(
        f"data: the {split} split's item {index} has a {what} of type {type(value).__name__}; torchslim takes "
        "torch tensors (or numpy arrays / numbers, converted). Return tensors from your dataset's __getitem__."
    )


def _item(dataset: Dataset, split: str, index: int) -> tuple:
    try:
        item = dataset[index]
    except Exception as exc:
        raise DataError(
            f"data: reading item {index} of the {split} split failed: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. Fix the dataset's __getitem__ "
            f"(len() says it has {len(dataset)} items)."
        ) from None
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        got = type(item).__name__ + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        raise DataError(
            f"data: the {split} split's item {index} is a {got}, not an (input, target) pair; make the "
            "dataset's __getitem__ return (input, target), e.g. a TensorDataset(inputs, labels)."
        )
    return item


class AsTensors(Dataset):
    """A dataset whose numpy inputs/targets are handed out as tensors (the user's stays untouched)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return tuple(torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in item[:2]) + tuple(item[2:])


def check_split(dataset: Dataset, split: str, converted: list[str]) -> Dataset:
    """`dataset` checked on a sample of its items; wrapped to hand out tensors when it gives numpy."""
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(
            f"data: the {split} split ({type(dataset).__name__}) has no len(); give a map-style Dataset "
            "(with __len__ and __getitem__), e.g. a TensorDataset."
        ) from None
    if n == 0:
        raise DataError(
            f"data: the {split} split is empty; return at least one example for it (check the data "
            "function's filters, paths and data.train_subset / data.eval_subset)."
        )
    first_shape = first_dtype = None
    numpy_seen = False
    for i in sample_indices(n):
        item = _item(dataset, split, i)
        numpy_seen |= any(isinstance(v, np.ndarray) for v in item[:2])
        x = _tensor(item[0], split, i, "input")
        y = _tensor(item[1], split, i, "target")
        if first_shape is None:
            first_shape, first_dtype = tuple(x.shape), x.dtype
        elif tuple(x.shape) != first_shape or x.dtype != first_dtype:
            raise DataError(
                f"data: the {split} split's item {i} has an input of shape {list(x.shape)} ({x.dtype}), but item "
                f"{sample_indices(n)[0]} has {list(first_shape)} ({first_dtype}); every input must have one shape "
                "and dtype (resize or pad them in the dataset)."
            )
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise DataError(f"data: the {split} split's item {i} has a target that is not finite ({y.tolist()}).")
    if numpy_seen:
        converted.append(split)
        return AsTensors(dataset)
    return dataset


def check_splits(splits: dict[str, Dataset | None]) -> dict[str, Dataset | None]:
    """The splits ({"train": ..., "val": ..., "test": ...}; None: not given) checked, and wrapped where
    they give numpy arrays (said once)."""
    converted: list[str] = []
    checked = {name: None if d is None else check_split(d, name, converted) for name, d in splits.items()}
    if converted:
        console.log(f"data: the {', '.join(converted)} split(s) give numpy arrays; converted to torch tensors")
    return checked


def check_bundle(bundle) -> None:
    """Check (and where needed wrap) the train / val / test splits of a DataBundle in place."""
    for split, dataset in check_splits({s: getattr(bundle, s) for s in ("train", "val", "test")}).items():
        setattr(bundle, split, dataset)


def check_labels(dataset: Dataset, split: str, classes: int) -> None:
    """Class labels of a sample of items are integers in [0, classes)."""
    for i in sample_indices(len(dataset)):
        y = torch.as_tensor(_item(dataset, split, i)[1])
        if y.is_floating_point() or y.dtype == torch.bool or y.numel() != 1:
            raise DataError(
                f"data: the {split} split's item {i} has the label {y.tolist() if y.numel() < 8 else list(y.shape)} "
                f"({y.dtype}); a classifier's label is one integer class index (torch.long), not one-hot "
                "vectors or floats: return int(label)."
            )
        if not 0 <= int(y) < classes:
            raise DataError(
                f"data: the {split} split's item {i} has the label {int(y)}, outside the model's {classes} "
                f"outputs (labels must be 0 to {classes - 1}); give the model {int(y) + 1} or more outputs, "
                "or renumber the labels from 0."
            )
