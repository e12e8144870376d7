"""Tiled InfoNCE forward and backward kernels in Triton, in the style of flash attention.

Forward (:func:`_row_forward_kernel`): each program owns ``BLOCK_M`` rows of ``L = s * A @ B.T`` and
walks the columns in tiles of ``BLOCK_N``. It computes each tile from the features (an inner loop over
``D`` in steps of ``BLOCK_D``), keeps a running row maximum and rescales its running sums whenever the
maximum grows (the online log-sum-exp). Besides the log-sum-exp it carries, per row, the mass and the
logit sum and count of the positives, ``sum_j p_ij L_ij`` for the entropy and the sum of squares around
the known row mean for the spread. The column direction is the same kernel with the features swapped.

Backward (:func:`_grad_kernel`): each program owns ``BLOCK_M`` rows of ``A`` and ``BLOCK_DOUT`` feature
columns of their gradient. It recomputes each logit tile, forms
``dL = a_i exp(L - lse_row_i) + b_j exp(L - lse_col_j) - Y_ij (c_i + e_j)`` and accumulates ``dL @ B``.
The gradient of ``B`` is the same kernel with the roles swapped, so no atomics are needed. When ``D`` is
larger than ``BLOCK_DOUT``, the logits of a row block are recomputed once per feature block.

Positives are pairs with equal ids (``query_ids[i] == key_ids[j]``); a paired batch without ids uses
``arange(N)`` for both. Logits, softmax and accumulators are float32 whatever the input dtype, and
float32 inputs use IEEE (not TF32) products. Shapes need no padding: every load is masked.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..dense import ContrastiveTerms
from ..statistics import row_sums

ScaleLike = Union[float, Tensor]


@triton.jit
def _logit_tile(
    a_ptr, b_ptr, rows, columns, n_rows, n_columns, dim, stride_a, stride_b, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    """Return the ``(BLOCK_M, BLOCK_N)`` float32 tile ``scale * A[rows] @ B[columns].T``.

    ``UPCAST`` converts the tiles to float32 before the product. The interpreter needs it for bfloat16,
    because ``tl.dot`` on bfloat16 tiles returns wrong values under ``TRITON_INTERPRET=1`` (Triton 3.9.0).
    """
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        offsets_d = d_start + tl.arange(0, BLOCK_D)
        a_tile = tl.load(
            a_ptr + rows[:, None] * stride_a + offsets_d[None, :],
            mask=(rows[:, None] < n_rows) & (offsets_d[None, :] < dim),
            other=0.0,
        )
        b_tile = tl.load(
            b_ptr + columns[:, None] * stride_b + offsets_d[None, :],
            mask=(columns[:, None] < n_columns) & (offsets_d[None, :] < dim),
            other=0.0,
        )
        if UPCAST:
            a_tile = a_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        accumulator += tl.dot(a_tile, tl.trans(b_tile), input_precision="ieee")
    return accumulator * scale


@triton.jit
def _row_forward_kernel(
    a_ptr, b_ptr, a_ids_ptr, b_ids_ptr, scale_ptr, row_mean_ptr,
    lse_ptr, positive_logit_sum_ptr, positive_count_ptr, positive_prob_ptr, expected_logit_ptr, centered_square_ptr,
    n_rows, n_columns, dim, stride_a, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < n_rows
    scale = tl.load(scale_ptr).to(tl.float32)
    row_ids = tl.load(a_ids_ptr + rows, mask=row_valid, other=-1)
    row_mean = tl.load(row_mean_ptr + rows, mask=row_valid, other=0.0)

    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_exp_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive_exp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive_logit_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive_count = tl.zeros((BLOCK_M,), dtype=tl.float32)
    centered_square = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for column_start in range(0, n_columns, BLOCK_N):
        columns = column_start + tl.arange(0, BLOCK_N)
        column_valid = columns < n_columns
        logits = _logit_tile(
            a_ptr, b_ptr, rows, columns, n_rows, n_columns, dim, stride_a, stride_b, scale, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST
        )
        valid = row_valid[:, None] & column_valid[None, :]
        column_ids = tl.load(b_ids_ptr + columns, mask=column_valid, other=-2)
        positive = valid & (row_ids[:, None] == column_ids[None, :])

        # Online log-sum-exp: rescale the running sums by exp(old max - new max) before adding the tile.
        tile_max = tl.max(tl.where(column_valid[None, :], logits, float("-inf")), axis=1)
        new_max = tl.maximum(running_max, tile_max)
        factor = tl.exp(running_max - new_max)
        exp_tile = tl.where(column_valid[None, :], tl.exp(logits - new_max[:, None]), 0.0)
        logits_or_zero = tl.where(valid, logits, 0.0)

        sum_exp = sum_exp * factor + tl.sum(exp_tile, axis=1)
        sum_exp_logit = sum_exp_logit * factor + tl.sum(exp_tile * logits_or_zero, axis=1)
        positive_exp = positive_exp * factor + tl.sum(tl.where(positive, exp_tile, 0.0), axis=1)
        positive_logit_sum += tl.sum(tl.where(positive, logits, 0.0), axis=1)
        positive_count += tl.sum(positive.to(tl.float32), axis=1)
        centered = tl.where(valid, logits - row_mean[:, None], 0.0)
        centered_square += tl.sum(centered * centered, axis=1)
        running_max = new_max

    tl.store(lse_ptr + rows, running_max + tl.log(sum_exp), mask=row_valid)
    tl.store(positive_logit_sum_ptr + rows, positive_logit_sum, mask=row_valid)
    tl.store(positive_count_ptr + rows, positive_count, mask=row_valid)
    tl.store(positive_prob_ptr + rows, positive_exp / sum_exp, mask=row_valid)
    tl.store(expected_logit_ptr + rows, sum_exp_logit / sum_exp, mask=row_valid)
    tl.store(centered_square_ptr + rows, centered_square, mask=row_valid)


@triton.jit
def _grad_kernel(
    a_ptr, b_ptr, a_ids_ptr, b_ids_ptr, scale_ptr,
    row_lse_ptr, row_weight_ptr, row_target_ptr,
    column_lse_ptr, column_weight_ptr, column_target_ptr,
    grad_ptr,
    n_rows, n_columns, dim, stride_a, stride_b, stride_grad,
    HAS_ROW: tl.constexpr, HAS_COLUMN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offsets_out = tl.program_id(1) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    row_valid = rows < n_rows
    scale = tl.load(scale_ptr).to(tl.float32)
    row_ids = tl.load(a_ids_ptr + rows, mask=row_valid, other=-1)

    row_lse = tl.load(row_lse_ptr + rows, mask=row_valid, other=0.0)
    row_weight = tl.load(row_weight_ptr + rows, mask=row_valid, other=0.0)
    row_target = tl.load(row_target_ptr + rows, mask=row_valid, other=0.0)

    accumulator = tl.zeros((BLOCK_M, BLOCK_DOUT), dtype=tl.float32)
    for column_start in range(0, n_columns, BLOCK_N):
        columns = column_start + tl.arange(0, BLOCK_N)
        column_valid = columns < n_columns
        valid = row_valid[:, None] & column_valid[None, :]
        logits = _logit_tile(
            a_ptr, b_ptr, rows, columns, n_rows, n_columns, dim, stride_a, stride_b, scale, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST
        )
        column_ids = tl.load(b_ids_ptr + columns, mask=column_valid, other=-2)
        positive = valid & (row_ids[:, None] == column_ids[None, :])

        grad_logits = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        target = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_ROW:
            grad_logits += row_weight[:, None] * tl.exp(logits - row_lse[:, None])
            target += row_target[:, None]
        if HAS_COLUMN:
            column_lse = tl.load(column_lse_ptr + columns, mask=column_valid, other=0.0)
            column_weight = tl.load(column_weight_ptr + columns, mask=column_valid, other=0.0)
            column_target = tl.load(column_target_ptr + columns, mask=column_valid, other=0.0)
            grad_logits += column_weight[None, :] * tl.exp(logits - column_lse[None, :])
            target += column_target[None, :]
        grad_logits = tl.where(valid, grad_logits - tl.where(positive, target, 0.0), 0.0)

        b_tile = tl.load(
            b_ptr + columns[:, None] * stride_b + offsets_out[None, :],
            mask=column_valid[:, None] & (offsets_out[None, :] < dim),
            other=0.0,
        ).to(tl.float32)
        accumulator += tl.dot(grad_logits, b_tile, input_precision="ieee")

    tl.store(
        grad_ptr + rows[:, None] * stride_grad + offsets_out[None, :],
        accumulator,
        mask=row_valid[:, None] & (offsets_out[None, :] < dim),
    )


def _block_sizes(dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """Return ``(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DOUT)``.

    ``tl.dot`` needs every tile side to be at least 16. The interpreter (CPU tensors) gets small tiles
    because it runs each program in Python.
    """
    dim_block = max(16, min(triton.next_power_of_2(dim), 64))
    if device.type != "cuda":
        return 16, 16, dim_block, dim_block
    # NOTE: untuned. The kernels have only run under the interpreter, never compiled for a GPU.
    return 64, 64, dim_block, max(16, min(triton.next_power_of_2(dim), 128))


class _RowResults:
    """Per-row float32 outputs of :func:`_row_forward_kernel` for one direction."""

    def __init__(self, lse, positive_logit_sum, positive_count, positive_prob, expected_logit, centered_square):
        self.lse = lse
        self.positive_logit_sum = positive_logit_sum
        self.positive_count = positive_count
        self.positive_prob = positive_prob
        self.expected_logit = expected_logit
        self.centered_square = centered_square


def _row_forward(a: Tensor, b: Tensor, a_ids: Tensor, b_ids: Tensor, scale: Tensor, row_mean: Tensor) -> _RowResults:
    n_rows, dim = a.shape
    outputs = [torch.empty(n_rows, dtype=torch.float32, device=a.device) for _ in range(6)]
    block_m, block_n, block_d, _ = _block_sizes(dim, a.device)
    grid = (triton.cdiv(n_rows, block_m),)
    _row_forward_kernel[grid](
        a, b, a_ids, b_ids, scale, row_mean, *outputs,
        n_rows, b.shape[0], dim, a.stride(0), b.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=a.device.type != "cuda",
    )
    return _RowResults(*outputs)


def _grad(
    a: Tensor,
    b: Tensor,
    a_ids: Tensor,
    b_ids: Tensor,
    scale: Tensor,
    row_terms: Optional[tuple[Tensor, Tensor, Tensor]],
    column_terms: Optional[tuple[Tensor, Tensor, Tensor]],
) -> Tensor:
    """Return the float32 ``dL @ B`` for the rows of ``a``; each terms tuple is ``(lse, weight, target)``."""
    n_rows, dim = a.shape
    grad = torch.empty(n_rows, dim, dtype=torch.float32, device=a.device)
    block_m, block_n, block_d, block_out = _block_sizes(dim, a.device)
    placeholder = torch.zeros(1, dtype=torch.float32, device=a.device)
    row = row_terms if row_terms is not None else (placeholder,) * 3
    column = column_terms if column_terms is not None else (placeholder,) * 3
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(dim, block_out))
    _grad_kernel[grid](
        a, b, a_ids, b_ids, scale, *row, *column, grad,
        n_rows, b.shape[0], dim, a.stride(0), b.stride(0), grad.stride(0),
        HAS_ROW=row_terms is not None, HAS_COLUMN=column_terms is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DOUT=block_out, UPCAST=a.device.type != "cuda",
    )
    return grad


def _direction_statistics(results: _RowResults, row_mean: Tensor, scale: Tensor, n_columns: int) -> tuple[Tensor, Tensor]:
    """Return ``(row_loss, sums)`` of one direction from the kernel outputs."""
    positive_logit = results.positive_logit_sum / results.positive_count
    row_loss = results.lse - positive_logit
    margin = positive_logit - row_mean
    entropy = results.lse - results.expected_logit
    spread = (results.centered_square / n_columns).clamp_min(0).sqrt() / scale
    return row_loss, row_sums(row_loss, results.positive_prob, margin, entropy, spread)


class TritonTerms(torch.autograd.Function):
    """Autograd function ``(query, key, scale) -> (loss_rows, loss_columns, sums)`` on the Triton kernels.

    Mirrors :class:`~adaptive_contrastive.fused.BlockwiseTerms`: ``loss_columns`` is a 0-d zero and
    ``sums`` has one row when ``columns`` is false, and ``sums`` is empty without ``statistics``.
    """

    @staticmethod
    def forward(ctx, query, key, scale, query_ids, key_ids, columns, statistics):
        ctx.input_dtypes = (query.dtype, key.dtype, scale.dtype)
        # tl.dot needs both operands in one dtype, and the kernels compute in float32, so mixed inputs are
        # promoted to a common dtype and float64 inputs are rounded to float32 first.
        common_dtype = torch.promote_types(query.dtype, key.dtype)
        if common_dtype == torch.float64:
            common_dtype = torch.float32
        query = query.detach().to(common_dtype).contiguous()
        key = key.detach().to(common_dtype).contiguous()
        scale32 = scale.detach().reshape(1).float()

        # mean_j L_ij = s * q_i . mean_j k_j, so the means need no pass over the logits.
        row_mean = (query.float() @ key.float().mean(dim=0)) * scale32
        rows = _row_forward(query, key, query_ids, key_ids, scale32, row_mean)
        row_loss, row_sum_vector = _direction_statistics(rows, row_mean, scale32, key.shape[0])
        parts = [row_sum_vector]

        column_lse = column_count = None
        column_loss = torch.zeros((), dtype=torch.float32, device=query.device)
        if columns:
            column_mean = (key.float() @ query.float().mean(dim=0)) * scale32
            column_results = _row_forward(key, query, key_ids, query_ids, scale32, column_mean)
            column_row_loss, column_sum_vector = _direction_statistics(column_results, column_mean, scale32, query.shape[0])
            column_loss = column_row_loss.mean()
            column_lse, column_count = column_results.lse, column_results.positive_count
            parts.append(column_sum_vector)

        sums = torch.stack(parts) if statistics else torch.empty(0, device=query.device)
        ctx.save_for_backward(query, key, scale32, query_ids, key_ids, rows.lse, rows.positive_count, column_lse, column_count)
        ctx.columns = columns
        ctx.mark_non_differentiable(sums)
        return row_loss.mean(), column_loss, sums

    @staticmethod
    def backward(ctx, grad_rows, grad_columns, _grad_sums):
        query, key, scale32, query_ids, key_ids, row_lse, row_count, column_lse, column_count = ctx.saved_tensors
        n, m = query.shape[0], key.shape[0]

        row_weight = (grad_rows.float() / n).expand(n).contiguous()
        row_terms = (row_lse, row_weight, row_weight / row_count)
        column_terms = None
        if ctx.columns:
            column_weight = (grad_columns.float() / m).expand(m).contiguous()
            column_terms = (column_lse, column_weight, column_weight / column_count)

        grad_query = _grad(query, key, query_ids, key_ids, scale32, row_terms, column_terms)
        # The key gradient is the same sum over the transposed logits, with the two directions' roles swapped.
        grad_key = _grad(key, query, key_ids, query_ids, scale32, column_terms, row_terms)

        query_dtype, key_dtype, scale_dtype = ctx.input_dtypes
        grad_scale = torch.linalg.vecdot(grad_query.flatten(), query.float().flatten()).to(scale_dtype)
        return (
            (grad_query * scale32).to(query_dtype),
            (grad_key * scale32).to(key_dtype),
            grad_scale.reshape(()),
            None,
            None,
            None,
            None,
        )


def _scale_tensor(logit_scale: ScaleLike, like: Tensor) -> Tensor:
    if isinstance(logit_scale, Tensor):
        return logit_scale.reshape(())
    return torch.tensor(float(logit_scale), dtype=torch.float32, device=like.device)


def symmetric_terms_triton(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    image_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
) -> ContrastiveTerms:
    """Compute what :func:`~adaptive_contrastive.dense.symmetric_terms` computes, tile by tile on the GPU.

    Losses and sums are float32 (float64 sums on devices that have float64), and the feature gradients
    come back in the input dtype. Float64 features are computed in float32.
    """
    n = image_features.shape[0]
    ids = torch.arange(n, device=image_features.device) if image_ids is None else image_ids.contiguous()
    loss_i2t, loss_t2i, sums = TritonTerms.apply(
        image_features, text_features, _scale_tensor(logit_scale, image_features), ids, ids, True, need_statistics
    )
    return ContrastiveTerms(loss_i2t, loss_t2i, sums if need_statistics else None)


def direction_terms_triton(
    query_features: Tensor,
    key_features: Tensor,
    logit_scale: ScaleLike,
    *,
    targets: Optional[Tensor] = None,
    query_ids: Optional[Tensor] = None,
    key_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """Compute one direction's loss (softmax over keys) and sums, tile by tile on the GPU.

    Takes the arguments of :func:`~adaptive_contrastive.functional.compute_direction_terms`.
    """
    n, m = query_features.shape[0], key_features.shape[0]
    device = query_features.device
    if query_ids is not None and key_ids is not None:
        row_ids, column_ids = query_ids.contiguous(), key_ids.contiguous()
    else:
        row_ids = torch.arange(n, device=device) if targets is None else targets.contiguous()
        column_ids = torch.arange(m, device=device, dtype=row_ids.dtype)

    loss, _, sums = TritonTerms.apply(
        query_features, key_features, _scale_tensor(logit_scale, query_features), row_ids, column_ids, False, need_statistics
    )
    return loss, sums[0] if need_statistics else None
