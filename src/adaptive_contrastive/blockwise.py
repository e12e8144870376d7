"""Row-block InfoNCE on the PyTorch backend: every statistic in one pass, gradients by hand.

The fused dense path (:mod:`adaptive_contrastive.fused`) and the chunked path
(:mod:`adaptive_contrastive.chunked`) share this module. Both walk the ``(n, M)`` logit matrix
``L = s * Q @ K.T`` in blocks of whole rows. For each block they compute, in one visit:

* the row direction (softmax over each row) completely, because a block holds whole rows: the row
  max, the log-sum-exp, ``sum_j p_ij L_ij`` for the entropy, the positive logits and probabilities, and
  the centred sum of squares for the spread;
* the column direction (softmax over each column) as running sums that are rescaled whenever a
  column's running maximum grows, as in the online softmax of flash attention. The same rescaling
  carries ``sum_i exp(L_ij - m_j) L_ij`` (entropy) and the mass on the positives.

Row and column means of ``L`` need no pass over the matrix: ``mean_j L_ij = s * q_i . mean_j k_j``.

The backward pass rebuilds each block of ``dL = a (P - Y_row) + b (Q - Y_col)`` from the saved
log-sum-exps and feeds it to ``dQ = s dL K``, ``dK = s dL^T Q`` and
``ds = sum_ij dL_ij (L_ij / s) = sum_i q_i . (dL K)_i``, so the scale gradient costs O(n D).

Working on blocks of a few hundred KiB keeps the dozen elementwise steps per block in the CPU cache,
so the whole pass reads the logits from memory about once per direction. The block height is
:func:`default_block_rows`, or the user's ``chunk_size`` in chunked mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .statistics import row_sums

# Target size, in elements, of one logit block. 2**20 float32 values are 4 MiB, so a block and its two
# temporaries of the same shape stay in the L2 or L3 cache of current server CPUs.
_BLOCK_ELEMENTS = 2**20


def default_block_rows(num_rows: int, num_columns: int) -> int:
    """Return the rows per block for an ``(num_rows, num_columns)`` logit matrix (at least 8, at most ``num_rows``)."""
    return max(1, min(num_rows, max(8, _BLOCK_ELEMENTS // max(num_columns, 1))))


@dataclass
class Positives:
    """Positive pairs of a logit matrix, given by ids or by the diagonal.

    With both id tensors ``None``, row ``i``'s single positive is column ``i`` (the diagonal). Otherwise
    entry ``(i, j)`` is a positive when ``query_ids[i] == key_ids[j]``; a target index is expressed as
    ``query_ids = targets`` and ``key_ids = arange(M)``.
    """

    query_ids: Optional[Tensor] = None
    key_ids: Optional[Tensor] = None

    @property
    def diagonal(self) -> bool:
        return self.query_ids is None

    def mask(self, start: int, stop: int) -> Tensor:
        """Return the ``(stop - start, M)`` bool mask of positives for rows ``start:stop``."""
        assert self.query_ids is not None and self.key_ids is not None
        return self.query_ids[start:stop, None] == self.key_ids[None, :]


@dataclass
class ForwardResult:
    """Per-row and per-column results of a forward pass, all ``compute_dtype`` and detached.

    ``row_*`` tensors have shape ``(n,)``; ``column_*`` tensors have shape ``(M,)`` and exist only when
    the column direction was requested. Counts are the number of positives of each row or column.
    """

    row_lse: Tensor
    row_loss: Tensor
    row_count: Optional[Tensor]
    row_statistics: Optional[Tensor]
    column_lse: Optional[Tensor] = None
    column_loss: Optional[Tensor] = None
    column_count: Optional[Tensor] = None
    column_statistics: Optional[Tensor] = None
    # Only the fixed-shift pass (adaptive_contrastive.fixed_shift) fills these: sums of exp(L - shift).
    row_sum_exp: Optional[Tensor] = None
    column_sum_exp: Optional[Tensor] = None


class _ColumnAccumulator:
    """Running column softmax sums over row blocks, rescaled when a column's running maximum grows.

    For column ``j`` and the rows seen so far it stores ``m_j = max_i L_ij`` and, relative to ``m_j``,
    ``sum_i exp(L_ij - m_j)``, ``sum_i exp(L_ij - m_j) L_ij`` and the same over positive rows only. The
    positive-logit sums, positive counts and centred sums of squares need no rescaling.
    """

    def __init__(self, num_columns: int, like: Tensor, statistics: bool, positives: Positives) -> None:
        self.max = torch.full((num_columns,), float("-inf"), dtype=like.dtype, device=like.device)
        self.sum_exp = torch.zeros(num_columns, dtype=like.dtype, device=like.device)
        self.positive_logit_sum = torch.zeros_like(self.sum_exp)
        self.count = None if positives.diagonal else torch.zeros_like(self.sum_exp)
        self.statistics = statistics
        if statistics:
            self.sum_exp_logit = torch.zeros_like(self.sum_exp)
            self.positive_exp = torch.zeros_like(self.sum_exp)
            self.centered_square_sum = torch.zeros_like(self.sum_exp)

    def add(
        self,
        logits: Tensor,
        start: int,
        mask: Optional[Tensor],
        column_mean: Optional[Tensor],
        buffer: Tensor,
        buffer2: Tensor,
    ) -> None:
        """Fold the row block ``logits`` (rows ``start:start + b`` of the full matrix) into the sums."""
        block_max = logits.amax(dim=0)
        new_max = torch.maximum(self.max, block_max)

        # exp(old max - new max) is 0 on the first block, where the old max is -inf and the sums are 0.
        factor = (self.max - new_max).exp_()
        self.max = new_max
        self.sum_exp.mul_(factor)

        exp_block = torch.sub(logits, new_max, out=buffer).exp_()
        self.sum_exp.add_(exp_block.sum(dim=0))

        rows = logits.shape[0]
        if mask is None:
            self.positive_logit_sum[start : start + rows] += logits.diagonal(offset=start)
        else:
            self.positive_logit_sum.add_(torch.mul(logits, mask, out=buffer2).sum(dim=0))
            self.count.add_(mask.sum(dim=0, dtype=self.count.dtype))

        if not self.statistics:
            return

        self.sum_exp_logit.mul_(factor)
        self.sum_exp_logit.add_(torch.mul(exp_block, logits, out=buffer2).sum(dim=0))

        self.positive_exp.mul_(factor)
        if mask is None:
            self.positive_exp[start : start + rows] += exp_block.diagonal(offset=start)
        else:
            self.positive_exp.add_(exp_block.mul_(mask).sum(dim=0))

        centered = torch.sub(logits, column_mean, out=buffer2)
        self.centered_square_sum.add_(centered.square_().sum(dim=0))


def _row_block(
    logits: Tensor,
    start: int,
    mask: Optional[Tensor],
    row_mean: Optional[Tensor],
    buffer: Tensor,
    buffer2: Tensor,
    statistics: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[tuple[Tensor, Tensor, Tensor, Tensor]]]:
    """Reduce whole rows: return ``(lse, positive_logit_mean, count, (positive_prob, entropy, centered_sq, sum_exp))``."""
    row_max = logits.amax(dim=1, keepdim=True)
    exp_block = torch.sub(logits, row_max, out=buffer).exp_()
    sum_exp = exp_block.sum(dim=1)
    lse = row_max.squeeze(1) + sum_exp.log()

    count = None
    if mask is None:
        # Clone, because the chunked path reuses the logits buffer for the next block.
        positive_logit = logits.diagonal(offset=start).clone()
    else:
        count = mask.sum(dim=1, dtype=logits.dtype)
        positive_logit = torch.mul(logits, mask, out=buffer2).sum(dim=1) / count

    if not statistics:
        return lse, positive_logit, count, None

    if mask is None:
        positive_prob = exp_block.diagonal(offset=start) / sum_exp
    else:
        positive_prob = torch.mul(exp_block, mask, out=buffer2).sum(dim=1) / sum_exp

    expected_logit = torch.mul(exp_block, logits, out=buffer2).sum(dim=1) / sum_exp
    entropy = lse - expected_logit

    centered = torch.sub(logits, row_mean.unsqueeze(1), out=buffer2)
    centered_square_sum = centered.square_().sum(dim=1)
    return lse, positive_logit, count, (positive_prob, entropy, centered_square_sum, sum_exp)


def blockwise_forward(
    query: Tensor,
    key: Tensor,
    scale: Tensor,
    positives: Positives,
    *,
    columns: bool,
    statistics: bool,
    block_rows: int,
    stored_logits: Optional[Tensor] = None,
) -> ForwardResult:
    """Run the one-pass forward over row blocks of ``L = scale * query @ key.T``.

    Args:
        query: ``(n, D)`` features in the compute dtype (float32 or float64).
        key: ``(M, D)`` features in the same dtype.
        scale: 0-d tensor, the logit scale ``s > 0``, detached.
        positives: where each row's positives are.
        columns: also compute the column direction (softmax over each column); needs ``n == M``.
        statistics: also compute the per-row statistics of :mod:`adaptive_contrastive.statistics`.
        block_rows: rows per block.
        stored_logits: the full ``(n, M)`` logit matrix if the caller already has it; otherwise each block
            is recomputed with one ``(block_rows, D) @ (D, M)`` matrix product.

    Returns:
        :class:`ForwardResult`; the statistics are ``(n, 5)`` per-row values
        ``(loss, positive_prob, margin, entropy, spread)``, before summation.
    """
    n, m = query.shape[0], key.shape[0]
    dtype, device = query.dtype, query.device
    scaled_query = query * scale

    row_mean = column_mean = None
    if statistics:
        # mean_j L_ij = s * q_i . mean_j k_j, and the same for columns: O(n D) in place of a pass over L.
        row_mean = scaled_query @ key.mean(dim=0)
        if columns:
            column_mean = key @ scaled_query.mean(dim=0)

    block_rows = max(1, min(block_rows, n))
    buffer = torch.empty(block_rows, m, dtype=dtype, device=device)
    buffer2 = torch.empty(block_rows, m, dtype=dtype, device=device)
    logits_buffer = torch.empty(block_rows, m, dtype=dtype, device=device) if stored_logits is None else None
    accumulator = _ColumnAccumulator(m, query, statistics, positives) if columns else None

    lse_parts, positive_parts, count_parts, stat_parts = [], [], [], []
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        rows = stop - start
        if stored_logits is not None:
            logits = stored_logits[start:stop]
        else:
            logits = torch.mm(scaled_query[start:stop], key.T, out=logits_buffer[:rows])
        mask = None if positives.diagonal else positives.mask(start, stop)
        block_buffer, block_buffer2 = buffer[:rows], buffer2[:rows]

        lse, positive_logit, count, row_stats = _row_block(
            logits, start, mask, None if row_mean is None else row_mean[start:stop], block_buffer, block_buffer2, statistics
        )
        lse_parts.append(lse)
        positive_parts.append(positive_logit)
        count_parts.append(count)
        stat_parts.append(row_stats)

        if accumulator is not None:
            accumulator.add(logits, start, mask, column_mean, block_buffer, block_buffer2)

    row_lse = torch.cat(lse_parts)
    row_positive_logit = torch.cat(positive_parts)
    row_count = None if positives.diagonal else torch.cat(count_parts)
    row_loss = row_lse - row_positive_logit

    row_statistics = None
    if statistics:
        positive_prob, entropy, centered_square_sum, _ = (torch.cat(parts) for parts in zip(*stat_parts))
        margin = row_positive_logit - row_mean
        spread = (centered_square_sum / m).clamp_min(0).sqrt() / scale
        row_statistics = torch.stack([row_loss, positive_prob, margin, entropy, spread], dim=1)

    result = ForwardResult(row_lse=row_lse, row_loss=row_loss, row_count=row_count, row_statistics=row_statistics)
    if accumulator is None:
        return result

    result.column_lse = accumulator.max + accumulator.sum_exp.log()
    column_count = accumulator.count
    column_positive_logit = accumulator.positive_logit_sum
    if column_count is not None:
        column_positive_logit = column_positive_logit / column_count
    result.column_count = column_count
    result.column_loss = result.column_lse - column_positive_logit

    if statistics:
        positive_prob = accumulator.positive_exp / accumulator.sum_exp
        entropy = result.column_lse - accumulator.sum_exp_logit / accumulator.sum_exp
        margin = column_positive_logit - column_mean
        spread = (accumulator.centered_square_sum / n).clamp_min(0).sqrt() / scale
        result.column_statistics = torch.stack([result.column_loss, positive_prob, margin, entropy, spread], dim=1)
    return result


def statistics_to_sums(per_row: Tensor) -> Tensor:
    """Reduce ``(n, 5)`` per-row statistics to the ``(NUM_SUMS,)`` sums vector of :func:`~adaptive_contrastive.statistics.row_sums`."""
    return row_sums(per_row[:, 0], per_row[:, 1], per_row[:, 2], per_row[:, 3], per_row[:, 4])


def blockwise_backward(
    query: Tensor,
    key: Tensor,
    scale: Tensor,
    positives: Positives,
    saved: ForwardResult,
    row_weight: Tensor,
    column_weight: Optional[Tensor],
    *,
    block_rows: int,
    stored_logits: Optional[Tensor],
    need_scale_grad: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Return ``(dQ, dK, ds)`` for the loss ``row_weight * mean_i l_i + column_weight * mean_j l_j``.

    ``row_weight`` and ``column_weight`` are the 0-d upstream gradients of the two direction losses.
    Each block of ``dL`` is rebuilt from the saved log-sum-exps as
    ``a * (exp(L - lse_row) - Y_row) + b * (exp(L - lse_col) - Y_col)`` with ``a = row_weight / n`` and
    ``b = column_weight / M``, where ``Y`` spreads a unit of target mass uniformly over each row's (or
    column's) positives. The gradients are in the compute dtype; ``ds`` is ``None`` unless requested.
    """
    n, m = query.shape[0], key.shape[0]
    dtype, device = query.dtype, query.device
    row_coefficient = row_weight.to(dtype) / n
    column_coefficient = None if column_weight is None else column_weight.to(dtype) / m
    scaled_query = query * scale

    block_rows = max(1, min(block_rows, n))
    buffer = torch.empty(block_rows, m, dtype=dtype, device=device)
    grad_query_unscaled = torch.empty(n, key.shape[1], dtype=dtype, device=device)

    # With stored logits (dense mode) the blocks of dL fill one (n, M) matrix that feeds two full-size
    # matrix products after the loop. Per-block products would re-read and re-write the whole (M, D)
    # key gradient once per block. In chunked mode dL exists one chunk at a time.
    if stored_logits is not None:
        grad_logits_full = torch.empty(n, m, dtype=dtype, device=device)
        grad_key_unscaled = None
    else:
        grad_logits_buffer = torch.empty(block_rows, m, dtype=dtype, device=device)
        logits_buffer = torch.empty(block_rows, m, dtype=dtype, device=device)
        grad_key_unscaled = torch.zeros(m, key.shape[1], dtype=dtype, device=device)

    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        rows = stop - start
        if stored_logits is not None:
            logits = stored_logits[start:stop]
            grad_logits = grad_logits_full[start:stop]
        else:
            logits = torch.mm(scaled_query[start:stop], key.T, out=logits_buffer[:rows])
            grad_logits = grad_logits_buffer[:rows]

        torch.sub(logits, saved.row_lse[start:stop, None], out=grad_logits).exp_()
        grad_logits.mul_(row_coefficient)
        if column_coefficient is not None:
            column_probs = torch.sub(logits, saved.column_lse, out=buffer[:rows]).exp_()
            grad_logits.add_(column_probs.mul_(column_coefficient))

        _subtract_targets(grad_logits, start, positives, saved, row_coefficient, column_coefficient, buffer[:rows])

        if stored_logits is None:
            torch.mm(grad_logits, key, out=grad_query_unscaled[start:stop])
            grad_key_unscaled.addmm_(grad_logits.T, query[start:stop])

    if stored_logits is not None:
        torch.mm(grad_logits_full, key, out=grad_query_unscaled)
        grad_key_unscaled = grad_logits_full.T @ query

    scale_grad = None
    if need_scale_grad:
        scale_grad = torch.linalg.vecdot(grad_query_unscaled.flatten(), query.flatten())
    return grad_query_unscaled.mul_(scale), grad_key_unscaled.mul_(scale), scale_grad


def _subtract_targets(
    grad_logits: Tensor,
    start: int,
    positives: Positives,
    saved: ForwardResult,
    row_coefficient: Tensor,
    column_coefficient: Optional[Tensor],
    buffer: Tensor,
) -> None:
    """Subtract ``a * Y_row + b * Y_col`` from a block of ``dL`` in place."""
    rows = grad_logits.shape[0]
    if positives.diagonal:
        target = row_coefficient if column_coefficient is None else row_coefficient + column_coefficient
        grad_logits.diagonal(offset=start).sub_(target)
        return

    stop = start + rows
    mask = positives.mask(start, stop)
    target = torch.div(mask, saved.row_count[start:stop, None], out=buffer).mul_(row_coefficient)
    if column_coefficient is not None:
        target.add_(mask / saved.column_count * column_coefficient)
    grad_logits.sub_(target)
