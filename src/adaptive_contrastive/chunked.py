"""Chunked PyTorch path: exact InfoNCE terms without an ``(N, N)`` matrix, on every device.

``chunk_size=c`` processes ``c`` rows of the similarity matrix at a time. The forward pass computes each
chunk ``L_c = s * X_c @ Y.T`` once, reduces its rows completely and folds its columns into running
log-sum-exp sums (see :mod:`adaptive_contrastive.blockwise`). The backward pass recomputes each chunk
from the features and the saved log-sum-exps, so nothing of size ``N * N`` outlives a chunk.

Memory beyond the inputs and their gradients, in elements of the compute dtype (float32 for float16,
bfloat16 and float32 inputs): about ``3 * c * N`` for the chunk and two temporaries, plus ``O(N)``
vectors. The dense paths hold ``N * N`` for the logits and more for the softmax and its gradient.

Cost: four matrix products of ``c * N * D`` per chunk (one forward, three backward) against three for
the fused dense path, so the time grows by about one matrix product over the fused dense path.
Gradients equal the dense path's up to float rounding (tested to 1e-5 relative in float32).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .dense import ContrastiveTerms
from .dispatch import check_chunk_size
from .fused import BlockwiseTerms, as_scale_tensor, fused_symmetric_terms

ScaleLike = Union[float, Tensor]


def chunked_symmetric_terms(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    image_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
    chunk_size: int,
) -> ContrastiveTerms:
    """Compute both direction losses and their sums ``chunk_size`` rows at a time.

    Args:
        image_features: ``(N, D)`` image embeddings, any floating dtype.
        text_features: ``(N, D)`` text embeddings, same device.
        logit_scale: positive float or 0-d tensor (the exponentiated multiplier).
        image_ids: optional ``(N,)`` integer group ids; pairs with equal ids are positives.
        need_statistics: also return the detached ``(2, NUM_SUMS)`` sums.
        chunk_size: rows of the similarity matrix per chunk, a positive int.

    Returns:
        :class:`~adaptive_contrastive.dense.ContrastiveTerms`, equal to the dense path's.
    """
    chunk_size = check_chunk_size(chunk_size)
    return fused_symmetric_terms(
        image_features,
        text_features,
        logit_scale,
        image_ids=image_ids,
        need_statistics=need_statistics,
        chunk_size=chunk_size,
    )


def chunked_direction_terms(
    query_features: Tensor,
    key_features: Tensor,
    logit_scale: ScaleLike,
    *,
    targets: Optional[Tensor] = None,
    query_ids: Optional[Tensor] = None,
    key_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
    chunk_size: int,
) -> tuple[Tensor, Optional[Tensor]]:
    """Compute one direction's loss, softmax over keys, ``chunk_size`` queries at a time.

    Takes the arguments of :func:`~adaptive_contrastive.functional.compute_direction_terms`: ``(n, D)``
    queries, ``(M, D)`` keys, optional ``(n,)`` int64 ``targets`` (default ``arange(n)``), or
    ``query_ids`` with ``key_ids`` to mark every key with the query's id as a positive.

    Returns:
        ``(loss, sums)``: the 0-d mean row loss with grad, and the ``(NUM_SUMS,)`` sums or ``None``.
    """
    chunk_size = check_chunk_size(chunk_size)
    n, m = query_features.shape[0], key_features.shape[0]

    if query_ids is not None and key_ids is not None:
        row_ids, column_ids = query_ids, key_ids
    elif targets is not None:
        row_ids = targets
        column_ids = torch.arange(m, device=targets.device, dtype=targets.dtype)
    else:
        if n > m:
            raise ValueError(
                f"the default targets arange(n) need at least as many keys as queries, got n={n} queries and "
                f"M={m} keys. Pass targets= with each query's key index."
            )
        row_ids = column_ids = None

    scale = as_scale_tensor(logit_scale, query_features)
    loss, _, sums = BlockwiseTerms.apply(
        query_features, key_features, scale, row_ids, column_ids, False, need_statistics, chunk_size
    )
    return loss, sums[0] if need_statistics else None
