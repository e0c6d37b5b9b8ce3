"""A content-addressed cache of trained weights, so a recipe run again does not train the same model again.

The key covers everything that decides the weights a training run ends with: the weights it starts
from, the training settings, the data settings, the task, the seed, the device type and world size,
the torch version and the source code of torchslim itself (any change to the package is a new key).
An entry holds the trained weights (safetensors), the training record and the global RNG state after
training, so the stages that follow see the same random numbers as after a real training run.

The folder is `$TORCHSLIM_CACHE`, else `$XDG_CACHE_HOME/torchslim`, else `~/.cache/torchslim`;
deleting it is always safe."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from torchslim.io import write_json
from torchslim.models.io import load_weights, save_weights

WEIGHTS, RECORD, RNG = "model.safetensors", "record.json", "rng.pt"


def cache_dir() -> Path:
    if os.environ.get("TORCHSLIM_CACHE"):
        return Path(os.environ["TORCHSLIM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "torchslim"


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of every Python source file of the installed torchslim package."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def training_key(model: nn.Module, settings: dict) -> str:
    """The cache key of training `model` (as it is now) with `settings` (plain JSON-able data)."""
    payload = {
        "weights": weights_fingerprint(model),
        "settings": settings,
        "torch": torch.__version__,
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def lookup(key: str, model: nn.Module) -> dict | None:
    """Load a cached training into `model` and restore the RNG state; returns its record, or None on a miss
    (or a damaged entry, which is removed)."""
    entry = cache_dir() / "train" / key
    if not (entry / RECORD).exists():
        return None
    try:
        record = json.loads((entry / RECORD).read_text())
        load_weights(model, entry / WEIGHTS)
        torch.set_rng_state(torch.load(entry / RNG, weights_only=True))
    except Exception:  # a half-deleted or damaged entry is a miss, never an error
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return {**record, "path": str(entry)}


def store(key: str, model: nn.Module, record: dict) -> Path | None:
    """Write an entry (the record last, so an entry without it is never read); a cache that cannot be
    written is skipped, never an error."""
    entry = cache_dir() / "train" / key
    try:
        entry.mkdir(parents=True, exist_ok=True)
        save_weights(model, entry / WEIGHTS)
        torch.save(torch.get_rng_state(), entry / RNG)
        write_json(entry / RECORD, record)
    except OSError:
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return entry
