"""Hidden-size pruning of Llama-layout decoder language models: channels of the residual stream
removed from every tensor that reads or writes it (Minitron's "embedding channel" pruning).

A residual channel is a column of the token embedding table and of the output head, an entry of
every norm's weight over the hidden size, a column of every projection that reads the stream
(q/k/v_proj, gate/up_proj) and a row of every projection that writes it (o_proj, down_proj).

- Importance (calibration text, as Minitron): the sum over every hidden-size norm of the
  root-mean-square of the norm's output in that channel, i.e. how much the channel feeds the layers
  that read the stream.
- RMS correction: an RMS norm divides by the root-mean-square over *all* channels; once the small
  ones are gone it divides by a larger number. Each norm's weight is scaled by the calibration
  estimate of rms(kept) / rms(all) of its input, so that its output keeps its size. Removing channels
  that are zero on every token changes no logit (test).
- Embedding scales derived from the hidden size (Gemma multiplies the embeddings by sqrt(hidden
  size), a buffer its class recomputes from the config on load) follow the new size; the table and,
  when the head shares it, the final norm absorb the change, so the model reloads with its Hugging
  Face class and gives the same logits."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.models.transformer import (
    decoder_blocks,
    keep_cols,
    keep_rows,
    kept_count,
    model_configs,
    run_hooked,
    sync_decoder_config,
)

READS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITES = ("self_attn.o_proj", "mlp.down_proj")


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside `model` (itself, or a wrapper's `lm`)."""
    for m in model.modules():
        if hasattr(m, "get_input_embeddings") and hasattr(getattr(m, "config", None), "hidden_size"):
            return m
    raise TorchslimError(
        f"{type(model).__name__} holds no Hugging Face language model (get_input_embeddings and "
        "a config with hidden_size) whose hidden size could be pruned."
    )


def hidden_size(model: nn.Module) -> int:
    return causal_lm(model).get_input_embeddings().weight.shape[1]


def _norms(lm: nn.Module, d: int) -> dict[str, nn.Module]:
    """Every module with a weight vector over the hidden size outside the projections (the norms)."""
    out = {}
    for name, m in lm.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.Linear, nn.Embedding)) or not isinstance(w, nn.Parameter) or w.dim() != 1:
            continue
        if w.shape[0] == d and ".self_attn." not in f".{name}." and ".mlp." not in f".{name}.":
            out[name] = m
    return out


def _final_norm(lm: nn.Module, norms: dict[str, nn.Module]) -> nn.Module | None:
    """The norm the output head reads (the hidden-size norm outside the decoder layers)."""
    blocks = decoder_blocks(lm)
    inside = {id(m) for b in blocks for m in b.modules()}
    outside = [m for m in norms.values() if id(m) not in inside]
    return outside[0] if len(outside) == 1 else None


def _projections(block: nn.Module, d: int) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """(Linears reading the stream, Linears writing it) of a block; an error if one is unaccounted for."""
    reads = [block.get_submodule(p) for p in READS if isinstance(_get(block, p), nn.Linear)]
    writes = [block.get_submodule(p) for p in WRITES]
    known = {id(m) for m in reads + writes}
    other = [
        n
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in known and (m.in_features == d or m.out_features == d)
    ]
    if other:
        raise TorchslimError(
            f"hidden-size pruning knows q/k/v/o_proj and gate/up/down_proj; {type(block).__name__} "
            f"also has {', '.join(other)} on the hidden size. Prune heads and FFN neurons instead."
        )
    return reads, writes


def _get(module: nn.Module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def scale_norm_output(norm: nn.Module, factor: float) -> None:
    """Make `norm`'s output `factor` times larger by changing its weight (and bias): out = x̂·w (Llama)
    or out = x̂·(1 + w) (Gemma), told apart by probing; checked on a random input."""
    if getattr(norm, "bias", None) is not None:
        raise TorchslimError(f"hidden-size pruning supports RMS norms without bias; {type(norm).__name__} has one.")
    w = norm.weight.data
    probe = torch.randn(3, w.shape[0], dtype=w.dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = norm(probe).float()
        saved = w.clone()
        w.zero_()
        plus_one = bool(norm(probe).abs().max() > 0)
        w.copy_((1 + saved.float()) * factor - 1 if plus_one else saved * factor)
        after = norm(probe).float()
    if not torch.allclose(after, before * factor, rtol=1e-3, atol=1e-5):
        raise TorchslimError(f"cannot rescale {type(norm).__name__}: its output is neither x̂·w nor x̂·(1 + w).")


@torch.no_grad()
def _statistics(model: nn.Module, norms: dict[str, nn.Module], batches: Iterable[tuple]) -> dict[str, tuple]:
    """Per norm: (mean square of its input per channel, mean square of its output per channel)."""
    sums: dict[str, list] = {n: [0, 0, 0] for n in norms}

    def pre(name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name][0] = sums[name][0] + (x * x).sum(0)
            sums[name][2] += len(x)

        return hook

    def post(name):
        def hook(module, args, out):
            y = out.detach().float().reshape(-1, out.shape[-1])
            sums[name][1] = sums[name][1] + (y * y).sum(0)

        return hook

    handles = [
        h for n, m in norms.items() for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))
    ]
    run_hooked(model, batches, handles)
    if any(s[2] == 0 for s in sums.values()):
        raise TorchslimError("hidden-size pruning saw no calibration tokens through every norm.")
    return {n: (s[0] / s[2], s[1] / s[2]) for n, s in sums.items()}


def channel_scores(stats: dict[str, tuple]) -> torch.Tensor:
    """Importance of each residual channel: the sum over norms of its output's root-mean-square."""
    return sum(out.sqrt() for _, out in stats.values())


@torch.no_grad()
def keep_channels(model: nn.Module, keep: torch.Tensor, norm_factors: dict[str, float] | None = None) -> None:
    """Keep the residual channels `keep` (sorted indices) everywhere, in place; `norm_factors` scale
    norms' outputs (the RMS correction); the config says the new hidden size."""
    lm = causal_lm(model)
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    d, new = embed.weight.shape[1], len(keep)
    norms = _norms(lm, d)
    final = _final_norm(lm, norms)
    projections = [_projections(b, d) for b in decoder_blocks(lm)]
    tied = head is not None and head.weight is embed.weight
    table = embed.weight.data[:, keep].clone()
    scale = getattr(embed, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and math.isclose(float(scale), math.sqrt(d), rel_tol=1e-3):
        # the class recomputes sqrt(hidden_size) on load: use the new one, the table absorbs the change
        ratio = math.sqrt(d) / math.sqrt(new)
        table = table * ratio
        scale.fill_(math.sqrt(new))
        if hasattr(embed, "scalar_embed_scale"):
            embed.scalar_embed_scale = math.sqrt(new)
        if tied:
            if final is None:
                raise TorchslimError(
                    "hidden-size pruning: the output head shares the scaled embedding table, but "
                    "the norm before the head could not be identified."
                )
            norm_factors = dict(norm_factors or {})
            name = next(n for n, m in norms.items() if m is final)
            norm_factors[name] = norm_factors.get(name, 1.0) / ratio
    embed.weight = nn.Parameter(table)
    embed.embedding_dim = new
    if head is not None:
        if tied:
            head.weight = embed.weight
        else:
            keep_cols(head, keep)
        head.in_features = new
    for name, norm in norms.items():
        norm.weight = nn.Parameter(norm.weight.data[keep].clone())
        for attr in ("hidden_size", "normalized_shape"):
            if isinstance(getattr(norm, attr, None), int):
                setattr(norm, attr, new)
            elif isinstance(getattr(norm, attr, None), tuple):
                setattr(norm, attr, (new,))
        if norm_factors and name in norm_factors:
            scale_norm_output(norm, norm_factors[name])
    for block, (reads, writes) in zip(decoder_blocks(lm), projections):
        for lin in reads:
            keep_cols(lin, keep)
        for lin in writes:
            keep_rows(lin, keep)
        for m in block.modules():
            if isinstance(getattr(m, "hidden_size", None), int) and m.hidden_size == d:
                m.hidden_size = new
    for config in model_configs(model):
        config.hidden_size = new
    sync_decoder_config(model)


@torch.no_grad()
def prune_hidden(model: nn.Module, ratio: float, batches: Iterable[tuple], multiple: int = 32) -> dict:
    """Remove `ratio` of the residual stream's channels, the least important on the calibration
    `batches` first (kept count a multiple of `multiple` where the size is), with the RMS correction."""
    if not 0 <= ratio < 1:
        raise TorchslimError(f"hidden_ratio must be in [0, 1), got {ratio}.")
    d = hidden_size(model)
    count = kept_count(d, ratio, multiple)
    if count == d:
        return {"hidden_before": d, "hidden_after": d}
    keep, factors = choose_channels(model, count, batches)
    keep_channels(model, keep, factors)
    return {"hidden_before": d, "hidden_after": count, "kept": keep.tolist(), "norm_factors": factors}


@torch.no_grad()
def choose_channels(model: nn.Module, count: int, batches: Iterable[tuple]) -> tuple[torch.Tensor, dict[str, float]]:
    """(the `count` most important residual channels, sorted; each norm's RMS correction factor) on the
    calibration `batches`."""
    lm = causal_lm(model)
    d = hidden_size(model)
    norms = _norms(lm, d)
    if not norms:
        raise TorchslimError(
            f"{type(lm).__name__} has no norm over the hidden size; hidden-size pruning needs the "
            "Llama layout (RMS norms before attention and MLP)."
        )
    stats = _statistics(model, norms, batches)
    keep = torch.argsort(channel_scores(stats), descending=True)[:count].sort().values
    factors = {}
    for name, (inputs, _) in stats.items():
        kept_share = float(inputs[keep].sum() / inputs.sum().clamp_min(1e-30))
        factors[name] = math.sqrt(kept_share * d / count)
    return keep, factors


def resize_hidden(model: nn.Module, size: int) -> None:
    """Give the model `size` residual channels (the first ones): the structure of a hidden-pruned
    model, whose weights are then loaded over it."""
    if size != hidden_size(model):
        keep_channels(model, torch.arange(size))
