"""Difficulty statistics: the per-direction number from which each adaptive loss sets its weights.

Each function takes a :class:`~adaptive_contrastive.statistics.DirectionSummary` whose fields have shape
``(2,)`` (image->text first) and returns a ``(2,)`` non-negative float32 tensor. The reasons for each
choice are in ``docs/method.md``.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from .statistics import DirectionSummary

VarianceStatistic = Literal["log_prob", "prob", "logit"]
VARIANCE_STATISTICS = ("log_prob", "prob", "logit")


def variance_statistic(summary: DirectionSummary, statistic: VarianceStatistic = "log_prob") -> Tensor:
    """Return the variance over the batch of each direction's per-pair alignment.

    ``"log_prob"``: the mean log-probability of a row's positives under that direction's softmax.
    ``"prob"``: the softmax mass on a row's positives. ``"logit"``: the mean positive logit minus the
    row's mean logit. The raw positive logit is not offered because it is the same number in both
    directions, so its variance could not tell them apart.
    """
    if statistic == "log_prob":
        return summary.log_prob_variance
    if statistic == "prob":
        return summary.prob_variance
    if statistic == "logit":
        return summary.logit_variance
    raise ValueError(f"statistic must be one of {VARIANCE_STATISTICS}, got {statistic!r}.")


def entropy_statistic(summary: DirectionSummary) -> Tensor:
    """Return each direction's mean softmax entropy in nats (higher means less confident)."""
    return summary.mean_entropy


def spread_statistic(summary: DirectionSummary) -> Tensor:
    """Return each direction's mean per-row standard deviation of similarities (lower means harder)."""
    return summary.mean_spread
