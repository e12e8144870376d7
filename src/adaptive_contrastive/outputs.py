"""The detailed result that every loss can return for logging."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from torch import Tensor

from .statistics import DirectionSummary


@dataclass(frozen=True)
class ContrastiveLossOutput:
    """A loss value with the per-direction terms, weights and statistics behind it.

    All fields except ``loss`` are detached. Weights are 0-d float32 tensors with
    ``weight_i2t + weight_t2i == 2`` for the adaptive losses.

    Attributes:
        loss: 0-d float32 loss ``0.5 * (weight_i2t * loss_i2t + weight_t2i * loss_t2i)``, with grad.
        loss_i2t: image->text loss (softmax over each image's row of text logits), nats.
        loss_t2i: text->image loss (softmax over each text's column of image logits), nats.
        weight_i2t: weight of the image->text loss.
        weight_t2i: weight of the text->image loss.
        statistic_i2t: this batch's difficulty statistic for image->text, or ``None`` for fixed weights.
        statistic_t2i: the same for text->image.
        smoothed_statistic_i2t: the bias-corrected moving average that set the weights, or ``None``.
        smoothed_statistic_t2i: the same for text->image.
        summary: every per-direction mean and variance, as ``(2,)`` tensors (index 0 image->text), or
            ``None`` when no statistics were computed.
    """

    loss: Tensor
    loss_i2t: Tensor
    loss_t2i: Tensor
    weight_i2t: Tensor
    weight_t2i: Tensor
    statistic_i2t: Optional[Tensor] = None
    statistic_t2i: Optional[Tensor] = None
    smoothed_statistic_i2t: Optional[Tensor] = None
    smoothed_statistic_t2i: Optional[Tensor] = None
    summary: Optional[DirectionSummary] = None

    def to_dict(self) -> dict[str, object]:
        """Return the fields as a flat dict, with ``loss`` under the open_clip key ``contrastive_loss``."""
        result: dict[str, object] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "loss":
                result["contrastive_loss"] = value
            elif field.name == "summary" and value is not None:
                for summary_field in fields(value):
                    result[f"summary_{summary_field.name}"] = getattr(value, summary_field.name)
            elif value is not None:
                result[field.name] = value
        return result
