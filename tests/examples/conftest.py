"""Fixtures for the Flickr8k example tests; puts the repository root on sys.path for ``examples.flickr8k``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from flickr8k_helpers import TINY_IMAGES, TINY_SPLITS, caption_of, write_image  # noqa: E402


@pytest.fixture
def original_layout(tmp_path: Path) -> Path:
    """A tiny dataset in the original layout; the token file also names a missing image, "ghost.jpg.1"."""
    root = tmp_path / "original"
    for seed, name in enumerate(TINY_IMAGES):
        write_image(root / "Flicker8k_Dataset" / name, seed)
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    lines = [f"{name}#{index}\t{caption_of(name, index)}" for name in TINY_IMAGES for index in range(5)]
    lines += [f"ghost.jpg.1#{index}\tA caption whose image is missing ." for index in range(5)]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, file_name in (("train", "Flickr_8k.trainImages.txt"), ("dev", "Flickr_8k.devImages.txt"),
                             ("test", "Flickr_8k.testImages.txt")):
        (text / file_name).write_text("\n".join(TINY_SPLITS[split]) + "\n", encoding="utf-8")
    return root
