"""Helpers shared by the Flickr8k example tests: tiny image files, fixture captions and the local copy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]


def local_flickr8k_dir() -> Path | None:
    """Return the local Flickr8k copy from $FLICKR8K_DIR or ../shared/flickr8k next to the repository, if present."""
    candidates = []
    if os.environ.get("FLICKR8K_DIR"):
        candidates.append(Path(os.environ["FLICKR8K_DIR"]))
    candidates.append(REPO_ROOT.parent / "shared" / "flickr8k")
    for candidate in candidates:
        if (candidate / "Flickr8k_text").is_dir() or (candidate / "captions.txt").is_file():
            return candidate.resolve()
    return None


def write_image(path: Path, seed: int, size: int = 16) -> None:
    """Write a small random RGB JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


TINY_SPLITS = {
    "train": ["a.jpg", "b.jpg", "c.jpg"],
    "dev": ["d.jpg"],
    "test": ["e.jpg"],
}
TINY_IMAGES = [name for names in TINY_SPLITS.values() for name in names]


def caption_of(name: str, index: int) -> str:
    """Return the caption text used by the fixtures for image ``name``."""
    return f"caption {index} of {name.removesuffix('.jpg')}"
