"""Hidden-size (residual stream) pruning of decoder language models: tiny random-weight Llama and
Gemma 3 models (behaviour, not quality). The exact check: channels that are zero on every token carry
nothing, so removing them — with the RMS correction — must leave every logit as it was; without the
correction the norms would divide by a smaller root-mean-square and the logits would change."""

import copy

import pytest
import torch

from torchslim.prune.transformer.hidden import causal_lm, prune_hidden, scale_norm_output


def _llama(**over):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-10,
    )  # random weights make a tiny residual stream: keep eps out of the comparison
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **over})).eval()


def _gemma3(**over):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256,
        rms_norm_eps=1e-10,
    )
    return Gemma3ForCausalLM(Gemma3TextConfig(**{**cfg, **over})).eval()


def _zero_channels(lm, channels):
    """Make residual channels `channels` zero on every token (nothing writes them), and give the norms
    non-trivial weights so a wrong rescaling shows."""
    with torch.no_grad():
        lm.get_input_embeddings().weight[:, channels] = 0
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight[channels] = 0
            layer.mlp.down_proj.weight[channels] = 0
        for name, m in lm.named_modules():
            if name.endswith("norm") and "self_attn" not in name:
                m.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))


def _batches(n=2):
    ids = torch.randint(0, 300, (n, 16), generator=torch.Generator().manual_seed(1))
    return [(ids, torch.ones_like(ids))]


@pytest.mark.parametrize("build", [_llama, _gemma3], ids=["llama", "gemma3"])
def test_removing_channels_that_carry_nothing_changes_no_logit(build, tmp_path):
    lm = build()
    zero = list(range(1, 64, 2))  # every odd channel
    _zero_channels(lm, zero)
    ids = _batches()[0][0]
    with torch.no_grad():
        want = lm(ids).logits
    record = prune_hidden(lm, 0.5, _batches(), multiple=32)
    assert record["hidden_after"] == 32 and lm.config.hidden_size == 32
    assert lm.get_input_embeddings().weight.shape == (300, 32)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # still one shared table
    for layer in lm.model.layers:
        assert layer.self_attn.q_proj.in_features == 32 and layer.mlp.down_proj.out_features == 32
        assert layer.self_attn.q_proj.out_features == 64  # heads untouched
    with torch.no_grad():
        got = lm(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the model's own class reloads it with the same logits (Gemma recomputes sqrt(hidden) for the table)
    lm.save_pretrained(tmp_path)
    again = type(lm).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, got, atol=1e-5, rtol=1e-5)


def test_the_rms_correction_is_what_keeps_the_logits():
    """The same removal without the correction (every norm factor 1) changes the logits."""
    from torchslim.prune.transformer.hidden import keep_channels

    lm = _llama()
    _zero_channels(lm, list(range(32, 64)))
    ids = _batches()[0][0]
    with torch.no_grad():
        want = lm(ids).logits
        keep_channels(lm, torch.arange(32))
        assert (lm(ids).logits - want).abs().max() > 1e-2


def test_the_least_active_channels_go_and_the_untied_head_follows():
    lm = _llama(tie_word_embeddings=False)
    weak = [3, 10, 17, 40]
    with torch.no_grad():  # channels nothing writes much into are the least important
        lm.get_input_embeddings().weight[:, weak] *= 1e-3
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight[weak] *= 1e-3
            layer.mlp.down_proj.weight[weak] *= 1e-3
    head = lm.get_output_embeddings().weight.detach().clone()
    prune_hidden(lm, 4 / 64, _batches(), multiple=4)
    assert lm.config.hidden_size == 60
    kept = [c for c in range(64) if c not in weak]
    assert torch.equal(lm.get_output_embeddings().weight, head[:, kept])


def test_scale_norm_output_handles_both_norm_forms_and_refuses_a_bias():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from torchslim.errors import TorchslimError

    x = torch.randn(5, 8)
    for norm in (LlamaRMSNorm(8), Gemma3RMSNorm(8)):
        with torch.no_grad():
            norm.weight.uniform_(-0.5, 1.5)
            before = norm(x)
            scale_norm_output(norm, 1.7)
            torch.testing.assert_close(norm(x), before * 1.7, rtol=1e-5, atol=1e-6)
    with pytest.raises(TorchslimError, match="without bias"):
        scale_norm_output(torch.nn.LayerNorm(8), 2.0)


def test_a_model_without_a_language_model_inside_is_refused():
    from torchslim.errors import TorchslimError

    with pytest.raises(TorchslimError, match="no Hugging Face language model"):
        causal_lm(torch.nn.Linear(3, 3))


def test_heads_neurons_and_hidden_size_resize_back_from_the_shapes():
    """`resize_decoder` rebuilds a head-, neuron- and hidden-pruned structure from `layer_shapes`."""
    from torchslim.prune.transformer.decoder import layer_shapes, prune_decoder, resize_decoder

    lm = _llama(intermediate_size=128)
    fresh = copy.deepcopy(lm)
    prune_decoder(lm, head_ratio=0.5, ffn_ratio=0.25, batches=_batches(), hidden_ratio=0.5)
    shapes = layer_shapes(lm)
    assert shapes[0] == {"heads": 2, "kv_heads": 1, "head_dim": 16, "neurons": 96, "hidden": 32}
    resize_decoder(fresh, shapes)
    fresh.load_state_dict(lm.state_dict())
    ids = _batches()[0][0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, lm(ids).logits)
