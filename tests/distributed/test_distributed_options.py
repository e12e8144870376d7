"""Distributed options in one process: validation, errors without a process group, and no change at world size 1."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

import adaptive_contrastive as ac
from adaptive_contrastive.distributed import GroupInfo, gather_batch, resolve_group

import ddp_helpers

LOSS_CLASSES = (ac.SymmetricInfoNCE, ac.VarianceAwareInfoNCE, ac.EntropyWeighted, ac.SpreadWeighted)


def make_features(rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    image_features = torch.nn.functional.normalize(torch.randn(rows, 4, generator=generator), dim=-1)
    text_features = torch.nn.functional.normalize(torch.randn(rows, 4, generator=generator), dim=-1)
    return image_features, text_features


@pytest.mark.parametrize(
    ("options", "error", "fragment"),
    [
        ({"local_loss": 1}, TypeError, "local_loss must be a bool"),
        ({"gather_with_grad": "yes"}, TypeError, "gather_with_grad must be a bool"),
        ({"world_size": 0}, ValueError, "world_size must be None"),
        ({"world_size": True}, ValueError, "world_size must be None"),
        ({"world_size": 2.0}, ValueError, "world_size must be None"),
        ({"rank": -1}, ValueError, "rank must be None"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank must be smaller than world_size"),
        ({"process_group": "nccl"}, TypeError, "process_group must be a torch.distributed.ProcessGroup"),
    ],
)
@pytest.mark.parametrize("loss_class", LOSS_CLASSES, ids=lambda loss_class: loss_class.__name__)
def test_invalid_option_raises(loss_class, options, error, fragment) -> None:
    with pytest.raises(error, match=fragment):
        loss_class(**options)


@pytest.mark.parametrize("loss_class", LOSS_CLASSES, ids=lambda loss_class: loss_class.__name__)
def test_world_size_without_group_raises(loss_class) -> None:
    image_features, text_features = make_features()
    loss_fn = loss_class(world_size=2)

    with pytest.raises(ValueError, match=r"world_size=2 .*init_process_group"):
        loss_fn(image_features, text_features, 10.0)


def test_rank_without_group_raises() -> None:
    image_features, text_features = make_features()

    with pytest.raises(ValueError, match=r"rank=1 needs an initialised process group"):
        ac.SymmetricInfoNCE(rank=1)(image_features, text_features, 10.0)


def test_resolve_group_without_group() -> None:
    assert resolve_group() == GroupInfo(rank=0, world_size=1, group=None)
    assert resolve_group(rank=0, world_size=1) == GroupInfo(rank=0, world_size=1, group=None)


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("loss_class", LOSS_CLASSES, ids=lambda loss_class: loss_class.__name__)
def test_single_process_options_change_nothing(loss_class, local_loss: bool) -> None:
    image_features, text_features = make_features()
    image_ids = torch.tensor([0, 1, 1, 2, 3, 0])
    plain = loss_class()
    with_options = loss_class(local_loss=local_loss, gather_with_grad=False, rank=0, world_size=1)

    for step in range(3):
        expected = plain(image_features, text_features, 10.0, image_ids=image_ids, return_details=True)
        actual = with_options(image_features, text_features, 10.0, image_ids=image_ids, return_details=True)
        assert torch.equal(actual.loss, expected.loss), f"step {step}"
        assert torch.equal(actual.weight_i2t, expected.weight_i2t), f"step {step}"

    for name, buffer in plain.named_buffers():
        assert torch.equal(dict(with_options.named_buffers())[name], buffer), name


def test_gather_batch_single_process_returns_inputs() -> None:
    image_features, text_features = make_features()

    batch = gather_batch(image_features, text_features, None, GroupInfo(0, 1, None), None)

    assert batch.image_features is image_features
    assert batch.text_features is text_features
    assert batch.batch_sizes == (6,)
    assert batch.offset == 0


@pytest.fixture
def single_process_group():
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{ddp_helpers.find_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss_class", LOSS_CLASSES, ids=lambda loss_class: loss_class.__name__)
def test_group_of_one_changes_nothing(single_process_group, loss_class) -> None:
    image_features, text_features = make_features()
    expected = loss_class(world_size=1)(image_features, text_features, 10.0)

    from_default_group = loss_class()(image_features, text_features, 10.0)
    from_new_group = loss_class(process_group=dist.new_group([0]), rank=0)(image_features, text_features, 10.0)

    assert torch.equal(from_default_group, expected)
    assert torch.equal(from_new_group, expected)


def test_group_size_mismatch_raises(single_process_group) -> None:
    image_features, text_features = make_features()

    with pytest.raises(ValueError, match=r"world_size=4 does not match the size of the process group \(1\)"):
        ac.SymmetricInfoNCE(world_size=4)(image_features, text_features, 10.0)
