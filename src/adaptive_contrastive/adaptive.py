"""Adaptive direction-weighted InfoNCE losses: a shared base and its three weighting strategies."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from . import strategies
from .base import ContrastiveLoss, LossResult
from .functional import adaptive_info_nce
from .outputs import ContrastiveLossOutput
from .statistics import DirectionSummary
from .weighting import Mapping, check_weighting_options


class AdaptiveInfoNCE(ContrastiveLoss):
    r"""Symmetric InfoNCE whose two direction weights follow a smoothed difficulty statistic.

    .. math::

        L = \tfrac12 \left( w_{i2t} L_{i2t} + w_{t2i} L_{t2i} \right), \qquad w_{i2t} + w_{t2i} = 2

    Each training step computes a per-direction statistic ``c`` from the detached similarity matrix,
    folds it into an exponential moving average ``m_t = decay * m_{t-1} + (1 - decay) * c_t`` kept in
    the buffers ``ema_statistic`` and ``ema_step``, and maps the bias-corrected average to weights (see
    :func:`~adaptive_contrastive.weighting.weights_from_statistics`). The weights carry no gradient.
    In eval mode the buffers are read but not updated, as in ``BatchNorm``; before the first training
    step the weights are equal.

    Subclasses define :meth:`batch_statistic`.

    Args:
        decay: moving-average decay in [0, 1); 0 uses each batch's statistic alone.
        mapping: ``"direct"`` gives the direction with the larger statistic the larger weight;
            ``"inverse"`` the smaller. ``None`` takes the subclass default.
        power: sharpness exponent applied to the statistic; 0 gives equal weights.
        weight_bounds: ``(min_weight, max_weight)`` with ``0 < min_weight <= 1 <= max_weight``.
        bias_correction: divide the average by ``1 - decay ** step`` as Adam does.
        warmup_steps: blend linearly from equal weights to the adaptive ones over this many updates.
        eps: added to the statistic before mapping, so that two zero statistics give equal weights.
        normalize: L2-normalise both inputs in float32 first.
        validate_values: raise on non-finite inputs or a non-positive tensor ``logit_scale``.
        local_loss, gather_with_grad, rank, world_size, process_group: distributed training options, see
            :class:`~adaptive_contrastive.ContrastiveLoss`. With several ranks the statistic comes from
            the global batch, so the weights and the buffers are identical on every rank.
        chunk_size: ``None`` for the dense paths, or the rows per chunk of the memory-efficient chunked
            path (extra memory ``O(N * chunk_size)``), see :class:`~adaptive_contrastive.ContrastiveLoss`.

    Shape:
        - image_features: ``(N, D)``, any floating dtype.
        - text_features: ``(N, D)``, same device.
        - logit_scale: Python float, 0-d tensor or ``nn.Parameter`` (the exponentiated multiplier).
        - image_ids (optional): ``(N,)`` integer group ids; pairs with equal ids are positives.
        - Output: 0-d tensor in nats, float32 (float64 for float64 inputs).
    """

    default_mapping: Mapping = "direct"

    def __init__(
        self,
        *,
        decay: float = 0.9,
        mapping: Optional[Mapping] = None,
        power: float = 1.0,
        weight_bounds: tuple[float, float] = (0.5, 1.5),
        bias_correction: bool = True,
        warmup_steps: int = 0,
        eps: float = 1e-8,
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
        mapping = self.default_mapping if mapping is None else mapping
        check_weighting_options(
            decay=decay, mapping=mapping, power=power, weight_bounds=weight_bounds, warmup_steps=warmup_steps, eps=eps
        )
        if not isinstance(bias_correction, bool):
            raise TypeError(f"bias_correction must be a bool, got {bias_correction!r}.")

        self.decay = float(decay)
        self.mapping: Mapping = mapping
        self.power = float(power)
        self.weight_bounds = (float(weight_bounds[0]), float(weight_bounds[1]))
        self.bias_correction = bias_correction
        self.warmup_steps = warmup_steps
        self.eps = float(eps)

        self.register_buffer("ema_statistic", torch.zeros(2, dtype=torch.float32))
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.int64))

    def batch_statistic(self, summary: DirectionSummary) -> Tensor:
        """Return the ``(2,)`` non-negative difficulty statistic of this batch, image->text first."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Keep the moving average in float32 when the module is cast with .half(), .to(dtype) and the like,
        # because a float16 average of a variance overflows and bfloat16 rounds it to 3 digits. The device
        # still follows the cast.
        ema_statistic = self.ema_statistic
        result = super()._apply(fn, recurse)
        if self.ema_statistic.dtype != torch.float32:
            self.ema_statistic = ema_statistic.to(device=self.ema_statistic.device, dtype=torch.float32)
        return result

    def reset_statistics(self) -> None:
        """Forget the moving average, so the next step starts again from equal weights."""
        self.ema_statistic.zero_()
        self.ema_step.zero_()

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
        """Compute the loss and, in training mode, update the moving average.

        Returns the 0-d loss; ``{"contrastive_loss": loss}`` with ``output_dict``; a
        :class:`ContrastiveLossOutput` with ``return_details``; a flat dict with both. In distributed
        training, ``batch_sizes`` (every rank's batch size in rank order, the same list on every rank)
        skips the ``all_gather`` that otherwise exchanges the sizes each step.
        """
        output = adaptive_info_nce(
            image_features,
            text_features,
            logit_scale,
            statistic_fn=self.batch_statistic,
            mapping=self.mapping,
            power=self.power,
            weight_bounds=self.weight_bounds,
            eps=self.eps,
            image_ids=image_ids,
            normalize=self.normalize,
            ema_statistic=self.ema_statistic,
            ema_step=self.ema_step,
            decay=self.decay,
            update_ema=self.training,
            bias_correction=self.bias_correction,
            warmup_steps=self.warmup_steps,
            return_details=True if return_details else False,
            validate_values=self.validate_values,
            batch_sizes=batch_sizes,
            chunk_size=self.chunk_size,
            **self.distributed_options(),
        )
        if isinstance(output, ContrastiveLossOutput):
            return self.format_output(output, output_dict, return_details)
        return {"contrastive_loss": output} if output_dict else output

    @property
    def weights(self) -> Tensor:
        """The ``(2,)`` weights that the next eval-mode forward would use, image->text first."""
        from .weighting import debiased_ema, warmup_weights, weights_from_statistics

        smoothed = debiased_ema(self.ema_statistic, self.ema_step, self.decay, self.bias_correction)
        weights = weights_from_statistics(
            smoothed, mapping=self.mapping, power=self.power, weight_bounds=self.weight_bounds, eps=self.eps
        )
        return warmup_weights(weights, self.ema_step, self.warmup_steps)

    def extra_repr(self) -> str:
        return (
            f"decay={self.decay}, mapping={self.mapping!r}, power={self.power}, weight_bounds={self.weight_bounds}, "
            f"bias_correction={self.bias_correction}, warmup_steps={self.warmup_steps}, {super().extra_repr()}"
        )


class VarianceAwareInfoNCE(AdaptiveInfoNCE):
    """Adaptive InfoNCE weighted by the variance of each direction's alignment predictions.

    The statistic is the variance over the batch of a per-pair alignment score, computed separately
    under the image->text softmax (over each row) and the text->image softmax (over each column).
    With the default ``mapping="direct"`` the direction whose predictions vary more gets more weight.

    Args:
        statistic: the per-pair alignment score. ``"log_prob"`` (default): the log-probability of the
            positive, which is minus the pair's cross-entropy. ``"prob"``: the softmax probability of the
            positive. ``"logit"``: the positive logit minus the mean logit of its row or column.
        **kwargs: the options of :class:`AdaptiveInfoNCE`.
    """

    def __init__(self, *, statistic: strategies.VarianceStatistic = "log_prob", **kwargs) -> None:
        if statistic not in strategies.VARIANCE_STATISTICS:
            raise ValueError(f"statistic must be one of {strategies.VARIANCE_STATISTICS}, got {statistic!r}.")
        super().__init__(**kwargs)
        self.statistic = statistic

    def batch_statistic(self, summary: DirectionSummary) -> Tensor:
        return strategies.variance_statistic(summary, self.statistic)

    def extra_repr(self) -> str:
        return f"statistic={self.statistic!r}, {super().extra_repr()}"


class EntropyWeighted(AdaptiveInfoNCE):
    """Adaptive InfoNCE weighted by each direction's mean softmax entropy.

    A direction whose softmax is flatter (higher entropy, less confident) gets more weight with the
    default ``mapping="direct"``.

    Args:
        **kwargs: the options of :class:`AdaptiveInfoNCE`.
    """

    def batch_statistic(self, summary: DirectionSummary) -> Tensor:
        return strategies.entropy_statistic(summary)


class SpreadWeighted(AdaptiveInfoNCE):
    """Adaptive InfoNCE weighted by the spread of similarities seen from each direction.

    The statistic is the mean over rows (image->text) or columns (text->image) of the standard
    deviation of the similarities ``X @ Y.T`` (cosines for normalised features). A smaller spread means
    the positives stand out less, so the default ``mapping="inverse"`` gives that direction more weight.

    Args:
        **kwargs: the options of :class:`AdaptiveInfoNCE`.
    """

    default_mapping: Mapping = "inverse"

    def batch_statistic(self, summary: DirectionSummary) -> Tensor:
        return strategies.spread_statistic(summary)
