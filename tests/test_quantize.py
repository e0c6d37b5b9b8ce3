import numpy as np
import onnx
import pytest
import torch

from torchslim.export import export_onnx, onnx_outputs
from torchslim.measure.latency import ort_session
from torchslim.measure.predict import sqnr_db
from torchslim.models import mlp_teacher
from torchslim.pipeline import run
from torchslim.quantize import lower
from torchslim.quantize.observers import OBSERVERS, MinMax
from torchslim.recipe import parse_recipe
from torchslim.train import TrainConfig, cross_entropy_loss, fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):
    torch.manual_seed(0)
    model = mlp_teacher()
    fit(model, small_data.train, TrainConfig(epochs=2, lr=2e-3), loss_fn=cross_entropy_loss(), batch_size=64)
    path = export_onnx(model.eval(), tmp_path_factory.mktemp("q") / "float.onnx", small_data.input)
    return model, path


def _accuracy(path, data):
    x, y = data.test.tensors
    return float((onnx_outputs(ort_session(path), x.numpy()).argmax(1) == y.numpy()).mean())


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _calibration(data, n=4, bs=64):
    x = data.train.tensors[0][: n * bs].numpy()
    return [x[i : i + bs] for i in range(0, len(x), bs)]


def test_observers_on_known_data():
    rng = np.random.default_rng(0)
    values = rng.normal(size=200_000).astype(np.float32)
    values[:5] = 40.0  # a few outliers
    ranges = {}
    for name, cls in OBSERVERS.items():
        obs = cls()
        for chunk in np.array_split(values, 8):
            obs.update(chunk)
        ranges[name] = obs.range()
    assert ranges["minmax"] == (pytest.approx(float(values.min())), 40.0)
    for name in ("percentile", "entropy"):
        assert ranges[name][1] < 10, (name, ranges[name])  # outliers clipped

    # the MSE observer's range has lower quantization error on the data than min-max's
    def err(lo, hi):
        scale = (hi - lo) / 255
        q = np.clip(np.round((values - lo) / scale), 0, 255) * scale + lo
        return float(np.mean((q - values) ** 2))

    assert err(*ranges["mse"]) <= err(*ranges["minmax"])
    assert err(*ranges["mse"]) <= min(err(*ranges[n]) for n in ("percentile", "entropy", "moving_average"))


def test_int8_weight_sqnr_per_layer(trained):
    model, _ = trained
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.detach().numpy()
            scale = np.abs(w).max(axis=1, keepdims=True) / 127  # per-channel symmetric int8
            q = np.clip(np.round(w / scale), -127, 127) * scale
            assert sqnr_db(w, q) > 35, name
            obs = MinMax()
            obs.update(w)
            assert obs.range() == (pytest.approx(float(w.min())), pytest.approx(float(w.max())))


@pytest.mark.parametrize("observer", sorted(OBSERVERS))
def test_static_int8_is_real_and_accurate(trained, small_data, tmp_path, observer):
    _, path = trained
    out = lower.static_int8(path, tmp_path / "q.onnx", _calibration(small_data), observer=observer)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(out)
    assert out.stat().st_size < 0.3 * path.stat().st_size
    assert _accuracy(out, small_data) > _accuracy(path, small_data) - 0.015


def test_lowered_agreement_metrics(trained, small_data, tmp_path):
    from torchslim.measure import lowered_agreement
    from torchslim.tasks.classification import top1_agreement

    model, path = trained
    out = lower.static_int8(path, tmp_path / "q.onnx", _calibration(small_data))
    agree = lowered_agreement(model, ort_session(out), out, small_data.test.tensors[0][:256], agreement=top1_agreement)
    assert agree["fake_quant_sqnr_db"] > 30  # int8 kernels reproduce the QDQ simulation
    assert agree["float_sqnr_db"] > 20 and agree["float_top1_agreement"] > 0.95


def test_dynamic_weight_only_and_fp16(trained, small_data, tmp_path):
    _, path = trained
    base = _accuracy(path, small_data)
    dyn = lower.dynamic_int8(path, tmp_path / "d.onnx")
    assert "MatMulInteger" in _ops(dyn) or "DynamicQuantizeMatMul" in _ops(dyn)
    assert _accuracy(dyn, small_data) > base - 0.015 and dyn.stat().st_size < 0.3 * path.stat().st_size
    w4 = lower.weight_only(path, tmp_path / "w4.onnx", bits=4, group_size=32)
    assert "MatMulNBits" in _ops(w4)
    assert w4.stat().st_size <= 0.20 * path.stat().st_size
    assert _accuracy(w4, small_data) > base - 0.01
    h = lower.half(path, tmp_path / "h.onnx")
    assert 0.45 < h.stat().st_size / path.stat().st_size < 0.55
    x = small_data.test.tensors[0][:64].numpy()
    assert np.abs(onnx_outputs(ort_session(h), x) - onnx_outputs(ort_session(path), x)).max() < 2e-2


def _student_recipe(tiny_recipe, *stages):
    tiny_recipe["model"] = {"builtin": "cnn_student"}
    tiny_recipe["data"].update(train_subset=1024, eval_subset=300)
    # the same training in every test here: the first trains, the others take its weights (and random
    # state) from the session's private cache (conftest), so what follows is what a fresh training gives
    tiny_recipe["stages"] = [{"train": {"epochs": 2, "lr": 0.003, "cache": True}}, *stages]
    return parse_recipe(tiny_recipe)


def test_quantize_stage_with_fallback_and_resume(tmp_path, tiny_recipe):
    recipe = _student_recipe(
        tiny_recipe,
        {
            "quantize": {
                "method": "static",
                "weight_bits": 2,
                "max_accuracy_drop": 0.005,
                "calibration_batches": 2,
                "sensitivity_samples": 300,
            }
        },
        {"export": {"format": "all"}},
    )
    report = run(recipe, tmp_path / "a")
    q = report["stages"][2]
    info = q["quantization"]
    assert len(info["sensitivity"]) == 7 and info["budget_met"] and info["val_drop"] <= 0.005
    assert info["float_layers"], "2-bit weights should force some layers back to float"
    assert q["metrics"]["size_bytes"] < report["stages"][1]["metrics"]["size_bytes"]
    assert report["stages"][3]["metrics"]["size_bytes"] == q["metrics"]["size_bytes"]  # export keeps int8
    assert "Quantization sensitivity" in (tmp_path / "a" / "report.html").read_text()

    # a run that stopped after the quantize stage resumes with the int8 artifact, not a float re-export
    state = tmp_path / "a" / "state.json"
    import json

    saved = json.loads(state.read_text())
    saved["stages"] = saved["stages"][:3]
    saved["status"] = "running"
    state.write_text(json.dumps(saved))
    resumed = run(recipe, tmp_path / "a", resume=True)
    assert resumed["stages"][3]["metrics"]["size_bytes"] == q["metrics"]["size_bytes"]


def test_narrow_weights_stay_consistent_with_int8_kernels(trained, small_data, tmp_path):
    from torchslim.measure import lowered_agreement

    model, path = trained
    out = lower.static_int8(path, tmp_path / "w4.onnx", _calibration(small_data), weight_bits=4)
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer]
    int8 = [w for w in weights if w.dtype == np.int8 and w.size > 100]
    assert int8 and all(np.abs(w).max() <= 7 for w in int8)
    agree = lowered_agreement(model, ort_session(out), out, small_data.test.tensors[0][:256])
    assert agree["fake_quant_sqnr_db"] > 30  # the fused kernels compute what the QDQ graph says


def test_qat_bakes_weights_on_the_grid_and_learns(small_data):
    from torchslim.models import cnn_student
    from torchslim.quantize.qat import prepare_qat

    torch.manual_seed(0)
    model = cnn_student()
    handle = prepare_qat(model, weight_bits=4, learnable_scales=True)
    assert any("scale" in n for n, _ in model.named_parameters())  # LSQ scales are trained
    images, labels = small_data.train.tensors  # a third of the session's images: the claims are about the grid
    train = torch.utils.data.TensorDataset(images[:1024], labels[:1024])
    result = fit(
        model,
        train,
        TrainConfig(epochs=2, lr=2e-3),
        loss_fn=cross_entropy_loss(),
        batch_size=64,
        epoch_setup=lambda m, e: handle.freeze_observers() if e >= 1 else None,
    )
    assert result.history[1]["loss"] < result.history[0]["loss"]
    frozen = {n: float(o.hi) for n, o in model.torchslim_qat.items()}
    ranges = handle.finish()
    assert not hasattr(model, "torchslim_qat") and set(model.state_dict()) == set(cnn_student().state_dict())
    assert all(hi > lo for lo, hi in ranges.values()) and len(frozen) == 7
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            for row in m.weight.detach().flatten(1):
                assert len(torch.unique(row)) <= 15  # 4-bit symmetric grid: -7..7 times one scale


def test_qat_stage_lowers_to_int8_kernels(tmp_path, tiny_recipe):
    recipe = _student_recipe(
        tiny_recipe,
        {
            "quantize": {
                "method": "qat",
                "weight_bits": 4,
                "calibration_batches": 2,
                "finetune": {"epochs": 1, "lr": 0.001},
                "freeze_observers_epoch": 1,
            }
        },
    )
    report = run(recipe, tmp_path)
    q = report["stages"][2]
    assert q["quantization"]["method"] == "qat" and len(q["quantization"]["qat"]["layers"]) == 7
    assert q["metrics"]["fake_quant_sqnr_db"] > 30
    assert q["metrics"]["accuracy"] >= report["stages"][1]["metrics"]["accuracy"] - 0.1
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(tmp_path / q["artifact"])


def _dq_scale(model, node_name, input_index):
    """The scale of the DequantizeLinear feeding input `input_index` of the named node."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    dq = producer[node.input[input_index]]
    assert dq.op_type == "DequantizeLinear"
    return inits.get(dq.input[0]), inits[dq.input[1]]


def test_qat_ships_the_ranges_and_weight_scales_it_trained(tmp_path, tiny_recipe):
    from safetensors.torch import load_file

    recipe = _student_recipe(
        tiny_recipe,
        {
            "quantize": {
                "method": "qat",
                "weight_bits": 4,
                "learnable_scales": True,
                "calibration_batches": 2,
                "finetune": {"epochs": 1, "lr": 0.001},
            }
        },
    )
    report = run(recipe, tmp_path)
    q = report["stages"][2]["quantization"]
    artifact = onnx.load(str(tmp_path / report["stages"][2]["artifact"]))
    assert len(q["trained_ranges"]) == 7 and len(q["trained_weight_scales"]) == 7
    for layer, record in q["trained_ranges"].items():
        lo, hi = min(record["range"][0], 0.0), max(record["range"][1], 0.0)
        _, scale = _dq_scale(artifact, record["node"], 0)  # the layer's input activation
        assert scale.size == 1 and float(scale) == pytest.approx((hi - lo) / 255, rel=1e-5), layer
    # the int8 weights times their scales are exactly the weights QAT trained (LSQ scales included)
    trained = load_file(str(tmp_path / report["stages"][2]["dir"] / "model.safetensors"))
    for layer, record in q["trained_ranges"].items():
        w_q, w_scale = _dq_scale(artifact, record["node"], 1)
        shape = [-1] + [1] * (w_q.ndim - 1)
        dequantized = w_q.astype(np.float32) * w_scale.reshape(shape)
        expected = trained[f"{layer}.weight"].numpy()
        expected = expected if expected.shape == dequantized.shape else expected.T
        assert np.abs(dequantized - expected).max() < 1e-6, layer


def test_default_scheme_runs_every_conv_and_gemm_on_integer_kernels(tmp_path, tiny_recipe):
    """On the CPU the test runs on (Xeon with VNNI or AVX2-only EPYC): the default static int8 of an
    SE-ResNet (excitation by broadcasting, the common way) runs every Conv/Gemm on an integer kernel in
    ONNX Runtime's optimised graph, and the report lists the schemes tried with their node counts."""
    tiny_recipe.update(model={"entrypoint": "zoo:SEResNet", "kwargs": {"width": 16}})  # tests/zoo.py
    tiny_recipe["data"].update(train_subset=512, eval_subset=200)
    tiny_recipe["stages"] = [
        {"train": {"epochs": 1, "lr": 0.003}},
        {"quantize": {"calibration_batches": 2, "sensitivity_samples": 200}},
    ]
    report = run(parse_recipe(tiny_recipe), tmp_path)
    q = report["stages"][2]
    kernels = q["metrics"]["kernels"]
    assert kernels["float"] == 0 and kernels["integer"] == 16, kernels  # 15 convolutions + the classifier
    assert set(kernels["by_op"]) <= {"QLinearConv", "QGemm", "QLinearMatMul"}
    scheme = q["quantization"]["scheme"]
    assert {r["name"] for r in scheme["candidates"]} == {"S8S8", "U8S8 reduce_range", "U8S8"}
    chosen = next(r for r in scheme["candidates"] if r["name"] == scheme["chosen"])
    assert chosen["integer_nodes"] == 16 and chosen["float_nodes"] == 0
    assert report["environment"]["cpu_features"] is not None
    assert report["comparison"]["shapes"]["batch 8"]["speedup"]["rounds"] >= 10
    html = (tmp_path / "report.html").read_text()
    assert "scheme tried on this CPU" in html and f"{scheme['chosen']} (chosen)" in html
