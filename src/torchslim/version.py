"""The version of torchslim (a module of its own, so reports read it without importing the package API)."""

__version__ = "0.1.0"
