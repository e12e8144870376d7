"""Feature cache: hits, invalidation on a changed identity, corrupt and stale files, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flickr8k_helpers import write_image
from examples.flickr8k.features import (
    cache_path,
    cached_features,
    identity_key,
    image_features,
    image_list_identity,
    write_cache,
)


class CountingCompute:
    """Feature producer that counts its calls and returns distinct values each time."""

    def __init__(self, rows: int = 4, dim: int = 3) -> None:
        self.calls = 0
        self.rows, self.dim = rows, dim

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return np.full((self.rows, self.dim), float(self.calls), dtype=np.float32)


IDENTITY = {"encoder": {"name": "toy", "weights_sha256": "0" * 64}, "items": {"count": 4, "sha256": "a"}}


def only_file(folder: Path) -> Path:
    files = [path for path in folder.iterdir()]
    assert len(files) == 1, files
    return files[0]


def test_cache_hit_skips_compute(tmp_path: Path) -> None:
    compute = CountingCompute()

    first = cached_features(tmp_path, "images", IDENTITY, 4, compute)
    second = cached_features(tmp_path, "images", IDENTITY, 4, compute)

    assert compute.calls == 1
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("change", ["encoder", "preprocessing", "items", "noise"])
def test_changed_identity_rebuilds(tmp_path: Path, change: str) -> None:
    compute = CountingCompute()
    cached_features(tmp_path, "images", IDENTITY, 4, compute)

    changed = json.loads(json.dumps(IDENTITY))
    if change == "encoder":
        changed["encoder"]["weights_sha256"] = "1" * 64
    elif change == "preprocessing":
        changed["encoder"]["preprocessing"] = {"resize": [256, 256]}
    elif change == "items":
        changed["items"]["sha256"] = "b"
    else:
        changed["noise"] = {"sigma": 0.3}
    features = cached_features(tmp_path, "images", changed, 4, compute)

    assert compute.calls == 2
    assert features[0, 0] == 2.0


def test_corrupt_file_rebuilds(tmp_path: Path) -> None:
    compute = CountingCompute()
    cached_features(tmp_path, "images", IDENTITY, 4, compute)
    path = only_file(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    features = cached_features(tmp_path, "images", IDENTITY, 4, compute)

    assert compute.calls == 2
    assert features[0, 0] == 2.0
    assert only_file(tmp_path) == path


def test_tampered_features_fail_checksum(tmp_path: Path) -> None:
    compute = CountingCompute()
    cached_features(tmp_path, "images", IDENTITY, 4, compute)
    path = only_file(tmp_path)
    with np.load(path) as content:
        meta = str(content["meta"])
        features = content["features"].copy()
    features[0, 0] = 42.0
    np.savez(path, features=features, meta=np.array(meta))

    cached_features(tmp_path, "images", IDENTITY, 4, compute)

    assert compute.calls == 2


def test_stale_identity_in_file_rebuilds(tmp_path: Path) -> None:
    key = identity_key(IDENTITY)
    path = cache_path(tmp_path, "images", key)
    write_cache(path, "an older key", {"old": True}, np.zeros((4, 3), dtype=np.float32))
    compute = CountingCompute()

    features = cached_features(tmp_path, "images", IDENTITY, 4, compute)

    assert compute.calls == 1
    assert features[0, 0] == 1.0


def test_wrong_row_count_rebuilds(tmp_path: Path) -> None:
    key = identity_key(IDENTITY)
    write_cache(cache_path(tmp_path, "images", key), key, IDENTITY, np.zeros((3, 3), dtype=np.float32))
    compute = CountingCompute()

    cached_features(tmp_path, "images", IDENTITY, 4, compute)

    assert compute.calls == 1


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr("examples.flickr8k.features.os.replace", failing_replace)

    with pytest.raises(OSError, match="disk full"):
        cached_features(tmp_path, "images", IDENTITY, 4, CountingCompute())

    assert list(tmp_path.iterdir()) == []


def test_image_list_identity_sees_file_change(tmp_path: Path) -> None:
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for seed, path in enumerate(paths):
        write_image(path, seed)
    before = image_list_identity(paths)

    write_image(paths[1], seed=7, size=32)

    assert image_list_identity(paths) != before
    assert image_list_identity(paths[::-1]) != image_list_identity(paths)


class ToyImageEncoder:
    """Image encoder stand-in: mean colour per channel, with a fixed identity."""

    name = "toy"
    dim = 3
    image_size = 8

    def __init__(self) -> None:
        self.batches = 0

    def identity(self) -> dict:
        return {"encoder": self.name, "preprocessing": {"resize": [8, 8]}}

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        return pixels.mean(dim=(1, 2))


def test_image_features_cached_per_list(tmp_path: Path) -> None:
    paths = []
    for seed in range(5):
        paths.append(tmp_path / "images" / f"{seed}.jpg")
        write_image(paths[-1], seed)
    encoder = ToyImageEncoder()
    cache = tmp_path / "cache"

    first = image_features(encoder, paths, cache, batch_size=2)
    again = image_features(encoder, paths, cache, batch_size=2)
    subset = image_features(encoder, paths[:3], cache, batch_size=2)

    assert first.shape == (5, 3)
    assert encoder.batches == 3 + 2  # 5 images in batches of 2, then 3 images; the repeat is a hit
    np.testing.assert_allclose(subset, first[:3], rtol=1e-6)
    np.testing.assert_array_equal(again, first)
