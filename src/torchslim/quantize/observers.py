"""Observers: turn the values a tensor took on real calibration data into a quantization range.

Each observer sees the tensor batch by batch (`update`) and returns (lowest, highest) for an
integer grid of `bits` bits. Histogram-based observers work on a bounded sample of the values."""

from __future__ import annotations

import numpy as np

SAMPLE_PER_BATCH = 65536


class Observer:
    def __init__(self, bits: int = 8):
        self.bits = bits
        self.lo, self.hi = np.inf, -np.inf
        self.samples: list[np.ndarray] = []

    def update(self, values: np.ndarray) -> None:
        flat = np.asarray(values, dtype=np.float32).ravel()
        if flat.size == 0:
            return
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        step = max(1, flat.size // SAMPLE_PER_BATCH)
        self.samples.append(flat[::step])

    def sample(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(1, np.float32)

    def range(self) -> tuple[float, float]:
        raise NotImplementedError


class MinMax(Observer):
    """The extremes seen over all batches."""

    def range(self):
        return self.lo, self.hi


class MovingAverageMinMax(Observer):
    """Exponential moving average of each batch's extremes (less hostage to one outlier batch)."""

    def __init__(self, bits: int = 8, momentum: float = 0.9):
        super().__init__(bits)
        self.momentum, self.avg = momentum, None

    def update(self, values):
        super().update(values)
        flat = np.asarray(values, dtype=np.float32).ravel()
        cur = np.array([flat.min(), flat.max()])
        self.avg = cur if self.avg is None else self.momentum * self.avg + (1 - self.momentum) * cur

    def range(self):
        return float(self.avg[0]), float(self.avg[1])


class Percentile(Observer):
    """Clip the tails: the `percentile` and 100 - `percentile` quantiles of the values."""

    def __init__(self, bits: int = 8, percentile: float = 99.99):
        super().__init__(bits)
        self.percentile = percentile

    def range(self):
        s = self.sample()
        lo, hi = np.percentile(s, [100 - self.percentile, self.percentile])
        return float(min(lo, 0.0)), float(max(hi, 0.0))


def _quant_error(s: np.ndarray, lo: float, hi: float, bits: int) -> float:
    levels = 2**bits - 1
    scale = max(hi - lo, 1e-12) / levels
    q = np.clip(np.round((s - lo) / scale), 0, levels)
    return float(np.mean((q * scale + lo - s) ** 2))


class MSE(Observer):
    """The clipping range that minimises the mean squared quantize-dequantize error on the sample."""

    def range(self):
        s = self.sample()
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        candidates = np.linspace(0.2, 1.0, 41)
        errors = [_quant_error(s, lo * c, hi * c, self.bits) for c in candidates]
        c = candidates[int(np.argmin(errors))]
        return lo * c, hi * c


class Entropy(Observer):
    """The threshold whose 2^bits-level quantized histogram is closest (KL divergence) to the
    original histogram of |x| (the TensorRT calibration algorithm)."""

    def __init__(self, bits: int = 8, bins: int = 2048):
        super().__init__(bits)
        self.bins = bins

    def range(self):
        s = self.sample()
        signed = self.lo < 0
        amax = max(abs(self.lo), abs(self.hi), 1e-12)
        hist, edges = np.histogram(np.abs(s), bins=self.bins, range=(0, amax))
        hist = hist.astype(np.float64)
        levels = 2 ** (self.bits - 1) if signed else 2**self.bits
        best, best_kl = self.bins, np.inf
        for i in range(levels, self.bins + 1, max(1, self.bins // 256)):
            p = hist[:i].copy()
            p[i - 1] += hist[i:].sum()
            q = np.zeros(i)
            for chunk in np.array_split(np.arange(i), levels):
                nonzero = hist[chunk] > 0
                if nonzero.any():
                    q[chunk[nonzero]] = hist[chunk].sum() / nonzero.sum()
            mask = p > 0
            if q[mask].min(initial=1) == 0:
                continue
            pn, qn = p[mask] / p.sum(), q[mask] / q.sum()
            kl = float(np.sum(pn * np.log(pn / qn)))
            if kl < best_kl:
                best, best_kl = i, kl
        t = float(edges[best])
        return (-t if signed else 0.0), t


OBSERVERS = {
    "minmax": MinMax,
    "moving_average": MovingAverageMinMax,
    "percentile": Percentile,
    "mse": MSE,
    "entropy": Entropy,
}
