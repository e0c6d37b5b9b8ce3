"""Language-model metrics over a token stream, from any runtime's logits.

    logits = lambda ids: model(ids).logits            # (1, n) int64 -> (1, n, vocab); or an ONNX session
    windows(ids, length=512, stride=512)              # where each window starts and which tokens it scores
    score(logits, ids, n_bytes, length=512, stride=512, reference=ref_logits)

Perplexity is exp of the mean negative log-likelihood of every scored token; the stream is cut into
windows of `length` tokens starting every `stride` tokens (consecutive windows share at least one
token), and each token is scored once, in the first window where it has context before it (a stride
below the length gives every scored token but the first window's at least `length - stride` tokens
of context). Bits per byte divide the total NLL (in bits) by the
UTF-8 bytes of the scored text, so models with different tokenizers compare. With a `reference`,
the mean KL divergence KL(reference || model) of the next-token distributions and the share of
tokens whose most likely next token agrees are computed on the same windows.

A model whose tokenizer starts every text with a BOS token (Gemma) was trained to see it first, and
the first position of a window without it draws attention it cannot use (Gemma 3 270M in
`bench/recipes/gemma3-int4.yaml`: float perplexity 81.2 on package descriptions without, 31.7 with).
With `bos`, every window's first token, which is
context only (every window scores from its second token on), is replaced by it, as llama.cpp's
perplexity tool does; `bos_token(tokenizer)` says whether a tokenizer asks for it."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor], torch.Tensor | np.ndarray]


def windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position inside the window) for a stream of `n` tokens; every
    position 1..n-1 is scored exactly once (position 0 has nothing before it)."""
    if not 0 < stride <= length:
        raise ValueError(f"stride must be in (0, length]; got stride {stride}, length {length}")
    out, scored_to = [], 1
    start = 0
    while scored_to < n:
        end = min(start + length, n)
        out.append((start, end, scored_to - start))
        scored_to = end
        if end == n:
            break
        start = min(max(start + stride, end - length), end - 1)  # at least the last token as context
    return out


def _as_tensor(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x


def bos_token(tokenizer) -> int | None:
    """The BOS token id if `tokenizer` puts one before every text it encodes, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return int(bos) if ids and ids[0] == bos else None


def score(
    logits: Logits,
    ids: torch.Tensor,
    n_bytes: int | None = None,
    length: int = 512,
    stride: int = 512,
    reference: Logits | None = None,
    bos: int | None = None,
) -> dict:
    """Perplexity, bits per byte (when `n_bytes` is given: the UTF-8 bytes of the scored text) and,
    against a `reference`, mean KL and top-1 agreement, of a 1-D token stream `ids`; with `bos`,
    every window starts with that token in place of its first (unscored) one."""
    ids = ids.reshape(-1).long()
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for start, end, first in windows(len(ids), length, stride):
        chunk = ids[start:end].unsqueeze(0)
        if bos is not None:
            chunk = chunk.clone()
            chunk[0, 0] = bos
        with torch.no_grad():
            logp = F.log_softmax(_as_tensor(logits(chunk)).float()[0, first - 1 : end - start - 1], dim=-1)
        targets = chunk[0, first:]
        nll -= float(logp.gather(1, targets.unsqueeze(1)).sum())
        count += len(targets)
        if reference is not None:
            with torch.no_grad():
                ref = F.log_softmax(_as_tensor(reference(chunk)).float()[0, first - 1 : end - start - 1], dim=-1)
            kl += float((ref.exp() * (ref - logp)).sum())
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    out = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}
    if n_bytes:
        out["bits_per_byte"] = nll / math.log(2) / n_bytes
    if reference is not None:
        out["kl"], out["top1_agreement"] = max(kl / count, 0.0), agree / count  # KL >= 0; rounding aside
    return out


def scored_bytes(tokenizer, ids: torch.Tensor) -> int:
    """UTF-8 bytes of the text the scored tokens (all but the first) spell."""
    ids = ids.reshape(-1).tolist()
    whole = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    first = tokenizer.decode(ids[:1], clean_up_tokenization_spaces=False)
    return len(whole.encode("utf-8")) - len(first.encode("utf-8"))
