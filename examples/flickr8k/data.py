"""Flickr8k loaders for the original, Kaggle and Karpathy layouts.

Every loader returns a :class:`Flickr8k` with one entry per image that exists on disk and one
entry per caption whose image exists. Captions that name a missing image are skipped and
counted, because the published token file contains 5 captions for "2258277193_586949ec62.jpg.1",
an image that is not in the archive.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "FLICKR8K_DIR"
SPLITS = ("train", "dev", "test")
LAYOUTS = ("auto", "original", "kaggle", "karpathy")

HOW_TO_GET = (
    "Get Flickr8k with `python examples/flickr8k/run.py --download --data-dir DIR`, "
    "or unpack Flickr8k_Dataset.zip and Flickr8k_text.zip into DIR yourself."
)

ORIGINAL_IMAGE_DIR = "Flicker8k_Dataset"  # sic: the dataset's own spelling
ORIGINAL_TEXT_DIR = "Flickr8k_text"
ORIGINAL_TOKEN_FILE = "Flickr8k.token.txt"
ORIGINAL_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
KAGGLE_IMAGE_DIR = "Images"
KAGGLE_CAPTION_FILE = "captions.txt"
KARPATHY_FILE = "dataset_flickr8k.json"
KARPATHY_SPLIT_NAMES = {"train": "train", "val": "dev", "restval": "train", "test": "test"}


class DatasetFileNotFoundError(FileNotFoundError):
    """A file or folder that the Flickr8k loader requires is missing."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"Flickr8k {what} not found: {path}. {HOW_TO_GET}")
        self.path = path


@dataclass
class Flickr8k:
    """Flickr8k images, captions and splits.

    Attributes:
        root: dataset folder.
        layout: "original", "kaggle" or "karpathy".
        image_names: (num_images,) file names, sorted.
        image_paths: (num_images,) absolute paths, aligned with ``image_names``.
        captions: (num_captions,) caption strings.
        caption_image: (num_captions,) int64 index into ``image_names`` of each caption's image.
        splits: split name ("train", "dev", "test") to a sorted int64 array of image indices.
        skipped_captions: captions dropped because their image file is missing.
        skipped_split_images: split-file entries dropped because the image file is missing.
    """

    root: Path
    layout: str
    image_names: list[str]
    image_paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray
    splits: dict[str, np.ndarray]
    skipped_captions: int = 0
    skipped_split_images: int = 0
    notes: list[str] = field(default_factory=list)

    def captions_of(self, image_indices: np.ndarray) -> np.ndarray:
        """Return the sorted caption indices whose image is in ``image_indices``."""
        mask = np.isin(self.caption_image, np.asarray(image_indices, dtype=np.int64))
        return np.flatnonzero(mask)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """Return the dataset folder from the argument, else from $FLICKR8K_DIR.

    Raises:
        ValueError: if neither is set.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        raise ValueError(
            f"No Flickr8k folder given: pass --data-dir DIR or set ${DATA_DIR_ENV}. {HOW_TO_GET}"
        )
    return Path(data_dir).expanduser().resolve()


def detect_layout(root: Path) -> str:
    """Return "karpathy", "original" or "kaggle" from the files present in ``root``."""
    if (root / KARPATHY_FILE).is_file():
        return "karpathy"
    if (root / ORIGINAL_TEXT_DIR / ORIGINAL_TOKEN_FILE).is_file() or (root / ORIGINAL_IMAGE_DIR).is_dir():
        return "original"
    if (root / KAGGLE_CAPTION_FILE).is_file() or (root / KAGGLE_IMAGE_DIR).is_dir():
        return "kaggle"
    raise DatasetFileNotFoundError(
        root / ORIGINAL_TEXT_DIR / ORIGINAL_TOKEN_FILE,
        f"caption file (none of {ORIGINAL_TEXT_DIR}/{ORIGINAL_TOKEN_FILE}, {KAGGLE_CAPTION_FILE} "
        f"or {KARPATHY_FILE} is in {root})",
    )


def load_flickr8k(data_dir: str | os.PathLike | None, layout: str = "auto") -> Flickr8k:
    """Load Flickr8k from ``data_dir`` (or $FLICKR8K_DIR) in the given or detected layout.

    Raises:
        DatasetFileNotFoundError: a required file or folder is missing; the message names it.
        ValueError: unknown layout, or no folder given.
    """
    root = resolve_data_dir(data_dir)
    if not root.is_dir():
        raise DatasetFileNotFoundError(root, "folder")
    if layout not in LAYOUTS:
        raise ValueError(f"Invalid layout {layout!r}: expected one of {', '.join(LAYOUTS)}.")
    if layout == "auto":
        layout = detect_layout(root)

    if layout == "original":
        dataset = _load_original(root)
    elif layout == "kaggle":
        dataset = _load_kaggle(root)
    else:
        dataset = _load_karpathy(root)

    split_sizes = ", ".join(f"{name} {len(dataset.splits[name])}" for name in SPLITS)
    logger.info(
        "Loaded Flickr8k (%s layout) from %s: %d images, %d captions, splits: %s.",
        layout, root, len(dataset.image_names), len(dataset.captions), split_sizes,
    )
    if dataset.skipped_captions:
        logger.warning("Skipped %d captions whose image file is missing.", dataset.skipped_captions)
    if dataset.skipped_split_images:
        logger.warning(
            "Skipped %d split-file entries whose image file is missing.", dataset.skipped_split_images
        )
    return dataset


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetFileNotFoundError(path, what)
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetFileNotFoundError(path, what)
    return path


def _list_images(image_dir: Path) -> dict[str, Path]:
    suffixes = {".jpg", ".jpeg", ".png"}
    return {
        entry.name: entry.resolve()
        for entry in image_dir.iterdir()
        if entry.is_file() and entry.suffix.lower() in suffixes
    }


def _assemble(
    root: Path,
    layout: str,
    available: dict[str, Path],
    caption_pairs: list[tuple[str, str]],
    split_names: dict[str, list[str]],
) -> Flickr8k:
    """Build a :class:`Flickr8k` from (image name, caption) pairs and split name lists.

    Images that no caption and no split refers to are dropped. Pairs and split entries whose
    image is not in ``available`` are skipped and counted.
    """
    referenced = {name for name, _ in caption_pairs if name in available}
    for names in split_names.values():
        referenced.update(name for name in names if name in available)
    image_names = sorted(referenced)
    index_of = {name: index for index, name in enumerate(image_names)}

    captions: list[str] = []
    caption_image: list[int] = []
    skipped_captions = 0
    for name, caption in caption_pairs:
        if name not in index_of:
            skipped_captions += 1
            continue
        captions.append(caption)
        caption_image.append(index_of[name])

    splits: dict[str, np.ndarray] = {}
    skipped_split_images = 0
    for split in SPLITS:
        indices = []
        for name in split_names.get(split, []):
            if name in index_of:
                indices.append(index_of[name])
            else:
                skipped_split_images += 1
        splits[split] = np.array(sorted(set(indices)), dtype=np.int64)

    return Flickr8k(
        root=root,
        layout=layout,
        image_names=image_names,
        image_paths=[available[name] for name in image_names],
        captions=captions,
        caption_image=np.array(caption_image, dtype=np.int64),
        splits=splits,
        skipped_captions=skipped_captions,
        skipped_split_images=skipped_split_images,
    )


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _load_original(root: Path) -> Flickr8k:
    """Load ``Flicker8k_Dataset/`` with ``Flickr8k_text/Flickr8k.token.txt`` and the split files."""
    image_dir = _require_dir(root / ORIGINAL_IMAGE_DIR, "image folder")
    text_dir = _require_dir(root / ORIGINAL_TEXT_DIR, "text folder")
    token_file = _require_file(text_dir / ORIGINAL_TOKEN_FILE, "caption file")
    split_files = {
        split: _require_file(text_dir / name, f"{split} split file")
        for split, name in ORIGINAL_SPLIT_FILES.items()
    }

    caption_pairs = []
    for line_number, line in enumerate(_read_lines(token_file), start=1):
        key, separator, caption = line.partition("\t")
        if not separator:
            raise ValueError(f"Invalid line {line_number} in {token_file}: expected '<image>#<n>\\t<caption>'.")
        image_name = key.rsplit("#", 1)[0]
        caption_pairs.append((image_name, caption.strip()))

    split_names = {split: _read_lines(path) for split, path in split_files.items()}
    return _assemble(root, "original", _list_images(image_dir), caption_pairs, split_names)


def _find_split_files(root: Path) -> dict[str, Path] | None:
    """Return the official split files when they sit in ``root`` or ``root/Flickr8k_text``."""
    for folder in (root, root / ORIGINAL_TEXT_DIR):
        paths = {split: folder / name for split, name in ORIGINAL_SPLIT_FILES.items()}
        if all(path.is_file() for path in paths.values()):
            return paths
    return None


def _load_kaggle(root: Path) -> Flickr8k:
    """Load ``Images/`` with ``captions.txt``, a CSV file with the header ``image,caption``.

    The Kaggle copy ships no split files. The official split files are used when they sit next
    to ``captions.txt`` or in ``Flickr8k_text/``. Otherwise the images are split 6000/1000/1000
    at random with seed 0, and results are not comparable with the official test split.
    """
    image_dir = _require_dir(root / KAGGLE_IMAGE_DIR, "image folder")
    caption_file = _require_file(root / KAGGLE_CAPTION_FILE, "caption file")

    caption_pairs = []
    with open(caption_file, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"Invalid header in {caption_file}: expected 'image,caption', got {reader.fieldnames}.")
        for row in reader:
            caption_pairs.append((row["image"].strip(), row["caption"].strip()))

    available = _list_images(image_dir)
    split_files = _find_split_files(root)
    notes = []
    if split_files is not None:
        split_names = {split: _read_lines(path) for split, path in split_files.items()}
    else:
        names = sorted({name for name, _ in caption_pairs if name in available})
        order = np.random.default_rng(0).permutation(len(names))
        shuffled = [names[index] for index in order]
        num_test = min(1000, len(names) // 8)
        num_dev = min(1000, len(names) // 8)
        split_names = {
            "test": shuffled[:num_test],
            "dev": shuffled[num_test:num_test + num_dev],
            "train": shuffled[num_test + num_dev:],
        }
        message = (
            f"No official split files found in {root}; using a random split with seed 0. "
            "Results are not comparable with the official test split."
        )
        logger.warning(message)
        notes.append(message)

    dataset = _assemble(root, "kaggle", available, caption_pairs, split_names)
    dataset.notes.extend(notes)
    return dataset


def _load_karpathy(root: Path) -> Flickr8k:
    """Load Karpathy's ``dataset_flickr8k.json`` with images from ``Flicker8k_Dataset/`` or ``Images/``.

    Karpathy's "val" split is the dev split, and "restval" (absent in Flickr8k) would join train.
    """
    json_file = _require_file(root / KARPATHY_FILE, "Karpathy split file")
    image_dir = next(
        (root / name for name in (ORIGINAL_IMAGE_DIR, KAGGLE_IMAGE_DIR, "images") if (root / name).is_dir()),
        None,
    )
    if image_dir is None:
        raise DatasetFileNotFoundError(root / ORIGINAL_IMAGE_DIR, f"image folder (or {KAGGLE_IMAGE_DIR}/)")

    with open(json_file, encoding="utf-8") as handle:
        content = json.load(handle)

    caption_pairs = []
    split_names: dict[str, list[str]] = {split: [] for split in SPLITS}
    for entry in content["images"]:
        name = entry["filename"]
        split = KARPATHY_SPLIT_NAMES.get(entry.get("split", "train"))
        if split is None:
            raise ValueError(f"Invalid split {entry.get('split')!r} for {name} in {json_file}.")
        split_names[split].append(name)
        for sentence in entry["sentences"]:
            raw = sentence.get("raw") or " ".join(sentence["tokens"])
            caption_pairs.append((name, raw.strip()))

    return _assemble(root, "karpathy", _list_images(image_dir), caption_pairs, split_names)
