"""Counts read off the model itself: parameters, FLOPs (torch's own counter), inference memory."""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> dict:
    params = list(model.parameters())
    return {
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "nonzero_params": sum(int(torch.count_nonzero(p)) for p in params),
    }


def _args(example) -> tuple:
    return example if isinstance(example, tuple) else (example,)


def count_flops(model: nn.Module, example: torch.Tensor | tuple) -> int:
    """FLOPs of one forward pass on `example` (a tensor, or a tuple of the model's inputs; a
    multiply-add counts as 2), by torch.utils.flop_counter."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(*_args(example))
    return int(counter.get_total_flops())


def peak_inference_bytes(model: nn.Module, example: torch.Tensor | tuple) -> int:
    """Peak of the bytes allocated during one forward pass beyond the weights (activations and
    workspace), read from the PyTorch profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    with torch.inference_mode():
        model(*_args(example))  # first call allocates lazily-built caches; keep them out of the peak
        with _silence_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(*_args(example))
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def _silence_stderr():
    """The profiler's C++ side prints start/stop lines straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
