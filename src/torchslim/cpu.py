"""What the CPU can do, for the report and for defaults that depend on it (int8 schemes, channel
rounding). Read from /proc/cpuinfo (Linux); elsewhere the list is empty and defaults stay generic."""

from __future__ import annotations

import functools
from pathlib import Path

# the instruction-set features that change which kernels ONNX Runtime and PyTorch pick
KNOWN = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "bf16",
)


@functools.lru_cache(maxsize=1)
def cpu_features() -> list[str]:
    """The KNOWN features this CPU reports, e.g. ['avx', 'avx2', 'fma', ...]."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [f for f in KNOWN if f in flags]


def has_int8_dot_product() -> bool:
    """An int8 dot-product instruction (VNNI on x86, SDOT on Arm): without it, x86's u8 x s8 multiply
    (vpmaddubsw) saturates its 16-bit pair sums when weights use the whole int8 range."""
    features = set(cpu_features())
    return bool(features & {"avx512_vnni", "avx_vnni", "asimddp"}) or not features & {"avx2"}


def vector_channels() -> int:
    """Channels one vector register holds in float32 — ONNX Runtime's blocked (NCHWc) convolution
    block: 16 with AVX-512, 8 with AVX2 or NEON-wide kernels, 4 otherwise. Pruned widths that are
    multiples of it keep the fast kernels; others fall back to slower paths."""
    features = cpu_features()
    if "avx512f" in features:
        return 16
    if "avx2" in features or "asimd" in features:
        return 8
    return 4
