"""Distillation losses. Each returns a scalar; the distiller sums named parts with explicit weights.

`FEATURE_LOSSES` names the comparisons of intermediate outputs a feature term may use (its `kind`),
each called as `loss(student, teacher, inputs)` with the models' arguments (a text model's second is
its attention mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) on temperature-softened distributions, scaled by T^2 so its gradients
    keep the same magnitude as the hard loss's whatever the temperature (Hinton et al. 2015)."""
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


def kd_loss(
    student_logits, teacher_logits, labels, temperature: float = 4.0, soft_weight: float = 0.7, hard_weight: float = 0.3
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """soft_weight * soft + hard_weight * cross-entropy(labels). Returns (total, {"soft", "hard"})."""
    soft = soft_loss(student_logits, teacher_logits, temperature)
    hard = F.cross_entropy(student_logits, labels)
    return soft_weight * soft + hard_weight * hard, {"soft": soft, "hard": hard}


def hint_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets hint: mean squared error between (adapted) student and teacher features."""
    if student.shape[2:] != teacher.shape[2:] and student.dim() == 4:
        student = F.interpolate(student, size=teacher.shape[2:], mode="bilinear", align_corners=False)
    return F.mse_loss(student, teacher)


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a CNN feature map: mean over channels of |A|^p, flattened and L2-normalised."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: distance between the normalised spatial attention maps (any widths)."""
    if student.shape[2:] != teacher.shape[2:]:
        student = F.interpolate(student, size=teacher.shape[2:], mode="bilinear", align_corners=False)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).sum(1).mean()


def attention_probs_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Transformer attention maps (batch, heads, query, key) as distributions: KL(teacher || student),
    averaged over heads first when the head counts differ."""
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    return F.kl_div(student.clamp_min(1e-9).log(), teacher, reduction="batchmean") / (
        student.shape[1] * student.shape[2]
    )


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of [batch, sequence, width] hidden states over the real tokens (mask 1)."""
    weights = mask.unsqueeze(-1).float()
    diff = (student - teacher) ** 2
    return (diff * weights).sum() / (weights.sum() * diff.shape[-1])


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error divided by the teacher's mean square, so every layer weighs alike."""
    return F.mse_loss(student.float(), teacher) / teacher.pow(2).mean().clamp_min(1e-12)


FEATURE_LOSSES = {
    "hint": lambda student, teacher, inputs: hint_loss(student, teacher),
    "attention": lambda student, teacher, inputs: attention_transfer(student, teacher),
    "attention_probs": lambda student, teacher, inputs: attention_probs_loss(student, teacher),
    "masked_mse": lambda student, teacher, inputs: masked_mse(student, teacher, inputs[1]),
    "normalised_mse": lambda student, teacher, inputs: normalised_mse(student, teacher),
}
