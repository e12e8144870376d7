"""Flickr8k loaders on tiny fixtures in the original, Kaggle and Karpathy layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from flickr8k_helpers import TINY_IMAGES, TINY_SPLITS, caption_of, write_image
from examples.flickr8k.data import DatasetFileNotFoundError, load_flickr8k, resolve_data_dir


def check_tiny_dataset(dataset) -> None:
    assert dataset.image_names == sorted(TINY_IMAGES)
    assert len(dataset.captions) == 5 * len(TINY_IMAGES)
    for split, names in TINY_SPLITS.items():
        assert [dataset.image_names[index] for index in dataset.splits[split]] == sorted(names)
    for caption, image in zip(dataset.captions, dataset.caption_image):
        name = dataset.image_names[image]
        assert caption.startswith("caption ")
        assert caption.endswith(name.removesuffix(".jpg"))
    assert all(path.is_file() for path in dataset.image_paths)


def test_original_layout_loads(original_layout: Path) -> None:
    dataset = load_flickr8k(original_layout)

    assert dataset.layout == "original"
    check_tiny_dataset(dataset)


def test_original_layout_skips_missing_image(original_layout: Path) -> None:
    (original_layout / "Flicker8k_Dataset" / "b.jpg").unlink()

    dataset = load_flickr8k(original_layout)

    assert "b.jpg" not in dataset.image_names
    assert "ghost.jpg.1" not in dataset.image_names
    assert dataset.skipped_captions == 5 + 5
    assert dataset.skipped_split_images == 1
    assert len(dataset.captions) == 5 * (len(TINY_IMAGES) - 1)
    assert len(dataset.splits["train"]) == 2


@pytest.mark.parametrize("missing", [
    "Flickr8k_text/Flickr8k.token.txt",
    "Flickr8k_text/Flickr_8k.testImages.txt",
    "Flicker8k_Dataset",
])
def test_original_layout_missing_file(original_layout: Path, missing: str) -> None:
    path = original_layout / missing
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()

    with pytest.raises(DatasetFileNotFoundError) as caught:
        load_flickr8k(original_layout, layout="original")

    message = str(caught.value)
    assert str(path) in message
    assert "--download" in message
    assert "Flickr8k_Dataset.zip" in message


def test_empty_folder_names_caption_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetFileNotFoundError) as caught:
        load_flickr8k(tmp_path)

    assert "Flickr8k.token.txt" in str(caught.value)
    assert "captions.txt" in str(caught.value)


def test_missing_data_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetFileNotFoundError, match="folder not found"):
        load_flickr8k(tmp_path / "absent")


def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLICKR8K_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path.resolve()

    monkeypatch.delenv("FLICKR8K_DIR")
    with pytest.raises(ValueError, match="--data-dir"):
        resolve_data_dir(None)


def make_kaggle(root: Path, with_splits: bool) -> Path:
    for seed, name in enumerate(TINY_IMAGES):
        write_image(root / "Images" / name, seed)
    with open(root / "captions.txt", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for name in TINY_IMAGES + ["missing.jpg"]:
            for index in range(5):
                writer.writerow([name, caption_of(name, index)])
    if with_splits:
        for split, file_name in (("train", "Flickr_8k.trainImages.txt"), ("dev", "Flickr_8k.devImages.txt"),
                                 ("test", "Flickr_8k.testImages.txt")):
            (root / file_name).write_text("\n".join(TINY_SPLITS[split]) + "\n", encoding="utf-8")
    return root


def test_kaggle_layout_loads(tmp_path: Path) -> None:
    dataset = load_flickr8k(make_kaggle(tmp_path, with_splits=True))

    assert dataset.layout == "kaggle"
    check_tiny_dataset(dataset)
    assert dataset.skipped_captions == 5


def test_kaggle_layout_without_split_files(tmp_path: Path) -> None:
    dataset = load_flickr8k(make_kaggle(tmp_path, with_splits=False))

    sizes = {split: len(indices) for split, indices in dataset.splits.items()}
    assert sum(sizes.values()) == len(TINY_IMAGES)
    all_indices = np.concatenate(list(dataset.splits.values()))
    assert len(np.unique(all_indices)) == len(TINY_IMAGES)
    assert any("random split" in note for note in dataset.notes)


def test_kaggle_layout_missing_captions(tmp_path: Path) -> None:
    make_kaggle(tmp_path, with_splits=True)
    (tmp_path / "captions.txt").unlink()

    with pytest.raises(DatasetFileNotFoundError, match="captions.txt"):
        load_flickr8k(tmp_path, layout="kaggle")


def test_karpathy_layout_loads(tmp_path: Path) -> None:
    split_of = {name: split for split, names in TINY_SPLITS.items() for name in names}
    karpathy_split = {"train": "train", "dev": "val", "test": "test"}
    images = []
    for seed, name in enumerate(TINY_IMAGES):
        write_image(tmp_path / "Flicker8k_Dataset" / name, seed)
        images.append({
            "filename": name,
            "split": karpathy_split[split_of[name]],
            "sentences": [{"raw": caption_of(name, index), "tokens": caption_of(name, index).split()}
                          for index in range(5)],
        })
    images.append({"filename": "missing.jpg", "split": "train",
                   "sentences": [{"raw": "lost", "tokens": ["lost"]}]})
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))

    dataset = load_flickr8k(tmp_path)

    assert dataset.layout == "karpathy"
    check_tiny_dataset(dataset)
    assert dataset.skipped_captions == 1
    assert dataset.skipped_split_images == 1


def test_karpathy_layout_missing_images(tmp_path: Path) -> None:
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": []}))

    with pytest.raises(DatasetFileNotFoundError, match="Flicker8k_Dataset"):
        load_flickr8k(tmp_path)
