"""End-to-end fine-tuning of the last blocks of EfficientNet-Lite0, for users with a GPU.

With ``--finetune-blocks K`` the image side of every run is uint8 pixels instead of cached
features. The images are decoded once into memory. Each run trains a fresh copy of the pretrained
encoder in which the last K MBConv blocks and the head convolution receive gradients. The whole
encoder stays in eval mode, so BatchNorm running statistics are not updated, the usual choice for
fine-tuning with small batches. The caption encoder stays frozen and cached.

On a CPU this is slow: each dev evaluation re-encodes every dev image.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .encoders import EfficientNetLite0Encoder, ImageEncoder, load_image

logger = logging.getLogger(__name__)


class FineTunedImageTower(nn.Module):
    """EfficientNet-Lite0 that maps (N, H, W, 3) uint8 pixels to (N, 1280) pooled features.

    Args:
        encoder: the frozen encoder to copy; its weights are not modified.
        trainable_blocks: number of final MBConv blocks that receive gradients, with the head
            convolution and its BatchNorm. Must be between 1 and the number of blocks (16).
    """

    def __init__(self, encoder: ImageEncoder, trainable_blocks: int) -> None:
        super().__init__()
        if not isinstance(encoder, EfficientNetLite0Encoder):
            raise ValueError(f"Fine-tuning supports only the efficientnet-lite0 encoder, got {encoder.name!r}.")
        self.output_dim = encoder.dim
        self.model = copy.deepcopy(encoder.model)
        num_blocks = len(self.model._blocks)
        if not 1 <= trainable_blocks <= num_blocks:
            raise ValueError(f"Invalid --finetune-blocks {trainable_blocks}: expected 1 to {num_blocks}.")

        self.model.requires_grad_(False)
        for module in [*self.model._blocks[-trainable_blocks:], self.model._conv_head, self.model._bn1]:
            module.requires_grad_(True)
        self.register_buffer("mean", torch.tensor(encoder.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(encoder.std).view(1, 3, 1, 1), persistent=False)
        self.model.eval()

    def train(self, mode: bool = True) -> "FineTunedImageTower":
        """Keep the encoder in eval mode, so BatchNorm statistics and drop-connect stay fixed."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode (N, H, W, 3) uint8 pixels to (N, 1280) features."""
        images = pixels.permute(0, 3, 1, 2).float() / 255.0
        images = (images - self.mean) / self.std
        return self.model.extract_features(images).mean(dim=(2, 3))


def load_pixels(paths: list[Path], image_size: int, description: str = "decode images") -> torch.Tensor:
    """Decode and resize images into one (N, image_size, image_size, 3) uint8 tensor (about 150 KB per image)."""
    pixels = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    for index, path in enumerate(tqdm(paths, desc=description, unit="img")):
        pixels[index] = np.round(load_image(path, image_size) * 255.0).astype(np.uint8)
    return torch.from_numpy(pixels)
