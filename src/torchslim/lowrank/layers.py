"""The factorised layers that replace a dense one: each is a plain chain of smaller Linear / Conv2d
layers computing the low-rank product, so every runtime runs it with its ordinary kernels.

Widths are read off the inner layers (properties), so structured pruning of a factorised model
stays consistent, and the classes are registered for reloading a saved model into its original
architecture (see `torchslim.models.shapes`)."""

from __future__ import annotations

from torch import nn

from torchslim.models.shapes import register_shape_attrs


class LowRankLinear(nn.Module):
    """`second(first(x))` with `first: in -> rank` (no bias) and `second: rank -> out`: a truncated SVD."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    in_features = property(lambda self: self.first.in_features)
    out_features = property(lambda self: self.second.out_features)
    rank = property(lambda self: self.first.out_features)

    def forward(self, x):
        return self.second(self.first(x))

    @classmethod
    def empty_like(cls, dense: nn.Linear) -> "LowRankLinear":
        return cls(dense.in_features, dense.out_features, 1, dense.bias is not None)


def _conv(src: nn.Conv2d, cin: int, cout: int, spatial: bool, bias: bool) -> nn.Conv2d:
    """A groups=1 convolution with `src`'s kernel, stride, padding and dilation (spatial) or a 1x1."""
    if not spatial:
        return nn.Conv2d(cin, cout, 1, bias=bias)
    return nn.Conv2d(
        cin, cout, src.kernel_size, src.stride, src.padding, src.dilation, bias=bias, padding_mode=src.padding_mode
    )


class LowRankConv2d(nn.Module):
    """SVD of the [out, in*kh*kw] matrix: `first` (the original kernel, in -> rank), then a 1x1 to out."""

    def __init__(self, src: nn.Conv2d, rank: int, bias: bool):
        super().__init__()
        self.first = _conv(src, src.in_channels, rank, True, False)
        self.second = _conv(src, rank, src.out_channels, False, bias)

    in_channels = property(lambda self: self.first.in_channels)
    out_channels = property(lambda self: self.second.out_channels)
    rank = property(lambda self: self.first.out_channels)

    def forward(self, x):
        return self.second(self.first(x))

    @classmethod
    def empty_like(cls, dense: nn.Conv2d) -> "LowRankConv2d":
        return cls(dense, 1, dense.bias is not None)


class TuckerConv2d(nn.Module):
    """Tucker-2: a 1x1 projection of the input channels (in -> r_in), the core convolution with the
    original kernel (r_in -> r_out), and a 1x1 expansion (r_out -> out)."""

    def __init__(self, src: nn.Conv2d, rank_in: int, rank_out: int, bias: bool):
        super().__init__()
        self.first = _conv(src, src.in_channels, rank_in, False, False)
        self.core = _conv(src, rank_in, rank_out, True, False)
        self.last = _conv(src, rank_out, src.out_channels, False, bias)

    in_channels = property(lambda self: self.first.in_channels)
    out_channels = property(lambda self: self.last.out_channels)
    rank = property(lambda self: (self.core.in_channels, self.core.out_channels))

    def forward(self, x):
        return self.last(self.core(self.first(x)))

    @classmethod
    def empty_like(cls, dense: nn.Conv2d) -> "TuckerConv2d":
        return cls(dense, 1, 1, dense.bias is not None)


FACTORED = (LowRankLinear, LowRankConv2d, TuckerConv2d)
for _cls in FACTORED:
    register_shape_attrs(_cls, (), swappable=True)
