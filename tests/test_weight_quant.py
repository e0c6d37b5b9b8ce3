"""Weight-only quantization: round-to-nearest grids and GPTQ, which must move a layer's outputs on
its calibration data less than round-to-nearest does."""

import pytest
import torch
from torch import nn

from torchslim.quantize.weights import (
    Grid,
    collect_hessians,
    dequantized,
    gptq,
    output_error,
    quantize_layer,
    quantize_weights,
    rtn,
)


def correlated_inputs(n=2048, d=64, seed=0):
    """Inputs from one distribution (a fixed low-rank mixing plus noise), `seed` drawing the samples:
    activations are correlated like this, which is what GPTQ exploits."""
    mixing = torch.randn(d // 4, d, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d // 4, generator=g) @ mixing + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("grid", [Grid(4, 32, True), Grid(4, 32, False), Grid(3, 64, True), Grid(8, 0, True)])
def test_round_to_nearest_puts_every_group_on_its_grid(grid):
    w = torch.randn(16, 64)
    q, scale, zero = rtn(w, grid)
    lo, hi = grid.levels
    assert q.min() >= lo and q.max() <= hi and torch.equal(q, q.round())
    assert scale.shape == (16, 64 // grid.width(64))
    new = dequantized(q, scale, zero, grid)
    step = scale.repeat_interleave(grid.width(64), 1)
    assert ((new - w).abs() <= step / 2 + 1e-6).all()  # within half a step (nothing clipped)


@pytest.mark.parametrize(
    "grid,act_order",
    [(Grid(4, 32, True), False), (Grid(4, 32, False), False), (Grid(4, 32, True), True), (Grid(3, 0, True), False)],
)
def test_gptq_moves_the_outputs_less_than_round_to_nearest(grid, act_order):
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), correlated_inputs()
    hessian = 2 * x.T @ x / len(x)
    q, scale, zero = gptq(w, hessian, grid, act_order=act_order)
    assert q.min() >= grid.levels[0] and q.max() <= grid.levels[1]
    ours = dequantized(q, scale, zero, grid)
    nearest = dequantized(*rtn(w, grid), grid)
    measured = lambda new: float(((x @ new.T - x @ w.T) ** 2).mean())  # noqa: E731
    assert measured(ours) < 0.7 * measured(nearest)
    assert output_error(w, ours, hessian) == pytest.approx(measured(ours), rel=1e-3)


def test_gptq_on_a_model_beats_round_to_nearest_layer_by_layer_and_at_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    batches = [(correlated_inputs(256, 64, seed=s),) for s in range(4)]
    held_out = correlated_inputs(512, 64, seed=9)
    reference = model(held_out).detach()
    results = {}
    for method in ("rtn", "gptq"):
        copy = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
        copy.load_state_dict(model.state_dict())
        layers = {"0": copy[0], "2": copy[2]}
        hessians = collect_hessians(copy, batches, layers)
        records = quantize_weights(copy, Grid(4, 32, True), method, hessians=hessians, layers=layers)
        results[method] = (records, float(((copy(held_out).detach() - reference) ** 2).mean()))
        assert len(torch.unique(copy[0].weight[0, :32])) <= 16  # 4 bits: at most 16 values per group
    assert results["gptq"][1] < results["rtn"][1]
    assert all(g["output_error"] < r["output_error"] for g, r in zip(results["gptq"][0], results["rtn"][0]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_layer_whose_width_the_group_does_not_divide_ends_with_a_short_group(symmetric):
    grid, w = Grid(4, 32, symmetric), torch.randn(8, 72)  # groups of 32, 32 and 8 columns
    q, scale, zero = rtn(w, grid)
    assert q.shape == (8, 72) and scale.shape == (8, 3)
    assert torch.equal(scale[:, 2], grid.params(w[:, 64:])[0])  # the short group's own scale
    new = dequantized(q, scale, zero, grid)
    assert ((new - w).abs() <= scale.repeat_interleave(32, 1)[:, :72] / 2 + 1e-6).all()
    x = correlated_inputs(1024, 72)
    hessian = 2 * x.T @ x / len(x)
    ours = dequantized(*gptq(w, hessian, grid), grid)
    assert output_error(w, ours, hessian) < output_error(w, new, hessian)


def _tiny_llama_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchslim.models.lm import Logits

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return Logits(LlamaForCausalLM(config).eval()).eval()


@pytest.mark.parametrize(
    "grid,method",
    [
        (Grid(4, 32, True), "gptq"),
        (Grid(4, 32, False), "gptq"),
        (Grid(8, 64, True), "rtn"),
        (Grid(4, 16, False), "rtn"),
        (Grid(4, 128, False), "gptq"),
    ],
)  # 64-wide layers: one short group
def test_quantized_weights_lower_to_matmul_nbits_that_compute_the_same_logits(tmp_path, grid, method):
    import onnx

    from torchslim.export.onnx import export_inputs
    from torchslim.measure.latency import ort_session
    from torchslim.quantize.nbits import lower_quantized_weights
    from torchslim.quantize.weights import linear_layers

    model = _tiny_llama_logits()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 97, (2, 32), generator=g),) for _ in range(4)]
    layers = linear_layers(model)
    assert len(layers) == 14  # q, k, v, o, gate, up, down in two blocks; lm_head stays float
    quantize_weights(model, grid, method, hessians=collect_hessians(model, batches, layers), layers=layers)
    if grid.bits == 4 and method == "rtn":  # bits per layer mixed, as a validation budget leaves them
        for name in list(layers)[::3]:
            quantize_layer(
                layers[name],
                Grid(8, grid.group, grid.symmetric),
                weight=torch.randn(layers[name].weight.shape, generator=g) * 0.02,
            )
    ids = torch.randint(0, 97, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    float_path = export_inputs(
        model, tmp_path / "float.onnx", (ids, mask), ["input_ids", "attention_mask"], [{0: "batch", 1: "sequence"}] * 2
    )
    path = lower_quantized_weights(float_path, tmp_path / "nbits.onnx", model, fuse=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == 14
    out = ort_session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        reference = model(ids, mask).numpy()
    assert abs(out - reference).max() < 1e-3 * (abs(reference).max() + 1)
    assert path.stat().st_size < 0.75 * float_path.stat().st_size


def test_gptq_block_after_block_on_a_llama_beats_round_to_nearest_at_the_logits():
    from torchslim.quantize.weights import gptq_sequential, linear_layers, repeated_blocks

    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 97, (2, 32), generator=g),) for _ in range(8)]
    held_out = torch.randint(0, 97, (4, 32), generator=g)
    reference = _tiny_llama_logits()
    assert len(repeated_blocks(reference)) == 2
    with torch.no_grad():
        target = reference(held_out)
    errors = {}
    for method in ("rtn", "sequential"):
        model = _tiny_llama_logits()
        if method == "rtn":
            quantize_weights(model, Grid(4, 32, True), "rtn", layers=linear_layers(model))
        else:
            records = gptq_sequential(model, batches, Grid(4, 32, True))
            assert len(records) == 14 and records[0]["layer"].startswith("lm.model.layers.0.")
        with torch.no_grad():
            errors[method] = float(((model(held_out) - target) ** 2).mean())
    assert errors["sequential"] < errors["rtn"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_clipping_search_never_rounds_worse_and_helps_heavy_tails(symmetric):
    from torchslim.quantize.weights import Grid, dequantized, rtn

    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((64, 256))  # heavier tails than Gaussian, like LLM weights
    importance = torch.rand(256) + 0.1
    errors = {}
    for clip in (0, 10):
        grid = Grid(4, 128, symmetric, clip)
        q, scale, zero = rtn(w, grid, importance)
        assert q.min() >= grid.levels[0] and q.max() <= grid.levels[1]
        errors[clip] = (((dequantized(q, scale, zero, grid) - w) ** 2) * importance).sum(1)
    assert bool((errors[10] <= errors[0] + 1e-6).all())  # per row: the full range is one of the candidates
    assert errors[10].sum() < 0.95 * errors[0].sum()  # measured: about 10% less on this draw


def test_a_validation_budget_keeps_the_most_sensitive_layers_at_more_bits_and_no_more():
    from torchslim.quantize.budget import mixed_bits, relative_drop
    from torchslim.quantize.weights import quantize_layer

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)
    ).eval()
    x = correlated_inputs(512, 32, seed=3)
    with torch.no_grad():
        target = model(x)
    score = lambda: -float(((model(x).detach() - target) ** 2).mean()) - 1.0  # noqa: E731  (larger is better)
    layers = {str(i): model[i] for i in (0, 2, 4, 6)}
    floats = {n: m.weight.data.clone() for n, m in layers.items()}
    for layer in layers.values():
        quantize_layer(layer, Grid(2, 16, True))
    all_low = score()
    budget = 0.5 * relative_drop(-1.0, all_low)
    chosen = mixed_bits(
        layers, floats, lambda n: quantize_layer(layers[n], Grid(8, 16, True), weight=floats[n]), score, score, budget
    )
    k = len(chosen["high_layers"])
    costs = [r["drop"] for r in chosen["sensitivity"]]
    assert 0 < k < 4 and costs == sorted(costs, reverse=True) and costs[-1] > 0
    assert chosen["high_layers"] == [r["layer"] for r in chosen["sensitivity"][:k]]
    assert chosen["validation_drop"] <= budget and relative_drop(-1.0, score()) == pytest.approx(
        chosen["validation_drop"]
    )
    assert [layers[n].torchslim_weight_grid[0].bits for n in layers] == [
        8 if n in chosen["high_layers"] else 2 for n in layers
    ]
    assert chosen["evaluated"][str(k - 1)] > budget  # one layer fewer at 8 bits misses the budget
