import torch
from torch import nn

from torchslim.measure import count_flops, count_params, model_size_bytes, peak_inference_bytes
from torchslim.measure.latency import pytorch_latency
from torchslim.measure.task import classification_metrics


def test_params_count_nonzero_after_zeroing():
    model = nn.Linear(10, 4)
    with torch.no_grad():
        model.weight[:2] = 0
    stats = count_params(model)
    assert stats == {"params": 44, "trainable_params": 44, "nonzero_params": 24}
    model.bias.requires_grad_(False)
    assert count_params(model)["trainable_params"] == 40


def test_flops_come_from_torch_counter():
    assert count_flops(nn.Linear(100, 30), torch.zeros(1, 100)) == 2 * 100 * 30
    conv = nn.Conv2d(1, 8, 3, padding=1)
    assert count_flops(conv, torch.zeros(1, 1, 28, 28)) == 2 * 28 * 28 * 8 * 9


def test_size_is_bytes_on_disk(tmp_path):
    model = nn.Linear(1000, 100)
    size = model_size_bytes(model, tmp_path / "m.safetensors")
    assert size == (tmp_path / "m.safetensors").stat().st_size
    assert 4 * 100_100 <= size < 4 * 100_100 + 1024  # float32 values plus a small header


def test_latency_summary_fields():
    lat = pytorch_latency(nn.Linear(50, 5), torch.zeros(4, 50), threads=1, warmup=2, repeats=7)
    assert lat["repeats"] == 7 and lat["batch_size"] == 4 and lat["threads"] == 1
    assert 0 < lat["min"] <= lat["p50"] <= lat["p95"]


def test_peak_memory_grows_with_batch():
    model = nn.Sequential(nn.Linear(100, 1000), nn.ReLU(), nn.Linear(1000, 10))
    small = peak_inference_bytes(model, torch.zeros(8, 100))
    big = peak_inference_bytes(model, torch.zeros(64, 100))
    assert small >= 8 * 1000 * 4 and big >= 64 * 1000 * 4 and big > 4 * small


def test_classification_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]).numpy()
    labels = torch.tensor([0, 1, 1]).numpy()
    m = classification_metrics(logits, labels)
    assert abs(m["accuracy"] - 2 / 3) < 1e-6
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    assert abs(m["loss"] - expected) < 1e-6
