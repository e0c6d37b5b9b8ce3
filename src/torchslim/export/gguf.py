"""A quantized language model written as a GGUF file that llama.cpp loads, with torchslim's own
integers and scales where the scheme maps onto a GGUF type.

    info = write_gguf(lm, source="SmolLM2-135M-Instruct.Q4_1.gguf", out="model.gguf")
    info = write_gguf(lm, source=Path("my-model"), out="model.gguf", mixture="Q4_K_M")  # a HF folder

Mapping (blocks of 32 input columns, the one block size of these types): symmetric int4 -> Q4_0
(value (n - 8) * d), int4 with zero points -> Q4_1 (n * d + m, m = -zero * scale), symmetric int8
-> Q8_0. A scale is stored as float16 there (a relative change below 1e-3 of each weight); every
other tensor (norms, a layer left float) is written float32. The metadata (architecture, sizes,
tokenizer, chat template) is the source GGUF's when the model came from one, else built from the
model's Hugging Face folder (config.json, tokenizer.json) as llama.cpp's converter builds it
(`export/gguf_meta.py`), with the sizes (blocks, widths, heads) the model's own; tensors are named
as llama.cpp names them, with the transforms llama.cpp's converter applies (undone by
transformers' loader for a GGUF source) applied (query/key rows permuted for rotary embeddings in `llama`
files, `1 +` norm weights in Gemma 2/3 files).

With `mixture="Q4_K_M"` (any of llama.cpp's Q4_0 … Q6_K, Q4_K_S/M, Q5_K_S/M) the float weight matrices
are packed in llama.cpp's types instead, chosen per tensor as `llama-quantize` chooses them
(`llama_type`) and rounded by `export/ggml.py` — or given already rounded (`packed`, e.g. by GPTQ on
those grids: `quantize.weight_only`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.export import ggml
from torchslim.export.gguf_meta import ROTARY_PERMUTED, architecture, metadata

BLOCK = 32


def gguf_type(grid) -> str | None:
    """The GGUF type a weight grid maps onto, or None."""
    if grid.group != BLOCK:
        return None
    if grid.bits == 4:
        return "Q4_0" if grid.symmetric else "Q4_1"
    if grid.bits == 8 and grid.symmetric:
        return "Q8_0"
    return None


def why_not(grid, source: Path | None) -> str | None:
    """Why no GGUF can be written for this scheme and source, or None when one can."""
    if source is None:
        return (
            "the model came from neither a GGUF file nor a Hugging Face folder (the writer takes the "
            "architecture and tokenizer metadata from one)"
        )
    if gguf_type(grid) is None:
        return (
            f"{grid.bits}-bit {'symmetric' if grid.symmetric else 'asymmetric'} groups of {grid.group} map onto "
            "no GGUF type (Q4_0, Q4_1 and Q8_0 take blocks of 32; Q8_0 is symmetric)"
        )
    return None


MIXTURES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
# a k-quant type -> the type llama.cpp keeps rows in whose width is not whole super-blocks of 256
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in its _M mixtures: the first and last
    eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_type(tensor_name: str, columns: int, layers: int, mixture: str, tied: bool) -> str:
    """The type llama.cpp's `llama-quantize` gives a weight matrix (GGUF name, row width) in `mixture`,
    as its `llama_tensor_get_type` chooses: the output head (the embeddings, when tied to it) in Q6_K
    (Q8_0 when its rows are not whole blocks of the mixture's type); in _M mixtures the value
    projections (a fused query/key/value too) and FFN down projections of the layers `_more_bits` picks
    in Q6_K; in Q4_K_S the first four value projections and the first eighth of the down projections in
    Q5_K; everything else in the mixture's type. Then its fallback for rows a k-quant cannot pack: Q4_K
    -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 for rows not whole blocks of 32."""
    if mixture not in MIXTURES:
        raise TorchslimError(f"GGUF mixture {mixture!r} is not one of {', '.join(MIXTURES)}.")
    kind = mixture[:4] if mixture[3] == "K" else mixture
    parts = tensor_name.split(".")
    role = parts[2] if parts[0] == "blk" and len(parts) > 3 else parts[0]
    index = int(parts[1]) if parts[0] == "blk" else -1
    if tensor_name == "output.weight" or (tied and tensor_name == "token_embd.weight"):
        if columns % ggml.LAYOUTS[kind].block:
            kind = "Q8_0"
        elif kind != "Q8_0":
            kind = "Q6_K"
    elif role in ("attn_v", "attn_qkv", "attn_kv_b"):
        if mixture in ("Q4_K_M", "Q5_K_M") and _more_bits(index, layers):
            kind = "Q6_K"
        elif mixture == "Q4_K_S" and index < 4:
            kind = "Q5_K"
    elif role == "ffn_down":
        if mixture in ("Q4_K_M", "Q5_K_M") and _more_bits(index, layers):
            kind = "Q6_K"
        elif mixture == "Q4_K_S" and index < layers // 8:
            kind = "Q5_K"
    if columns % ggml.LAYOUTS[kind].block:
        kind = FALLBACK.get(kind, kind)
        if columns % ggml.LAYOUTS[kind].block:
            kind = "F16"
    return kind


def quantized(name: str) -> bool:
    """Whether llama.cpp quantizes a tensor of this GGUF name (weight matrices; not norms)."""
    return name.endswith(".weight") and "norm" not in name


def from_grid(grid, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[str, np.ndarray]:
    """(GGUF type, blocks) holding a layer's torchslim integers (rows x columns) and per-block scales
    as they are: symmetric int4 -> Q4_0 ((n - 8)·d), with zero points -> Q4_1 (n·d + m, m = -zero·scale),
    symmetric int8 -> Q8_0."""
    kind = gguf_type(grid)
    step = scale.float().half().float()
    if kind == "Q4_1":
        minimum = (-zero.float() * scale.float()).half().float()
        typed = ggml.TypeGrid(kind, step, -minimum, {"d": step.reshape(-1), "m": minimum.reshape(-1)})
        codes = q
    else:
        center = ggml.LAYOUTS[kind].center
        typed = ggml.TypeGrid(kind, step, center * step, {"d": step.reshape(-1)})
        codes = q + center
    return kind, ggml.encode(typed, codes.to(torch.int16))


def _rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives query/key weights (the inverse of transformers' loader)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _source(lm: nn.Module, source: Path):
    """(architecture, {GGUF name: Hugging Face parameter name}, parameters, tied) of a model written with
    the metadata of `source` (a .gguf file or the model's Hugging Face folder)."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    arch = architecture(lm.config, source)
    model_type = None if source.suffix == ".gguf" else arch
    names = get_gguf_hf_weights_map(lm, TensorProcessor(), model_type=model_type)  # gguf name -> HF name
    state = dict(lm.named_parameters(remove_duplicate=False))
    head, embeddings = state.get(names.get("output.weight", "")), state.get(names.get("token_embd.weight", ""))
    tied = head is None or head is embeddings  # the embeddings are the output head too
    return arch, names, state, tied


def mixture_types(model: nn.Module, source: Path, mixture: str) -> dict[str, str]:
    """Per Hugging Face parameter name, the GGUF type `mixture` gives each weight matrix (`llama_type`);
    a tensor tied to another is listed once, under the name written."""
    lm = getattr(model, "lm", model)
    _, names, state, tied = _source(lm, source)
    types, seen = {}, set()
    for tensor_name, hf in names.items():
        if hf not in state or id(state[hf]) in seen:
            continue
        seen.add(id(state[hf]))
        if state[hf].dim() == 2 and quantized(tensor_name):
            types[hf] = llama_type(tensor_name, state[hf].shape[1], lm.config.num_hidden_layers, mixture, tied)
    return types


def write_gguf(
    model: nn.Module,
    source: Path,
    out: Path,
    mixture: str | None = None,
    importance: dict[str, torch.Tensor] | None = None,
    packed: dict[str, tuple[str, np.ndarray]] | None = None,
) -> dict:
    """Write `model` (a Hugging Face causal LM, or a wrapper holding one as `.lm`) with its weight grids
        to `out`, metadata and tensor names from `source`. Returns {path, bytes, tensor_bytes (the weights
    alone, without the metadata), types: {type: tensors}}.
        `mixture` (one of MIXTURES): the float weight matrices in the types llama.cpp's mixture gives them
        (`llama_type`), rounded by `torchslim.export.ggml` — or as given in `packed` ({Hugging Face
        parameter name: (type, blocks in the model's row order)}, e.g. GPTQ's); `importance`: per Hugging
        Face parameter name, the mean square of the activations each input column sees (an importance
        matrix)."""
    if mixture is not None and mixture not in MIXTURES:
        raise TorchslimError(f"GGUF mixture {mixture!r} is not one of {', '.join(MIXTURES)}.")
    import gguf

    lm = getattr(model, "lm", model)
    arch, names, state, tied = _source(lm, source)
    _, fields, extra = metadata(lm, source)
    packed = packed or {}
    grids = {
        id(m.weight): m.torchslim_weight_grid
        for m in lm.modules()
        if isinstance(m, nn.Linear) and hasattr(m, "torchslim_weight_grid")
    }
    config = lm.config
    writer = gguf.GGUFWriter(str(out), arch)
    for name, value, vtype, sub_type in fields:
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
    types: dict[str, int] = {}
    written: set[int] = set()
    tensor_bytes = 0
    for tensor_name, hf in names.items():
        if hf not in state or id(state[hf]) in written:  # a head tied to the embeddings is stored once
            continue
        written.add(id(state[hf]))
        param = state[hf].detach().float()
        order = None
        if arch in ROTARY_PERMUTED and (".attn_q." in tensor_name or ".attn_k." in tensor_name) and param.dim() == 2:
            heads = config.num_attention_heads if ".attn_q." in tensor_name else config.num_key_value_heads
            order = _rotary_rows(param.shape[0], heads)
        grid = grids.get(id(state[hf]))
        if hf in packed:
            kind, blocks = packed[hf]
        elif mixture is not None and param.dim() == 2 and quantized(tensor_name):
            kind = llama_type(tensor_name, param.shape[1], config.num_hidden_layers, mixture, tied)
            blocks = param if kind == "F16" else ggml.pack(param, kind, (importance or {}).get(hf))
        elif grid is not None and param.shape[-1] % BLOCK == 0 and gguf_type(grid[0]) is not None:
            kind, blocks = from_grid(*grid)
        else:
            kind, blocks = "F32", param
            if arch in ("gemma2", "gemma3") and "norm.weight" in tensor_name:
                blocks = blocks + 1
        if order is not None:
            blocks = blocks[order.numpy()] if isinstance(blocks, np.ndarray) else blocks[order]
        if kind in ("F32", "F16"):
            blocks = blocks.numpy().astype(np.float32 if kind == "F32" else np.float16)
            writer.add_tensor(tensor_name, blocks)
        else:
            writer.add_tensor(tensor_name, blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        tensor_bytes += blocks.nbytes
        types[kind] = types.get(kind, 0) + 1
    for tensor_name, tensor in extra.items():
        writer.add_tensor(tensor_name, tensor.numpy().astype(np.float32))
        tensor_bytes += tensor.numel() * 4
        types["F32"] = types.get("F32", 0) + 1
    main = mixture or max((k for k in types if k != "F32"), key=types.get, default="F32")
    file_type = "ALL_F32" if main == "F32" else "MOSTLY_F16" if main == "F16" else f"MOSTLY_{main}"
    writer.add_file_type(int(getattr(gguf.LlamaFileType, file_type)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": out.name, "bytes": out.stat().st_size, "tensor_bytes": tensor_bytes, "types": types}
