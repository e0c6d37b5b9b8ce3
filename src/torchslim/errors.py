"""Errors meant for people: what went wrong, where, and what would be accepted."""

from __future__ import annotations

import errno


class TorchslimError(Exception):
    """A user-facing error. The CLI prints its message and exits non-zero, without a traceback."""

    exit_code = 2


class RecipeError(TorchslimError):
    """The recipe is malformed, has unknown keys, wrong types or out-of-range values."""


class DataError(TorchslimError):
    """A data file is missing, corrupt, or does not fit the model."""


class ExportError(TorchslimError):
    """A model could not be exported, or the exported artifact disagrees with PyTorch."""


class RunDirError(TorchslimError):
    """The output directory cannot be used as asked (finished run, nothing to resume, unwritable)."""


class UserCodeError(TorchslimError):
    """A function of the user's (model builder, data function, task, plugin stage or config) raised:
    the message says which and why, then shows the user's own frames only."""


def os_error_message(exc: OSError, resume: str | None = None) -> str:
    """What a failed file operation means for the person, by its cause; `resume`: the command that
    continues the run, when one had started (its finished work is kept: every file torchslim writes
    goes to a temporary name first and is renamed only once complete)."""
    where = f" ({exc.filename})" if exc.filename else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    kept = (
        f" Everything finished so far is kept and nothing half-written was left as if complete; after fixing "
        f"it, continue with: {resume}"
        if resume
        else ""
    )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"The disk is full{where}: {what}. Free space on that disk, or choose --out on another one.{kept}"
    if exc.errno == errno.EFBIG:
        return (
            f"A file grew past the largest size allowed{where}: {what}. The file system or this process's "
            f"file-size limit (`ulimit -f`) refuses it; raise the limit, or choose --out on another disk.{kept}"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"Not allowed to write or read{where}: {what}. The folder is read-only or belongs to another user; "
            f"fix its permissions or choose another --out.{kept}"
        )
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return (
            f"A file or folder torchslim needed does not exist{where}: {what}. Check the path in the recipe, the "
            f"data folder (TORCHSLIM_DATA) and the model files; if the run folder itself was removed, start "
            f"the run again.{kept}"
        )
    return f"{what}{where}.{kept}"
