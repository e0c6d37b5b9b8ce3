"""Low-rank factorisation: truncated SVD of Linear layers, Tucker-2 of convolutions."""

from torchslim.lowrank.factorize import factorize
from torchslim.lowrank.layers import LowRankConv2d, LowRankLinear, TuckerConv2d

__all__ = ["factorize", "LowRankLinear", "LowRankConv2d", "TuckerConv2d"]
