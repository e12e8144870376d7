"""Functional forms of the losses: stateless functions that the ``nn.Module`` losses call.

The adaptive functions take the moving-average buffers as optional arguments. Without them the weights
come from this batch's statistic alone, which is the module behaviour with ``decay=0``.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import strategies
from ._validation import (
    check_features,
    check_image_ids,
    check_logit_scale,
    raise_for_invalid_values,
    values_are_valid,
)
from .dense import ContrastiveTerms, direction_terms, positive_mask_from_ids, symmetric_terms
from .dispatch import check_chunk_size, direction_terms_auto, symmetric_terms_auto
from .distributed import compute_batch_terms, prepare_batch
from .outputs import ContrastiveLossOutput
from .statistics import DirectionSummary, summarize
from .weighting import (
    Mapping,
    check_weighting_options,
    debiased_ema,
    ema_update_,
    warmup_weights,
    weights_from_statistics,
)

logger = logging.getLogger(__name__)

ScaleLike = Union[float, Tensor]
StatisticFn = Callable[[DirectionSummary], Tensor]

_warned_batch_of_one = False


def _warn_batch_of_one() -> None:
    global _warned_batch_of_one
    if _warned_batch_of_one:
        return
    _warned_batch_of_one = True
    warnings.warn(
        "InfoNCE on a batch of one pair is identically 0 because the softmax has a single entry, so this "
        "step trains nothing. Use batches of at least 2 pairs, for example with drop_last=True in the DataLoader.",
        RuntimeWarning,
        stacklevel=4,
    )


def prepare_inputs(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    image_ids: Optional[Tensor] = None,
    normalize: bool = False,
    global_batch_size: Optional[int] = None,
) -> tuple[Tensor, Tensor, ScaleLike]:
    """Validate the inputs and return the features (normalised if asked) and a float32 or float64 scale.

    ``global_batch_size`` is the number of pairs over all ranks in distributed training. The warning
    about a batch of one pair reads it, because a single local pair is fine when other ranks add more.

    Raises:
        TypeError, ValueError: on any invalid shape, dtype, device or Python-number ``logit_scale``.
    """
    check_features(image_features, text_features)
    check_logit_scale(logit_scale, image_features.device)
    check_image_ids(image_ids, image_features.shape[0], image_features.device)

    if (image_features.shape[0] if global_batch_size is None else global_batch_size) == 1:
        _warn_batch_of_one()

    # float16 and bfloat16 are promoted to float32, but float64 stays float64 so that gradcheck can run.
    if normalize:
        image_features = F.normalize(image_features.to(torch.promote_types(image_features.dtype, torch.float32)), dim=-1)
        text_features = F.normalize(text_features.to(torch.promote_types(text_features.dtype, torch.float32)), dim=-1)

    if isinstance(logit_scale, Tensor):
        scale: ScaleLike = logit_scale.reshape(()).to(torch.promote_types(logit_scale.dtype, torch.float32))
    else:
        scale = float(logit_scale)
    return image_features, text_features, scale


def compute_terms(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    image_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
    chunk_size: Optional[int] = None,
) -> ContrastiveTerms:
    """Compute both direction losses and, if asked, their sums, on already validated inputs.

    The compute path (Triton, fused, chunked or the dense reference) follows the rules in
    :mod:`adaptive_contrastive.dispatch`; every path returns the same values up to float rounding.

    Args:
        image_features: ``(N, D)`` floating tensor.
        text_features: ``(N, D)`` floating tensor on the same device.
        logit_scale: positive float or 0-d float32 tensor.
        image_ids: optional ``(N,)`` integer group ids; equal ids are positives of each other.
        need_statistics: also compute the detached ``(2, NUM_SUMS)`` sums.
        chunk_size: ``None`` for the dense paths, or the rows per chunk of the chunked path, whose extra
            memory is ``O(N * chunk_size)`` in place of ``O(N * N)``.
    """
    return symmetric_terms_auto(
        image_features,
        text_features,
        logit_scale,
        image_ids=image_ids,
        need_statistics=need_statistics,
        chunk_size=check_chunk_size(chunk_size),
    )


def compute_direction_terms(
    query_features: Tensor,
    key_features: Tensor,
    logit_scale: ScaleLike,
    *,
    targets: Optional[Tensor] = None,
    query_ids: Optional[Tensor] = None,
    key_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Compute one direction's loss, softmax over keys, for ``n`` queries against ``M`` keys.

    This is the building block of the local-loss mode of distributed training, where each rank scores its
    own queries against the keys of all ranks.

    Args:
        query_features: ``(n, D)`` floating tensor.
        key_features: ``(M, D)`` floating tensor.
        logit_scale: positive float or 0-d float32 tensor.
        targets: ``(n,)`` int64 column of each query's positive; defaults to ``arange(n)``.
        query_ids: optional ``(n,)`` integer group ids; with ``key_ids``, equal ids are positives.
        key_ids: optional ``(M,)`` integer group ids.
        need_statistics: also compute the detached ``(NUM_SUMS,)`` sums.
        chunk_size: ``None`` for the dense reference, or the queries per chunk of the chunked path. CUDA
            tensors use the Triton kernels when ``triton`` is installed, whatever this is.

    Returns:
        ``(loss, sums)``: the 0-d mean row loss and the sums or ``None``.
    """
    fast_result = direction_terms_auto(
        query_features,
        key_features,
        logit_scale,
        targets=targets,
        query_ids=query_ids,
        key_ids=key_ids,
        need_statistics=need_statistics,
        chunk_size=check_chunk_size(chunk_size),
    )
    if fast_result is not None:
        return fast_result

    compute_dtype = torch.promote_types(query_features.dtype, torch.float32)
    similarities = query_features.to(compute_dtype) @ key_features.to(compute_dtype).T

    positive_mask = None
    if query_ids is not None and key_ids is not None:
        positive_mask = positive_mask_from_ids(query_ids, key_ids)

    return direction_terms(
        similarities, logit_scale, targets=targets, positive_mask=positive_mask, need_statistics=need_statistics
    )


def check_values(
    terms: ContrastiveTerms,
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    image_ids: Optional[Tensor] = None,
    statistic: Optional[Tensor] = None,
) -> None:
    """Raise a ``ValueError`` naming the bad input when the loss is not finite or ``logit_scale <= 0``.

    With ``statistic``, a non-finite difficulty statistic raises as well, in the same boolean read.

    This is the one host synchronisation in a forward pass, a single boolean read. It is skipped while
    ``torch.compile`` traces, so compiled losses do not break their graph on it.
    """
    if torch.compiler.is_compiling():
        return

    valid = values_are_valid(terms.loss_i2t + terms.loss_t2i, logit_scale)
    if statistic is not None:
        valid = valid & torch.isfinite(statistic).all()
    if bool(valid):
        return

    loss_and_scale_valid = bool(values_are_valid(terms.loss_i2t + terms.loss_t2i, logit_scale))
    if statistic is not None and loss_and_scale_valid:
        raise ValueError(
            f"the difficulty statistic overflowed float32 (got {statistic.tolist()}) although the loss is finite, "
            f"because the logits are very large (largest feature magnitude "
            f"{max(float(image_features.detach().abs().max()), float(text_features.detach().abs().max())):.3g}). "
            f"L2-normalise the features, for example with normalize=True, or lower logit_scale."
        )
    raise_for_invalid_values(image_features, text_features, logit_scale, image_ids)


def combine(terms: ContrastiveTerms, weights: Tensor) -> Tensor:
    """Return ``0.5 * (weights[0] * loss_i2t + weights[1] * loss_t2i)`` with the weights held constant."""
    weights = weights.detach()
    return 0.5 * (weights[0] * terms.loss_i2t + weights[1] * terms.loss_t2i)


def _check_fixed_weights(weights: tuple[float, float]) -> None:
    if not (isinstance(weights, (tuple, list)) and len(weights) == 2):
        raise TypeError(f"weights must be a pair (image_to_text, text_to_image), got {weights!r}.")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"weights must be two finite numbers >= 0, got {weights!r}. Use (1.0, 1.0) for the CLIP loss.")
    if weights[0] + weights[1] == 0:
        raise ValueError("weights must not both be 0, because the loss would be identically 0. Use (1.0, 1.0) for the CLIP loss.")


def _validated_terms(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    need_statistics: bool,
    image_ids: Optional[Tensor],
    normalize: bool,
    validate_values: bool,
    local_loss: bool,
    gather_with_grad: bool,
    rank: Optional[int],
    world_size: Optional[int],
    process_group: Optional[Any],
    batch_sizes: Optional[Sequence[int]],
    chunk_size: Optional[int],
    statistic_fn: Optional[StatisticFn] = None,
) -> tuple[ContrastiveTerms, Optional[DirectionSummary], Optional[Tensor]]:
    """Validate and gather the batch, then compute both directions' terms.

    With ``statistic_fn`` it also returns the batch summary and the ``(2,)`` detached float32 difficulty
    statistic. With ``validate_values`` it checks that the loss and the statistic are finite.
    """
    group_info, batch, scale = prepare_batch(
        image_features,
        text_features,
        logit_scale,
        image_ids=image_ids,
        normalize=normalize,
        gather_with_grad=gather_with_grad,
        rank=rank,
        world_size=world_size,
        process_group=process_group,
        batch_sizes=batch_sizes,
    )

    terms = compute_batch_terms(
        batch, scale, group_info, local_loss=local_loss, need_statistics=need_statistics, chunk_size=chunk_size
    )
    summary = None
    statistic = None
    if statistic_fn is not None:
        assert terms.sums is not None
        summary = summarize(terms.sums)
        statistic = statistic_fn(summary).detach().float()

    if validate_values:
        check_values(terms, batch.image_features, batch.text_features, logit_scale, batch.image_ids, statistic)
    return terms, summary, statistic


def symmetric_info_nce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    weights: tuple[float, float] = (1.0, 1.0),
    image_ids: Optional[Tensor] = None,
    normalize: bool = False,
    return_details: bool = False,
    validate_values: bool = True,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    process_group: Optional[Any] = None,
    batch_sizes: Optional[Sequence[int]] = None,
    chunk_size: Optional[int] = None,
) -> Union[Tensor, ContrastiveLossOutput]:
    """Compute the fixed-weight symmetric InfoNCE loss ``0.5 * (w_i2t * L_i2t + w_t2i * L_t2i)``.

    With the default ``weights=(1.0, 1.0)`` this is the CLIP loss
    ``0.5 * (CE(S, y) + CE(S.T, y))`` with ``S = logit_scale * image_features @ text_features.T``
    and ``y = arange(N)``.

    Args:
        image_features: ``(N, D)`` image embeddings.
        text_features: ``(N, D)`` text embeddings; row ``i`` pairs with image row ``i``.
        logit_scale: the exponentiated multiplier (1 / temperature), a float or 0-d tensor.
        weights: ``(w_i2t, w_t2i)``, two numbers >= 0, not both 0.
        image_ids: optional ``(N,)`` integer group ids; pairs with equal ids are positives of each other.
        normalize: L2-normalise both inputs in float32 first.
        return_details: return a :class:`ContrastiveLossOutput` in place of the 0-d loss.
        validate_values: raise on non-finite inputs or a non-positive tensor ``logit_scale``.
        local_loss, gather_with_grad, rank, world_size, process_group, batch_sizes: distributed training
            options, described in :class:`~adaptive_contrastive.ContrastiveLoss` and
            :mod:`adaptive_contrastive.distributed`. Without an initialised process group they change nothing.
        chunk_size: ``None`` for the dense paths, or the rows per chunk of the chunked path, whose extra
            memory is ``O(N * chunk_size)`` in place of ``O(N * N)``.

    Returns:
        0-d float32 loss (nats), or a :class:`ContrastiveLossOutput`.
    """
    _check_fixed_weights(weights)
    terms, _, _ = _validated_terms(
        image_features,
        text_features,
        logit_scale,
        need_statistics=return_details,
        image_ids=image_ids,
        normalize=normalize,
        validate_values=validate_values,
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        rank=rank,
        world_size=world_size,
        process_group=process_group,
        batch_sizes=batch_sizes,
        chunk_size=chunk_size,
    )

    weight_tensor = torch.tensor(weights, dtype=torch.float32, device=terms.loss_i2t.device)
    loss = combine(terms, weight_tensor)
    if not return_details:
        return loss

    return ContrastiveLossOutput(
        loss=loss,
        loss_i2t=terms.loss_i2t.detach(),
        loss_t2i=terms.loss_t2i.detach(),
        weight_i2t=weight_tensor[0],
        weight_t2i=weight_tensor[1],
        summary=summarize(terms.sums) if terms.sums is not None else None,
    )


def adaptive_info_nce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    statistic_fn: StatisticFn,
    mapping: Mapping = "direct",
    power: float = 1.0,
    weight_bounds: tuple[float, float] = (0.5, 1.5),
    eps: float = 1e-8,
    image_ids: Optional[Tensor] = None,
    normalize: bool = False,
    ema_statistic: Optional[Tensor] = None,
    ema_step: Optional[Tensor] = None,
    decay: float = 0.0,
    update_ema: bool = True,
    bias_correction: bool = True,
    warmup_steps: int = 0,
    return_details: bool = False,
    validate_values: bool = True,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    process_group: Optional[Any] = None,
    batch_sizes: Optional[Sequence[int]] = None,
    chunk_size: Optional[int] = None,
) -> Union[Tensor, ContrastiveLossOutput]:
    """Compute ``0.5 * (w_i2t * L_i2t + w_t2i * L_t2i)`` with weights set by a difficulty statistic.

    ``statistic_fn`` maps the batch summary to a ``(2,)`` statistic. When ``ema_statistic`` and
    ``ema_step`` are given, the weights come from their bias-corrected average, and the statistic is folded
    into them in place first if ``update_ema`` is true. Without them the weights come from this batch alone.
    See :mod:`adaptive_contrastive.weighting` for the mapping.

    Args:
        image_features, text_features: ``(N, D)`` embeddings, row ``i`` of each forming a pair.
        logit_scale: exponentiated multiplier, a float or 0-d tensor.
        statistic_fn: one of the functions in :mod:`adaptive_contrastive.strategies`, or your own.
        mapping, power, weight_bounds, eps: see :func:`~adaptive_contrastive.weighting.weights_from_statistics`.
        image_ids: optional ``(N,)`` integer group ids.
        normalize: L2-normalise both inputs in float32 first.
        ema_statistic: optional ``(2,)`` float32 moving-average buffer.
        ema_step: optional 0-d int64 step counter buffer.
        decay: moving-average decay in [0, 1).
        update_ema: fold this batch into the buffers (the modules pass ``self.training``).
        bias_correction: divide the average by ``1 - decay ** step``.
        warmup_steps: blend from equal weights over this many updates.
        return_details: return a :class:`ContrastiveLossOutput` in place of the 0-d loss.
        validate_values: raise on non-finite inputs or a non-positive tensor ``logit_scale``.
        local_loss, gather_with_grad, rank, world_size, process_group, batch_sizes: distributed training
            options, described in :class:`~adaptive_contrastive.ContrastiveLoss` and
            :mod:`adaptive_contrastive.distributed`. With several ranks the statistic is that of the
            global batch on every rank, so the weights and the buffers stay identical across ranks.
        chunk_size: ``None`` for the dense paths, or the rows per chunk of the chunked path, whose extra
            memory is ``O(N * chunk_size)`` in place of ``O(N * N)``.

    Returns:
        0-d float32 loss (nats), or a :class:`ContrastiveLossOutput`.
    """
    if (ema_statistic is None) != (ema_step is None):
        raise ValueError("ema_statistic and ema_step must be passed together or not at all.")
    terms, summary, statistic = _validated_terms(
        image_features,
        text_features,
        logit_scale,
        need_statistics=True,
        image_ids=image_ids,
        normalize=normalize,
        validate_values=validate_values,
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        rank=rank,
        world_size=world_size,
        process_group=process_group,
        batch_sizes=batch_sizes,
        chunk_size=chunk_size,
        statistic_fn=statistic_fn,
    )

    assert summary is not None and statistic is not None

    if ema_statistic is None or ema_step is None:
        smoothed = statistic
        weights = weights_from_statistics(statistic, mapping=mapping, power=power, weight_bounds=weight_bounds, eps=eps)
    else:
        if update_ema:
            ema_update_(ema_statistic, ema_step, statistic, decay)
        smoothed = debiased_ema(ema_statistic, ema_step, decay, bias_correction)
        weights = weights_from_statistics(smoothed, mapping=mapping, power=power, weight_bounds=weight_bounds, eps=eps)
        weights = warmup_weights(weights, ema_step, warmup_steps)

    loss = combine(terms, weights)
    if not return_details:
        return loss

    return ContrastiveLossOutput(
        loss=loss,
        loss_i2t=terms.loss_i2t.detach(),
        loss_t2i=terms.loss_t2i.detach(),
        weight_i2t=weights[0],
        weight_t2i=weights[1],
        statistic_i2t=statistic[0],
        statistic_t2i=statistic[1],
        smoothed_statistic_i2t=smoothed[0].detach().clone(),
        smoothed_statistic_t2i=smoothed[1].detach().clone(),
        summary=summary,
    )


def _stateless(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    statistic_fn: StatisticFn,
    mapping: Mapping,
    power: float,
    weight_bounds: tuple[float, float],
    eps: float,
    image_ids: Optional[Tensor],
    normalize: bool,
    return_details: bool,
    chunk_size: Optional[int] = None,
) -> Union[Tensor, ContrastiveLossOutput]:
    check_weighting_options(decay=0.0, mapping=mapping, power=power, weight_bounds=weight_bounds, warmup_steps=0, eps=eps)
    return adaptive_info_nce(
        image_features,
        text_features,
        logit_scale,
        statistic_fn=statistic_fn,
        mapping=mapping,
        power=power,
        weight_bounds=weight_bounds,
        eps=eps,
        image_ids=image_ids,
        normalize=normalize,
        return_details=return_details,
        chunk_size=chunk_size,
    )


def variance_aware_info_nce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    statistic: strategies.VarianceStatistic = "log_prob",
    mapping: Mapping = "direct",
    power: float = 1.0,
    weight_bounds: tuple[float, float] = (0.5, 1.5),
    eps: float = 1e-8,
    image_ids: Optional[Tensor] = None,
    normalize: bool = False,
    return_details: bool = False,
    chunk_size: Optional[int] = None,
) -> Union[Tensor, ContrastiveLossOutput]:
    """Stateless form of :class:`~adaptive_contrastive.VarianceAwareInfoNCE`: weights from this batch alone."""
    if statistic not in strategies.VARIANCE_STATISTICS:
        raise ValueError(f"statistic must be one of {strategies.VARIANCE_STATISTICS}, got {statistic!r}.")

    def statistic_fn(summary: DirectionSummary) -> Tensor:
        return strategies.variance_statistic(summary, statistic)

    return _stateless(
        image_features, text_features, logit_scale, statistic_fn, mapping, power, weight_bounds, eps,
        image_ids, normalize, return_details, chunk_size,
    )


def entropy_weighted_info_nce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    mapping: Mapping = "direct",
    power: float = 1.0,
    weight_bounds: tuple[float, float] = (0.5, 1.5),
    eps: float = 1e-8,
    image_ids: Optional[Tensor] = None,
    normalize: bool = False,
    return_details: bool = False,
    chunk_size: Optional[int] = None,
) -> Union[Tensor, ContrastiveLossOutput]:
    """Stateless form of :class:`~adaptive_contrastive.EntropyWeighted`: weights from this batch alone."""
    return _stateless(
        image_features, text_features, logit_scale, strategies.entropy_statistic, mapping, power, weight_bounds,
        eps, image_ids, normalize, return_details, chunk_size,
    )


def spread_weighted_info_nce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    mapping: Mapping = "inverse",
    power: float = 1.0,
    weight_bounds: tuple[float, float] = (0.5, 1.5),
    eps: float = 1e-8,
    image_ids: Optional[Tensor] = None,
    normalize: bool = False,
    return_details: bool = False,
    chunk_size: Optional[int] = None,
) -> Union[Tensor, ContrastiveLossOutput]:
    """Stateless form of :class:`~adaptive_contrastive.SpreadWeighted`: weights from this batch alone."""
    return _stateless(
        image_features, text_features, logit_scale, strategies.spread_statistic, mapping, power, weight_bounds,
        eps, image_ids, normalize, return_details, chunk_size,
    )
