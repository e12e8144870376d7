"""Distributed data parallel support: gathering features across ranks and the two loss layouts.

Every rank has ``n_r`` image-text pairs, and the global batch is their concatenation in rank order,
``N = sum_r n_r`` pairs. Two layouts compute the loss of that global batch:

- Global (the default): every rank gathers all features and computes the full ``N x N`` terms, so every
  rank returns the single-process loss of the global batch.
- Local loss (``local_loss=True``): rank ``r`` scores only its own image rows against all texts and its
  own text rows against all images, ``n_r x N`` each. The returned loss is this rank's share, scaled by
  ``n_r * W / N`` so that the mean over the ``W`` ranks is the single-process loss.

In both layouts the gather is differentiable. Its backward all-reduces (sums) the gradient of the
gathered tensor and returns this rank's rows, so after ``DistributedDataParallel`` averages the
parameter gradients they equal the single-process gradient of the global batch. ``docs/distributed.md``
derives this.

Batch sizes may differ across ranks. Unless the caller passes them, one extra ``all_gather`` of two
integers per rank exchanges them before the features are gathered, and reading them costs one host
synchronisation. Every rank then pads its rows to the largest batch for the feature ``all_gather`` and
trims the padding away.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .dense import ContrastiveTerms

ScaleLike = Union[float, Tensor]


class GroupInfo(NamedTuple):
    """This process's place in the process group that the loss gathers over.

    Attributes:
        rank: rank of this process inside ``group``.
        world_size: number of processes in ``group``. 1 means no gathering.
        group: the process group, or ``None`` for the default group (or for no group when
            ``world_size`` is 1).
    """

    rank: int
    world_size: int
    group: Optional[Any]


class GatheredBatch(NamedTuple):
    """The local rows of one forward pass and the global batch gathered from all ranks.

    Attributes:
        image_features: ``(N, D)`` image features of all ranks in rank order.
        text_features: ``(N, D)`` text features of all ranks.
        image_ids: ``(N,)`` int64 group ids of all ranks, or ``None``.
        local_image_features: ``(n_r, D)`` this rank's image features.
        local_text_features: ``(n_r, D)`` this rank's text features.
        local_image_ids: ``(n_r,)`` this rank's group ids, or ``None``.
        batch_sizes: ``n_r`` of every rank, in rank order.
        offset: index of this rank's first row in the global batch.
    """

    image_features: Tensor
    text_features: Tensor
    image_ids: Optional[Tensor]
    local_image_features: Tensor
    local_text_features: Tensor
    local_image_ids: Optional[Tensor]
    batch_sizes: tuple[int, ...]
    offset: int


def check_distributed_options(
    *,
    local_loss: bool,
    gather_with_grad: bool,
    rank: Optional[int],
    world_size: Optional[int],
    process_group: Optional[Any],
) -> None:
    """Raise ``TypeError`` or ``ValueError`` naming the first invalid distributed option.

    This check reads no process group, so a loss can be built before ``init_process_group`` runs.
    """
    if not isinstance(local_loss, bool):
        raise TypeError(f"local_loss must be a bool, got {local_loss!r}.")
    if not isinstance(gather_with_grad, bool):
        raise TypeError(f"gather_with_grad must be a bool, got {gather_with_grad!r}.")
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1):
        raise ValueError(
            f"world_size must be None (take it from the process group) or an int >= 1, got {world_size!r}."
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0):
        raise ValueError(f"rank must be None (take it from the process group) or an int >= 0, got {rank!r}.")
    if rank is not None and world_size is not None and world_size > 1 and rank >= world_size:
        raise ValueError(f"rank must be smaller than world_size, got rank={rank} and world_size={world_size}.")
    if process_group is not None and dist.is_available() and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup, such as the result of "
            f"torch.distributed.new_group(...), or None for the default group, got {type(process_group).__name__}."
        )


def resolve_group(
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    process_group: Optional[Any] = None,
) -> GroupInfo:
    """Return the rank and size of the group to gather over, from the initialised process group.

    ``world_size=None`` takes the size from ``process_group``, or from the default group when one is
    initialised, and means a single process otherwise. ``world_size=1`` turns gathering off even inside
    an initialised group, so each rank computes the loss of its own batch alone. A given ``rank`` or a
    ``world_size`` above 1 must match the group.

    Raises:
        ValueError: when ``world_size > 1`` or ``process_group`` is given but no process group is
            initialised, or when ``rank`` or ``world_size`` disagrees with the group.
    """
    initialized = dist.is_available() and dist.is_initialized()

    if world_size == 1:
        return GroupInfo(rank=0, world_size=1, group=None)

    if not initialized:
        if process_group is not None or (world_size is not None and world_size > 1):
            raise ValueError(
                f"world_size={world_size!r} and process_group={process_group!r} need an initialised process group, "
                f"but torch.distributed.is_initialized() is False. Call torch.distributed.init_process_group(...) "
                f"before the first forward pass, or leave world_size unset for single-process training."
            )
        if rank not in (None, 0):
            raise ValueError(
                f"rank={rank} needs an initialised process group, but torch.distributed.is_initialized() is False. "
                f"Call torch.distributed.init_process_group(...) first, or leave rank unset."
            )
        return GroupInfo(rank=0, world_size=1, group=None)

    group_rank = dist.get_rank(process_group)
    group_size = dist.get_world_size(process_group)
    if group_rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of process_group. Pass a group that "
            f"contains every rank that calls the loss, or None for the default group."
        )
    if world_size is not None and world_size != group_size:
        raise ValueError(
            f"world_size={world_size} does not match the size of the process group ({group_size}). "
            f"Leave world_size unset to take it from the group, or pass world_size=1 to turn gathering off."
        )
    if rank is not None and rank != group_rank:
        raise ValueError(
            f"rank={rank} does not match this process's rank {group_rank} in the process group. "
            f"Leave rank unset to take it from the group."
        )
    return GroupInfo(rank=group_rank, world_size=group_size, group=process_group)


def exchange_batch_sizes(
    features: Tensor,
    group_info: GroupInfo,
    batch_sizes: Optional[Sequence[int]] = None,
) -> Optional[tuple[int, ...]]:
    """Return every rank's batch size, from ``batch_sizes`` or from one ``all_gather``.

    The exchange also compares the embedding size ``D``, and every rank raises the same error when a
    batch is empty or the sizes disagree, so that no rank is left waiting in a later collective. Reading
    the gathered sizes is a host synchronisation. Pass ``batch_sizes`` to skip both.

    Args:
        features: ``(n_r, D)`` local features of this rank.
        group_info: the group from :func:`resolve_group`.
        batch_sizes: optional ``n_r`` of every rank in rank order, the same list on every rank.

    Returns:
        The ``W`` batch sizes, or ``None`` for a single process or an input that is not a 2-D tensor
        (the input validation then raises the error on this rank).

    Raises:
        ValueError: when a rank's batch is empty, the embedding sizes differ, or ``batch_sizes`` does not
            match the world size or this rank's batch.
    """
    if group_info.world_size == 1 or not isinstance(features, Tensor) or features.dim() != 2:
        return None

    local_size = features.shape[0]
    if batch_sizes is not None:
        sizes = _check_batch_sizes(batch_sizes, group_info)
        if sizes[group_info.rank] != local_size:
            raise ValueError(
                f"batch_sizes[{group_info.rank}] = {sizes[group_info.rank]} but this rank's batch has {local_size} rows. "
                f"Pass the true per-rank sizes, or batch_sizes=None to exchange them with one all_gather."
            )
        return sizes

    local_shape = torch.tensor([local_size, features.shape[1]], dtype=torch.int64, device=features.device)
    shapes = [torch.empty_like(local_shape) for _ in range(group_info.world_size)]
    dist.all_gather(shapes, local_shape, group=group_info.group)
    rows = torch.stack(shapes).tolist()

    sizes = tuple(int(row[0]) for row in rows)
    embedding_sizes = [int(row[1]) for row in rows]
    if any(size == 0 for size in sizes):
        raise ValueError(
            f"every rank needs at least one image-text pair, but the batch sizes per rank are {list(sizes)}. "
            f"Skip the step on all ranks together, or balance the batches, for example with DistributedSampler."
        )
    if len(set(embedding_sizes)) != 1:
        raise ValueError(
            f"every rank must have the same embedding size D, but the sizes per rank are {embedding_sizes}."
        )
    return sizes


def _check_batch_sizes(batch_sizes: Sequence[int], group_info: GroupInfo) -> tuple[int, ...]:
    if isinstance(batch_sizes, Tensor):
        batch_sizes = batch_sizes.tolist()
    sizes = tuple(batch_sizes)
    if len(sizes) != group_info.world_size:
        raise ValueError(
            f"batch_sizes must hold one size per rank ({group_info.world_size} values), got {list(sizes)}."
        )
    if not all(isinstance(size, numbers.Integral) and not isinstance(size, bool) for size in sizes):
        raise TypeError(f"batch_sizes must hold ints, got {list(sizes)}.")
    if any(size < 1 for size in sizes):
        raise ValueError(
            f"every rank needs at least one image-text pair, but batch_sizes is {list(sizes)}. "
            f"Skip the step on all ranks together, or balance the batches."
        )
    return tuple(int(size) for size in sizes)


def _all_gather_rows(tensor: Tensor, batch_sizes: Sequence[int], group_info: GroupInfo) -> Tensor:
    """Gather ``(n_r, ...)`` tensors of possibly different ``n_r`` into one ``(N, ...)`` tensor in rank order."""
    max_size = max(batch_sizes)
    tensor = tensor.contiguous()

    padded = tensor
    if tensor.shape[0] < max_size:
        padding = tensor.new_zeros((max_size - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, padding])

    buffers = [torch.empty_like(padded) for _ in range(group_info.world_size)]
    dist.all_gather(buffers, padded, group=group_info.group)
    return torch.cat([buffer[:size] for buffer, size in zip(buffers, batch_sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """``all_gather`` of rows whose backward sums the output gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, batch_sizes: tuple[int, ...], group_info: GroupInfo) -> Tensor:
        ctx.group_info = group_info
        ctx.start = sum(batch_sizes[: group_info.rank])
        ctx.stop = ctx.start + batch_sizes[group_info.rank]
        return _all_gather_rows(tensor, batch_sizes, group_info)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], None, None]:
        # Every rank's loss may depend on every gathered row, so the gradient of this rank's rows is the
        # sum over ranks of each rank's gradient for them. The clone keeps the in-place all_reduce off a
        # gradient buffer that autograd may still read.
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group_info.group)
        return grad[ctx.start : ctx.stop], None, None


def all_gather_with_grad(tensor: Tensor, batch_sizes: Sequence[int], group_info: GroupInfo) -> Tensor:
    """Gather every rank's rows in rank order, differentiably.

    The backward pass runs one ``all_reduce`` of the ``(N, ...)`` gradient, so every rank must run the
    backward of this gather (or of none), in the same order as the other collectives.

    Args:
        tensor: ``(n_r, ...)`` local rows.
        batch_sizes: ``n_r`` of every rank, from :func:`exchange_batch_sizes`.
        group_info: the group from :func:`resolve_group`.

    Returns:
        ``(N, ...)`` tensor, ``N = sum(batch_sizes)``, whose rows ``offset : offset + n_r`` are ``tensor``.
    """
    return _AllGatherWithGrad.apply(tensor, tuple(batch_sizes), group_info)


def all_gather_without_grad(tensor: Tensor, batch_sizes: Sequence[int], group_info: GroupInfo) -> Tensor:
    """Gather every rank's rows in rank order, with gradient only through this rank's own rows.

    The other ranks' rows are detached, as in open_clip's ``gather_with_grad=False``. The backward pass
    runs no collective.
    """
    with torch.no_grad():
        gathered = _all_gather_rows(tensor.detach(), batch_sizes, group_info)

    start = sum(batch_sizes[: group_info.rank])
    stop = start + batch_sizes[group_info.rank]
    return torch.cat([gathered[:start], tensor, gathered[stop:]])


def gather_batch(
    image_features: Tensor,
    text_features: Tensor,
    image_ids: Optional[Tensor],
    group_info: GroupInfo,
    batch_sizes: Optional[Sequence[int]],
    *,
    gather_with_grad: bool = True,
) -> GatheredBatch:
    """Gather the features and ids of every rank, or wrap the local batch for a single process.

    Args:
        image_features, text_features: ``(n_r, D)`` validated local features.
        image_ids: optional ``(n_r,)`` integer group ids. Ids must name the image across the global
            batch (a dataset index, say), because equal ids on different ranks become positives.
        group_info: the group from :func:`resolve_group`.
        batch_sizes: the sizes from :func:`exchange_batch_sizes`; ``None`` for a single process.
        gather_with_grad: let gradients flow back to the rank that owns each gathered row.

    Returns:
        A :class:`GatheredBatch`. For a single process its global and local fields are the inputs.
    """
    if group_info.world_size == 1 or batch_sizes is None:
        sizes = (image_features.shape[0],)
        return GatheredBatch(image_features, text_features, image_ids, image_features, text_features, image_ids, sizes, 0)

    gather = all_gather_with_grad if gather_with_grad else all_gather_without_grad
    embedding_size = image_features.shape[1]

    # One gather moves both modalities when their dtypes agree, which halves the collectives.
    if image_features.dtype == text_features.dtype:
        pairs = gather(torch.cat([image_features, text_features], dim=1), batch_sizes, group_info)
        all_image_features, all_text_features = pairs[:, :embedding_size], pairs[:, embedding_size:]
    else:
        all_image_features = gather(image_features, batch_sizes, group_info)
        all_text_features = gather(text_features, batch_sizes, group_info)

    all_image_ids = None
    if image_ids is not None:
        all_image_ids = _all_gather_rows(image_ids.to(torch.int64), batch_sizes, group_info)

    offset = sum(batch_sizes[: group_info.rank])
    return GatheredBatch(
        all_image_features,
        all_text_features,
        all_image_ids,
        image_features,
        text_features,
        image_ids,
        tuple(batch_sizes),
        offset,
    )


def prepare_batch(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: ScaleLike,
    *,
    image_ids: Optional[Tensor] = None,
    normalize: bool = False,
    gather_with_grad: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    process_group: Optional[Any] = None,
    batch_sizes: Optional[Sequence[int]] = None,
) -> tuple[GroupInfo, GatheredBatch, ScaleLike]:
    """Validate this rank's inputs and gather the global batch of all ranks.

    The batch sizes are exchanged before the local inputs are validated, so that an empty batch on one
    rank raises the same error on every rank instead of leaving the others waiting in the gather.

    Returns:
        ``(group_info, batch, scale)``: the group, the gathered batch and the validated float ``logit_scale``.
    """
    # functional imports this module, so import its entry points here to avoid an import cycle.
    from .functional import prepare_inputs

    group_info = resolve_group(rank, world_size, process_group)
    batch_sizes = exchange_batch_sizes(image_features, group_info, batch_sizes)
    image_features, text_features, scale = prepare_inputs(
        image_features,
        text_features,
        logit_scale,
        image_ids=image_ids,
        normalize=normalize,
        global_batch_size=None if batch_sizes is None else sum(batch_sizes),
    )

    batch = gather_batch(image_features, text_features, image_ids, group_info, batch_sizes, gather_with_grad=gather_with_grad)
    return group_info, batch, scale


def compute_batch_terms(
    batch: GatheredBatch,
    logit_scale: ScaleLike,
    group_info: GroupInfo,
    *,
    local_loss: bool = False,
    need_statistics: bool = True,
    **compute_options: Any,
) -> ContrastiveTerms:
    """Compute both direction terms of the global batch in the global or the local-loss layout.

    For a single process this is :func:`~adaptive_contrastive.functional.compute_terms` on the local batch.
    With several ranks the returned sums are those of the global batch and identical on every rank. The
    local-loss layout all-reduces them. The global layout broadcasts the sums of the group's first rank,
    so that rounding differences between ranks cannot change the weights.

    In the local-loss layout the two losses are this rank's row means scaled by ``n_r * W / N``, so
    their mean over ranks is the global loss and ``DistributedDataParallel``'s gradient average yields
    the single-process gradient.

    Args:
        batch: the batch from :func:`gather_batch`.
        logit_scale: positive float or 0-d tensor.
        group_info: the group from :func:`resolve_group`.
        local_loss: score only this rank's rows against all columns.
        need_statistics: also compute and synchronise the ``(2, NUM_SUMS)`` sums.
        **compute_options: passed on to ``compute_terms`` and ``compute_direction_terms``.
    """
    # functional imports this module, so import its entry points here to avoid an import cycle.
    from .functional import compute_direction_terms, compute_terms

    if group_info.world_size == 1:
        return compute_terms(
            batch.image_features,
            batch.text_features,
            logit_scale,
            image_ids=batch.image_ids,
            need_statistics=need_statistics,
            **compute_options,
        )

    if not local_loss:
        terms = compute_terms(
            batch.image_features,
            batch.text_features,
            logit_scale,
            image_ids=batch.image_ids,
            need_statistics=need_statistics,
            **compute_options,
        )
        if terms.sums is not None:
            dist.broadcast(terms.sums, src=_global_rank(0, group_info), group=group_info.group)
        return terms

    local_size = batch.local_image_features.shape[0]
    targets = None
    if batch.image_ids is None:
        targets = torch.arange(local_size, device=batch.local_image_features.device) + batch.offset

    loss_i2t, sums_i2t = compute_direction_terms(
        batch.local_image_features,
        batch.text_features,
        logit_scale,
        targets=targets,
        query_ids=batch.local_image_ids,
        key_ids=batch.image_ids,
        need_statistics=need_statistics,
        **compute_options,
    )
    loss_t2i, sums_t2i = compute_direction_terms(
        batch.local_text_features,
        batch.image_features,
        logit_scale,
        targets=targets,
        query_ids=batch.local_image_ids,
        key_ids=batch.image_ids,
        need_statistics=need_statistics,
        **compute_options,
    )

    sums = None
    if need_statistics:
        assert sums_i2t is not None and sums_t2i is not None
        sums = torch.stack([sums_i2t, sums_t2i])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group_info.group)

    share = local_size * group_info.world_size / sum(batch.batch_sizes)
    return ContrastiveTerms(loss_i2t * share, loss_t2i * share, sums)


def _global_rank(group_rank: int, group_info: GroupInfo) -> int:
    if group_info.group is None:
        return group_rank
    return dist.get_global_rank(group_info.group, group_rank)
