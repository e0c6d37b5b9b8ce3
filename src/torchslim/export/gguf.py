"""A quantized language model written as a GGUF file that llama.cpp loads, with torchslim's own
integers and scales where the scheme maps onto a GGUF type.

    info = write_gguf(lm, source="SmolLM2-135M-Instruct.Q4_1.gguf", out="model.gguf")

Mapping (blocks of 32 input columns, the one block size of these types): symmetric int4 -> Q4_0
(value (n - 8) * d), int4 with zero points -> Q4_1 (n * d + m, m = -zero * scale), symmetric int8
-> Q8_0. A scale is stored as float16 there (a relative change below 1e-3 of each weight); every
other tensor (norms, a layer left float) is written float32. The metadata (architecture, sizes,
tokenizer, chat template) is the source GGUF's, so the model must come from a GGUF file, with the
sizes (blocks, widths, heads) the model's own; tensors are named as llama.cpp names them, with the
transforms llama.cpp's converter applies undone by
transformers' loader applied again (query/key rows permuted for rotary embeddings in `llama`
files, `1 +` norm weights in Gemma 2/3 files).

With `mixture="Q4_K_M"` (or "Q6_K") the float weight matrices are packed in llama.cpp's k-quant types
instead, chosen per tensor as `llama-quantize` chooses them and rounded by `export/kquants.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.export import kquants

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
            "the model did not come from a GGUF file (the writer takes the architecture and tokenizer "
            "metadata from one)"
        )
    if gguf_type(grid) is None:
        return (
            f"{grid.bits}-bit {'symmetric' if grid.symmetric else 'asymmetric'} groups of {grid.group} map onto "
            "no GGUF type (Q4_0, Q4_1 and Q8_0 take blocks of 32; Q8_0 is symmetric)"
        )
    return None


def _pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kind: str) -> np.ndarray:
    """(rows x bytes) of GGUF blocks from a layer's integers (rows x columns) and per-block scales."""
    rows, cols = q.shape
    blocks = cols // BLOCK
    d = scale.reshape(rows, blocks, 1).numpy().astype(np.float16).view(np.uint8)
    if kind == "Q8_0":
        qs = q.reshape(rows, blocks, BLOCK).numpy().astype(np.int8).view(np.uint8)
        return np.concatenate([d, qs], axis=2).reshape(rows, -1)
    n = q.reshape(rows, blocks, BLOCK).to(torch.int16)
    if kind == "Q4_0":
        n = n + 8
    n = n.numpy().astype(np.uint8)
    qs = n[:, :, :16] | (n[:, :, 16:] << 4)
    if kind == "Q4_0":
        return np.concatenate([d, qs], axis=2).reshape(rows, -1)
    m = (-zero * scale).reshape(rows, blocks, 1).numpy().astype(np.float16).view(np.uint8)
    return np.concatenate([d, m, qs], axis=2).reshape(rows, -1)


MIXTURES = ("Q4_K_M", "Q6_K")


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in its _M mixtures: the first and last
    eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def kquant_type(tensor_name: str, layers: int, mixture: str, tied: bool) -> str:
    """The k-quant type llama.cpp's `llama-quantize` gives a weight matrix in `mixture`: Q4_K_M puts
    the output head (the embeddings, when tied to it) in Q6_K, and the value projections and FFN down
    projections of the layers `_more_bits` picks; everything else in Q4_K. Q6_K: every matrix."""
    if mixture == "Q6_K":
        return "Q6_K"
    if tensor_name == "output.weight" or (tied and tensor_name == "token_embd.weight"):
        return "Q6_K"
    parts = tensor_name.split(".")
    if parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down") and _more_bits(int(parts[1]), layers):
        return "Q6_K"
    return "Q4_K"


def _q8_0(weight: torch.Tensor) -> np.ndarray:
    """Symmetric int8 in blocks of 32 (llama.cpp's fallback for rows k-quants cannot pack)."""
    rows, cols = weight.shape
    x = weight.float().reshape(rows, cols // BLOCK, BLOCK)
    scale = (x.abs().amax(-1) / 127).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / safe[..., None]).round().clamp(-127, 127).reshape(rows, cols)
    return _pack(q, scale, torch.zeros_like(scale), "Q8_0")


def _rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives query/key weights (the inverse of transformers' loader)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def write_gguf(
    model: nn.Module,
    source: Path,
    out: Path,
    mixture: str | None = None,
    importance: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Write `model` (a Hugging Face causal LM, or a wrapper holding one as `.lm`) with its weight grids
    to `out`, metadata and tensor names from `source`. Returns {path, bytes, types: {type: tensors}}.
    `mixture` ("Q4_K_M", "Q6_K"): pack the float weight matrices in llama.cpp's k-quant types instead
    (`kquant_type`), rounded by `torchslim.export.kquants`; `importance`: per Hugging Face parameter
    name, the mean square of the activations each input column sees (an importance matrix)."""
    if mixture is not None and mixture not in MIXTURES:
        raise TorchslimError(f"GGUF mixture {mixture!r} is not one of {', '.join(MIXTURES)}.")
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    lm = getattr(model, "lm", model)
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    if arch not in ("llama", "gemma2", "gemma3", "qwen2", "qwen3", "mistral", "phi3", "smollm3"):
        raise TorchslimError(
            f"GGUF writer: architecture '{arch}' is not supported yet (llama, mistral, qwen2/3, phi3, gemma2/3 are)."
        )
    names = get_gguf_hf_weights_map(lm, TensorProcessor())  # gguf name -> Hugging Face parameter name
    state = dict(lm.named_parameters(remove_duplicate=False))
    head, embeddings = state.get(names.get("output.weight", "")), state.get(names.get("token_embd.weight", ""))
    tied = head is None or head is embeddings  # the embeddings are the output head too
    grids = {
        id(m.weight): m.torchslim_weight_grid
        for m in lm.modules()
        if isinstance(m, nn.Linear) and hasattr(m, "torchslim_weight_grid")
    }
    config = lm.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = {
        "block_count": config.num_hidden_layers,
        "embedding_length": config.hidden_size,
        "feed_forward_length": getattr(config, "intermediate_size", None),
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": getattr(config, "num_key_value_heads", None),
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "rope.dimension_count": int(head_dim * getattr(config, "partial_rotary_factor", 1.0)),
        "context_length": getattr(config, "max_position_embeddings", None),
    }
    writer = gguf.GGUFWriter(str(out), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        value = field.contents()
        key = name[len(arch) + 1 :] if name.startswith(arch + ".") else None
        if sizes.get(key) is not None:  # the model's own sizes (a pruned model's differ from the source's)
            value = type(value)(sizes[key])
        writer.add_key_value(
            name, value, vtype, sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        )
    types: dict[str, int] = {}
    written: set[int] = set()
    for tensor_name, hf in names.items():
        if hf not in state or id(state[hf]) in written:  # a head tied to the embeddings is stored once
            continue
        written.add(id(state[hf]))
        param = state[hf].detach().float()
        order = None
        if arch == "llama" and (".attn_q." in tensor_name or ".attn_k." in tensor_name) and param.dim() == 2:
            heads = config.num_attention_heads if ".attn_q." in tensor_name else config.num_key_value_heads
            order = _rotary_rows(param.shape[0], heads)
        if mixture is not None and param.dim() == 2 and tensor_name.endswith(".weight") and "norm" not in tensor_name:
            data = param if order is None else param[order]
            kind = kquant_type(tensor_name, config.num_hidden_layers, mixture, tied)
            if data.shape[1] % kquants.QK_K == 0:
                blocks = kquants.pack(data, kind, (importance or {}).get(hf))
            elif data.shape[1] % BLOCK == 0:
                kind, blocks = "Q8_0", _q8_0(data)
            else:
                kind, blocks = "F32", data.numpy().astype(np.float32)
            if kind == "F32":
                writer.add_tensor(tensor_name, blocks)
            else:
                writer.add_tensor(tensor_name, blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            types[kind] = types.get(kind, 0) + 1
            continue
        grid = grids.get(id(state[hf]))
        kind = gguf_type(grid[0]) if grid is not None and param.shape[-1] % BLOCK == 0 else None
        if kind is None:
            data = param
            if arch in ("gemma2", "gemma3") and "norm.weight" in tensor_name:
                data = data + 1
            writer.add_tensor(tensor_name, (data if order is None else data[order]).numpy().astype(np.float32))
            kind = "F32"
        else:
            _, q, scale, zero = grid
            q, scale, zero = q.to(torch.int16), scale.float(), zero.float()
            if order is not None:
                q, scale, zero = q[order], scale[order], zero[order]
            writer.add_tensor(
                tensor_name, _pack(q, scale, zero, kind), raw_dtype=getattr(gguf.GGMLQuantizationType, kind)
            )
        types[kind] = types.get(kind, 0) + 1
    main = mixture or max((k for k in types if k != "F32"), key=types.get, default="F32")
    file_type = {
        "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "F32": gguf.LlamaFileType.ALL_F32,
    }[main]
    writer.add_file_type(int(file_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": out.name, "bytes": out.stat().st_size, "types": types}
