"""Input checks shared by every loss.

Shape, dtype and device checks read only tensor metadata, so they cost nothing and never synchronise
with the device. Value checks (non-finite features, a non-positive tensor ``logit_scale``) need the
data; :func:`raise_for_invalid_values` runs them only after a cheap combined test has failed.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

ScaleLike = Union[float, Tensor]


def _describe(tensor: Tensor) -> str:
    return f"Tensor(shape={tuple(tensor.shape)}, dtype={tensor.dtype}, device={tensor.device})"


def check_features(image_features: object, text_features: object) -> None:
    """Raise ``TypeError`` or ``ValueError`` unless both inputs are ``(N, D)`` floating tensors that match."""
    for name, value in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(value).__name__}.")
        if not value.is_floating_point():
            raise TypeError(
                f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {_describe(value)}. "
                f"Convert it with {name}.float()."
            )
        if value.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D with shape (N, D), got {_describe(value)}. "
                f"Flatten extra dimensions, for example with {name}.flatten(1)."
            )

    assert isinstance(image_features, Tensor) and isinstance(text_features, Tensor)
    if image_features.device != text_features.device:
        raise ValueError(
            f"image_features and text_features must be on the same device, got {image_features.device} and "
            f"{text_features.device}. Move one with .to(other.device)."
        )
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"image_features and text_features must hold the same number of rows (one image-text pair per row), "
            f"got {image_features.shape[0]} and {text_features.shape[0]}."
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image_features and text_features must have the same embedding size D, got {image_features.shape[1]} "
            f"and {text_features.shape[1]}. Project both modalities to one size first."
        )
    if image_features.shape[0] == 0:
        raise ValueError("image_features and text_features are empty (batch size N = 0). Pass at least one pair.")
    if image_features.shape[1] == 0:
        raise ValueError("image_features and text_features have embedding size D = 0. Pass non-empty embeddings.")


def check_logit_scale(logit_scale: object, device: torch.device) -> None:
    """Raise unless ``logit_scale`` is a positive finite number or a one-element floating tensor on ``device``.

    A tensor's value is checked later, by :func:`raise_for_invalid_values`, to avoid a host synchronisation.
    """
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(
                f"logit_scale must be a scalar (0-d or one-element tensor), got {_describe(logit_scale)}. "
                f"Pass one multiplier for the whole batch."
            )
        if not logit_scale.is_floating_point():
            raise TypeError(
                f"logit_scale must have a floating dtype, got {_describe(logit_scale)}. Convert it with logit_scale.float()."
            )
        if logit_scale.device != device:
            raise ValueError(
                f"logit_scale is on {logit_scale.device} but the features are on {device}. "
                f"Move it with logit_scale.to({str(device)!r})."
            )
        return

    if isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real):
        raise TypeError(
            f"logit_scale must be a float, a 0-d tensor or a Parameter, got {type(logit_scale).__name__}."
        )
    if not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(
            f"logit_scale must be a finite number > 0 (the exponentiated multiplier, e.g. 1/0.07 = 14.3), "
            f"got {logit_scale!r}. If you store the log, pass logit_scale.exp()."
        )


def check_image_ids(image_ids: object, batch_size: int, device: torch.device) -> None:
    """Raise unless ``image_ids`` is ``None`` or an ``(N,)`` integer tensor on ``device``."""
    if image_ids is None:
        return
    if not isinstance(image_ids, Tensor):
        raise TypeError(f"image_ids must be a torch.Tensor of shape (N,) or None, got {type(image_ids).__name__}.")
    if image_ids.is_floating_point() or image_ids.is_complex() or image_ids.dtype == torch.bool:
        raise TypeError(f"image_ids must have an integer dtype such as torch.int64, got {_describe(image_ids)}.")
    if image_ids.shape != (batch_size,):
        raise ValueError(
            f"image_ids must have shape (N,) = ({batch_size},), one id per image-text pair, got {_describe(image_ids)}."
        )
    if image_ids.device != device:
        raise ValueError(
            f"image_ids is on {image_ids.device} but the features are on {device}. Move it with image_ids.to({str(device)!r})."
        )


def values_are_valid(loss: Tensor, logit_scale: ScaleLike) -> Tensor:
    """Return a 0-d bool tensor that is true when the loss is finite and a tensor ``logit_scale`` is positive.

    Any non-finite feature makes the loss non-finite, so this one reduction covers the feature checks.
    """
    valid = torch.isfinite(loss)
    if isinstance(logit_scale, Tensor):
        valid = valid & (logit_scale.detach().reshape(()) > 0) & torch.isfinite(logit_scale.detach().reshape(()))
    return valid


def raise_for_invalid_values(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    image_ids: Optional[Tensor] = None,
) -> None:
    """Find which input made the loss invalid and raise a ``ValueError`` that names it."""
    for name, value in (("image_features", image_features), ("text_features", text_features)):
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad_rows = (~finite).any(dim=1).nonzero().flatten()
            raise ValueError(
                f"{name} contains {int((~finite).sum())} non-finite values (NaN or inf) in rows "
                f"{bad_rows[:8].tolist()}{' ...' if bad_rows.numel() > 8 else ''}. "
                f"Check the encoder output for overflow, for example by training in bfloat16 or lowering the learning rate."
            )

    if isinstance(logit_scale, Tensor):
        value = float(logit_scale.detach().reshape(()))
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"logit_scale must be finite and > 0 (the exponentiated multiplier), got {value!r}. "
                f"If you store the log of the scale, pass logit_scale.exp(); clamp it with LogitScale.clamp_()."
            )

    max_abs = max(float(image_features.detach().abs().max()), float(text_features.detach().abs().max()))
    raise ValueError(
        f"the logits overflowed float32 although every input is finite (largest feature magnitude {max_abs:.3g}). "
        f"L2-normalise the features, for example with normalize=True, or lower logit_scale."
    )
