"""Files written so that a crash never leaves a half-written one. At the bottom of the import graph."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yields a temporary name beside `path` to write to; when the block ends without an error the
    file becomes `path` (one rename), otherwise it is removed and `path` keeps what it held. A process
    killed, or a disk that fills, mid-write never leaves a file at `path` that looks complete.
    `keep_suffix`: the temporary name ends like `path` (`.model.partial.onnx`), for writers that
    decide the format by the suffix; otherwise it is `path` + `.tmp`, which no glob for the real
    suffix picks up."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}" if keep_suffix else path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError:
        raise
    except Exception as exc:  # writers in other languages (safetensors, torch) report I/O errors their own way
        code = _write_failure(exc, tmp)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _write_failure(exc: Exception, tmp: Path) -> int | None:
    """The errno of a failed write reported as another exception type, or None if it is not one."""
    text = str(exc)
    found = re.search(r"os error (\d+)", text)
    if found:
        return int(found.group(1))
    if re.search(r"write failed|I/O error|No space left|unexpected pos", text, re.IGNORECASE):
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and tmp.exists() and tmp.stat().st_size >= limit - (1 << 16):
            return errno.EFBIG  # the process's file-size limit (ulimit -f)
        free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
        return errno.ENOSPC if free < 16 << 20 else errno.EIO
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through `replacing`, flushed to disk before the rename."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
