"""Datasets for a run: the built-in Fashion-MNIST, or user data from a `module:function` entry point."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, random_split

from torchslim.data import fashion_mnist
from torchslim.data.checks import check_bundle, check_splits
from torchslim.data.spec import DataBundle, InputSpec
from torchslim.entrypoint import call_builder, resolve
from torchslim.errors import DataError, RecipeError

__all__ = ["DataBundle", "InputSpec", "build_data", "fashion_mnist"]


def build_data(spec, search_dir: Path | None = None) -> DataBundle:
    """`spec` is the recipe's DataSpec."""
    if spec.builtin == "fashion_mnist":
        fixed = dict(
            val_size=spec.val_size,
            split_seed=spec.split_seed,
            train_subset=spec.train_subset,
            eval_subset=spec.eval_subset,
        )
        clash = sorted(set(fixed) & set(spec.kwargs))
        if clash:
            raise RecipeError(
                f"data.kwargs: {', '.join(clash)} are data settings of their own; write them "
                "directly under data: instead of under data.kwargs."
            )
        return call_builder(fashion_mnist.load, {**fixed, **spec.kwargs}, "data.kwargs")
    result = call_builder(resolve(spec.entrypoint, "data.entrypoint", search_dir), spec.kwargs, "data.kwargs")
    return _from_user(result, spec)


def _first(dataset: Dataset, n: int | None) -> Dataset:
    return Subset(dataset, range(min(n, len(dataset)))) if n else dataset


def _from_user(result, spec) -> DataBundle:
    """A user entry point returns a DataBundle, or a dict with 'train' and 'test' datasets and
    optionally 'val', 'input' (the InputSpec fields) and 'num_classes'."""
    if isinstance(result, DataBundle):
        bundle = result
        check_bundle(bundle)
    elif isinstance(result, dict) and {"train", "test"} <= result.keys():
        unknown = set(result) - {"train", "val", "test", "input", "num_classes", "description"}
        if unknown:
            raise DataError(
                f"data.entrypoint returned unknown keys {sorted(unknown)}; "
                "allowed: train, val, test, input, num_classes, description."
            )
        checked = check_splits({"train": result["train"], "val": result.get("val"), "test": result["test"]})
        train, val, test = checked["train"], checked["val"], checked["test"]
        if val is None:
            if len(train) <= spec.val_size:
                raise DataError(
                    f"data.entrypoint gave {len(train)} training examples, too few to hold out "
                    f"data.val_size={spec.val_size} for validation; return a 'val' dataset."
                )
            train, val = random_split(
                train,
                [len(train) - spec.val_size, spec.val_size],
                generator=torch.Generator().manual_seed(spec.split_seed),
            )
        x0 = train[0][0]
        input_spec = (
            InputSpec(**result["input"])
            if "input" in result
            else InputSpec(shape=[None, *x0.shape], dtype=str(x0.dtype).removeprefix("torch."))
        )
        bundle = DataBundle(
            train,
            val,
            test,
            input_spec,
            result.get("num_classes"),
            result.get("description", f"user data from {spec.entrypoint}"),
        )
    else:
        raise DataError(
            f"data.entrypoint '{spec.entrypoint}' returned {type(result).__name__}; expected a "
            "dict with 'train' and 'test' datasets (and optionally 'val', 'input', 'num_classes')."
        )
    bundle.train = _first(bundle.train, spec.train_subset)
    bundle.val = _first(bundle.val, spec.eval_subset)
    bundle.test = _first(bundle.test, spec.eval_subset)
    return bundle
