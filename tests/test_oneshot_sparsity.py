"""One-shot LLM sparsity: magnitude, Wanda and SparseGPT on calibration inputs (torchslim.prune.sparsity.oneshot)."""

import pytest
import torch

from torchslim.errors import TorchslimError
from torchslim.prune.sparsity.oneshot import keep_mask, prune_sequential, sparsegpt, wanda
from torchslim.quantize.weights import output_error


def _layer_data(rows=64, cols=128, tokens=2048, seed=0):
    """A weight and correlated inputs (a few dozen directions plus noise) with a few loud channels, as
    a transformer's activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=g) @ torch.randn(32, cols, generator=g) / 32**0.5 + 0.3 * torch.randn(
        tokens, cols, generator=g
    )
    x[:, ::8] *= 8  # loud channels scattered over the width
    w = torch.randn(rows, cols, generator=g)
    return w, 2 * x.T @ x / tokens


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_n_m_masks_keep_exactly_n_of_every_m_consecutive_weights(criterion):
    w, h = _layer_data()
    for n, m in ((2, 4), (4, 8), (1, 4)):
        new = wanda(w, h, n=n, m=m) if criterion == "wanda" else sparsegpt(w, h, n=n, m=m)
        per_group = (new != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert torch.all(per_group == n), (n, m)


def test_unstructured_masks_give_every_row_its_share():
    w, h = _layer_data()
    for new in (wanda(w, h, 0.5), sparsegpt(w, h, 0.6)):
        assert torch.all((new == 0).sum(1) >= int(0.5 * w.shape[1]))
    rows = (sparsegpt(w, h, 0.6) == 0).float().mean(1)
    assert torch.allclose(rows, torch.full_like(rows, 0.6), atol=0.02)
    assert torch.equal(keep_mask(torch.randn(3, 8), 0.0), torch.ones(3, 8, dtype=torch.bool))


def test_wanda_and_sparsegpt_change_the_layer_output_less_than_magnitude():
    """Output error on the calibration inputs: SparseGPT's weight update beats Wanda's choice, which
    beats magnitude's once some input channels are loud."""
    w, h = _layer_data()
    for pattern in ({"sparsity": 0.5}, {"n": 2, "m": 4}):
        mag = w * keep_mask(w.abs(), **pattern)
        errors = [output_error(w, new, h) for new in (mag, wanda(w, h, **pattern), sparsegpt(w, h, **pattern))]
        assert errors[2] < errors[1] < errors[0], (pattern, errors)
        assert errors[1] < 0.8 * errors[0] and errors[2] < 0.8 * errors[1], (pattern, errors)


def test_bad_patterns_are_refused_with_the_fix():
    w, h = _layer_data(cols=130)
    with pytest.raises(TorchslimError, match="multiple of m"):
        wanda(w, h, n=2, m=4)
    with pytest.raises(TorchslimError, match="either `sparsity`"):
        keep_mask(w, 0.5, 2, 4)
    with pytest.raises(TorchslimError, match="0 < n < m"):
        keep_mask(w, None, 4, 4)


def test_prune_sequential_sparsifies_every_block_layer_of_a_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchslim.models.lm import Logits

    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    ).eval()
    model = Logits(lm)
    head = lm.lm_head.weight.detach().clone()
    batches = [(torch.randint(0, 256, (2, 32)),) for _ in range(4)]
    records = prune_sequential(model, batches, "sparsegpt", n=2, m=4)
    assert len(records) == 14 and all(r["layer"].startswith("lm.model.layers.") for r in records)
    for layer in (m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"):
        assert torch.all((layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(-1) == 2)
    assert torch.equal(lm.lm_head.weight, head)  # the head (and the tied embeddings) untouched
    assert torch.isfinite(model(batches[0][0])).all()
