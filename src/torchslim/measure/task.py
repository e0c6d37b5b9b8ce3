"""Task metrics on held-out data. Each task turns model outputs and targets into named numbers."""

from __future__ import annotations

import numpy as np
import torch


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    logits_t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return {"accuracy": float((logits_t.argmax(1) == labels_t).float().mean()),
            "loss": float(torch.nn.functional.cross_entropy(logits_t, labels_t))}


TASKS = {"classification": classification_metrics}
