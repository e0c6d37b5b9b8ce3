"""Activation-aware scaling (AWQ): folds found by tracing, the float model unchanged by them, and
less output error after rounding where inputs have outlier channels."""

import pytest
import torch
from torch import nn

from torchslim.quantize.awq import awq_scale, find_folds, search_scale
from torchslim.quantize.weights import Grid, collect_hessians, dequantized, linear_layers, output_error, rtn


def _tiny(kind: str):
    import transformers

    from torchslim.models.lm import Logits

    torch.manual_seed(0)
    shape = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    else:  # Gemma 3: norms compute x * (1 + weight); a norm before and after each sub-block
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**shape, head_dim=16))
        with torch.no_grad():  # weights of a trained model, not the zeros of a fresh one
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    return Logits(model.eval()).eval()


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_folds_are_found_by_tracing_and_scaling_leaves_the_float_model_unchanged(kind):
    model = _tiny(kind)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 97, (2, 48), generator=g),) for _ in range(4)]
    held_out = torch.randint(0, 97, (3, 40), generator=g)
    layers = linear_layers(model)
    folds = find_folds(model, batches[0], layers)
    found = {(f.producer.rpartition(".")[2], tuple(c.rpartition(".")[2] for c in f.consumers)) for f in folds}
    feed = "post_attention_layernorm" if kind == "llama" else "pre_feedforward_layernorm"
    assert found == {
        ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
        (feed, ("gate_proj", "up_proj")),
        ("up_proj", ("down_proj",)),
    }
    assert len(folds) == 6  # three per block; o_proj reads grouped-query attention: none
    assert all(f.offset == (1.0 if kind == "gemma3" else 0.0) for f in folds if "norm" in f.producer)
    with torch.no_grad():
        before = model(held_out).clone()
    weights = {n: m.weight.detach().clone() for n, m in layers.items()}
    magnitudes: dict = {}
    hessians = collect_hessians(model, batches, layers, magnitudes)
    records = awq_scale(model, batches, Grid(4, 16, True), layers, hessians, magnitudes)
    assert len(records) == 6
    recollected = collect_hessians(model, batches, layers)  # the Hessians were rescaled to the new inputs
    for name in layers:
        assert torch.allclose(hessians[name], recollected[name], rtol=1e-3, atol=1e-5 * recollected[name].abs().max())
    changed = [n for n, m in layers.items() if not torch.equal(m.weight, weights[n])]
    assert changed, "no scale was folded in"
    with torch.no_grad():
        after = model(held_out)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()  # float32 rounding only


def test_an_activation_between_the_layers_is_not_folded_across():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    layers = {"2": model[2]}
    assert find_folds(model, (torch.randn(4, 16),), layers) == []
    no_activation = nn.Sequential(nn.Linear(16, 32), nn.Identity(), nn.Linear(32, 8)).eval()
    folds = find_folds(no_activation, (torch.randn(4, 16),), {"2": no_activation[2]})
    assert [(f.producer, f.consumers) for f in folds] == [("0", ["2"])]


def test_scaling_cuts_the_rounding_error_where_inputs_have_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 128, generator=g)
    x[:, :4] *= 20  # a few channels carry large activations, as in trained language models
    w = torch.randn(64, 128, generator=g)
    hessian = 2 * x.T @ x / len(x)
    grid = Grid(4, 128, True)
    s, alpha, ratio = search_scale(w, hessian, x.abs().mean(0), grid)
    assert alpha > 0 and ratio < 0.8
    scaled = dequantized(*rtn(w * s, grid), grid) / s
    plain = dequantized(*rtn(w, grid), grid)
    assert output_error(w, scaled, hessian) == pytest.approx(ratio * output_error(w, plain, hessian), rel=1e-4)


def test_smoothquant_moves_activation_peaks_into_the_weights_and_keeps_the_float_model():
    from torchslim.quantize.awq import input_peaks, smooth_scale

    model = _tiny("llama")
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 97, (2, 48), generator=g),) for _ in range(3)]
    with torch.no_grad():  # an outlier channel, as trained language models have
        for layer in model.lm.model.layers:
            layer.post_attention_layernorm.weight[5] = 30.0
    layers = linear_layers(model)
    reader = "lm.model.layers.0.mlp.gate_proj"
    peak_before = input_peaks(model, batches, {reader: layers[reader]})[reader]
    with torch.no_grad():
        before = model(batches[0][0]).clone()
    records = smooth_scale(model, batches, layers, alpha=0.5)
    assert len(records) == 6
    peak_after = input_peaks(model, batches, {reader: layers[reader]})[reader]
    assert peak_after.max() < 0.5 * peak_before.max()  # the outlier channel flattened
    with torch.no_grad():
        assert (model(batches[0][0]) - before).abs().max() <= 1e-4 * before.abs().max()
