"""Fixed-shift variant of the row-block pass: one exponential per logit serves both softmax directions.

The general pass (:mod:`adaptive_contrastive.blockwise`) subtracts each row's maximum for the row
softmax and each column's running maximum for the column softmax, so it takes two exponentials per logit
in the forward pass and two more in the backward pass. By Cauchy-Schwarz every logit satisfies
``|L_ij| <= B = s * max_i |q_i| * max_j |k_j|``. When ``exp(-2 B)`` is still a normal float, the single
matrix ``E = exp(L - B)`` represents every entry with full relative precision (none underflows, none
overflows), and

* row ``i``'s log-sum-exp is ``B + log sum_j E_ij``, column ``j``'s is ``B + log sum_i E_ij``;
* ``sum_j p_ij L_ij = B + sum_j E_ij (L_ij - B) / sum_j E_ij``, and the same over columns;
* ``dL = E * (a / rowsum_i + b / colsum_j) - targets``, two elementwise steps.

The dense mode overwrites the stored logits with ``E`` in place, so its backward pass needs no
exponential at all. :func:`fixed_shift_bound` returns ``B`` only for CPU tensors and only when the
condition holds (``2 B <= 80`` in float32, ``2 B <= 700`` in float64). Reading ``B`` on another device
would be a host synchronisation, so other devices always take the general pass. L2-normalised features
meet the condition in float32 for ``logit_scale <= 40``; CLIP starts at ``1 / 0.07 = 14.3``.

The spread uses ``sum_j (L_ij - mu_i)^2 = sum_j L_ij^2 - M mu_i^2`` with the known mean ``mu_i``. For
float32 logits whose mean is far larger than their spread this difference loses digits that the
general pass keeps, which changes the spread statistic only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .blockwise import ForwardResult, Positives, _subtract_targets

# Largest 2 * B for which exp(-2 B) is a normal number, with a margin: float32 normals reach
# exp(-87.3), float64 normals exp(-708.4).
_MAX_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


def fixed_shift_bound(query: Tensor, key: Tensor, scale: Tensor) -> Optional[float]:
    """Return the shift ``B`` if the fixed-shift pass is exact and free of host synchronisation, else ``None``."""
    if query.device.type != "cpu" or torch.compiler.is_compiling() or query.dtype not in _MAX_RANGE:
        return None

    bound = float(scale) * float(query.norm(dim=1).max()) * float(key.norm(dim=1).max())
    if not math.isfinite(bound) or 2.0 * bound > _MAX_RANGE[query.dtype]:
        return None
    return bound


class _Sums:
    """Column sums over row blocks; fixed shift means no rescaling."""

    def __init__(self, m: int, like: Tensor, positives: Positives) -> None:
        zeros = torch.zeros(m, dtype=like.dtype, device=like.device)
        self.sum_exp = zeros.clone()
        self.sum_exp_shifted = zeros.clone()
        self.square_sum = zeros.clone()
        self.positive_logit_sum = zeros.clone()
        self.positive_exp = zeros.clone()
        self.count = None if positives.diagonal else zeros.clone()


def fixed_shift_forward(
    query: Tensor,
    key: Tensor,
    scale: Tensor,
    shift: float,
    positives: Positives,
    *,
    columns: bool,
    statistics: bool,
    block_rows: int,
    stored_logits: Optional[Tensor] = None,
) -> ForwardResult:
    """Run the forward pass of :func:`~adaptive_contrastive.blockwise.blockwise_forward` with the fixed shift.

    Takes the same arguments plus ``shift`` from :func:`fixed_shift_bound`. ``stored_logits``, when
    given, is overwritten with ``exp(L - shift)`` for the backward pass. The result also carries the
    row and column sums of ``exp(L - shift)`` in ``row_sum_exp`` and ``column_sum_exp``.
    """
    n, m = query.shape[0], key.shape[0]
    dtype, device = query.dtype, query.device
    scaled_query = query * scale

    row_mean = column_mean = None
    if statistics:
        row_mean = scaled_query @ key.mean(dim=0)
        if columns:
            column_mean = key @ scaled_query.mean(dim=0)

    block_rows = max(1, min(block_rows, n))
    buffer = torch.empty(block_rows, m, dtype=dtype, device=device)
    logits_buffer = torch.empty(block_rows, m, dtype=dtype, device=device) if stored_logits is None else None
    column_sums = _Sums(m, query, positives) if columns else None

    row_parts: dict[str, list[Tensor]] = {name: [] for name in ("sum_exp", "shifted", "square", "positive_logit", "positive_exp", "count")}
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        rows = stop - start
        if stored_logits is not None:
            logits = stored_logits[start:stop]
        else:
            logits = torch.mm(scaled_query[start:stop], key.T, out=logits_buffer[:rows])
        block_buffer = buffer[:rows]
        mask = None if positives.diagonal else positives.mask(start, stop)

        # Everything that needs the logits themselves comes first, because exp overwrites them.
        if statistics:
            squares = torch.mul(logits, logits, out=block_buffer)
            row_parts["square"].append(squares.sum(dim=1))
            if column_sums is not None:
                column_sums.square_sum.add_(squares.sum(dim=0))

        if mask is None:
            positive_logit = logits.diagonal(offset=start).clone()
            row_parts["positive_logit"].append(positive_logit)
            if column_sums is not None:
                column_sums.positive_logit_sum[start:stop] += positive_logit
        else:
            masked = torch.mul(logits, mask, out=block_buffer)
            count = mask.sum(dim=1, dtype=dtype)
            row_parts["count"].append(count)
            row_parts["positive_logit"].append(masked.sum(dim=1) / count)
            if column_sums is not None:
                column_sums.positive_logit_sum.add_(masked.sum(dim=0))
                column_sums.count.add_(mask.sum(dim=0, dtype=dtype))

        shifted = torch.sub(logits, shift, out=block_buffer)
        exp_block = torch.exp(shifted, out=logits)
        row_parts["sum_exp"].append(exp_block.sum(dim=1))
        if column_sums is not None:
            column_sums.sum_exp.add_(exp_block.sum(dim=0))

        # The diagonal's exp also gives the loss as log(sum_exp / E_ii), which is exactly 0 for one column.
        if mask is None:
            positive_exp = exp_block.diagonal(offset=start).clone()
            row_parts["positive_exp"].append(positive_exp)
            if column_sums is not None:
                column_sums.positive_exp[start:stop] += positive_exp

        if statistics:
            weighted = shifted.mul_(exp_block)
            row_parts["shifted"].append(weighted.sum(dim=1))
            if column_sums is not None:
                column_sums.sum_exp_shifted.add_(weighted.sum(dim=0))

            if mask is not None:
                masked_exp = torch.mul(exp_block, mask, out=block_buffer)
                row_parts["positive_exp"].append(masked_exp.sum(dim=1))
                if column_sums is not None:
                    column_sums.positive_exp.add_(masked_exp.sum(dim=0))

    row = {name: torch.cat(parts) if parts else None for name, parts in row_parts.items()}
    result = _direction_result(row["sum_exp"], row["positive_logit"], row["count"], shift, row["positive_exp"])
    result.row_sum_exp = row["sum_exp"]
    if statistics:
        result.row_statistics = _statistics(
            result.row_loss, result.row_lse, row["sum_exp"], row["shifted"], row["square"], row["positive_exp"],
            row["positive_logit"], row_mean, m, scale,
        )
    if column_sums is None:
        return result

    column_positive_logit = column_sums.positive_logit_sum
    if column_sums.count is not None:
        column_positive_logit = column_positive_logit / column_sums.count
    column = _direction_result(
        column_sums.sum_exp, column_positive_logit, column_sums.count, shift, column_sums.positive_exp
    )
    result.column_lse = column.row_lse
    result.column_loss = column.row_loss
    result.column_count = column_sums.count
    result.column_sum_exp = column_sums.sum_exp
    if statistics:
        result.column_statistics = _statistics(
            column.row_loss, column.row_lse, column_sums.sum_exp, column_sums.sum_exp_shifted, column_sums.square_sum,
            column_sums.positive_exp, column_positive_logit, column_mean, n, scale,
        )
    return result


def _direction_result(
    sum_exp: Tensor, positive_logit: Tensor, count: Optional[Tensor], shift: float, positive_exp: Optional[Tensor]
) -> ForwardResult:
    """Return the log-sum-exps and losses of one direction; ``positive_exp`` is used with one positive per row."""
    lse = sum_exp.log() + shift
    if count is None:
        # log(S / E_ii) in place of (B + log S) - L_ii avoids an absolute rounding error of about B * eps.
        loss = sum_exp.log() - positive_exp.log()
    else:
        loss = lse - positive_logit
    return ForwardResult(row_lse=lse, row_loss=loss, row_count=count, row_statistics=None)


def _statistics(
    loss: Tensor,
    lse: Tensor,
    sum_exp: Tensor,
    sum_exp_shifted: Tensor,
    square_sum: Tensor,
    positive_exp: Tensor,
    positive_logit: Tensor,
    mean: Tensor,
    length: int,
    scale: Tensor,
) -> Tensor:
    """Return the ``(rows, 5)`` per-row ``(loss, positive_prob, margin, entropy, spread)`` of one direction."""
    positive_prob = positive_exp / sum_exp

    # H = lse - sum_j p_j L_j, where lse = B + log S and sum_j p_j L_j = B + sum_j E_j (L_j - B) / S.
    entropy = sum_exp.log() - sum_exp_shifted / sum_exp
    margin = positive_logit - mean
    variance = (square_sum / length - mean.square()).clamp_min(0)
    spread = variance.sqrt() / scale
    return torch.stack([loss, positive_prob, margin, entropy, spread], dim=1)


def fixed_shift_backward(
    query: Tensor,
    key: Tensor,
    scale: Tensor,
    shift: float,
    positives: Positives,
    saved: ForwardResult,
    row_weight: Tensor,
    column_weight: Optional[Tensor],
    *,
    block_rows: int,
    stored_exp: Optional[Tensor],
    need_scale_grad: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Return ``(dQ, dK, ds)`` like :func:`~adaptive_contrastive.blockwise.blockwise_backward`.

    ``stored_exp`` is the matrix that :func:`fixed_shift_forward` overwrote with ``exp(L - shift)``, or
    ``None`` in chunked mode, where each block is recomputed.
    """
    n, m = query.shape[0], key.shape[0]
    dtype, device = query.dtype, query.device
    row_coefficient = row_weight.to(dtype) / n
    column_coefficient = None if column_weight is None else column_weight.to(dtype) / m

    # dL_ij = E_ij * (a / rowsum_i + b / colsum_j) minus the targets.
    row_factor = (row_coefficient / saved.row_sum_exp).unsqueeze(1)
    column_factor = None if column_coefficient is None else column_coefficient / saved.column_sum_exp

    block_rows = max(1, min(block_rows, n))
    buffer = torch.empty(block_rows, m, dtype=dtype, device=device)
    grad_query_unscaled = torch.empty(n, key.shape[1], dtype=dtype, device=device)
    if stored_exp is not None:
        grad_logits_full = torch.empty(n, m, dtype=dtype, device=device)
        grad_key_unscaled = None
    else:
        scaled_query = query * scale
        grad_logits_buffer = torch.empty(block_rows, m, dtype=dtype, device=device)
        exp_buffer = torch.empty(block_rows, m, dtype=dtype, device=device)
        grad_key_unscaled = torch.zeros(m, key.shape[1], dtype=dtype, device=device)

    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        rows = stop - start
        if stored_exp is not None:
            exp_block = stored_exp[start:stop]
            grad_logits = grad_logits_full[start:stop]
        else:
            exp_block = torch.mm(scaled_query[start:stop], key.T, out=exp_buffer[:rows]).sub_(shift).exp_()
            grad_logits = grad_logits_buffer[:rows]

        torch.mul(exp_block, row_factor[start:stop], out=grad_logits)
        if column_factor is not None:
            grad_logits.addcmul_(exp_block, column_factor)
        _subtract_targets(grad_logits, start, positives, saved, row_coefficient, column_coefficient, buffer[:rows])

        if stored_exp is None:
            torch.mm(grad_logits, key, out=grad_query_unscaled[start:stop])
            grad_key_unscaled.addmm_(grad_logits.T, query[start:stop])

    if stored_exp is not None:
        torch.mm(grad_logits_full, key, out=grad_query_unscaled)
        grad_key_unscaled = grad_logits_full.T @ query

    scale_grad = None
    if need_scale_grad:
        scale_grad = torch.linalg.vecdot(grad_query_unscaled.flatten(), query.flatten())
    return grad_query_unscaled.mul_(scale), grad_key_unscaled.mul_(scale), scale_grad
