"""From two per-direction difficulty statistics to two loss weights that sum to 2.

The steps, each a pure tensor function with no host synchronisation:

1. :func:`ema_update_` smooths the batch statistic ``x_t`` (shape ``(2,)``) with an exponential moving
   average ``m_t = decay * m_{t-1} + (1 - decay) * x_t``, starting from ``m_0 = 0``.
2. :func:`debiased_ema` divides by ``1 - decay ** t`` as Adam does, so the first steps are not pulled
   towards the zero start value.
3. :func:`weights_from_statistics` maps the smoothed statistics to difficulties, normalises them to sum
   to 2 and clamps them to the allowed range.
4. :func:`warmup_weights` optionally blends from equal weights to the adaptive ones over the first steps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Mapping = Literal["direct", "inverse"]
MAPPINGS = ("direct", "inverse")


def check_weighting_options(
    *,
    decay: float,
    mapping: str,
    power: float,
    weight_bounds: tuple[float, float],
    warmup_steps: int,
    eps: float,
) -> None:
    """Raise ``TypeError`` (wrong type) or ``ValueError`` (out of range) naming the first invalid option."""
    for name, value in (("decay", decay), ("power", power), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number (int or float), got {type(value).__name__} {value!r}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
        raise TypeError(f"warmup_steps must be an int, got {type(warmup_steps).__name__} {warmup_steps!r}.")

    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(
            f"decay must be a number in [0, 1), got {decay!r}. Use 0 for no smoothing or a value such as 0.9."
        )
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}.")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not (math.isfinite(power) and power >= 0):
        raise ValueError(f"power must be a finite number >= 0, got {power!r}. Use 1 for weights proportional to the statistic.")
    if not (isinstance(weight_bounds, (tuple, list)) and len(weight_bounds) == 2):
        raise TypeError(f"weight_bounds must be a pair (min_weight, max_weight), got {weight_bounds!r}.")
    low, high = weight_bounds
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise TypeError(f"weight_bounds must hold two numbers, got {weight_bounds!r}.")
    if not all(math.isfinite(v) for v in (low, high)):
        raise ValueError(f"weight_bounds must hold two finite numbers, got {weight_bounds!r}.")
    if not 0.0 < low <= 1.0 <= high:
        raise ValueError(
            f"weight_bounds must satisfy 0 < min_weight <= 1 <= max_weight so that two positive weights "
            f"can sum to 2, got {weight_bounds!r}. For example use (0.5, 1.5)."
        )
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}. The default 1e-8 suits float32 statistics.")


def ema_update_(ema_statistic: Tensor, ema_step: Tensor, statistic: Tensor, decay: float) -> None:
    """Fold one batch statistic into the moving average, in place.

    Args:
        ema_statistic: ``(2,)`` float32 buffer ``m_{t-1}``, overwritten with ``m_t``.
        ema_step: 0-d int64 buffer ``t - 1``, incremented to ``t``.
        statistic: ``(2,)`` batch statistic ``x_t`` (detached). A non-finite entry leaves its average as is.
        decay: smoothing factor in [0, 1).
    """
    # A non-finite entry (possible only with validate_values=False) keeps the previous average, so one bad
    # batch cannot poison every later step.
    statistic = statistic.to(ema_statistic.dtype)
    statistic = torch.where(torch.isfinite(statistic), statistic, ema_statistic)
    ema_statistic.lerp_(statistic, 1.0 - decay)
    ema_step.add_(1)


def debiased_ema(ema_statistic: Tensor, ema_step: Tensor, decay: float, bias_correction: bool = True) -> Tensor:
    """Return ``m_t / (1 - decay ** t)``, or ``m_t`` when ``bias_correction`` is false.

    At ``t = 0`` (no update yet) the result is 0, which :func:`weights_from_statistics` maps to equal weights.
    """
    if not bias_correction or decay == 0.0:
        return ema_statistic

    correction = 1.0 - torch.pow(torch.tensor(decay, dtype=ema_statistic.dtype, device=ema_statistic.device), ema_step)
    return torch.where(correction > 0, ema_statistic / correction.clamp_min(1e-30), torch.zeros_like(ema_statistic))


def weights_from_statistics(
    statistic: Tensor,
    *,
    mapping: Mapping = "direct",
    power: float = 1.0,
    weight_bounds: tuple[float, float] = (0.5, 1.5),
    eps: float = 1e-8,
) -> Tensor:
    """Map two non-negative difficulty statistics to weights ``(w_i2t, w_t2i)`` with ``w_i2t + w_t2i = 2``.

    With ``c`` the statistic, the difficulty is ``d = (c + eps) ** power`` for ``mapping="direct"``
    (a larger statistic earns a larger weight) and ``d = (c + eps) ** -power`` for ``"inverse"``. Then
    ``w_i2t = 2 * d_i2t / (d_i2t + d_t2i)``, clamped so that both weights stay inside ``weight_bounds``,
    and ``w_t2i = 2 - w_i2t``. Two zero statistics give equal weights, because ``eps`` is added first.

    Args:
        statistic: ``(2,)`` tensor, image->text first.
        mapping: ``"direct"`` or ``"inverse"``.
        power: sharpness exponent; 0 gives equal weights.
        weight_bounds: ``(min_weight, max_weight)`` with ``0 < min_weight <= 1 <= max_weight``.
        eps: added to the statistic before the power, in the statistic's units.

    Returns:
        ``(2,)`` detached float32 weights.
    """
    statistic = statistic.detach().float().clamp_min(0.0) + eps
    exponent = power if mapping == "direct" else -power

    # 2 * d0 / (d0 + d1) equals 2 * sigmoid(log d0 - log d1). The log form cannot overflow, whereas
    # (c + eps) ** power reaches inf / inf = NaN for a large power or a tiny statistic.
    log_ratio = exponent * (statistic[0].log() - statistic[1].log())
    weight_i2t = 2.0 * torch.sigmoid(log_ratio)

    low, high = weight_bounds
    weight_i2t = weight_i2t.clamp(max(low, 2.0 - high), min(high, 2.0 - low))
    return torch.stack([weight_i2t, 2.0 - weight_i2t])


def warmup_weights(weights: Tensor, ema_step: Tensor, warmup_steps: int) -> Tensor:
    """Blend linearly from equal weights at step 0 to ``weights`` at ``warmup_steps``.

    The blend keeps the sum at 2 because both endpoints sum to 2.
    """
    if warmup_steps == 0:
        return weights

    progress = (ema_step.to(weights.dtype) / warmup_steps).clamp(0.0, 1.0)
    return 1.0 + progress * (weights - 1.0)
