"""Fine-tuning tower: which parameters train, frozen BatchNorm, and the original encoder untouched."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch", reason="the examples extra is not installed")

from examples.flickr8k.encoders import EfficientNetLite0Encoder  # noqa: E402
from examples.flickr8k.finetune import FineTunedImageTower  # noqa: E402


@pytest.fixture(scope="module")
def encoder() -> EfficientNetLite0Encoder:
    return EfficientNetLite0Encoder()


def test_tower_trains_last_blocks_only(encoder) -> None:
    tower = FineTunedImageTower(encoder, trainable_blocks=2).train()
    pixels = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)

    features = tower(pixels)
    features.sum().backward()

    assert features.shape == (2, 1280)
    assert all(parameter.grad is not None for parameter in tower.model._blocks[-1].parameters())
    assert all(parameter.grad is not None for parameter in tower.model._conv_head.parameters())
    assert all(parameter.grad is None for parameter in tower.model._blocks[-3].parameters())
    assert all(parameter.grad is None for parameter in tower.model._conv_stem.parameters())
    assert not tower.model.training
    assert not any(parameter.requires_grad for parameter in encoder.model.parameters())


def test_tower_matches_frozen_encoder(encoder) -> None:
    tower = FineTunedImageTower(encoder, trainable_blocks=1)
    pixels = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)

    with torch.no_grad():
        tuned = tower(pixels)
    frozen = encoder.encode(pixels.float() / 255.0)

    torch.testing.assert_close(tuned, frozen, rtol=1e-4, atol=1e-4)


def test_tower_rejects_invalid_block_count(encoder) -> None:
    with pytest.raises(ValueError, match="--finetune-blocks 0"):
        FineTunedImageTower(encoder, trainable_blocks=0)
    with pytest.raises(ValueError, match="expected 1 to 16"):
        FineTunedImageTower(encoder, trainable_blocks=17)
