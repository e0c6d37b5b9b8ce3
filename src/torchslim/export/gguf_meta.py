"""The metadata of a GGUF file: copied from the GGUF file a model came from, or built from a Hugging
Face model's config and the tokenizer files in its folder as llama.cpp's converter builds them
(architecture, sizes, rope, vocabulary with token types, merges or scores, special tokens, chat
template).

    arch, fields, extra = metadata(lm, source)   # source: a .gguf file or the model's folder
    for key, value, vtype, sub_type in fields: writer.add_key_value(key, value, vtype, sub_type=sub_type)

`extra` holds tensors llama.cpp reads that the model has no parameter for (`rope_freqs.weight`,
Llama 3's rotary frequency factors). The pre-tokenizer (`tokenizer.ggml.pre`, how llama.cpp splits
text before the merges) is read off the structure of `tokenizer.json`'s pre-tokenizer: its split
expression and whether digits are split one by one; one llama.cpp does not name is an error that
says so rather than a file that tokenizes differently.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import torch
from gguf import GGUFValueType as V

from torchslim.errors import TorchslimError
from torchslim.models.gguf_file import gguf_reader

# Hugging Face model_type -> llama.cpp architecture, for models written from their own folder
HF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "granite": "granite",
    "olmo2": "olmo2",
}
ROTARY_PERMUTED = ("llama", "granite")  # llama.cpp's converter reorders their query/key rows
# architectures whose GGUF files a model loaded from a GGUF file can be written back in
GGUF_ARCHITECTURES = ("llama", "gemma2", "gemma3", "qwen2", "qwen3", "mistral", "phi3", "smollm3")

# the split expressions of tokenizer.json's pre-tokenizers that llama.cpp implements, by the name
# llama.cpp gives them (the letters of its own expression are matched, so both the case-insensitive
# group `(?i:'s|…)` and its spelled-out form count)
_LLAMA3 = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
SPLITS = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2", _GPT2: "gpt-2"}


def metadata(lm, source: Path) -> tuple[str, list[tuple], dict[str, torch.Tensor]]:
    """(llama.cpp architecture, [(key, value, type, array item type)], extra tensors) for `lm` written
    with the metadata of `source`: a .gguf file (its fields, with the model's own sizes) or the
    model's Hugging Face folder (built from config.json and tokenizer.json)."""
    if source.suffix == ".gguf":
        return _from_gguf(lm.config, source)
    return _from_folder(lm.config, source)


def architecture(config, source: Path) -> str:
    """The llama.cpp architecture `config` is written as, or a clear error."""
    if source.suffix == ".gguf":
        arch = gguf_reader(source).fields["general.architecture"].contents()
        arch = arch if arch in GGUF_ARCHITECTURES else None
    else:
        arch = HF_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise TorchslimError(
            f"GGUF writer: the {getattr(config, 'model_type', '?')!r} family is not supported yet "
            f"(from a GGUF file: {', '.join(GGUF_ARCHITECTURES)}; from a Hugging Face folder: "
            f"{', '.join(sorted(HF_ARCHITECTURES))})."
        )
    return arch


def _sizes(config) -> dict[str, object]:
    """The model's own sizes, as llama.cpp's keys name them (a pruned model's differ from its source's)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "block_count": config.num_hidden_layers,
        "embedding_length": config.hidden_size,
        "feed_forward_length": getattr(config, "intermediate_size", None),
        "attention.head_count": heads,
        "attention.head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "rope.dimension_count": int(head_dim * getattr(config, "partial_rotary_factor", 1.0)),
        "context_length": getattr(config, "max_position_embeddings", None),
    }


def _from_gguf(config, source: Path):
    arch = architecture(config, source)
    reader = gguf_reader(source)
    sizes = _sizes(config)
    fields = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype, value = field.types[0], field.contents()
        key = name[len(arch) + 1 :] if name.startswith(arch + ".") else None
        if sizes.get(key) is not None:
            value = type(value)(sizes[key])
        fields.append((name, value, vtype, field.types[-1] if vtype == V.ARRAY else None))
    return arch, fields, {}


def _rope(config) -> tuple[dict, str]:
    """(the rotary parameters of the full-attention layers, their rope_type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    if not params:  # an older config: rope_theta and rope_scaling
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), **(getattr(config, "rope_scaling", None) or {})}
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return params, kind


def _rope_fields(config, arch: str) -> tuple[list[tuple], dict[str, torch.Tensor]]:
    params, kind = _rope(config)
    fields = [(f"{arch}.rope.freq_base", float(params.get("rope_theta", 10000.0)), V.FLOAT32, None)]
    extra = {}
    if kind == "linear":
        fields += [
            (f"{arch}.rope.scaling.type", "linear", V.STRING, None),
            (f"{arch}.rope.scaling.factor", float(params["factor"]), V.FLOAT32, None),
        ]
    elif kind == "yarn":
        fields += [
            (f"{arch}.rope.scaling.type", "yarn", V.STRING, None),
            (f"{arch}.rope.scaling.factor", float(params["factor"]), V.FLOAT32, None),
            (
                f"{arch}.rope.scaling.original_context_length",
                int(params.get("original_max_position_embeddings", config.max_position_embeddings)),
                V.UINT32,
                None,
            ),
        ]
    elif kind == "llama3":  # llama.cpp divides each rotary frequency by a factor it reads from a tensor
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
        dim = _sizes(config)["rope.dimension_count"]
        base = float(params["rope_theta"]) ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        extra["rope_freqs.weight"] = (base / scaled.double()).float()
    elif kind != "default":
        raise TorchslimError(
            f"GGUF writer: rotary scaling {kind!r} of this model is not written yet (default, linear, "
            "yarn and llama3 are)."
        )
    return fields, extra


def _from_folder(config, folder: Path):
    arch = architecture(config, folder)
    sizes = _sizes(config)
    heads = sizes["attention.head_count"]
    fields: list[tuple] = [
        ("general.name", folder.name, V.STRING, None),
        ("general.type", "model", V.STRING, None),
        (f"{arch}.vocab_size", int(config.vocab_size), V.UINT32, None),
    ]
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length"):
        fields.append((f"{arch}.{key}", int(sizes[key]), V.UINT32, None))
    fields += [
        (f"{arch}.attention.head_count", int(heads), V.UINT32, None),
        (f"{arch}.attention.head_count_kv", int(sizes["attention.head_count_kv"]), V.UINT32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), V.FLOAT32, None),
    ]
    if getattr(config, "head_dim", None):  # as llama.cpp's converter: whenever the config names a head size
        for key in ("attention.key_length", "attention.value_length"):
            fields.append((f"{arch}.{key}", int(sizes[key]), V.UINT32, None))
    if arch in ROTARY_PERMUTED:
        fields.append((f"{arch}.rope.dimension_count", int(sizes["rope.dimension_count"]), V.UINT32, None))
    if arch == "granite":  # Granite's multipliers: attention scale, embeddings, residual branches, logits
        for key, name in (
            ("attention.scale", "attention_multiplier"),
            ("embedding_scale", "embedding_multiplier"),
            ("residual_scale", "residual_multiplier"),
            ("logit_scale", "logits_scaling"),
        ):
            if getattr(config, name, None) is not None:
                fields.append((f"{arch}.{key}", float(getattr(config, name)), V.FLOAT32, None))
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if arch == "gemma3" and scalar is not None and scalar != sizes["attention.key_length"]:
        raise TorchslimError(
            f"GGUF writer: this Gemma 3 scales attention by query_pre_attn_scalar={scalar}, not by its head "
            f"size {sizes['attention.key_length']}; llama.cpp scales by the head size, so the file would "
            "compute a different model."
        )
    if arch == "gemma3" and getattr(config, "sliding_window", None):
        fields.append((f"{arch}.attention.sliding_window", int(config.sliding_window), V.UINT32, None))
    rope, extra = _rope_fields(config, arch)
    return arch, fields + rope + tokenizer_fields(folder, int(config.vocab_size)), extra


# ---------------------------------------------------------------------------------------------- tokenizer


def _pre(tok: dict) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenizer (its split expression, digits one by one)."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits = [s["pattern"].get("Regex", s["pattern"].get("String")) for s in steps if s.get("type") == "Split"]
    single_digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if not splits and byte_level and byte_level[0].get("use_regex", True):
        splits = [_GPT2]  # ByteLevel's own expression is GPT-2's
    if len(splits) == 1:
        expr = splits[0].replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)|", "")
        expr = expr.replace("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|", "")
        name = SPLITS.get(expr)
        if name == "gpt-2" and single_digits:
            return "smollm"  # digits one by one, then GPT-2's expression (StarCoder's and SmolLM's)
        if name is not None and not single_digits:
            return name
    raise TorchslimError(
        "GGUF writer: the tokenizer's pre-tokenizer (tokenizer.json: "
        f"{json.dumps(pre)[:300]}) is not one llama.cpp implements under a name torchslim knows "
        f"({', '.join(sorted(set(SPLITS.values()) | {'smollm'}))}); llama.cpp would split text differently "
        "from the model's own tokenizer. Write the GGUF from a model loaded from a GGUF file instead."
    )


def _merge_scores(model: dict) -> dict[int, float]:
    """SentencePiece scores for a BPE vocabulary with byte fallback: llama.cpp's tokenizer of that kind
    merges the adjacent pair whose result scores highest, so a token made by the merge of rank r
    scores −r (its earliest merge); byte tokens 0; the rest below every merge."""
    vocab, merges = model["vocab"], model.get("merges", [])
    scores: dict[int, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = vocab.get(left + right)
        if token is not None and token not in scores:
            scores[token] = -float(rank)
    for text, i in vocab.items():
        if i not in scores:
            is_byte = text.startswith("<0x") and text.endswith(">") and len(text) == 6
            scores[i] = 0.0 if is_byte else -float(len(merges) + i)
    return scores


def tokenizer_fields(folder: Path, vocab_size: int) -> list[tuple]:
    """The tokenizer.* fields of the tokenizer in `folder` (tokenizer.json, tokenizer_config.json),
    its vocabulary padded to the model's `vocab_size` as llama.cpp's converter pads it."""
    path = folder / "tokenizer.json"
    if not path.exists():
        raise TorchslimError(
            f"GGUF writer: {folder} has no tokenizer.json (a fast tokenizer's file); save the tokenizer "
            "next to the model with tokenizer.save_pretrained(folder)."
        )
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok["model"]
    special = {a["id"]: a for a in tok.get("added_tokens", [])}
    if (
        model["type"] == "BPE"
        and not model.get("byte_fallback")
        and (tok.get("decoder") or {}).get("type") == "ByteLevel"
    ):
        kind, pre = "gpt2", _pre(tok)
        texts = {i: t for t, i in model["vocab"].items()}
        scores = None
    elif model["type"] == "BPE" and model.get("byte_fallback"):
        kind, pre = "llama", "default"
        texts, scores = {i: t for t, i in model["vocab"].items()}, _merge_scores(model)
    else:
        raise TorchslimError(
            f"GGUF writer: a {model['type']} tokenizer{' with byte fallback' if model.get('byte_fallback') else ''} "
            "is not written yet (byte-level BPE and SentencePiece-style BPE with byte fallback are)."
        )
    for i, a in special.items():
        texts[i] = a["content"]
    tokens, types, score_list = [], [], []
    for i in range(max(vocab_size, len(texts))):
        text = texts.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            if i in special:
                types.append(gguf.TokenType.CONTROL if special[i].get("special") else gguf.TokenType.USER_DEFINED)
            elif kind == "llama" and text.startswith("<0x") and text.endswith(">") and len(text) == 6:
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
        if scores is not None:
            score_list.append(-1000.0 if i in special or text is None else scores.get(i, -1000.0))
    fields = [
        ("tokenizer.ggml.model", kind, V.STRING, None),
        ("tokenizer.ggml.pre", pre, V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", [int(t) for t in types], V.ARRAY, V.INT32),
    ]
    if score_list:
        fields.append(("tokenizer.ggml.scores", score_list, V.ARRAY, V.FLOAT32))
    special_vocab = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=len(tokens))
    if special_vocab.merges:
        fields.append(("tokenizer.ggml.merges", list(special_vocab.merges), V.ARRAY, V.STRING))
    keys = gguf.Keys.Tokenizer
    ids = {"bos": keys.BOS_ID, "eos": keys.EOS_ID, "unk": keys.UNK_ID, "sep": keys.SEP_ID, "pad": keys.PAD_ID}
    for typ, tid in special_vocab.special_token_ids.items():
        if typ in ids:
            fields.append((ids[typ], int(tid), V.UINT32, None))
    adds = {"bos": keys.ADD_BOS, "eos": keys.ADD_EOS, "sep": keys.ADD_SEP}
    for typ, value in special_vocab.add_special_token.items():
        if typ in adds:
            fields.append((adds[typ], bool(value), V.BOOL, None))
    normalizer = json.dumps(tok.get("normalizer") or {})
    fields.append((keys.ADD_PREFIX, '"Prepend"' in normalizer and "▁" in normalizer, V.BOOL, None))
    if isinstance(special_vocab.chat_template, str):
        fields.append(("tokenizer.chat_template", special_vocab.chat_template, V.STRING, None))
    return fields
