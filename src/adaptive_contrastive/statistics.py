"""Sufficient statistics of one InfoNCE direction, and the per-direction summaries derived from them.

Every quantity that the weighting strategies read is a mean or a variance over the rows of one
direction's logit matrix (image->text rows for one direction, text->image rows for the other). Each
compute path (dense, chunked, Triton, and each rank in distributed training) therefore reduces its rows
to a short vector of *sums*. Sums add across row chunks and across ranks with a plain ``+`` or an
``all_reduce(SUM)``, and :func:`summarize` turns them into means and variances only at the end.

Layout of the last dimension of a sums tensor (``NUM_SUMS`` entries), for rows ``i`` of a logit matrix
``L`` of shape ``(n, M)`` with softmax ``p_i = softmax(L_i)`` and positive set ``P_i``:

====  =====================  ==========================================================================
idx   name                   per-row value that is summed
====  =====================  ==========================================================================
0     ``COUNT``              1
1     ``LOSS``               ``l_i = -mean_{j in P_i} log p_ij`` (the row's cross-entropy, nats)
2     ``LOSS_SQ``            ``l_i ** 2``
3     ``PROB``               ``sum_{j in P_i} p_ij`` (softmax mass on the positives)
4     ``PROB_SQ``            its square
5     ``MARGIN``             ``mean_{j in P_i} L_ij - mean_j L_ij`` (logit units)
6     ``MARGIN_SQ``          its square
7     ``ENTROPY``            ``-sum_j p_ij log p_ij`` (nats)
8     ``SPREAD``             ``std_j(L_ij) / logit_scale`` (population standard deviation, cosine units
                             when the features are L2-normalised)
====  =====================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

COUNT = 0
LOSS = 1
LOSS_SQ = 2
PROB = 3
PROB_SQ = 4
MARGIN = 5
MARGIN_SQ = 6
ENTROPY = 7
SPREAD = 8
NUM_SUMS = 9

# Index of the image->text and text->image rows in a stacked ``(2, NUM_SUMS)`` sums tensor.
IMAGE_TO_TEXT = 0
TEXT_TO_IMAGE = 1


def sums_dtype(device: torch.device) -> torch.dtype:
    """Return the accumulation dtype of the sums: float64, or float32 on MPS, which has no float64.

    Variances come from ``E[x^2] - E[x]^2``. With per-row losses near ``log N`` (a near-uniform softmax)
    float32 sums cancel to about 1e-6 of noise, which would outweigh a real variance of 1e-9; float64
    sums keep that noise near 1e-14 for float32 per-row values.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def row_sums(
    row_loss: Tensor,
    positive_prob: Tensor,
    margin: Tensor,
    entropy: Tensor,
    spread: Tensor,
) -> Tensor:
    """Reduce per-row values of one direction to its sums vector.

    Args:
        row_loss: ``(n,)`` per-row cross-entropy in nats.
        positive_prob: ``(n,)`` softmax mass on each row's positives.
        margin: ``(n,)`` mean positive logit minus the row's mean logit.
        entropy: ``(n,)`` softmax entropy of each row in nats.
        spread: ``(n,)`` population standard deviation of each row's logits divided by the logit scale.

    Returns:
        ``(NUM_SUMS,)`` tensor laid out as described in the module docstring, in float64 (float32 on MPS,
        which has no float64).
    """
    dtype = sums_dtype(row_loss.device)
    row_loss = row_loss.to(dtype)
    positive_prob = positive_prob.to(dtype)
    margin = margin.to(dtype)
    count = torch.full_like(row_loss[:1], float(row_loss.shape[0])).squeeze(0)

    return torch.stack(
        [
            count,
            row_loss.sum(),
            row_loss.square().sum(),
            positive_prob.sum(),
            positive_prob.square().sum(),
            margin.sum(),
            margin.square().sum(),
            entropy.to(dtype).sum(),
            spread.to(dtype).sum(),
        ]
    )


@dataclass(frozen=True)
class DirectionSummary:
    """Means and variances of one direction, or of both when the fields have shape ``(2,)``.

    Variances are population variances over the rows of the batch (divided by the row count, not by
    ``count - 1``), so a batch of one has variance 0. All fields are detached float32 tensors.
    """

    count: Tensor
    mean_loss: Tensor
    log_prob_variance: Tensor
    prob_variance: Tensor
    logit_variance: Tensor
    mean_entropy: Tensor
    mean_spread: Tensor


def _variance(sums: Tensor, value_index: int, square_index: int, count: Tensor) -> Tensor:
    mean = sums[..., value_index] / count
    mean_of_squares = sums[..., square_index] / count

    # E[x^2] - E[x]^2 can round to a tiny negative number when all rows are equal.
    return (mean_of_squares - mean.square()).clamp_min(0.0)


def summarize(sums: Tensor) -> DirectionSummary:
    """Turn a ``(..., NUM_SUMS)`` sums tensor into means and variances over the rows.

    The per-row alignment whose variance ``log_prob_variance`` measures is the mean log-probability of the
    positives, which is ``-l_i``, so its variance equals the variance of the per-row losses.
    """
    sums = sums.detach()
    if sums.dtype != torch.float64 and sums.device.type != "mps":
        sums = sums.double()
    count = sums[..., COUNT].clamp_min(1.0)

    # The differences are taken in the sums' dtype; only the results are rounded to float32.
    return DirectionSummary(
        count=sums[..., COUNT].float(),
        mean_loss=(sums[..., LOSS] / count).float(),
        log_prob_variance=_variance(sums, LOSS, LOSS_SQ, count).float(),
        prob_variance=_variance(sums, PROB, PROB_SQ, count).float(),
        logit_variance=_variance(sums, MARGIN, MARGIN_SQ, count).float(),
        mean_entropy=(sums[..., ENTROPY] / count).float(),
        mean_spread=(sums[..., SPREAD] / count).float(),
    )
