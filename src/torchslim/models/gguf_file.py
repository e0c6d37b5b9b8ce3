"""GGUF files read once: gguf-py's reader with its fields parsed about 4x faster, kept per file version,
and handed to transformers' GGUF loading, which otherwise parses the same file again for the config,
the tokenizer and the weights (parsing is Python-bound: ~2.4 s for SmolLM2's 49k-token vocabulary and
merges, ~9.5 s for Gemma 3's 262k tokens, each time).

    reader = gguf_reader(path)          # fields and tensors, parsed once per file version
    with parsed_once(path):             # transformers' loaders read `path` through gguf_reader
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name)
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np

from torchslim.errors import TorchslimError

try:  # optional: GGUF files only
    import gguf
    from gguf.gguf_reader import GGUFReader
except ImportError:  # pragma: no cover - the hf extra installs gguf
    gguf = GGUFReader = None


def gguf_reader(path: Path):
    """The parsed GGUF file `path` (a gguf-py reader); the same object until the file changes. Readers
    are only read from, so one serves every caller."""
    if GGUFReader is None:
        raise TorchslimError("Reading a GGUF file needs the 'gguf' package: `pip install gguf`.")
    path = Path(path).resolve()
    stat = path.stat()
    return _parse(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parse(path: str, mtime_ns: int, size: int):
    return _Reader(path)


if GGUFReader is not None:

    class _Reader(GGUFReader):
        """gguf-py's reader, slicing a plain ndarray view of its memory map: the same fields and tensor
        views, without np.memmap's per-slice Python overhead (a tokenizer's fields are millions of
        small slices)."""

        _plain = _plain_of = None

        def _get(self, offset, dtype, count=1, override_order=None):
            if self._plain_of is not self.data:
                self._plain, self._plain_of = self.data.view(np.ndarray), self.data
            dtype, count = np.dtype(dtype), int(count)
            arr = self._plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


@contextlib.contextmanager
def parsed_once(path: Path | None):
    """Within the block, `gguf.GGUFReader(path)` (as transformers' GGUF loading calls it) returns
    `gguf_reader(path)`; other files and modes are read as before."""
    if path is None or gguf is None:
        yield
        return
    target = Path(path).resolve()

    def reader(file, mode="r"):
        return gguf_reader(target) if mode == "r" and Path(file).resolve() == target else GGUFReader(file, mode)

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = GGUFReader
