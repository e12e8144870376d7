"""Fused PyTorch path: both direction losses and all statistics from one logit matrix, hand-written backward.

:class:`BlockwiseTerms` is one ``torch.autograd.Function`` that returns both direction losses, so its
backward receives both upstream gradients (the detached direction weights, as autograd applies them)
and builds ``dL`` for both directions in one pass. With ``chunk_size=None`` it computes the full
``(N, N)`` logit matrix with one matrix product, keeps it for the backward pass and runs three matrix
products in all. With a ``chunk_size`` it keeps no ``(N, N)`` tensor and recomputes each row chunk of the
logits in the backward pass (four matrix products in all); :mod:`adaptive_contrastive.chunked` documents
that mode.

Inputs in float16 or bfloat16 are promoted to float32 for the logits and the softmax, float64 stays
float64, and the feature gradients are returned in the input dtype.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .blockwise import Positives, blockwise_backward, blockwise_forward, default_block_rows, statistics_to_sums
from .fixed_shift import fixed_shift_backward, fixed_shift_bound, fixed_shift_forward
from .dense import ContrastiveTerms

ScaleLike = Union[float, Tensor]


class BlockwiseTerms(torch.autograd.Function):
    """Autograd function ``(query, key, scale) -> (loss_rows, loss_columns, sums)``.

    ``loss_columns`` is a 0-d zero and ``sums`` has one row when ``columns`` is false. ``sums`` is
    ``(2, NUM_SUMS)`` or ``(1, NUM_SUMS)`` in the dtype of :func:`~adaptive_contrastive.statistics.row_sums` and carries no gradient, or is an empty tensor when
    ``statistics`` is false.
    """

    @staticmethod
    def forward(
        ctx,
        query: Tensor,
        key: Tensor,
        scale: Tensor,
        query_ids: Optional[Tensor],
        key_ids: Optional[Tensor],
        columns: bool,
        statistics: bool,
        chunk_size: Optional[int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        compute_dtype = torch.promote_types(query.dtype, torch.float32)
        query_c = query.detach().to(compute_dtype)
        key_c = key.detach().to(compute_dtype)
        scale_c = scale.detach().to(compute_dtype)
        positives = Positives(query_ids, key_ids)

        stored_logits = None
        if chunk_size is None:
            block_rows = default_block_rows(query.shape[0], key.shape[0])
            stored_logits = (query_c * scale_c) @ key_c.T
        else:
            block_rows = chunk_size

        # On the CPU, one exp(L - B) serves both directions when the bound B allows it (see fixed_shift).
        shift = fixed_shift_bound(query_c, key_c, scale_c)
        if shift is not None:
            result = fixed_shift_forward(
                query_c,
                key_c,
                scale_c,
                shift,
                positives,
                columns=columns,
                statistics=statistics,
                block_rows=block_rows,
                stored_logits=stored_logits,
            )
        else:
            result = blockwise_forward(
                query_c,
                key_c,
                scale_c,
                positives,
                columns=columns,
                statistics=statistics,
                block_rows=block_rows,
                stored_logits=stored_logits,
            )

        loss_rows = result.row_loss.mean()
        loss_columns = result.column_loss.mean() if columns else torch.zeros((), dtype=compute_dtype, device=query.device)

        if statistics:
            parts = [statistics_to_sums(result.row_statistics)]
            if columns:
                parts.append(statistics_to_sums(result.column_statistics))
            sums = torch.stack(parts)
        else:
            sums = torch.empty(0, dtype=torch.float32, device=query.device)

        ctx.save_for_backward(query_c, key_c, scale_c, stored_logits, query_ids, key_ids)
        ctx.result = result
        ctx.columns = columns
        ctx.block_rows = block_rows
        ctx.shift = shift
        ctx.input_dtypes = (query.dtype, key.dtype, scale.dtype)
        ctx.mark_non_differentiable(sums)
        return loss_rows, loss_columns, sums

    @staticmethod
    def backward(ctx, grad_rows: Tensor, grad_columns: Tensor, _grad_sums: Tensor):
        query_c, key_c, scale_c, stored_logits, query_ids, key_ids = ctx.saved_tensors
        need_query, need_key, need_scale = ctx.needs_input_grad[:3]

        if ctx.shift is not None:
            grad_query, grad_key, grad_scale = fixed_shift_backward(
                query_c,
                key_c,
                scale_c,
                ctx.shift,
                Positives(query_ids, key_ids),
                ctx.result,
                grad_rows,
                grad_columns if ctx.columns else None,
                block_rows=ctx.block_rows,
                stored_exp=stored_logits,
                need_scale_grad=need_scale,
            )
        else:
            grad_query, grad_key, grad_scale = blockwise_backward(
                query_c,
                key_c,
                scale_c,
                Positives(query_ids, key_ids),
                ctx.result,
                grad_rows,
                grad_columns if ctx.columns else None,
                block_rows=ctx.block_rows,
                stored_logits=stored_logits,
                need_scale_grad=need_scale,
            )

        query_dtype, key_dtype, scale_dtype = ctx.input_dtypes
        return (
            grad_query.to(query_dtype) if need_query else None,
            grad_key.to(key_dtype) if need_key else None,
            grad_scale.to(scale_dtype) if need_scale else None,
            None,
            None,
            None,
            None,
            None,
        )


def as_scale_tensor(logit_scale: ScaleLike, like: Tensor) -> Tensor:
    """Return ``logit_scale`` as a 0-d tensor on ``like``'s device; a Python float becomes a constant."""
    if isinstance(logit_scale, Tensor):
        return logit_scale.reshape(())
    return torch.tensor(float(logit_scale), dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)


def fused_symmetric_terms(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    image_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
    chunk_size: Optional[int] = None,
) -> ContrastiveTerms:
    """Compute what :func:`~adaptive_contrastive.dense.symmetric_terms` computes, in one fused pass.

    Args:
        image_features: ``(N, D)`` image embeddings, any floating dtype.
        text_features: ``(N, D)`` text embeddings, same device.
        logit_scale: positive float or 0-d tensor (the exponentiated multiplier).
        image_ids: optional ``(N,)`` integer group ids; pairs with equal ids are positives.
        need_statistics: also return the detached ``(2, NUM_SUMS)`` sums.
        chunk_size: ``None`` keeps the ``(N, N)`` logits for the backward pass. An int processes
            that many rows at a time and recomputes them in the backward pass.

    Returns:
        :class:`ContrastiveTerms` with float32 losses, or float64 for float64 inputs.
    """
    scale = as_scale_tensor(logit_scale, image_features)
    loss_i2t, loss_t2i, sums = BlockwiseTerms.apply(
        image_features, text_features, scale, image_ids, image_ids, True, need_statistics, chunk_size
    )
    return ContrastiveTerms(loss_i2t, loss_t2i, sums if need_statistics else None)
