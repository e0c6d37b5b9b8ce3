import copy

import onnxruntime as ort
import pytest
import torch
from torch import nn

from conftest import assert_resume_matches
from torchslim.data import fashion_mnist
from torchslim.data.spec import InputSpec
from torchslim.errors import RecipeError, TorchslimError
from torchslim.export.onnx import export_onnx, verify_onnx
from torchslim.lowrank import LowRankConv2d, LowRankLinear, TuckerConv2d, factorize
from torchslim.lowrank.factorize import apply, find_layers
from torchslim.models import MODELS, load_weights, save_weights
from torchslim.pipeline import run
from torchslim.recipe import parse_recipe
from torchslim.train import TrainConfig, cross_entropy_loss, evaluate_accuracy, fit

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _cnn():
    torch.manual_seed(0)
    model = MODELS["cnn_teacher"]().eval()
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("conv", ["tucker", "svd"])
def test_full_rank_factors_reproduce_the_dense_model(conv):
    model = _cnn()
    factored = copy.deepcopy(model)
    found = find_layers(factored, X, conv=conv)
    for layer in found:
        layer.ranks = layer.full
    records = apply(factored, found)
    kinds = {type(m) for m in factored.modules()}
    assert LowRankLinear in kinds and (TuckerConv2d if conv == "tucker" else LowRankConv2d) in kinds
    assert not any(type(m) is nn.Linear for m in factored.classifier)
    assert max(r["rel_error"] for r in records) < 1e-5
    torch.testing.assert_close(factored.eval()(X), model(X), atol=1e-4, rtol=1e-4)


def test_svd_factors_match_the_truncated_product():
    torch.manual_seed(1)
    dense = nn.Linear(40, 30)
    model = nn.Sequential(dense)
    factorize(model, torch.randn(2, 40), ranks={"0": 5})
    u, s, vh = torch.linalg.svd(dense.weight.detach())
    expected = (u[:, :5] * s[:5]) @ vh[:5]
    layer = model[0]
    assert isinstance(layer, LowRankLinear) and layer.rank == 5
    assert layer.first.weight.shape == (5, 40) and layer.second.weight.shape == (30, 5)
    torch.testing.assert_close(layer.second.weight @ layer.first.weight, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.second.bias, dense.bias)


def test_rank_ratio_and_energy_rules():
    model = _cnn()
    by_ratio = copy.deepcopy(model)
    records, _ = factorize(by_ratio, X, rank_ratio=0.25)
    fc = next(r for r in records if r["layer"] == "classifier.2")
    assert fc["rank"] == [int(0.25 * min(fc["shape"]))]
    conv = next(r for r in records if r["layer"] == "features.7")
    assert conv["kind"] == "tucker" and conv["rank"] == [16, 32]  # 64 -> 128 channels
    assert _params(by_ratio) < 0.3 * _params(model)
    low, high = copy.deepcopy(model), copy.deepcopy(model)
    factorize(low, X, energy=0.5)
    factorize(high, X, energy=0.95)
    assert _params(low) < _params(high)


def test_a_layer_that_would_grow_is_kept_dense_with_a_note():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    records, notes = factorize(model, torch.randn(2, 64), rank_ratio=0.75)  # 48 * 128 > 64 * 64
    assert type(model[1]) is nn.Linear and records[0]["kind"] == "dense"
    assert any(n.startswith("1: rank [48] of [64]") and n.endswith("kept dense") for n in notes)


@pytest.mark.parametrize("on", ["params", "flops"])
def test_budget_is_met_for_the_whole_model(on):
    model = _cnn()
    factored = copy.deepcopy(model)
    records, _ = factorize(factored, X, budget=0.4, budget_on=on)
    if on == "params":
        assert 0.35 * _params(model) < _params(factored) <= 0.4 * _params(model)
    else:
        before, after = sum(r["macs_before"] for r in records), sum(r["macs_after"] for r in records)
        assert 0.35 * before < after <= 0.4 * before
    with pytest.raises(TorchslimError, match="cannot be met"):
        factorize(copy.deepcopy(model), X, budget=0.001)


def test_factorised_model_saves_reloads_and_exports(tmp_path):
    model = _cnn()
    factorize(model, X, energy=0.9)
    save_weights(model, tmp_path / "w.safetensors")
    fresh = load_weights(MODELS["cnn_teacher"](), tmp_path / "w.safetensors").eval()
    assert _params(fresh) == _params(model)
    torch.testing.assert_close(fresh(X), model(X))
    path = export_onnx(model, tmp_path / "m.onnx", InputSpec(shape=[None, 1, 28, 28]))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert verify_onnx(model, session, X) < 1e-4


def test_svd_of_the_trained_mlp_teacher_at_half_the_parameters():
    """Acceptance: MLP teacher trained on all of Fashion-MNIST, SVD at a 50% parameter budget,
    fine-tuned: parameters really halved, test accuracy (10,000 images) within 1 point."""
    data = fashion_mnist.load()
    torch.manual_seed(0)
    teacher = MODELS["mlp_teacher"]()
    fit(teacher, data.train, TrainConfig(epochs=4, lr=2e-3), loss_fn=cross_entropy_loss(), batch_size=128, seed=0)
    reference = evaluate_accuracy(teacher, data.test)
    assert reference > 0.86
    student = copy.deepcopy(teacher)
    factorize(student, data.test.tensors[0][:2], budget=0.5)
    assert _params(student) <= 0.5 * _params(teacher)
    assert sum(isinstance(m, LowRankLinear) for m in student.modules()) >= 3
    fit(student, data.train, TrainConfig(epochs=2, lr=5e-4), loss_fn=cross_entropy_loss(), batch_size=128, seed=0)
    assert evaluate_accuracy(student, data.test) >= reference - 0.01


def test_lowrank_stage_in_a_recipe_resumes_and_reports(tmp_path, tiny_recipe):
    tiny_recipe["model"] = {"builtin": "mlp_teacher"}
    tiny_recipe["stages"] = [
        {"train": {"epochs": 1, "lr": 0.003}},
        {"lowrank": {"budget": 0.5, "finetune": {"epochs": 2, "lr": 0.001}}},
        {"export": {"format": "all"}},
    ]
    recipe = parse_recipe(tiny_recipe)
    report = run(recipe, tmp_path / "full")
    stage = report["stages"][2]
    assert stage["metrics"]["params"] <= 0.5 * report["stages"][1]["metrics"]["params"]
    assert [r["layer"] for r in stage["factorised"] if r["kind"] == "svd"]
    assert report["summary"]["param_ratio"] >= 2
    # the train epoch, then the first fine-tuning epoch
    assert_resume_matches(
        recipe, tmp_path / "resume", 2, "stages/03-export/model.safetensors", full=tmp_path / "full"
    )  # the run above is the uninterrupted one


def test_lowrank_config_needs_exactly_one_rank_rule(tiny_recipe):
    tiny_recipe["stages"] = [{"lowrank": {"rank_ratio": 0.5, "energy": 0.9}}]
    with pytest.raises(RecipeError, match="exactly one of rank_ratio, energy, budget or ranks"):
        parse_recipe(tiny_recipe)
