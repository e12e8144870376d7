"""Dense reference path: the full similarity matrix, plain PyTorch autograd.

This path materialises the ``(N, M)`` logit matrix and lets autograd differentiate it. It is the
reference that every faster path (fused, chunked, Triton) is tested against, and it serves every device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .statistics import row_sums

ScaleLike = Union[float, Tensor]


class ContrastiveTerms(NamedTuple):
    """The two direction losses of one batch and, when requested, their detached sums.

    Attributes:
        loss_i2t: 0-d float32 image->text loss, the mean over image rows of the row cross-entropy (nats).
        loss_t2i: 0-d float32 text->image loss, the mean over text rows (nats).
        sums: ``(2, NUM_SUMS)`` detached float64 sums (row 0 image->text, row 1 text->image), or
            ``None`` when statistics were not requested. See :mod:`adaptive_contrastive.statistics`.
    """

    loss_i2t: Tensor
    loss_t2i: Tensor
    sums: Optional[Tensor]


def positive_mask_from_ids(query_ids: Tensor, key_ids: Tensor) -> Tensor:
    """Build the ``(n, M)`` boolean mask whose entry ``(i, j)`` is true when query ``i`` and key ``j`` share an id."""
    return query_ids.unsqueeze(1) == key_ids.unsqueeze(0)


def direction_terms(
    similarities: Tensor,
    logit_scale: ScaleLike,
    *,
    targets: Optional[Tensor] = None,
    positive_mask: Optional[Tensor] = None,
    need_statistics: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """Compute one direction's InfoNCE loss, with the softmax taken over each row.

    The target distribution of row ``i`` is uniform over its positives, so the row loss is
    ``l_i = -mean_{j in P_i} log softmax(s * S_i)_j``. With one positive per row this is the usual
    cross-entropy.

    Args:
        similarities: ``(n, M)`` float32 dot products of query and key features (cosines when the
            features are L2-normalised). Rows are queries, columns are keys.
        logit_scale: exponentiated multiplier ``s`` applied to the similarities, a float or 0-d tensor.
        targets: ``(n,)`` int64 column index of each row's single positive. Ignored when
            ``positive_mask`` is given. Defaults to ``arange(n)``.
        positive_mask: ``(n, M)`` bool mask of positives. Every row must hold at least one.
        need_statistics: also return the detached sums of :mod:`adaptive_contrastive.statistics`.

    Returns:
        ``(loss, sums)``: the 0-d mean row loss (nats, with grad) and a ``(NUM_SUMS,)`` tensor or ``None``.
    """
    logits = similarities * logit_scale
    log_probs = logits.log_softmax(dim=1)

    if positive_mask is not None:
        positive_count = positive_mask.sum(dim=1)
        positive_log_prob = torch.where(positive_mask, log_probs, 0.0).sum(dim=1) / positive_count
    else:
        if targets is None:
            targets = torch.arange(logits.shape[0], device=logits.device)
        positive_log_prob = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)

    row_loss = -positive_log_prob
    loss = row_loss.mean()
    if not need_statistics:
        return loss, None

    with torch.no_grad():
        logits = logits.detach()
        log_probs = log_probs.detach()
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum(dim=1)
        spread = similarities.detach().std(dim=1, correction=0)

        if positive_mask is not None:
            positive_prob = torch.where(positive_mask, probs, 0.0).sum(dim=1)
            positive_logit = torch.where(positive_mask, logits, 0.0).sum(dim=1) / positive_count
        else:
            positive_prob = probs.gather(1, targets.unsqueeze(1)).squeeze(1)
            positive_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
        margin = positive_logit - logits.mean(dim=1)

        sums = row_sums(row_loss.detach(), positive_prob, margin, entropy, spread)

    return loss, sums


def symmetric_terms(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    image_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
) -> ContrastiveTerms:
    """Compute both direction losses of a paired batch from one similarity matrix.

    Row ``i`` of ``image_features`` and row ``i`` of ``text_features`` form a positive pair. With
    ``image_ids``, every pair ``(i, j)`` whose ids are equal is a positive as well.

    Args:
        image_features: ``(N, D)`` image embeddings, used as given.
        text_features: ``(N, D)`` text embeddings, used as given.
        logit_scale: exponentiated multiplier, a float or 0-d float32 tensor.
        image_ids: optional ``(N,)`` integer group id of each pair.
        need_statistics: also return the detached sums.

    Returns:
        :class:`ContrastiveTerms` with float32 losses, or float64 for float64 inputs.
    """
    # float16 and bfloat16 are promoted to float32, but float64 stays float64 so that gradcheck can run.
    compute_dtype = torch.promote_types(image_features.dtype, torch.float32)
    similarities = image_features.to(compute_dtype) @ text_features.to(compute_dtype).T

    positive_mask = None
    if image_ids is not None:
        positive_mask = positive_mask_from_ids(image_ids, image_ids)

    loss_i2t, sums_i2t = direction_terms(
        similarities, logit_scale, positive_mask=positive_mask, need_statistics=need_statistics
    )
    loss_t2i, sums_t2i = direction_terms(
        similarities.T,
        logit_scale,
        positive_mask=None if positive_mask is None else positive_mask.T,
        need_statistics=need_statistics,
    )

    sums = None
    if need_statistics:
        sums = torch.stack([sums_i2t, sums_t2i])
    return ContrastiveTerms(loss_i2t, loss_t2i, sums)
