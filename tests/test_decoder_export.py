"""The key/value-cache ONNX export of causal LMs (tiny random-weight configs: shapes and numbers
checked against PyTorch, nothing claimed): logits over 10 greedy steps, generation equal to
Hugging Face's, left padding, the empty cache that perplexity runs feed, int4 MatMulNBits."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from torchslim.export.decoder import Generator, cache_layout, complete_feed, export_decoder, pick, verify_decoder

TOLERANCE = 1e-4  # float32 logits of a 2-layer model, ONNX Runtime vs PyTorch


def _llama(**over):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **over})).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    lm = _llama()
    path = export_decoder(lm, tmp_path_factory.mktemp("decoder") / "model.onnx")
    return lm, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_cache_graph_declares_dynamic_cache_inputs_and_outputs(exported):
    lm, session = exported
    names = [i.name for i in session.get_inputs()]
    assert names[:2] == ["input_ids", "attention_mask"] and len(names) == 2 + 2 * 2
    key = session.get_inputs()[2]
    assert key.name == "past_key_values.0.key" and key.shape == ["batch", 2, "past_sequence", 16]
    assert [o.name for o in session.get_outputs()][:2] == ["logits", "present.0.key"]
    assert cache_layout(lm) == [(2, 16), (2, 16)]


def test_cache_logits_match_pytorch_over_ten_generated_tokens(exported):
    lm, session = exported
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    check = verify_decoder(lm, session, prompt, steps=10)
    assert check["steps"] == 10 and check["max_abs_diff"] < TOLERANCE and check["same_tokens"]


def test_greedy_generation_equals_transformers_generate(exported):
    lm, session = exported
    prompt = [5, 17, 42, 99, 3]
    got = Generator(session).generate(prompt, 12)
    with torch.no_grad():
        want = lm.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()
    assert got == want


def test_the_empty_cache_gives_the_full_sequence_logits(exported):
    lm, session = exported
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(2))
    feed = complete_feed(session, {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 20), np.int64)})
    assert feed["past_key_values.1.value"].shape == (3, 2, 0, 16)
    got = session.run(None, feed)[0]
    with torch.no_grad():
        want = lm(ids).logits.numpy()
    assert got.shape == (3, 20, 300) and np.abs(got - want).max() < TOLERANCE
    step = complete_feed(session, {"input_ids": ids[:, :1].numpy(), "attention_mask": np.ones((3, 21), np.int64)})
    assert step["past_key_values.0.key"].shape == (3, 2, 20, 16)  # a decode step's cache length from the mask


def test_left_padding_gives_the_unpadded_logits(exported):
    lm, session = exported
    ids = np.array([[0, 0, 0, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7]], np.int64)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1], [1] * 7], np.int64)
    got = session.run(None, complete_feed(session, {"input_ids": ids, "attention_mask": mask}))[0]
    alone = session.run(None, complete_feed(session, {"input_ids": ids[:1, 3:], "attention_mask": mask[:1, 3:]}))[0]
    assert np.abs(got[0, 3:] - alone[0]).max() < TOLERANCE


def test_int4_weights_lowered_to_matmul_nbits_match_the_dequantized_model_with_a_cache(tmp_path):
    from torchslim.quantize.nbits import lower_quantized_weights
    from torchslim.quantize.weights import Grid, quantize_weights

    lm = _llama()
    quantize_weights(lm, Grid(4, 32, True), "rtn")
    graph = export_decoder(lm, tmp_path / "grid.onnx")
    path = lower_quantized_weights(graph, tmp_path / "int4.onnx", lm, fuse=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in __import__("onnx").load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head stays float
    check = verify_decoder(lm, session, torch.tensor([[4, 8, 15, 16, 23, 42]]), steps=10)
    assert check["max_abs_diff"] < 1e-3 and check["same_tokens"]
    # fused (the default): q/k/v and gate/up of each block in one MatMulNBits each, the same numbers
    fused = lower_quantized_weights(graph, tmp_path / "fused.onnx", lm)
    nodes = __import__("onnx").load(str(fused)).graph.node
    assert [n.op_type for n in nodes].count("MatMulNBits") == 2 * 4
    widths = sorted(next(a.i for a in n.attribute if a.name == "N") for n in nodes if n.op_type == "MatMulNBits")
    assert widths == sorted([64 + 2 * 32, 64, 2 * 128, 64] * 2)  # q+k+v, o, gate+up, down
    feed = complete_feed(
        session, {"input_ids": np.array([[4, 8, 15, 16]]), "attention_mask": np.ones((1, 4), np.int64)}
    )
    merged = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    for a, b in zip(session.run(None, feed), merged.run(None, feed)):
        np.testing.assert_array_equal(a, b)


def test_sampling_keeps_to_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logits = np.array([5.0, 4.0, 1.0, 0.0, -1.0])
    assert pick(logits, 0.0, 0, 1.0, rng) == 0
    assert {pick(logits, 1.0, 2, 1.0, rng) for _ in range(200)} == {0, 1}
    assert {pick(logits, 1.0, 0, 0.5, rng) for _ in range(50)} == {0}  # 0 alone holds 0.71 of the mass


@pytest.mark.parametrize(
    "bits,symmetric,hidden",
    [(4, True, 48), (4, False, 48), (8, True, 48), (8, False, 64), (4, False, 64), (4, True, 64)],
)
def test_a_tied_head_and_embedding_table_lower_to_the_same_integers(tmp_path, bits, symmetric, hidden):
    """48 wide: a short last group of 32, so the head's blocks are padded and the table is stored a
    second time in the Gather's layout; 64: whole groups, one copy of the integers serves both."""
    from torchslim.quantize.nbits import lower_quantized_weights
    from torchslim.quantize.weights import Grid, output_head, quantize_weights, tied_to_input

    lm = _llama(tie_word_embeddings=True, hidden_size=hidden, num_attention_heads=4)
    name, head = output_head(lm)
    assert name == "lm_head" and tied_to_input(lm, head)
    quantize_weights(lm, Grid(bits, 32, symmetric), "rtn", layers={name: head})
    path = lower_quantized_weights(export_decoder(lm, tmp_path / "grid.onnx"), tmp_path / "q.onnx", lm)
    graph = __import__("onnx").load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("GatherBlockQuantized") == 1
    assert not [
        i.name for i in graph.initializer if i.data_type == 1 and list(i.dims) in ([300, hidden], [hidden, 300])
    ]
    integers = [
        i
        for i in graph.initializer  # uint8 tables of the packed integers (not scales, zero points)
        if i.data_type == 2 and int(np.prod(i.dims)) >= 300 * hidden * bits // 8
    ]
    assert len(integers) == (1 if hidden == 64 else 2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = verify_decoder(lm, session, torch.tensor([[4, 8, 15, 16, 23, 42]]), steps=10)
    assert check["max_abs_diff"] < 1e-3 and check["same_tokens"]


def test_a_tied_head_takes_the_largest_group_that_divides_its_width():
    from torchslim.quantize.weight_only import head_group

    head = lambda width: torch.nn.Linear(width, 10, bias=False)  # noqa: E731
    assert head_group(128, head(576), tied=True) == 64  # SmolLM2: 576 = 9 x 64, so one table serves both
    assert head_group(128, head(576), tied=False) == 128  # an untied head keeps the layers' group
    assert head_group(128, head(640), tied=True) == 128 and head_group(32, head(40), tied=True) == 32


def _gemma3(**over):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256,
    )
    return Gemma3ForCausalLM(Gemma3TextConfig(**{**cfg, **over})).eval()


@pytest.mark.parametrize("build", [_llama, _gemma3], ids=["llama-gqa", "gemma3-sliding"])
def test_export_attention_equals_the_models_own_and_is_restored(build):
    """Grouped attention (the query group folded onto its key/value head, float additive mask) gives
    the logits of the model's sdpa attention, with left padding and (Gemma 3) sliding windows."""
    from torchslim.export.attention import exporting_attention

    lm = build()
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        want = lm(input_ids=ids, attention_mask=mask).logits
        with exporting_attention(lm):
            assert lm.config._attn_implementation == "torchslim_grouped"
            got = lm(input_ids=ids, attention_mask=mask).logits
    assert lm.config._attn_implementation == "sdpa"
    assert torch.allclose(got[0, 4:], want[0, 4:], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)


def test_the_exported_graph_reads_the_cache_in_place_and_fuses_rms_norms(tmp_path):
    """No Expand of a cached key/value tensor, no Reciprocal left, and ONNX Runtime's optimized graph
    runs one SimplifiedLayerNormalization per RMS norm (2 per layer + the final one)."""
    import onnx

    path = export_decoder(_llama(), tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "Reciprocal" not in ops and ops.count("Expand") <= 3  # the mask's and positions' broadcasts only
    cache = {i.name for i in graph.input if i.name.startswith("past_key_values")}
    made = {o: n for n in graph.node for o in n.output}
    for node in graph.node:  # what the key/value cache flows into, before the attention MatMuls
        if node.op_type == "Expand":
            assert not (set(node.input) & cache) and not any(
                made.get(i) is not None and made[i].op_type == "Concat" and set(made[i].input) & cache
                for i in node.input
            )
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("SimplifiedLayerNormalization") + fused.count("SkipSimplifiedLayerNormalization") == 5


def test_divide_by_root_keeps_the_arithmetic():
    import onnx
    from onnx import TensorProto, helper

    from torchslim.export.decoder import divide_by_root

    nodes = [
        helper.make_node("Sqrt", ["v"], ["r"]),
        helper.make_node("Reciprocal", ["r"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["y"]),
        helper.make_node("Reciprocal", ["r"], ["shared"]),  # read twice: left alone
        helper.make_node("Mul", ["shared", "x"], ["z"]),
        helper.make_node("Add", ["shared", "z"], ["w"]),
    ]
    spec = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [3])  # noqa: E731
    model = helper.make_model(
        helper.make_graph(nodes, "g", [spec("x"), spec("v")], [spec("y"), spec("w")]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    feed = {"x": np.array([1.0, -2.0, 3.0], np.float32), "v": np.array([4.0, 0.5, 9.0], np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert divide_by_root(model.graph) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Sqrt", "Div", "Reciprocal", "Mul", "Add"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert all(np.allclose(a, b, rtol=1e-6) for a, b in zip(before, after))


def test_gemma3_with_sliding_windows_exports_with_a_cache_that_matches_pytorch(tmp_path):
    lm = _gemma3()
    session = ort.InferenceSession(str(export_decoder(lm, tmp_path / "gemma.onnx")), providers=["CPUExecutionProvider"])
    check = verify_decoder(lm, session, torch.tensor([[4, 8, 15, 16, 23, 42]]), steps=10)  # 16 tokens > window 4
    assert check["max_abs_diff"] < TOLERANCE and check["same_tokens"]


def test_a_model_of_the_same_structure_reuses_the_traced_graph_with_its_own_weights(tmp_path, monkeypatch):
    """Healing changes the weights, not the structure: the second export writes the new weights into the
    graph traced for the first (one trace, not two) and serves the new model's logits; a pruned model
    (other shapes) is traced again. Tied embeddings and all-equal norm weights stay distinct tensors."""
    from torchslim.export import decoder

    traces = []
    trace = decoder._trace
    monkeypatch.setattr(decoder, "_trace", lambda *a: traces.append(1) or trace(*a))
    monkeypatch.setattr(decoder, "_LAST", {})
    model = _llama()
    export_decoder(model, tmp_path / "a.onnx")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "norm" in name else 0.05))  # norms no longer all equal
    export_decoder(model, tmp_path / "b.onnx")
    assert len(traces) == 1
    session = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    check = verify_decoder(model, session, torch.randint(0, 300, (1, 7)), steps=5)
    assert check["same_tokens"] and check["max_abs_diff"] < 1e-4
    first = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    ids = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64)}
    feed = complete_feed(first, ids)
    assert not np.allclose(first.run(["logits"], feed)[0], session.run(["logits"], feed)[0])
    smaller = _llama(intermediate_size=48)
    export_decoder(smaller, tmp_path / "c.onnx")
    assert len(traces) == 2


def test_the_fused_attention_kernel_serves_padded_batches_and_decoding_as_pytorch(exported, tmp_path):
    """`fused=True` attends in ONNX Runtime's GroupQueryAttention, one node per layer and no
    Concat of the cache; a left-padded batch (prefill from an empty cache, then one decoding step onto
    it) gives PyTorch's logits at every real position. A model whose head size the kernel does not take
    (12, not a multiple of 8) is exported in the grouped form instead, with a warning that says why."""
    import onnx

    from torchslim.export.decoder import ATTENTION_KEY
    from torchslim.log import collect_warnings

    lm, _ = exported
    path = export_decoder(lm, tmp_path / "fused.onnx", fused=True)
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert {p.key: p.value for p in model.metadata_props}[ATTENTION_KEY] == "fused"
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    cache = {i.name for i in model.graph.input if i.name.startswith("past_key_values")}
    assert not any(n.op_type == "Concat" and set(n.input) & cache for n in model.graph.node)
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 300, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :3] = 0  # the second sequence is 3 tokens, left-padded
    logits, *present = fused.run(None, complete_feed(fused, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}))
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    torch.testing.assert_close(torch.from_numpy(logits)[0], out.logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(logits)[1, 3:], out.logits[1, 3:], atol=1e-4, rtol=1e-4)
    step = torch.tensor([[7], [9]])
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    past = [i.name for i in fused.get_inputs() if i.name.startswith("past_key_values")]
    feed = {"input_ids": step.numpy(), "attention_mask": mask.numpy(), **dict(zip(past, present))}
    logits, *_ = fused.run(None, feed)
    with torch.no_grad():
        want = lm(
            input_ids=step,
            attention_mask=mask,
            position_ids=(mask.sum(-1, keepdim=True) - 1),
            past_key_values=out.past_key_values,
        ).logits
    torch.testing.assert_close(torch.from_numpy(logits), want, atol=1e-4, rtol=1e-4)

    collect_warnings()
    odd = _llama(hidden_size=48)  # 4 heads of 12
    path = export_decoder(odd, tmp_path / "grouped.onnx", fused=True)
    model = onnx.load(str(path))
    assert {p.key: p.value for p in model.metadata_props}[ATTENTION_KEY] == "grouped"
    assert "GroupQueryAttention" not in [n.op_type for n in model.graph.node]
    assert any("head size 12 is not a multiple of 8" in w for w in collect_warnings())
    check = verify_decoder(odd, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), ids[:1], steps=3)
    assert check["same_tokens"] and check["max_abs_diff"] < 1e-4
