"""On-disk cache of frozen-encoder features.

Each cache file is ``<cache dir>/<kind>-<key>.npz`` where the key is the SHA-256 of a JSON
identity: the encoder (name and weights digest), its preprocessing, the item list (image names
and file sizes, or caption texts), any noise applied before encoding, and the cache format
version. A file is written to a temporary name in the same folder and renamed into place, so a
crash never leaves a partial file under the final name. On load, the stored identity and a
SHA-256 of the feature bytes are checked; a file that fails either check, or cannot be read, is
rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .encoders import ImageEncoder, TextEncoder, load_image

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "flickr8k"


def identity_key(identity: dict[str, Any]) -> str:
    """Return the hex SHA-256 of the identity serialised as canonical JSON."""
    canonical = json.dumps({"format": CACHE_FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _digest_array(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def cache_path(cache_dir: Path, kind: str, key: str) -> Path:
    """Return the cache file path for a kind ("images", "captions", ...) and an identity key."""
    return Path(cache_dir) / f"{kind}-{key[:24]}.npz"


def read_cache(path: Path, key: str, num_items: int) -> np.ndarray | None:
    """Return the cached (num_items, dim) features, or None when the file is missing, corrupt or stale."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as content:
            meta = json.loads(str(content["meta"]))
            features = content["features"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        logger.warning("Feature cache %s is unreadable (%s); rebuilding it.", path, error)
        return None

    if meta.get("key") != key:
        logger.warning("Feature cache %s is stale (identity changed); rebuilding it.", path)
        return None
    if features.ndim != 2 or features.shape[0] != num_items:
        logger.warning(
            "Feature cache %s has shape %s, expected %d rows; rebuilding it.", path, features.shape, num_items
        )
        return None
    if meta.get("sha256") != _digest_array(features):
        logger.warning("Feature cache %s failed its checksum; rebuilding it.", path)
        return None
    return features


def write_cache(path: Path, key: str, identity: dict[str, Any], features: np.ndarray) -> None:
    """Write features and their identity atomically: to a temporary file, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"key": key, "identity": identity, "sha256": _digest_array(features)}, default=str)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp", delete=False)
    try:
        with handle:
            np.savez(handle, features=features, meta=np.array(meta))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def cached_features(
    cache_dir: Path,
    kind: str,
    identity: dict[str, Any],
    num_items: int,
    compute: Callable[[], np.ndarray],
) -> np.ndarray:
    """Return features for ``identity`` from the cache, computing and caching them on a miss.

    Args:
        cache_dir: folder of the cache files.
        kind: file name prefix, e.g. "images" or "captions".
        identity: JSON-serialisable description of everything the features depend on.
        num_items: expected number of rows.
        compute: called on a miss; returns a (num_items, dim) float32 array.
    """
    key = identity_key(identity)
    path = cache_path(cache_dir, kind, key)
    features = read_cache(path, key, num_items)
    if features is not None:
        logger.info("Loaded %s features %s from %s.", kind, features.shape, path)
        return features

    features = np.ascontiguousarray(compute(), dtype=np.float32)
    if features.shape[0] != num_items:
        raise RuntimeError(f"Encoder returned {features.shape[0]} rows for {num_items} {kind}.")
    write_cache(path, key, identity, features)
    logger.info("Cached %s features %s in %s.", kind, features.shape, path)
    return features


def image_list_identity(paths: list[Path]) -> dict[str, Any]:
    """Describe an image list by the SHA-256 of its names and file sizes, so a changed file invalidates it."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{Path(path).name}\t{os.path.getsize(path)}\n".encode("utf-8"))
    return {"count": len(paths), "sha256": digest.hexdigest()}


def caption_list_identity(captions: list[str]) -> dict[str, Any]:
    """Describe a caption list by the SHA-256 of its texts."""
    digest = hashlib.sha256()
    for caption in captions:
        digest.update(caption.encode("utf-8") + b"\n")
    return {"count": len(captions), "sha256": digest.hexdigest()}


PixelTransform = Callable[[int, np.ndarray], np.ndarray]


def extract_image_features(
    encoder: ImageEncoder,
    paths: list[Path],
    batch_size: int = 64,
    transform: PixelTransform | None = None,
    description: str = "image features",
) -> np.ndarray:
    """Encode images in batches, decoding the next batch in a background thread.

    Args:
        encoder: frozen image encoder.
        paths: image files.
        batch_size: images per forward pass.
        transform: optional ``(position in paths, pixels) -> pixels`` applied to (H, W, 3) pixels
            in [0, 1] before normalisation, used for pixel noise.
        description: progress bar label.

    Returns:
        (len(paths), encoder.dim) float32 array.
    """
    def decode(start: int) -> torch.Tensor:
        batch = []
        for position in range(start, min(start + batch_size, len(paths))):
            pixels = load_image(paths[position], encoder.image_size)
            if transform is not None:
                pixels = transform(position, pixels)
            batch.append(pixels)
        return torch.from_numpy(np.stack(batch))

    starts = list(range(0, len(paths), batch_size))
    outputs = []
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(total=len(paths), desc=description, unit="img") as bar:
        pending = pool.submit(decode, starts[0]) if starts else None
        for index, _ in enumerate(starts):
            pixels = pending.result()
            if index + 1 < len(starts):
                pending = pool.submit(decode, starts[index + 1])
            outputs.append(encoder.encode(pixels).float().cpu().numpy())
            bar.update(len(pixels))
    if not outputs:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.concatenate(outputs)


def extract_text_features(
    encoder: TextEncoder,
    captions: list[str],
    batch_size: int = 256,
    description: str = "caption features",
) -> np.ndarray:
    """Encode captions in chunks of ``batch_size`` with a progress bar; returns (N, encoder.dim) float32."""
    outputs = []
    with tqdm(total=len(captions), desc=description, unit="caption") as bar:
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            outputs.append(encoder.encode(chunk, batch_size=batch_size))
            bar.update(len(chunk))
    if not outputs:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.concatenate(outputs)


def image_features(
    encoder: ImageEncoder,
    paths: list[Path],
    cache_dir: Path,
    batch_size: int = 64,
    noise: dict[str, Any] | None = None,
    transform: PixelTransform | None = None,
    kind: str = "images",
) -> np.ndarray:
    """Return cached or freshly extracted image features; ``noise`` describes ``transform`` in the key."""
    identity = {
        "modality": "image",
        "encoder": encoder.identity(),
        "items": image_list_identity(paths),
        "noise": noise,
    }
    return cached_features(
        cache_dir, kind, identity, len(paths),
        lambda: extract_image_features(encoder, paths, batch_size, transform, description=kind),
    )


def text_features(
    encoder: TextEncoder,
    captions: list[str],
    cache_dir: Path,
    batch_size: int = 256,
    noise: dict[str, Any] | None = None,
    kind: str = "captions",
) -> np.ndarray:
    """Return cached or freshly extracted caption features; ``noise`` describes any text corruption."""
    identity = {
        "modality": "text",
        "encoder": encoder.identity(),
        "items": caption_list_identity(captions),
        "noise": noise,
    }
    return cached_features(
        cache_dir, kind, identity, len(captions),
        lambda: extract_text_features(encoder, captions, batch_size, description=kind),
    )
