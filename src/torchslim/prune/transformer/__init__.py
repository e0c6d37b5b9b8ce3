"""Transformer surgery: heads and FFN neurons of encoders (`encoder`) and decoders (`decoder`), the
residual width of decoder LMs (`hidden`), whole blocks (`depth`). The structure helpers they share live
in `torchslim.models.transformer`."""
