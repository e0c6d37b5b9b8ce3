"""Activation-aware low-rank factorisation (ASVD scaling, SVD-LLM whitening): the same function at
full rank, and whitening's defining property — at a given rank, the least output error on the
calibration inputs, below plain SVD's — on inputs with correlated, outlier-heavy channels."""

import copy

import pytest
import torch
from torch import nn

from torchslim.lowrank.factorize import factorize


def _inputs(n=512, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5
    x = torch.randn(n, width, generator=g) @ mix
    x[:, :3] *= 20  # a few outlier channels, as language models' activations have
    return x


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 40))


def _output_error(model, factored, x):
    with torch.no_grad():
        return float((model(x) - factored(x)).norm() / model(x).norm())


@pytest.mark.parametrize("kind", ["scale", "whiten"])
def test_full_rank_factors_compute_the_same_function(kind):
    """W·S factorised, S⁻¹ folded back: at full rank (forced; it is not cheaper) the same layer."""
    from torchslim.lowrank.factorize import apply, find_layers, input_transforms

    model, x = _model(), _inputs()
    factored = copy.deepcopy(model)
    linears = {"0": factored[0], "2": factored[2]}
    found = find_layers(factored, x[:2], "linear", transforms=input_transforms(factored, linears, [(x,)], kind))
    for layer in found:
        layer.ranks = layer.full
    records = apply(factored, found)
    assert [r["kind"] for r in records] == ["svd", "svd"] and all(r["rel_error"] < 1e-4 for r in records)
    assert _output_error(model, factored, x) < 1e-4


def test_whitening_has_the_least_output_error_at_a_given_rank():
    model, x = _model(), _inputs()
    errors = {}
    for kind in ("none", "scale", "whiten"):
        factored = copy.deepcopy(model)
        options = {"calibration": [(x,)]} if kind != "none" else {}
        factorize(factored, x[:2], layers="linear", activation_aware=kind, ranks={"0": 12, "2": 12}, **options)
        errors[kind] = _output_error(model, factored, x)
    assert errors["whiten"] < 0.8 * errors["none"], errors
    assert errors["whiten"] <= errors["scale"] + 1e-6, errors
    # held-out inputs from the same distribution keep the order
    held = _inputs(seed=1)
    factored = copy.deepcopy(model)
    factorize(factored, x[:2], layers="linear", activation_aware="whiten", calibration=[(x,)], ranks={"0": 12, "2": 12})
    plain = copy.deepcopy(model)
    factorize(plain, x[:2], layers="linear", ranks={"0": 12, "2": 12})
    assert _output_error(model, factored, held) < _output_error(model, plain, held)


def test_a_tied_head_is_left_whole():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 32)
            self.body = nn.Linear(32, 32)
            self.head = nn.Linear(32, 50, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.body(self.embed(ids)))

    model = Tied()
    records, _ = factorize(model, torch.zeros(2, 5, dtype=torch.long), layers="linear", rank_ratio=0.25)
    assert [r["layer"] for r in records] == ["body"]
    assert model.head.weight is model.embed.weight


def test_activation_aware_needs_calibration():
    from torchslim.errors import TorchslimError

    with pytest.raises(TorchslimError, match="needs calibration batches"):
        factorize(_model(), _inputs()[:2], activation_aware="whiten", rank_ratio=0.5)
