"""Depth pruning of decoder language models (torchslim.prune.transformer.depth): Block Influence on calibration
inputs, blocks removed with the config and the cache slots following, the smaller model equal to
running the kept blocks by hand, reloaded by its Hugging Face class and exported with its cache."""

import pytest
import torch

from torchslim.errors import TorchslimError
from torchslim.prune.transformer.depth import block_influence, keep_blocks, least_influential, remove_blocks


def _tiny(kind: str, layers: int = 4):
    import transformers

    torch.manual_seed(0)
    shape = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval()
    # Gemma 3 with sliding-window and global layers mixed: layer_types must follow the kept blocks
    config = transformers.Gemma3TextConfig(
        **shape, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
    )
    return transformers.Gemma3ForCausalLM(config).eval()


def _by_hand(model, ids, keep):
    """Logits of the original model with only the blocks in `keep` run (the others skipped)."""
    layers = model.model.layers
    skipped = [i for i in range(len(layers)) if i not in keep]
    originals = {i: layers[i].forward for i in skipped}
    for i in skipped:
        layers[i].forward = lambda hidden_states, *a, **k: hidden_states
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for i, f in originals.items():
            layers[i].forward = f


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_removed_blocks_leave_a_model_equal_to_skipping_them(kind, tmp_path):
    import copy

    model = _tiny(kind)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    influence = block_influence(model, [(ids,)])
    assert len(influence) == 4 and all(0 <= v <= 2 for v in influence)
    remove = least_influential(influence, 1)
    assert remove == [min(range(4), key=influence.__getitem__)]
    want = _by_hand(model, ids, [i for i in range(4) if i not in remove])
    small = copy.deepcopy(model)
    keep = remove_blocks(small, [1, 2])
    assert keep == [0, 3] and len(small.model.layers) == 2 and small.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    if kind == "gemma3":
        assert small.config.layer_types == ["sliding_attention", "full_attention"]
    with torch.no_grad():
        got = small(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, _by_hand(model, ids, [0, 3]), atol=1e-5)
    one = copy.deepcopy(model)
    remove_blocks(one, remove)
    with torch.no_grad():
        assert torch.allclose(one(input_ids=ids, use_cache=False).logits, want, atol=1e-5)
        # generation with the cache: each kept block writes its own slot
        cached = small(input_ids=ids[:, :20], use_cache=True)
        step = small(input_ids=ids[:, 20:21], past_key_values=cached.past_key_values, use_cache=True).logits
    assert torch.allclose(step[:, -1], got[:, 20], atol=1e-4)
    small.save_pretrained(tmp_path / "small")  # its Hugging Face class reloads it
    again = type(small).from_pretrained(tmp_path / "small").eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids, use_cache=False).logits, got, atol=1e-5)


def test_a_depth_pruned_decoder_exports_with_its_cache(tmp_path):
    from torchslim.export.decoder import export_decoder, verify_decoder
    from torchslim.measure.latency import ort_session

    model = _tiny("llama")
    remove_blocks(model, [1])
    path = export_decoder(model, tmp_path / "small.onnx")
    check = verify_decoder(model, ort_session(path, 1), torch.randint(0, 97, (1, 12)), steps=10)
    assert check["same_tokens"] and check["max_abs_diff"] < 1e-4


def test_bad_block_choices_are_refused():
    model = _tiny("llama")
    with pytest.raises(TorchslimError, match="keep at least one"):
        least_influential([0.1, 0.2], 2)
    with pytest.raises(TorchslimError, match="cannot keep blocks"):
        keep_blocks(model, [0, 7])
    with pytest.raises(TorchslimError, match="repeated blocks"):
        block_influence(torch.nn.Linear(3, 3), [(torch.zeros(1, 3),)])
