"""Helpers every ONNX exporter here shares: a quiet exporter, the unfused attention path, and the
feed completion that adds a decoder's empty key/value cache."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import torch

from torchslim.errors import ExportError

PAST_AXIS = "past_sequence"


@contextlib.contextmanager
def quiet():
    """The exporters narrate every step; keep the user's terminal for our own messages."""
    loggers = [
        logging.getLogger(name)
        for name in ("torch", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@contextlib.contextmanager
def no_fused_encoder():
    """PyTorch's `nn.TransformerEncoderLayer` / `nn.MultiheadAttention` run one fused kernel at
    inference that neither exporter can translate; the layer-by-layer path computes the same."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def complete_feed(session, feed: dict) -> dict:
    """`feed` plus every cache input the graph declares and the feed lacks: zeros of length
    attention_mask width - input_ids width (0 when they agree: the prompt), batch from input_ids."""
    missing = [i for i in session.get_inputs() if i.name not in feed]
    if not missing:
        return feed
    ids = feed["input_ids"]
    mask = feed.get("attention_mask")
    past = 0 if mask is None else mask.shape[1] - ids.shape[1]
    out = dict(feed)
    for spec in missing:
        if PAST_AXIS not in spec.shape:
            raise ExportError(f"the ONNX artifact needs input '{spec.name}' {spec.shape}, which the feed lacks.")
        shape = [ids.shape[0] if d == "batch" else past if d == PAST_AXIS else d for d in spec.shape]
        out[spec.name] = np.zeros(shape, np.float16 if "float16" in spec.type else np.float32)
    return out
