"""Reader for the IDX format (LeCun's MNIST files), gzip or plain."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from torchslim.errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path, hint: str = "") -> np.ndarray:
    """Read one IDX file into a numpy array; any damage becomes a DataError naming the file."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"Data file {path} does not exist. {hint}".strip()) from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"Data file {path} cannot be read ({exc}); it looks corrupt. {hint}".strip()) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"Data file {path} is not an IDX file (bad magic number). {hint}".strip())
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"Data file {path} is truncated inside its header. {hint}".strip())
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"Data file {path} holds {len(raw) - header} data bytes but its header "
            f"promises {expected} (shape {list(shape)}); it is truncated or corrupt. {hint}".strip()
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).copy()
