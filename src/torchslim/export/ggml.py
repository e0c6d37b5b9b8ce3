"""llama.cpp's quantized block types (ggml's), packed by torchslim: the k-quants Q4_K, Q5_K and Q6_K
(super-blocks of 256 weights) and the blocks of 32 Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 that llama.cpp
keeps rows of other widths in.

Every type is one grid: within a sub-block, `w ≈ step·q − offset` with q an integer in lo..hi, the
step and offset as the file stores them.

- Q4_K: 8 sub-blocks of 32, step `d·sc_j`, offset `dmin·m_j`, q in 0..15, the sub-block scales sc_j
  and minimums m_j 6-bit integers of the super-block's float16 `d` and `dmin` (144 bytes per 256
  weights: 4.5 bits per weight); Q5_K the same with q in 0..31 (5.5 bits). Q6_K: 16 sub-blocks of
  16, step `d·sc_j` with int8 scales of a float16 `d`, q in 0..63 around 32 (6.5625 bits).
- Q4_0 / Q5_0: a float16 step `d`, q in 0..15 / 0..31 around 8 / 16 (4.5 / 5.5 bits); Q4_1 / Q5_1
  add a float16 minimum `m` (5 / 6 bits); Q8_0: a float16 `d` and int8 q (8.5 bits). The symmetric
  types' steps (and Q6_K's sub-block scales) may be negative, as llama.cpp stores them: the block's
  extreme then takes the wider negative side of the codes whichever its sign.

The rounding is torchslim's: every sub-block's range is chosen by a search over clipped ranges for
the least squared error, optionally weighted per input column by an importance (the mean square of
the activations the column sees, as llama.cpp's importance matrix), and the codes are rounded
against the steps as finally stored — or chosen by GPTQ on those steps (`TypeGrid` has the
interface `quantize.weights.gptq` takes). The byte layout is llama.cpp's (`ggml-quants.c`): the
tests read the packed blocks back with gguf-py's reference dequantizers.

    g = grid(weight, "Q4_K", importance=act_sq)   # the searched steps and offsets, as stored
    q = codes(weight, g)                          # round-to-nearest on them
    blocks = encode(g, q)                         # (rows, bytes) uint8 in llama.cpp's layout
    approx = decode(g, q)                         # what llama.cpp computes with (== unpack(blocks))
    blocks = pack(weight, "Q4_K")                 # the three in one
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from torchslim.errors import TorchslimError

QK_K = 256


@dataclass(frozen=True)
class Layout:
    block: int  # weights per block (a row's width must be a multiple)
    bytes: int  # bytes per block
    sub: int  # weights sharing one step and offset
    lo: int
    hi: int
    center: int = 0  # symmetric types: q − center is the signed code


LAYOUTS = {
    "Q4_K": Layout(QK_K, 144, 32, 0, 15),
    "Q5_K": Layout(QK_K, 176, 32, 0, 31),
    "Q6_K": Layout(QK_K, 210, 16, 0, 63, 32),
    "Q4_0": Layout(32, 18, 32, 0, 15, 8),
    "Q4_1": Layout(32, 20, 32, 0, 15),
    "Q5_0": Layout(32, 22, 32, 0, 31, 16),
    "Q5_1": Layout(32, 24, 32, 0, 31),
    "Q8_0": Layout(32, 34, 32, -128, 127),
}
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
BYTES = {k: v.bytes for k, v in LAYOUTS.items()}
# clipping factors tried for each sub-block's range: the range is shrunk by each
SHRINK = torch.tensor([1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.78, 0.74, 0.70])
SIGNED_SHRINK = torch.linspace(1.0, 0.7, 31)  # one factor per candidate: a finer search costs the same


@dataclass
class TypeGrid:
    """One tensor's grid in a GGML type: per sub-block (rows × cols/sub) the step and offset as stored,
    and the per-block numbers the file holds (`stored`). `quantize`/`dequantize`/`width` are the grid
    interface `quantize.weights.gptq` uses with fixed scales."""

    kind: str
    step: torch.Tensor
    offset: torch.Tensor
    stored: dict = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.kind]

    @property
    def levels(self) -> tuple[int, int]:
        return self.layout.lo, self.layout.hi

    def width(self, columns: int) -> int:
        return self.layout.sub

    def quantize(self, w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        safe = torch.where(step != 0, step, torch.ones_like(step)).unsqueeze(-1)
        q = torch.round((w + offset.unsqueeze(-1)) / safe)
        q = torch.where(step.unsqueeze(-1) != 0, q, torch.full_like(q, float(self.layout.center)))
        return q.clamp(self.layout.lo, self.layout.hi)

    def dequantize(self, q: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return q * step.unsqueeze(-1) - offset.unsqueeze(-1)


def check(shape, kind: str) -> None:
    """A clear error when `kind` is not a type torchslim packs or the rows' width is not whole blocks."""
    if kind not in LAYOUTS:
        raise TorchslimError(f"GGML type {kind!r} is not one of {', '.join(LAYOUTS)}.")
    if len(shape) != 2 or shape[1] % LAYOUTS[kind].block:
        raise TorchslimError(
            f"{kind} packs rows of a multiple of {LAYOUTS[kind].block} weights; this tensor is {list(shape)} "
            "(llama.cpp keeps such tensors in another type)."
        )


def _error_weights(importance: torch.Tensor | None, shape: tuple[int, int], size: int) -> torch.Tensor:
    """Per-weight error weights, (rows·cols/size, size): the column's importance, or ones."""
    rows, cols = shape
    if importance is None:
        return torch.ones(rows * cols // size, size)
    imp = importance.float().clamp_min(0).reshape(1, cols).expand(rows, cols)
    return (imp + 1e-12).reshape(-1, size)


CHUNK = 1 << 13  # sub-blocks searched at a time: the candidates' temporaries stay in the CPU's caches


def _error(x, w, step, offset, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, weighted squared error per row) of x on (step, offset)."""
    safe = torch.where(step != 0, step, torch.ones_like(step))
    q = ((x + offset[:, None]) / safe[:, None]).round().clamp(lo, hi)
    return q, (w * (q * step[:, None] - offset[:, None] - x) ** 2).sum(1)


def _search(x: torch.Tensor, w: torch.Tensor, candidates, offsets: str = "any", exact=None):
    """Per row of x (sub-blocks): the (step, offset) among `candidates(x)` (an iterable of (step, offset,
    lo, hi) tensors/ints) with the least weighted squared error of x ≈ step·q − offset, q in lo..hi,
    then refitted by weighted least squares on its codes (twice; kept where the error falls): the step
    alone with `offsets="zero"`, both with "any", both with the offset kept ≥ 0 with "positive".
    `exact(x)`: more candidates, taken only where one represents the row exactly (weights already on
    such a grid come back to it). `CHUNK` rows at a time."""
    if len(x) > CHUNK:
        parts = [
            _search(x[i : i + CHUNK], w[i : i + CHUNK], candidates, offsets, exact) for i in range(0, len(x), CHUNK)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n = x.shape[0]
    best_err, best_step, best_offset = torch.full((n,), float("inf")), torch.zeros(n), torch.zeros(n)
    for step, offset, lo, hi in candidates(x):
        _, err = _error(x, w, step, offset, lo, hi)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_step = torch.where(better, step, best_step)
        best_offset = torch.where(better, offset, best_offset)
    best_step, best_offset, best_err = _refit(x, w, best_err, best_step, best_offset, lo, hi, offsets)
    if exact is not None:
        tiny = 1e-12 * (w * x * x).sum(1)
        for step, offset, lo, hi in exact(x):
            _, err = _error(x, w, step, offset, lo, hi)
            take = (err <= tiny) & (best_err > tiny)
            best_err = torch.where(take, err, best_err)
            best_step = torch.where(take, step, best_step)
            best_offset = torch.where(take, offset, best_offset)
    return best_step, best_offset


def _refit(x, w, best_err, best_step, best_offset, lo, hi, offsets: str):
    """`_search`'s weighted least-squares refit of the chosen steps and offsets on their codes."""
    for _ in range(2):
        q, _ = _error(x, w, best_step, best_offset, lo, hi)
        wq = w * q
        a, d = (wq * q).sum(1), (wq * x).sum(1)
        if offsets == "zero":
            step = d / torch.where(a > 0, a, torch.ones_like(a))
            offset = torch.zeros_like(step)
        else:
            b, c, e = wq.sum(1), w.sum(1), (w * x).sum(1)
            det = a * c - b * b
            step = (d * c - e * b) / torch.where(det.abs() > 0, det, torch.ones_like(det))
            offset = (step * b - e) / c
            if offsets == "positive":
                offset = offset.clamp_min(0)
        valid = (step != 0 if offsets == "zero" else step > 0) & torch.isfinite(step) & torch.isfinite(offset)
        step, offset = torch.where(valid, step, best_step), torch.where(valid, offset, best_offset)
        _, err = _error(x, w, step, offset, lo, hi)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_step = torch.where(better, step, best_step)
        best_offset = torch.where(better, offset, best_offset)
    return best_step, best_offset, best_err


def _ranges(x: torch.Tensor, levels: int, clamp_zero: bool):
    """Asymmetric candidates: [lo·a, hi·b] (lo ≤ 0 ≤ hi when `clamp_zero`, as the k-quants' non-negative
    minimums need) or, unclamped, the range shrunk towards its middle."""
    lo, hi = x.min(1).values, x.max(1).values
    if clamp_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        for a in SHRINK:
            for b in SHRINK:
                yield (hi * b - lo * a) / levels, -lo * a, 0, levels
    else:
        mid = (lo + hi) / 2
        for a in SHRINK:
            for b in SHRINK:
                bottom, top = mid - (mid - lo) * a, mid + (hi - mid) * b
                yield (top - bottom) / levels, -bottom, 0, levels


def _spans(x: torch.Tensor, levels: int):
    """The range (lo ≤ 0) spread over fewer levels, at each position: the grid of weights whose codes do
    not reach both ends (as llama.cpp's own k-quant files hold)."""
    lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
    for k in range(1, 5):
        step = (hi - lo) / (levels - k)
        for j in range(k + 1):
            yield step, j * step - lo, 0, levels


def _signed(x: torch.Tensor, low: int, high: int):
    """Symmetric candidates (q in low..high, low = −high − 1): the absolute maximum on the positive side
    (amax/high) and, as llama.cpp does, the signed extreme on the wider negative side (extreme/low: a
    negative step when the extreme is positive, so that side gets the extra level), each shrunk."""
    amax = x.abs().max(1).values
    extreme = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
    zero = torch.zeros_like(amax)
    for a in SIGNED_SHRINK:
        yield amax * a / high, zero, low, high
        yield extreme * a / low, zero, low, high


def _super_scale(values: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float16-rounded super-block scale, integer codes 0..top) of non-negative per-sub-block values
    (super-blocks × sub-blocks)."""
    d = (values.max(1).values / top).half().float()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return d, (values / safe[:, None]).round().clamp(0, top)


def _signed_super_scale(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float16 super-block scale, int8 codes −128..127) of signed per-sub-block steps: as llama.cpp's
    Q6_K, the extreme step is code −128 (the scale negative when that step is positive)."""
    extreme = values.gather(1, values.abs().argmax(1, keepdim=True))[:, 0]
    d = (extreme / -128).half().float()
    safe = torch.where(d != 0, d, torch.ones_like(d))
    return d, (values / safe[:, None]).round().clamp(-128, 127)


def grid(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> TypeGrid:
    """The searched steps and offsets of `weight` (rows × cols) in `kind`, as the file stores them;
    `importance` (cols,): how much each input column's error counts."""
    check(weight.shape, kind)
    lay = LAYOUTS[kind]
    rows, cols = weight.shape
    x = weight.detach().float().reshape(-1, lay.sub)
    w = _error_weights(importance, (rows, cols), lay.sub)
    per_row = (rows, cols // lay.sub)
    if kind in ("Q4_K", "Q5_K"):
        scale, minimum = _search(
            x, w, lambda x: _ranges(x, lay.hi, clamp_zero=True), "positive", lambda x: _spans(x, lay.hi)
        )
        d, sc = _super_scale(scale.reshape(-1, 8), 63)
        dmin, mq = _super_scale(minimum.reshape(-1, 8), 63)
        step, offset = d[:, None] * sc, dmin[:, None] * mq
        stored = {"d": d, "dmin": dmin, "sc": sc, "m": mq}
    elif kind == "Q6_K":
        scale, _ = _search(x, w, lambda x: _signed(x, -32, 31), "zero")
        d, sc = _signed_super_scale(scale.reshape(-1, 16))
        step = d[:, None] * sc
        offset, stored = 32 * step, {"d": d, "sc": sc}
    elif lay.center or kind == "Q8_0":  # Q4_0, Q5_0, Q8_0: symmetric
        low, high = lay.lo - lay.center, lay.hi - lay.center
        scale, _ = _search(x, w, lambda x: _signed(x, low, high), "zero")
        step = scale.half().float()
        offset, stored = lay.center * step, {"d": step}
    else:  # Q4_1, Q5_1: a float16 step and minimum
        scale, offset = _search(x, w, lambda x: _ranges(x, lay.hi, clamp_zero=False), "any")
        step, minimum = scale.half().float(), (-offset).half().float()
        offset, stored = -minimum, {"d": step, "m": minimum}
    return TypeGrid(kind, step.reshape(per_row), offset.reshape(per_row), stored)


def _grouped(t: torch.Tensor, sub: int) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, sub)


def codes(weight: torch.Tensor, g: TypeGrid) -> torch.Tensor:
    """Round-to-nearest of `weight` on the grid: integer codes (rows × cols) in lo..hi."""
    q = g.quantize(_grouped(weight.detach().float(), g.layout.sub), g.step, g.offset)
    return q.reshape(weight.shape)


def decode(g: TypeGrid, q: torch.Tensor) -> torch.Tensor:
    """The float weights llama.cpp computes with from codes on the grid."""
    return g.dequantize(_grouped(q.float(), g.layout.sub), g.step, g.offset).reshape(q.shape)


def _half(t: torch.Tensor) -> np.ndarray:
    return t.half().numpy().view(np.uint8).reshape(-1, 2)


def _nibbles(q: np.ndarray, halves: int) -> np.ndarray:
    """Low 4 bits of codes (blocks, halves·2·n): byte i of chunk c holds element i of the two halves of c."""
    low = (q & 0x0F).reshape(q.shape[0], halves, 2, -1)
    return (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(q.shape[0], -1)


def encode(g: TypeGrid, q: torch.Tensor) -> np.ndarray:
    """(rows, cols/block·bytes) uint8 blocks of codes `q` (rows × cols) on `g`, in llama.cpp's layout."""
    lay, s = g.layout, g.stored
    rows = q.shape[0]
    if g.kind == "Q8_0":
        qs = q.reshape(-1, 32).to(torch.int8).numpy().view(np.uint8)
        return np.concatenate([_half(s["d"]), qs], 1).reshape(rows, -1)
    codes_ = q.reshape(-1, lay.block).to(torch.uint8).numpy()
    if g.kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        head = [_half(s["d"])] + ([_half(s["m"])] if "m" in s else [])
        if g.kind in ("Q5_0", "Q5_1"):  # the fifth bit of element i: bit i of a little-endian uint32
            bits = ((codes_ >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            head.append(bits.sum(1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4))
        return np.concatenate(head + [_nibbles(codes_, 1)], 1).reshape(rows, -1)
    if g.kind in ("Q4_K", "Q5_K"):
        sc, mq = s["sc"].to(torch.uint8).numpy(), s["m"].to(torch.uint8).numpy()
        scales = np.zeros((sc.shape[0], 12), np.uint8)
        scales[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
        scales[:, 4:8] = (mq[:, :4] & 0x3F) | ((mq[:, 4:] >> 4) << 6)
        scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mq[:, 4:] & 0x0F) << 4)
        parts = [np.stack([s["d"].half().numpy(), s["dmin"].half().numpy()], 1).view(np.uint8), scales]
        if g.kind == "Q5_K":  # the fifth bit of element i of sub-block j: bit j of byte i
            sub = codes_.reshape(-1, 8, 32)
            qh = np.zeros((sub.shape[0], 32), np.uint8)
            for j in range(8):
                qh |= ((sub[:, j, :] >> 4) & 1) << j
            parts.append(qh)
        return np.concatenate(parts + [_nibbles(codes_, 4)], 1).reshape(rows, -1)
    # Q6_K: value v of a half h (128 values): low 4 bits in byte h·64 + v % 64 (nibble v // 64), high 2
    # bits in byte h·32 + v % 32 (bits 2·(v // 32))
    halves = codes_.reshape(-1, 2, 128)
    low, high = halves & 0x0F, halves >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)
    hs = high.reshape(-1, 2, 4, 32)
    qh = (hs[:, :, 0] | (hs[:, :, 1] << 2) | (hs[:, :, 2] << 4) | (hs[:, :, 3] << 6)).reshape(-1, 64)
    scales = s["sc"].to(torch.int8).numpy().view(np.uint8)
    return np.concatenate([ql, qh, scales, _half(s["d"])], 1).reshape(rows, -1)


def pack(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """(rows, cols/block·bytes) uint8 blocks of `weight` in `kind`, rounded to nearest on the searched
    grid; `importance` (cols,): how much each input column's error counts."""
    g = grid(weight, kind, importance)
    return encode(g, codes(weight, g))


def unpack(blocks: np.ndarray, kind: str, shape: tuple[int, int]) -> torch.Tensor:
    """The float weights llama.cpp computes with from packed blocks (the inverse of `encode`'s layout)."""
    lay = LAYOUTS[kind]
    b = np.ascontiguousarray(blocks).reshape(-1, lay.bytes)

    def f16(start):
        return b[:, start : start + 2].view(np.float16).astype(np.float32)

    if kind == "Q8_0":
        out = f16(0) * b[:, 2:].view(np.int8).astype(np.float32)
    elif kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        start = 4 if kind.endswith("_1") else 2
        qs = b[:, -16:]
        q = np.concatenate([qs & 0x0F, qs >> 4], 1).astype(np.uint32)
        if kind.startswith("Q5"):
            qh = b[:, start : start + 4].copy().view("<u4")
            q = q | (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4)
        q = q.astype(np.float32)
        out = f16(0) * q + f16(2) if kind.endswith("_1") else f16(0) * (q - lay.center)
    elif kind in ("Q4_K", "Q5_K"):
        d, dmin = f16(0), f16(2)
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
        d = f16(208)
        low = np.concatenate([ql & 0x0F, ql >> 4], 2)
        high = np.concatenate([(qh >> shift) & 0x03 for shift in (0, 2, 4, 6)], 2)
        q = (low | (high << 4)).astype(np.float32).reshape(-1, 16, 16) - 32
        out = d[:, :, None] * sc[:, :, None] * q
    return torch.from_numpy(np.ascontiguousarray(out).reshape(shape).astype(np.float32))
