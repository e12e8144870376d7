"""Choice of compute path for the InfoNCE terms: Triton, fused PyTorch, chunked PyTorch or the dense reference.

Rules, in order:

1. Inside ``torch.compile`` the dense reference (:mod:`adaptive_contrastive.dense`) runs, because the
   compiler fuses its elementwise steps itself and traces it without graph breaks.
2. The Triton kernels (:mod:`adaptive_contrastive.kernels`) run for CUDA tensors when the ``triton``
   package imports, whatever ``chunk_size`` is, because they never hold an ``(N, N)`` matrix.
3. Otherwise ``chunk_size=None`` runs the fused dense path (:mod:`adaptive_contrastive.fused`) and an int
   runs the chunked path (:mod:`adaptive_contrastive.chunked`).

The environment variable ``ADAPTIVE_CONTRASTIVE_BACKEND``, read at every call, overrides the rules:
``auto`` (the default) applies them, ``torch`` never uses Triton, ``reference`` always runs the dense
reference, and ``triton`` always uses Triton. ``triton`` also runs the kernels on CPU tensors when
``TRITON_INTERPRET=1`` is set, which is how the tests check the kernels without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Union

import torch
from torch import Tensor

from .dense import ContrastiveTerms

ScaleLike = Union[float, Tensor]

BACKENDS = ("auto", "torch", "reference", "triton")
BACKEND_VARIABLE = "ADAPTIVE_CONTRASTIVE_BACKEND"


def check_chunk_size(chunk_size: object) -> Optional[int]:
    """Return ``chunk_size`` if it is ``None`` or a positive int; raise ``TypeError`` or ``ValueError`` otherwise."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"chunk_size must be None or a positive int (rows of the similarity matrix per chunk), got {chunk_size!r}."
        )
    if chunk_size <= 0:
        raise ValueError(
            f"chunk_size must be a positive int, got {chunk_size!r}. Use None for the dense path or, for example, 1024."
        )
    return chunk_size


def selected_backend() -> str:
    """Return the value of ``ADAPTIVE_CONTRASTIVE_BACKEND`` (default ``auto``), validated."""
    backend = os.environ.get(BACKEND_VARIABLE, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_VARIABLE} must be one of {BACKENDS}, got {backend!r}. Unset it for 'auto'.")
    return backend


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Return whether the optional ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(device: torch.device, backend: str) -> bool:
    if backend == "triton":
        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if not triton_available():
            raise RuntimeError(f"{BACKEND_VARIABLE}=triton but the triton package is not installed. Install the 'triton' extra.")
        if device.type != "cuda" and not interpreting:
            raise RuntimeError(
                f"{BACKEND_VARIABLE}=triton needs CUDA tensors, got tensors on {device}. "
                f"Set TRITON_INTERPRET=1 to run the kernels on the CPU, or unset {BACKEND_VARIABLE}."
            )
        return True
    return backend == "auto" and device.type == "cuda" and triton_available()


def symmetric_terms_auto(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    image_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
    chunk_size: Optional[int] = None,
) -> ContrastiveTerms:
    """Compute both direction losses and their sums on the path that the module docstring's rules select."""
    backend = selected_backend()
    if backend == "reference" or torch.compiler.is_compiling():
        from .dense import symmetric_terms

        return symmetric_terms(
            image_features, text_features, logit_scale, image_ids=image_ids, need_statistics=need_statistics
        )

    if _use_triton(image_features.device, backend):
        from .kernels import triton_symmetric_terms

        return triton_symmetric_terms(
            image_features, text_features, logit_scale, image_ids=image_ids, need_statistics=need_statistics
        )

    from .fused import fused_symmetric_terms

    return fused_symmetric_terms(
        image_features,
        text_features,
        logit_scale,
        image_ids=image_ids,
        need_statistics=need_statistics,
        chunk_size=chunk_size,
    )


def direction_terms_auto(
    query_features: Tensor,
    key_features: Tensor,
    logit_scale: ScaleLike,
    *,
    targets: Optional[Tensor] = None,
    query_ids: Optional[Tensor] = None,
    key_ids: Optional[Tensor] = None,
    need_statistics: bool = True,
    chunk_size: Optional[int] = None,
) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """Compute one direction's loss and sums on Triton or the chunked path; return ``None`` for the dense reference.

    The one-direction entry point keeps the dense reference as its default when no ``chunk_size`` is given
    and Triton does not apply, so this function leaves that case to the caller.
    """
    backend = selected_backend()
    if backend == "reference" or torch.compiler.is_compiling():
        return None

    if _use_triton(query_features.device, backend):
        from .kernels import triton_direction_terms

        return triton_direction_terms(
            query_features,
            key_features,
            logit_scale,
            targets=targets,
            query_ids=query_ids,
            key_ids=key_ids,
            need_statistics=need_statistics,
        )

    if chunk_size is None:
        return None

    from .chunked import chunked_direction_terms

    return chunked_direction_terms(
        query_features,
        key_features,
        logit_scale,
        targets=targets,
        query_ids=query_ids,
        key_ids=key_ids,
        need_statistics=need_statistics,
        chunk_size=chunk_size,
    )
