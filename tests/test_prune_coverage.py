"""Structured pruning on the coverage zoo: Hugging Face architectures from configs, PyTorch's own
transformer and the common idioms. Every model prunes at ratio 0.5, keeps its output shape, loses at
least 30% of its parameters, and reloads in a fresh process to identical outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prune_zoo import ZOO, build, example, run
from torchslim.models import save_weights
from torchslim.prune import plan, structured

TESTS = Path(__file__).parent


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Every zoo model pruned at ratio 0.5, saved with its outputs on the example."""
    out = tmp_path_factory.mktemp("zoo")
    results = {}
    for name in ZOO:
        model, x = build(name), example(name)
        before, reference = n_params(model), run(model, x)
        structured(model, x, ratio=0.5, verbose=False)
        after = run(model, x)
        save_weights(model, out / f"{name}.safetensors")
        torch.save(after, out / f"{name}.pt")
        results[name] = (before, n_params(model), reference, after)
    return out, results


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_prunes_keeps_its_output_shape_and_shrinks(name, pruned):
    _, results = pruned
    before, after, reference, out = results[name]
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()
    assert after <= 0.7 * before, f"{name}: only {1 - after / before:.0%} of the parameters removed"


RELOAD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from prune_zoo import ZOO, build, example, run
from torchslim.models import load_weights
diffs = {{}}
for name in ZOO:
    model = load_weights(build(name, seed=1), {out!r} + f"/{{name}}.safetensors").eval()
    diffs[name] = float((run(model, example(name)) - torch.load({out!r} + f"/{{name}}.pt")).abs().max())
print(json.dumps(diffs))
"""


def test_every_pruned_zoo_model_reloads_in_a_fresh_process(pruned):
    out, _ = pruned
    code = RELOAD.format(tests=str(TESTS), out=str(out))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(diffs) == set(ZOO)
    assert all(d == 0.0 for d in diffs.values()), {k: v for k, v in diffs.items() if v}


def _widths(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] + [
        m.out_features for m in model.modules() if isinstance(m, nn.Linear)
    ]


def test_se_resnet_prunes_to_the_same_widths_whatever_the_spelling():
    widths = {}
    for spelling in ("se-resnet-none", "se-resnet-unsqueeze", "se-resnet-view"):
        model = build(spelling)
        structured(model, example(spelling), ratio=0.5, verbose=False)
        widths[spelling] = _widths(model)
    assert widths["se-resnet-none"] == widths["se-resnet-unsqueeze"] == widths["se-resnet-view"]
    assert widths["se-resnet-none"][0] == 16  # the stem and residual stream: half of 32


def test_gqa_heads_go_with_their_query_group():
    model, x = build("hf-llama-gqa"), example("hf-llama-gqa")
    structured(model, x, ratio=0.5, verbose=False)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == 16  # one of two KV heads of 16
    assert attn.q_proj.out_features == 32 and attn.o_proj.in_features == 32  # its two query heads
    assert attn.num_key_value_groups == 2


class Odd(nn.Module):
    """A model with an op no rule knows (special_i0) on one branch's channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(torch.cat([torch.special.i0(self.a(x)), torch.relu(self.b(x))], 1))


def test_a_group_kept_whole_names_the_module_op_and_line():
    p = plan(Odd().eval(), torch.randn(2, 3, 8, 8), ratio=0.5)
    assert [g.producers for g in p.groups] == [("b",)]
    kept = next(k for k in p.kept if k.producers == ("a",))
    assert "special_i0" in kept.reasons[0] and "test_prune_coverage.py:" in kept.reasons[0]
    assert "special_i0" in p.summary()


HF_UNIFORM = ["hf-bert", "hf-distilbert", "hf-roberta", "hf-vit", "hf-gpt2", "hf-llama-gqa", "hf-qwen2"]
FROM_PRETRAINED = """
import json, sys, torch, transformers
sys.path.insert(0, {tests!r})
from prune_zoo import example, run
diffs = {{}}
for name, cls in {classes!r}.items():
    model = getattr(transformers, cls).from_pretrained({out!r} + "/" + name).eval()
    diffs[name] = float((run(model, example(name)) - torch.load({out!r} + f"/{{name}}.pt")).abs().max())
print(json.dumps(diffs))
"""


def test_hugging_face_models_pruned_uniformly_round_trip_through_from_pretrained(tmp_path):
    classes = {}
    for name in HF_UNIFORM:
        model, x = build(name), example(name)
        heads, hidden = model.config.num_attention_heads, model.config.hidden_size
        structured(model, x, ratio=0.5, verbose=False)
        assert model.torchslim_prune_plan.config.startswith("config updated"), model.torchslim_prune_plan.config
        assert (model.config.num_attention_heads, model.config.hidden_size) == (heads // 2, hidden // 2)
        model.save_pretrained(tmp_path / name)
        torch.save(run(model, x), tmp_path / f"{name}.pt")
        classes[name] = type(model).__name__
    code = FROM_PRETRAINED.format(tests=str(TESTS), out=str(tmp_path), classes=classes)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    assert diffs == {name: 0.0 for name in HF_UNIFORM}


def test_a_hugging_face_model_pruned_unevenly_keeps_its_config_and_says_why():
    model, x = build("hf-bert"), example("hf-bert")
    config = model.config.to_dict()
    structured(model, x, ratio={"bert.encoder.layer.0.*": 0.5, "default": 0.0}, verbose=False)
    assert model.bert.encoder.layer[0].intermediate.dense.out_features < config["intermediate_size"]
    assert model.bert.encoder.layer[1].intermediate.dense.out_features == config["intermediate_size"]
    assert model.config.to_dict() == config
    assert "differ between layers" in model.torchslim_prune_plan.config


def test_a_fused_qkv_projection_loses_whole_heads_from_q_k_and_v():
    model, x = build("vit-fused-qkv"), example("vit-fused-qkv")
    structured(model, x, ratio=0.5, verbose=False)
    attn = model.blocks[0].attn
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * attn.head_dim == 96
    assert attn.proj.in_features == 32


def test_a_layer_whose_code_fixes_a_width_keeps_its_channels_and_says_where():
    """timm's attention reshapes its output to its input's width: at ratio 0.3 the hidden size (64 -> 45)
    and the heads (4 x 16 -> 3 x 16) disagree, so the pruned copy fails there; that layer type keeps
    its channels, the rest is pruned, and the plan names the class and the line."""
    model, x = build("vit-fused-qkv"), example("vit-fused-qkv")
    reference_shape = run(model, x).shape
    structured(model, x, ratio=0.3, verbose=False)
    assert run(model, x).shape == reference_shape
    assert model.blocks[0].attn.qkv.weight.shape == (192, 64)
    assert model.blocks[0].mlp[0].out_features < 256
    reasons = [r for k in model.torchslim_prune_plan.kept for r in k.reasons if "run check" in r]
    assert reasons and "FusedQKVAttention" in reasons[0] and "prune_zoo.py:" in reasons[0]
