"""Knowledge distillation loss (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["distillation_kl", "DistillationLoss"]


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Compute ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T^2`` factor keeps the gradient of the soft term at the scale of
    the cross-entropy term when ``T`` changes. Computed in float32, also
    under autocast.

    Args:
        student_logits: (B, K).
        teacher_logits: (B, K).
        temperature: T > 0.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


class DistillationLoss(nn.Module):
    """Cross-entropy on the labels mixed with the distillation term: ``(1 - alpha) CE + alpha KD``.

    Args:
        alpha: weight of the distillation term, in [0, 1]; 0 is plain cross-entropy.
        temperature: softmax temperature T of both models' logits.
        label_smoothing: label smoothing of the cross-entropy term.
    """

    def __init__(self, *, alpha: float, temperature: float, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation weight alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be positive, got {temperature}")
        self.alpha = alpha
        self.temperature = temperature
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Return the scalar loss; ``teacher_logits`` (B, K) is required when ``alpha > 0``."""
        cross_entropy = F.cross_entropy(student_logits.float(), targets, label_smoothing=self.label_smoothing)
        if self.alpha == 0.0:
            return cross_entropy
        if teacher_logits is None:
            raise ValueError("the distillation loss needs teacher logits when alpha > 0")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match student logits "
                f"{tuple(student_logits.shape)}; both models need the same number of classes"
            )
        soft = distillation_kl(student_logits, teacher_logits, self.temperature)
        return (1.0 - self.alpha) * cross_entropy + self.alpha * soft
