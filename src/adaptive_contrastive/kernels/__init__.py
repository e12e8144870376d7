"""Triton kernels for CUDA tensors: tiled InfoNCE that never stores the ``(N, N)`` logit matrix.

Importing this package does not import ``triton``. The entry points import
:mod:`adaptive_contrastive.kernels.infonce`, and with it ``triton``, on their first call, so the package
works without the optional ``triton`` extra. :mod:`adaptive_contrastive.dispatch` decides when they run.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from ..dense import ContrastiveTerms

ScaleLike = Union[float, Tensor]


def triton_symmetric_terms(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    image_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
) -> ContrastiveTerms:
    """Compute both direction losses and their sums with the Triton kernels; see :mod:`.infonce`."""
    from .infonce import symmetric_terms_triton

    return symmetric_terms_triton(
        image_features, text_features, logit_scale, image_ids=image_ids, need_statistics=need_statistics
    )


def triton_direction_terms(
    query_features: Tensor,
    key_features: Tensor,
    logit_scale: ScaleLike,
    *,
    targets: Optional[Tensor] = None,
    query_ids: Optional[Tensor] = None,
    key_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """Compute one direction's loss and sums with the Triton kernels; see :mod:`.infonce`."""
    from .infonce import direction_terms_triton

    return direction_terms_triton(
        query_features,
        key_features,
        logit_scale,
        targets=targets,
        query_ids=query_ids,
        key_ids=key_ids,
        need_statistics=need_statistics,
    )
