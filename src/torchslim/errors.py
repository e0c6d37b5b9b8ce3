"""Errors meant for people: what went wrong, where, and what would be accepted."""

from __future__ import annotations


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
