"""Shared ``nn.Module`` plumbing: the open_clip-style helpers and the output formats."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .dispatch import check_chunk_size
from .distributed import check_distributed_options
from .outputs import ContrastiveLossOutput

LossResult = Union[Tensor, dict, ContrastiveLossOutput]


class ContrastiveLoss(nn.Module):
    """Base class of the image-text contrastive losses in this package.

    Subclasses implement ``forward``; this class holds the options every loss shares and the
    open_clip-style helpers that subclasses and users reuse.

    Args:
        normalize: L2-normalise both inputs in float32 before the similarity matrix. Leave it off when
            the model already normalises its embeddings, as CLIP models do.
        validate_values: check, with one host synchronisation per forward, that the loss is finite and
            that a tensor ``logit_scale`` is positive, and raise a ``ValueError`` naming the bad input
            otherwise. The check is skipped inside ``torch.compile``.
        local_loss: in distributed training, score only this rank's rows against the columns of all
            ranks. The returned loss is then this rank's share, scaled so that its mean over ranks is the
            loss of the global batch. Default ``False``: every rank computes the full global matrix.
        gather_with_grad: let gradients flow back through the gathered features of other ranks. With
            ``False`` they are detached, as in open_clip, and the encoder gradients are no longer the
            single-process ones (see ``docs/distributed.md``).
        rank: this process's rank in the group. ``None`` takes it from the process group, and a given
            value must match it.
        world_size: number of ranks to gather over. ``None`` takes it from ``process_group`` or the
            initialised default group (1 without one). ``1`` turns gathering off.
        process_group: the ``torch.distributed`` group to gather over. ``None`` is the default group.
        chunk_size: ``None`` (default) computes the full ``(N, N)`` similarity matrix. A positive int
            computes it ``chunk_size`` rows at a time and recomputes each chunk in the backward pass, so
            the extra memory is about ``3 * chunk_size * N`` floats in place of several ``N * N``, for about
            one more matrix product of time. Gradients are the same up to float rounding. CUDA tensors
            with ``triton`` installed use the tiled kernels, which need no ``(N, N)`` matrix either way.
    """

    def __init__(
        self,
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
        super().__init__()
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}.")
        if not isinstance(validate_values, bool):
            raise TypeError(f"validate_values must be a bool, got {validate_values!r}.")
        check_distributed_options(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            rank=rank,
            world_size=world_size,
            process_group=process_group,
        )
        self.normalize = normalize
        self.validate_values = validate_values
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self.chunk_size = check_chunk_size(chunk_size)

    def distributed_options(self) -> dict[str, Any]:
        """Return the distributed keyword arguments that ``forward`` passes to the functional form."""
        return {
            "local_loss": self.local_loss,
            "gather_with_grad": self.gather_with_grad,
            "rank": self.rank,
            "world_size": self.world_size,
            "process_group": self.process_group,
        }

    @staticmethod
    def get_logits(image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor]) -> tuple[Tensor, Tensor]:
        """Return ``(logits_per_image, logits_per_text)``, each ``(N, N)`` float32, the second the transpose of the first."""
        logits_per_image = logit_scale * (image_features.float() @ text_features.float().T)
        return logits_per_image, logits_per_image.T

    @staticmethod
    def get_ground_truth(num_logits: int, device: torch.device) -> Tensor:
        """Return the ``(N,)`` int64 targets ``arange(N)``: pair ``i`` is row ``i`` of both inputs."""
        return torch.arange(num_logits, device=device, dtype=torch.long)

    @staticmethod
    def format_output(output: ContrastiveLossOutput, output_dict: bool, return_details: bool) -> LossResult:
        """Return the plain loss, open_clip's ``{"contrastive_loss": loss}``, the dataclass, or a flat dict of it."""
        if return_details and output_dict:
            return output.to_dict()
        if return_details:
            return output
        if output_dict:
            return {"contrastive_loss": output.loss}
        return output.loss

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"
