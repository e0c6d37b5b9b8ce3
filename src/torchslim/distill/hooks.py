"""Read intermediate outputs by module path with forward hooks; no model's forward is rewritten."""

from __future__ import annotations

import contextlib
import difflib

import torch
from torch import nn

from torchslim.distributed import unwrap
from torchslim.errors import TorchslimError


@contextlib.contextmanager
def capture(model: nn.Module, paths: list[str], which: str = "model"):
    """Yields a dict that fills with {path: output} on every forward pass inside the block.
    For modules returning tuples (attention), the first tensor is kept unless the path ends in
    `[i]`, e.g. "layers.0.attn[1]" for the attention weights. Paths are the unwrapped model's under
    DistributedDataParallel."""
    modules = dict(unwrap(model).named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = []
    for path in paths:
        name, index = path[:-1].split("[") if path.endswith("]") else (path, None)
        if name not in modules:
            near = difflib.get_close_matches(name, list(modules), n=3)
            raise TorchslimError(
                f"{which} has no module '{name}'"
                + (f"; did you mean {near}?" if near else f"; its modules include {list(modules)[1:8]}.")
            )

        def hook(mod, args, out, path=path, index=index):
            value = out[int(index)] if index is not None else (out[0] if isinstance(out, (tuple, list)) else out)
            if value is None:
                raise TorchslimError(
                    f"{which}.{path} returned None (an attention layer asked not to return its weights?)"
                )
            store[path] = value

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
