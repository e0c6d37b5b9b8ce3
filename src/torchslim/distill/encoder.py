"""Distillation for sentence encoders: a shallower student (every k-th layer of the teacher, weights
copied) learns the teacher's embeddings and its hidden states, layer to mapped layer.

Hidden states are read with forward hooks on the layers' module paths (`encoder.encoder.layer.i`),
so neither model's forward is rewritten. The loss per batch is

    embedding_weight * mean(1 - cos(student embedding, teacher embedding))
  + hidden_weight   * sum over mapped layers of the masked mean squared error of the hidden states

and it runs on the one training loop (`torchslim.train.fit`) over real sentences tokenized once
and cut to the longest sentence of each batch."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.distill.hooks import capture
from torchslim.distill.students import apply_keep_blocks, keep_indices
from torchslim.errors import TorchslimError
from torchslim.models.hf import tokenize
from torchslim.prune.transformer.encoder import encoder_layers


def layer_path(model: nn.Module, i: int) -> str:
    layers = encoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return f"{prefix}.{i}"


def drop_layers(model: nn.Module, keep_every: int = 2, indices: list[int] | None = None) -> tuple[nn.Module, list[int]]:
    """Keep every k-th transformer layer (always the last), or the layers at `indices`, weights
    copied. Returns (model, kept indices); layer i of the result is layer kept[i] of `model`."""
    student = copy.deepcopy(model)
    layers = encoder_layers(student)
    kept = list(indices) if indices is not None else keep_indices(len(layers), keep_every)
    if not kept or any(not 0 <= i < len(layers) for i in kept):
        raise TorchslimError(f"Cannot keep layers {kept} of an encoder with {len(layers)} layers.")
    apply_keep_blocks(student, layer_path(student, 0).rsplit(".", 1)[0], kept)
    config = getattr(getattr(student, "encoder", student), "config", None)
    if config is not None:
        config.num_hidden_layers = len(kept)
    return student.requires_grad_(True), kept


def sentence_dataset(tokenizer, sentences: list[str], max_length: int = 128) -> TensorDataset:
    """Token ids and masks of all sentences, padded to the longest; batches are cut by `trim`."""
    ids, mask = tokenize(tokenizer, sentences, max_length)
    return TensorDataset(ids, mask)


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(mask.sum(1).max())
    return ids[:, :n], mask[:, :n]


class EncoderDistiller:
    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        layer_map: dict[int, int],
        embedding_weight: float = 1.0,
        hidden_weight: float = 1.0,
    ):
        self.teacher = teacher.eval().requires_grad_(False)
        self.layer_map = dict(layer_map)
        self.s_paths = {i: layer_path(student, i) for i in self.layer_map}
        self.t_paths = {i: layer_path(teacher, j) for i, j in self.layer_map.items()}
        self.embedding_weight, self.hidden_weight = embedding_weight, hidden_weight

    def loss(self, student: nn.Module, batch: tuple):
        ids, mask = trim(batch[0], batch[1])
        with torch.no_grad(), capture(self.teacher, list(self.t_paths.values()), "teacher") as t_feats:
            t_emb = self.teacher(ids, mask)
        with capture(student, list(self.s_paths.values()), "student") as s_feats:
            s_emb = student(ids, mask)
        parts = {"embedding": (1 - F.cosine_similarity(s_emb, t_emb.float(), dim=1)).mean()}
        weights = mask.unsqueeze(-1).float()
        hidden = s_emb.new_zeros(())
        for i in self.layer_map:
            diff = (s_feats[self.s_paths[i]] - t_feats[self.t_paths[i]].float()) ** 2
            hidden = hidden + (diff * weights).sum() / (weights.sum() * diff.shape[-1])
        parts["hidden"] = hidden
        total = self.embedding_weight * parts["embedding"] + self.hidden_weight * hidden
        return total, parts
