"""Built-in stages. Each module registers its handler with `@register_stage`; importing them here is
the whole discovery mechanism (no scanning). A recipe's `plugins:` import more."""

from torchslim.auto import stage as auto  # noqa: F401
from torchslim.distill import stage as distill  # noqa: F401
from torchslim.lowrank import stage as lowrank  # noqa: F401
from torchslim.prune import stage as prune  # noqa: F401
from torchslim.quantize import encoder_stage as quantize_embedding  # noqa: F401
from torchslim.quantize import stage as quantize  # noqa: F401
from torchslim.stages import export, train  # noqa: F401
