"""Multi-head attention with separate q/k/v/out projections, so heads can be removed physically.

`nn.MultiheadAttention` ties the projection width to the embedding width; `Attention` computes the
same function (it takes the same call arguments and returns the same tuple) with its own head count
and head size, which pruning updates in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.models.shapes import register_shape_attrs


class Attention(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        out_dim: int | None = None,
    ):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = head_dim or embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, out_dim or embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "Attention":
        """The same function as `mha`, with its weights."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "only nn.MultiheadAttention with equal q/k/v widths and no bias_k/add_zero_attn can be converted"
            )
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
        )
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                rows = slice(i * mha.embed_dim, (i + 1) * mha.embed_dim)
                proj.weight.copy_(mha.in_proj_weight[rows])
                if mha.in_proj_bias is not None:
                    proj.bias.copy_(mha.in_proj_bias[rows])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    # what nn.TransformerEncoderLayer reads to choose its fused inference path: it stays available
    # while the projections keep nn.MultiheadAttention's shapes, and the layer falls back to calling
    # this module once heads or widths were pruned
    bias_k = bias_v = None
    add_zero_attn = False
    merge_masks = nn.MultiheadAttention.merge_masks

    @property
    def _qkv_same_embed_dim(self) -> bool:
        e = self.embed_dim
        return (
            all(p.weight.shape == (e, e) for p in (self.q_proj, self.k_proj, self.v_proj))
            and self.num_heads * self.head_dim == e
            and self.out_proj.weight.shape == (e, e)
        )

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])

    @classmethod
    def empty_like(cls, original: nn.Module) -> "Attention":
        """A placeholder to be given recorded shapes and weights on load."""
        embed = getattr(original, "embed_dim", 1)
        return cls(embed, getattr(original, "num_heads", 1), batch_first=getattr(original, "batch_first", False))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, H, L, d)
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._split(self.q_proj(query)), self._split(self.k_proj(key)), self._split(self.v_proj(value))
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            weights = F.dropout(scores.softmax(-1), p)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None
            )
            weights = None
        b, _, length, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        return out, weights


def _merge_masks(attn_mask, key_padding_mask, dtype):
    """Additive float mask of shape broadcastable to (B, H, Lq, Lk), or None."""
    mask = None
    if attn_mask is not None:
        mask = (
            torch.zeros_like(attn_mask, dtype=dtype).masked_fill(attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else attn_mask.to(dtype)
        )
    if key_padding_mask is not None:
        pad = torch.zeros_like(key_padding_mask, dtype=dtype).masked_fill(key_padding_mask.bool(), float("-inf"))
        pad = pad[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


def convert_attention(model: nn.Module) -> int:
    """Replace every nn.MultiheadAttention in `model` by an equivalent `Attention`; returns the count."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, child_name, Attention.from_mha(child))
                count += 1
    return count


register_shape_attrs(Attention, ("embed_dim", "num_heads", "head_dim"), swappable=True)
