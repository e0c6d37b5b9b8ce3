"""Decoder families beyond Llama, on tiny random configs: what each technique does with them."""

import pytest
import torch

from torchslim.models.lm import as_linear
from torchslim.quantize.weights import Grid, linear_layers, quantize_weights

transformers = pytest.importorskip("transformers")


def test_gpt2s_conv1d_projections_become_linear_layers_that_compute_the_same_and_quantize():
    """GPT-2 keeps its projections in Conv1D modules (weight stored in × out): loaded as a language model
    they become nn.Linear with the same outputs, so int4 reaches all of them, not only the head."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        as_linear(model)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    layers = linear_layers(model)
    assert len(layers) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of the 2 blocks
    quantize_weights(model, Grid(4, 32, True), "rtn", layers=layers)
    with torch.no_grad():
        quantized = model(input_ids=ids).logits
    assert 0 < (quantized - want).abs().max() < 0.5 * want.abs().max()
