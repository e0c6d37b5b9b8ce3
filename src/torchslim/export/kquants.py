"""llama.cpp's k-quant types, packed by torchslim: Q4_K, Q5_K and Q6_K super-blocks of 256 weights.

Q4_K: 8 sub-blocks of 32 weights, each `w ≈ d·sc_j·q − dmin·m_j` with q in 0..15, the sub-block
scales sc_j and minimums m_j as 6-bit integers of the super-block's float16 `d` and `dmin` (144 bytes
per 256 weights: 4.5 bits per weight); Q5_K the same with q in 0..31 (the fifth bits in 32 more bytes:
5.5 bits per weight). Q6_K: 16 sub-blocks of 16, `w ≈ d·sc_j·(q − 32)` with q in
0..63 and int8 sub-block scales of a float16 `d` (210 bytes: 6.5625 bits per weight).

The rounding is torchslim's: every sub-block's range (Q4_K: minimum and maximum; Q6_K: the absolute
maximum) is chosen by a search over clipped ranges for the least squared error, optionally weighted
per input column by an importance (the mean square of the activations the column sees, as llama.cpp's
importance matrix), and the codes are rounded again against the scales as finally stored. The byte
layout is llama.cpp's (`ggml-quants.c`): the tests read the packed blocks back with gguf-py's
reference dequantizers.

    blocks = pack(weight, "Q4_K", importance=act_sq)   # (rows, cols/256*144) uint8, cols % 256 == 0
    approx = unpack(blocks, "Q4_K", weight.shape)      # what llama.cpp computes with
"""

from __future__ import annotations

import numpy as np
import torch

from torchslim.errors import TorchslimError

QK_K = 256
BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
# clipping factors tried for each sub-block's range: the range is shrunk towards zero by each
SHRINK = torch.tensor([1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.78, 0.74, 0.70])


def _check(weight: torch.Tensor, kind: str) -> None:
    if kind not in BYTES:
        raise TorchslimError(f"k-quant type {kind!r} is not one of {', '.join(BYTES)}.")
    if weight.dim() != 2 or weight.shape[1] % QK_K:
        raise TorchslimError(
            f"{kind} packs rows of a multiple of {QK_K} weights; this tensor is {list(weight.shape)} "
            "(llama.cpp keeps such tensors in another type)."
        )


def _weights(importance: torch.Tensor | None, shape: tuple[int, int], size: int) -> torch.Tensor:
    """Per-weight error weights, (rows·cols/size, size): the column's importance, or ones."""
    rows, cols = shape
    if importance is None:
        return torch.ones(rows * cols // size, size)
    imp = importance.float().clamp_min(0).reshape(1, cols).expand(rows, cols)
    return (imp + 1e-12).reshape(-1, size)


def _asymmetric(x: torch.Tensor, w: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (sub-blocks): (scale, min) with x ≈ scale·q − min, q in 0..levels, min ≥ 0 and the
    least weighted squared error over the clipped ranges tried."""
    lo = x.min(1).values.clamp(max=0)
    hi = x.max(1).values.clamp(min=0)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_min = torch.zeros_like(lo), torch.zeros_like(lo)
    for a in SHRINK:
        for b in SHRINK:
            bottom, top = lo * a, hi * b
            scale = (top - bottom) / levels
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = ((x - bottom[:, None]) / safe[:, None]).round().clamp(0, levels)
            err = (w * (q * scale[:, None] + bottom[:, None] - x) ** 2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_min = torch.where(better, -bottom, best_min)
    return best_scale, best_min


def _symmetric(x: torch.Tensor, w: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Per row of x: the scale of x ≈ scale·q, q in low..high, with the least weighted squared error."""
    amax = x.abs().max(1).values
    best_err = torch.full_like(amax, float("inf"))
    best = torch.zeros_like(amax)
    for a in SHRINK:
        scale = amax * a / high
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (x / safe[:, None]).round().clamp(low, high)
        err = (w * (q * scale[:, None] - x) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best


def _super_scale(values: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float16-rounded super-block scale, integer codes 0..top) of non-negative per-sub-block values
    (super-blocks × sub-blocks)."""
    d = (values.max(1).values / top).half().float()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return d, (values / safe[:, None]).round().clamp(0, top)


def _with_minimums(weight: torch.Tensor, importance: torch.Tensor | None, levels: int):
    """Q4_K/Q5_K: per super-block (d, dmin, 8 six-bit scales, 8 six-bit minimums) and the codes
    0..levels of its 8 sub-blocks of 32, rounded against the scales as stored."""
    rows, cols = weight.shape
    x = weight.float().reshape(-1, 32)
    w = _weights(importance, (rows, cols), 32)
    scale, minimum = _asymmetric(x, w, levels)
    d, sc = _super_scale(scale.reshape(-1, 8), 63)
    dmin, mq = _super_scale(minimum.reshape(-1, 8), 63)
    step = (d[:, None] * sc).reshape(-1, 1)
    offset = (dmin[:, None] * mq).reshape(-1, 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = ((x + offset) / safe).round().clamp(0, levels).to(torch.uint8).reshape(-1, 8, 32).numpy()
    sc, mq = sc.to(torch.uint8).numpy(), mq.to(torch.uint8).numpy()
    packed = np.zeros((q.shape[0], 12), np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (mq[:, :4] & 0x3F) | ((mq[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mq[:, 4:] & 0x0F) << 4)
    head = np.stack([d.half().numpy(), dmin.half().numpy()], 1).view(np.uint8)
    return head, packed, q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """The low 4 bits of (super-blocks, 8, 32) codes: chunk c holds sub-block 2c (low) and 2c+1 (high)."""
    low = q & 0x0F
    return (low[:, 0::2, :] | (low[:, 1::2, :] << 4)).reshape(-1, 128)


def _q4_k(weight: torch.Tensor, importance: torch.Tensor | None) -> np.ndarray:
    head, scales, q = _with_minimums(weight, importance, 15)
    return np.concatenate([head, scales, _nibbles(q)], 1)


def _q5_k(weight: torch.Tensor, importance: torch.Tensor | None) -> np.ndarray:
    head, scales, q = _with_minimums(weight, importance, 31)
    # the fifth bit of element i of sub-block j: bit j of byte i
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= ((q[:, j, :] >> 4) & 1) << j
    return np.concatenate([head, scales, qh, _nibbles(q)], 1)


def _q6_k(weight: torch.Tensor, importance: torch.Tensor | None) -> np.ndarray:
    rows, cols = weight.shape
    x = weight.float().reshape(-1, 16)
    w = _weights(importance, (rows, cols), 16)
    scale = _symmetric(x, w, -32, 31)
    d, sc = _super_scale(scale.reshape(-1, 16), 127)
    step = (d[:, None] * sc).reshape(-1, 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = ((x / safe).round().clamp(-32, 31) + 32).to(torch.uint8).reshape(-1, QK_K).numpy()
    # value v of a half h (128 values): low 4 bits in byte h·64 + v % 64 (nibble v // 64), high 2 bits
    # in byte h·32 + v % 32 (bits 2·(v // 32))
    halves = q.reshape(-1, 2, 128)
    low, high = halves & 0x0F, halves >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)
    hs = high.reshape(-1, 2, 4, 32)
    qh = (hs[:, :, 0] | (hs[:, :, 1] << 2) | (hs[:, :, 2] << 4) | (hs[:, :, 3] << 6)).reshape(-1, 64)
    scales = sc.to(torch.int8).numpy().view(np.uint8)
    return np.concatenate([ql, qh, scales, d.half().numpy().view(np.uint8).reshape(-1, 2)], 1)


def pack(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """(rows, cols/256·bytes) uint8 blocks of `weight` (rows × cols, cols a multiple of 256) in the
    k-quant `kind`; `importance` (cols,): how much each input column's error counts."""
    _check(weight, kind)
    blocks = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[kind](weight, importance)
    return blocks.reshape(weight.shape[0], -1)


def unpack(blocks: np.ndarray, kind: str, shape: tuple[int, int]) -> torch.Tensor:
    """The float weights llama.cpp computes with from packed blocks (the inverse of `pack`'s layout)."""
    b = np.ascontiguousarray(blocks).reshape(-1, BYTES[kind])
    if kind in ("Q4_K", "Q5_K"):
        d = b[:, 0:2].view(np.float16).astype(np.float32)
        dmin = b[:, 2:4].view(np.float16).astype(np.float32)
        s = b[:, 4:16]
        sc = np.concatenate([s[:, 0:4] & 0x3F, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], 1)
        mq = np.concatenate([s[:, 4:8] & 0x3F, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
        qs = b[:, -128:].reshape(-1, 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], 2).reshape(-1, 8, 32)
        if kind == "Q5_K":
            qh = b[:, 16:48]
            q = q | np.stack([((qh >> j) & 1) << 4 for j in range(8)], 1)
        q = q.astype(np.float32)
        out = d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mq[:, :, None]
    else:
        ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
        sc = b[:, 192:208].view(np.int8).astype(np.float32)
        d = b[:, 208:210].view(np.float16).astype(np.float32)
        low = np.concatenate([ql & 0x0F, ql >> 4], 2)
        high = np.concatenate([(qh >> shift) & 0x03 for shift in (0, 2, 4, 6)], 2)
        q = (low | (high << 4)).astype(np.float32).reshape(-1, 16, 16) - 32
        out = d[:, :, None] * sc[:, :, None] * q
    return torch.from_numpy(out.reshape(shape).astype(np.float32))
