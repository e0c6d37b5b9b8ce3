import torch
from torch import nn

from torchslim.measure import count_flops, count_params, model_size_bytes, peak_inference_bytes
from torchslim.measure.latency import pytorch_latency
from torchslim.tasks.classification import classification_metrics


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


def test_interleaved_comparison_reports_speedup_spread_and_slowdowns(tmp_path):
    """Three 'stages': a big MLP, a small one (the compression), then the big one again (a stage that
    made the model slower). The comparison times them side by side and names the slowdown."""
    from torchslim.data import fashion_mnist
    from torchslim.export import export_onnx
    from torchslim.measure.compare import compare_stages
    from torchslim.models import mlp_student, mlp_teacher

    data = fashion_mnist.load(eval_subset=64)
    paths = []
    for i, build in enumerate((mlp_teacher, mlp_student, mlp_teacher)):
        torch.manual_seed(i)
        (tmp_path / f"s{i}").mkdir()
        paths.append(export_onnx(build().eval(), tmp_path / f"s{i}" / "model.onnx", data.input))
    entries = [{"name": n, "artifact": f"s{i}/model.onnx"} for i, n in enumerate(("baseline", "prune", "widen"))]
    feeds = lambda: {"batch 32": {"input": data.test.tensors[0][:32].numpy()}}  # noqa: E731
    record = compare_stages(entries, tmp_path, 0, feeds, threads=1, seconds=2, max_rounds=30)
    shape = record["shapes"]["batch 32"]
    assert shape["rounds"] >= 10 and [s["name"] for s in shape["stages"]] == ["baseline", "prune", "widen"]
    assert shape["speedup"]["q25"] <= shape["speedup"]["median"] <= shape["speedup"]["q75"]
    assert [sd["stage"] for sd in shape["slowdowns"]] == ["widen"] and shape["slowdowns"][0]["ratio"] > 2
    assert record["loadavg_before"] is not None and isinstance(record["noisy"], bool)
    # a pytorch-served run has no ONNX artifacts to compare: said, not guessed
    entries[2]["artifact"] = "s2/model.safetensors"
    assert "skipped" in compare_stages(entries, tmp_path, 0, feeds, threads=1)


def test_kernel_counts_read_the_graph_onnx_runtime_runs(tmp_path):
    from torchslim.data import fashion_mnist
    from torchslim.export import export_onnx
    from torchslim.measure.kernels import kernel_counts
    from torchslim.models import cnn_student
    from torchslim.quantize import lower

    data = fashion_mnist.load(train_subset=256, eval_subset=64)
    f32 = export_onnx(cnn_student().eval(), tmp_path / "f.onnx", data.input)
    assert kernel_counts(f32)["integer"] == 0 and kernel_counts(f32)["float"] == 7
    dyn = kernel_counts(lower.dynamic_int8(f32, tmp_path / "d.onnx"))  # only the Linear layers go int8
    assert dyn["integer"] == 2 and dyn["float"] == 5 and len(dyn["float_nodes"]) == 5
    wo = kernel_counts(lower.weight_only(f32, tmp_path / "w.onnx"))
    assert wo["weight_only"] == 2 and wo["integer"] == 0
