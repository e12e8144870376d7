"""A learnable temperature, stored as the log of the logit multiplier as in CLIP."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def clamp_logit_scale_(parameter: Tensor, max_scale: float = 100.0) -> Tensor:
    """Clamp a log-scale parameter in place so that ``exp(parameter) <= max_scale``; return it.

    Call it after ``optimizer.step()``. It edits ``parameter.data`` so the optimiser keeps its state.
    """
    if not (math.isfinite(max_scale) and max_scale > 0):
        raise ValueError(f"max_scale must be a finite number > 0, got {max_scale!r}. CLIP uses 100.")
    with torch.no_grad():
        limit = torch.tensor(math.log(max_scale), dtype=parameter.dtype, device=parameter.device)

        # log(max_scale) rounded to the parameter's dtype can exponentiate to slightly more than max_scale
        # (100.0000076 for 100 in float32), so step down to the next representable value when it does.
        if float(limit.exp()) > max_scale:
            limit = torch.nextafter(limit, torch.zeros_like(limit) - math.inf)
        parameter.clamp_(max=limit)
    return parameter


class LogitScale(nn.Module):
    """Learnable logit multiplier ``s = exp(log_scale)``, initialised to ``1 / init_temperature``.

    Args:
        init_temperature: the starting temperature ``1 / s``; the default 0.07 starts ``log_scale`` at
            ``ln(1 / 0.07) = 2.659``.
        max_scale: the cap that :meth:`clamp_` applies to ``s``.

    Shape:
        - Output: 0-d tensor ``s``, to pass as ``logit_scale`` to any loss.

    Example::

        >>> scale = LogitScale()
        >>> loss = loss_fn(image_features, text_features, scale())
        >>> loss.backward(); optimizer.step(); scale.clamp_()
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        if isinstance(init_temperature, bool) or not isinstance(init_temperature, (int, float)) or not (
            math.isfinite(init_temperature) and init_temperature > 0
        ):
            raise ValueError(f"init_temperature must be a finite number > 0, got {init_temperature!r}. CLIP uses 0.07.")
        if isinstance(max_scale, bool) or not isinstance(max_scale, (int, float)) or not (
            math.isfinite(max_scale) and max_scale > 0
        ):
            raise ValueError(f"max_scale must be a finite number > 0, got {max_scale!r}. CLIP uses 100.")
        if 1.0 / init_temperature > max_scale:
            raise ValueError(
                f"1 / init_temperature = {1.0 / init_temperature:.4g} exceeds max_scale = {max_scale!r}; "
                f"raise max_scale or init_temperature."
            )
        self.max_scale = float(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature), dtype=torch.float32))

    def forward(self) -> Tensor:
        return self.log_scale.exp()

    def clamp_(self) -> "LogitScale":
        """Clamp the stored parameter in place so that the multiplier is at most ``max_scale``."""
        clamp_logit_scale_(self.log_scale, self.max_scale)
        return self

    def extra_repr(self) -> str:
        return f"scale={float(self.log_scale.detach().exp()):.4g}, max_scale={self.max_scale}"
