"""The fixed-weight symmetric InfoNCE (CLIP) loss, the baseline of the adaptive losses."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import Tensor

from .base import ContrastiveLoss, LossResult
from .functional import _check_fixed_weights, symmetric_info_nce
from .outputs import ContrastiveLossOutput


class SymmetricInfoNCE(ContrastiveLoss):
    r"""Symmetric InfoNCE with fixed direction weights.

    .. math::

        S = s \, X Y^\top, \quad
        L = \tfrac12 \left( w_{i2t}\, \mathrm{CE}(S, y) + w_{t2i}\, \mathrm{CE}(S^\top, y) \right),
        \quad y = (0, 1, \dots, N-1)

    where ``s`` is ``logit_scale``, ``X`` the image and ``Y`` the text features. With the default equal
    weights this is the CLIP loss, in value and in gradient.

    Args:
        weights: ``(w_i2t, w_t2i)``, two numbers >= 0 and not both 0. Default ``(1.0, 1.0)``.
        normalize: L2-normalise both inputs in float32 first.
        validate_values: raise on non-finite inputs or a non-positive tensor ``logit_scale``.
        local_loss, gather_with_grad, rank, world_size, process_group: distributed training options, see
            :class:`~adaptive_contrastive.ContrastiveLoss`.
        chunk_size: ``None`` for the dense paths, or the rows per chunk of the memory-efficient chunked
            path (extra memory ``O(N * chunk_size)``), see :class:`~adaptive_contrastive.ContrastiveLoss`.

    Shape:
        - image_features: ``(N, D)``, any floating dtype.
        - text_features: ``(N, D)``, same device.
        - logit_scale: Python float, 0-d tensor or ``nn.Parameter`` (the exponentiated multiplier).
        - image_ids (optional): ``(N,)`` integer group ids; pairs with equal ids are positives.
        - Output: 0-d tensor in nats, float32 (float64 for float64 inputs).

    Example::

        >>> loss_fn = SymmetricInfoNCE()
        >>> loss = loss_fn(image_features, text_features, logit_scale)
    """

    def __init__(
        self,
        weights: tuple[float, float] = (1.0, 1.0),
        *,
        normalize: bool = False,
        validate_values: bool = True,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        process_group: Optional[Any] = None,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            normalize=normalize,
            validate_values=validate_values,
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            rank=rank,
            world_size=world_size,
            process_group=process_group,
            chunk_size=chunk_size,
        )
        _check_fixed_weights(weights)
        self.weights = (float(weights[0]), float(weights[1]))

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Union[float, Tensor],
        output_dict: bool = False,
        *,
        image_ids: Optional[Tensor] = None,
        return_details: bool = False,
        batch_sizes: Optional[Sequence[int]] = None,
    ) -> LossResult:
        """Compute the loss; see the class docstring for shapes and :meth:`format_output` for the result.

        In distributed training, ``batch_sizes`` (every rank's batch size in rank order, the same list on
        every rank) skips the ``all_gather`` that otherwise exchanges the sizes each step.
        """
        output = symmetric_info_nce(
            image_features,
            text_features,
            logit_scale,
            weights=self.weights,
            image_ids=image_ids,
            normalize=self.normalize,
            return_details=True if return_details else False,
            validate_values=self.validate_values,
            batch_sizes=batch_sizes,
            chunk_size=self.chunk_size,
            **self.distributed_options(),
        )
        if isinstance(output, ContrastiveLossOutput):
            return self.format_output(output, output_dict, return_details)
        return {"contrastive_loss": output} if output_dict else output

    def extra_repr(self) -> str:
        return f"weights={self.weights}, {super().extra_repr()}"
