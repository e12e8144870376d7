"""Feature preparation and the studies: loss comparison, noise stress test, sample efficiency, ablations.

All runs of a study share one data seed, which fixes the low-data training subset and the noise
pattern. The run seeds (0, 1, ...) vary initialisation, pair order and dropout. So the paired
difference between two losses at one seed isolates the loss, on identical data and batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Flickr8k
from .encoders import ImageEncoder, TextEncoder, build_image_encoder, build_text_encoder
from .features import image_features, text_features
from .finetune import FineTunedImageTower, load_pixels
from .noise import (
    NoiseSetting,
    add_gaussian_pixel_noise,
    choose_noisy_images,
    corrupt_captions,
    swap_captions,
)
from .train import LOSS_NAMES, EvalData, RunResult, TrainConfig, TrainData, train_run

logger = logging.getLogger(__name__)

NOISE_STREAM = {"swap": 1, "words": 2, "pixels": 3}
TRAIN_SUBSET_STREAM = 0


def noise_rng(data_seed: int, setting: NoiseSetting) -> np.random.Generator:
    """Return the generator of one noise setting; it depends only on the data seed, kind and level."""
    return np.random.default_rng([data_seed, NOISE_STREAM[setting.kind], int(round(setting.level * 1_000_000))])


def train_subset(train_images: np.ndarray, size: int | None, data_seed: int) -> np.ndarray:
    """Return ``size`` image indices drawn from the train split; smaller subsets are prefixes of larger ones.

    Taking a prefix of one seeded permutation keeps the sample-efficiency curve nested: the
    500-image subset is contained in the 1,000-image subset, and so on.
    """
    if size is None or size >= len(train_images):
        return np.sort(train_images)
    if size < 2:
        raise ValueError(f"Invalid --train-images {size}: need at least 2 images.")
    order = np.random.default_rng([data_seed, TRAIN_SUBSET_STREAM]).permutation(len(train_images))
    return np.sort(train_images[order[:size]])


def eval_subset(images: np.ndarray, size: int | None, data_seed: int) -> np.ndarray:
    """Return ``size`` images of a dev or test split (all of them when size is None), for quick runs."""
    if size is None or size >= len(images):
        return np.sort(images)
    return np.sort(np.random.default_rng([data_seed, 9]).choice(images, size=size, replace=False))


@dataclass
class FeatureSource:
    """Cached clean features and the encoders, loaded on first use.

    With ``scope="all"`` the clean features cover every image and caption of the dataset, so all
    studies share one cache entry. With ``scope="needed"`` they cover ``needed_images`` only,
    which keeps smoke runs fast. With ``pixel_inputs`` the image side of every split is uint8
    pixels for a fine-tuned tower, and the clean image features are not used.
    """

    dataset: Flickr8k
    cache_dir: Path
    image_encoder_name: str
    text_encoder_name: str
    needed_images: np.ndarray
    scope: str = "all"
    pixel_sigma: float = 0.3
    data_seed: int = 0
    image_batch_size: int = 64
    text_batch_size: int = 256
    pixel_inputs: bool = False
    _pixels: dict[int, torch.Tensor] = field(default_factory=dict)
    _image_encoder: ImageEncoder | None = None
    _text_encoder: TextEncoder | None = None
    _image_rows: dict[int, int] = field(default_factory=dict)
    _caption_rows: dict[int, int] = field(default_factory=dict)
    _image_features: torch.Tensor | None = None
    _text_features: torch.Tensor | None = None

    @property
    def image_encoder(self) -> ImageEncoder:
        """Frozen image encoder, built on first use."""
        if self._image_encoder is None:
            self._image_encoder = build_image_encoder(self.image_encoder_name)
        return self._image_encoder

    @property
    def text_encoder(self) -> TextEncoder:
        """Frozen caption encoder, built on first use."""
        if self._text_encoder is None:
            self._text_encoder = build_text_encoder(self.text_encoder_name)
        return self._text_encoder

    def load_clean(self) -> None:
        """Load or extract the clean features of the images and captions in scope."""
        if self.scope == "all":
            images = np.arange(len(self.dataset.image_names))
        elif self.scope == "needed":
            images = np.unique(self.needed_images)
        else:
            raise ValueError(f"Invalid feature scope {self.scope!r}: expected 'all' or 'needed'.")
        captions = self.dataset.captions_of(images)

        paths = [self.dataset.image_paths[index] for index in images]
        texts = [self.dataset.captions[index] for index in captions]
        self._image_features = torch.from_numpy(
            image_features(self.image_encoder, paths, self.cache_dir, self.image_batch_size)
        )
        self._text_features = torch.from_numpy(
            text_features(self.text_encoder, texts, self.cache_dir, self.text_batch_size)
        )
        self._image_rows = {int(index): row for row, index in enumerate(images)}
        self._caption_rows = {int(index): row for row, index in enumerate(captions)}

    def images(self, indices: np.ndarray) -> torch.Tensor:
        """Return (len(indices), image_dim) clean features of dataset images."""
        if self._image_features is None:
            self.load_clean()
        rows = [self._image_rows[int(index)] for index in indices]
        return self._image_features[rows]

    def captions(self, indices: np.ndarray) -> torch.Tensor:
        """Return (len(indices), text_dim) clean features of dataset captions."""
        if self._text_features is None:
            self.load_clean()
        rows = [self._caption_rows[int(index)] for index in indices]
        return self._text_features[rows]

    def pixels(self, indices: np.ndarray) -> torch.Tensor:
        """Return (len(indices), H, W, 3) uint8 pixels of dataset images, decoding each image once."""
        missing = [int(index) for index in indices if int(index) not in self._pixels]
        if missing:
            decoded = load_pixels([self.dataset.image_paths[index] for index in missing], self.image_encoder.image_size)
            self._pixels.update(zip(missing, decoded))
        return torch.stack([self._pixels[int(index)] for index in indices])

    def image_inputs(self, indices: np.ndarray) -> torch.Tensor:
        """Return pixels when fine-tuning, else clean features, of dataset images."""
        return self.pixels(indices) if self.pixel_inputs else self.images(indices)

    def eval_data(self, images: np.ndarray) -> EvalData:
        """Return a retrieval split over the given dataset images and all their captions."""
        captions = self.dataset.captions_of(images)
        position = {int(index): row for row, index in enumerate(images)}
        caption_image = torch.tensor([position[int(self.dataset.caption_image[c])] for c in captions])
        return EvalData(self.image_inputs(images), self.captions(captions), caption_image)

    def train_data(self, images: np.ndarray, setting: NoiseSetting) -> tuple[TrainData, dict[str, Any]]:
        """Return the training pairs of ``images`` with noise applied, and a summary of the noise."""
        captions = self.dataset.captions_of(images)
        position = {int(index): row for row, index in enumerate(images)}
        pair_image = np.array([position[int(self.dataset.caption_image[c])] for c in captions], dtype=np.int64)
        if self.pixel_inputs and setting.kind == "pixels":
            raise ValueError(f"Noise setting {setting.label} is not supported with --finetune-blocks; "
                             "use clean, swap or words settings.")
        image_rows = self.image_inputs(images)
        text_rows = self.captions(captions)
        summary: dict[str, Any] = {"setting": setting.label, "images": len(images), "pairs": len(captions)}

        if setting.kind == "swap":
            source, swapped = swap_captions(pair_image, setting.level, noise_rng(self.data_seed, setting))
            text_rows = text_rows[torch.from_numpy(source)]
            summary["swapped_pairs"] = int(swapped.sum())
        elif setting.kind == "words":
            originals = [self.dataset.captions[index] for index in captions]
            corrupted, counts = corrupt_captions(originals, setting.level, noise_rng(self.data_seed, setting))
            noise = {"kind": "words", "drop_probability": setting.level, "swap_probability": setting.level,
                     "data_seed": self.data_seed}
            text_rows = torch.from_numpy(text_features(
                self.text_encoder, corrupted, self.cache_dir, self.text_batch_size, noise=noise, kind="captions-noisy",
            ))
            summary.update(dropped_words=counts.dropped, words=counts.words, swaps=counts.swaps)
        elif setting.kind == "pixels":
            noisy = choose_noisy_images(len(images), setting.level, noise_rng(self.data_seed, setting))
            if len(noisy):
                noisy_indices = images[noisy]
                paths = [self.dataset.image_paths[index] for index in noisy_indices]
                sigma, seed = self.pixel_sigma, self.data_seed

                def transform(position_in_list: int, pixels: np.ndarray) -> np.ndarray:
                    # Seeded by the dataset image index, so an image gets the same noise in any list.
                    rng = np.random.default_rng([seed, 3, int(noisy_indices[position_in_list])])
                    return add_gaussian_pixel_noise(pixels, sigma, rng)

                noise = {"kind": "gaussian-pixels", "sigma": sigma, "data_seed": seed}
                features = image_features(
                    self.image_encoder, paths, self.cache_dir, self.image_batch_size,
                    noise=noise, transform=transform, kind="images-noisy",
                )
                image_rows = image_rows.clone()
                image_rows[torch.from_numpy(noisy)] = torch.from_numpy(features)
            summary.update(noisy_images=int(len(noisy)), pixel_sigma=self.pixel_sigma)

        return TrainData(image_rows, torch.from_numpy(pair_image), text_rows), summary


@dataclass
class RunSpec:
    """One run of a study: what to train on, with which loss and seed, and how to label it."""

    study: str
    setting: NoiseSetting
    train_images: int
    loss: str
    seed: int
    variant: str
    loss_options: dict[str, Any] = field(default_factory=dict)
    keep_embeddings: bool = False


def run_all(
    specs: Iterable[RunSpec],
    source: FeatureSource,
    train_images: dict[int, np.ndarray],
    dev: EvalData,
    test: EvalData,
    config: TrainConfig,
    finetune_blocks: int = 0,
    finetune_learning_rate: float = 1e-4,
    device: str = "cpu",
) -> tuple[list[dict[str, Any]], dict[str, RunResult], list[dict[str, Any]]]:
    """Train every run with a progress bar.

    With ``finetune_blocks`` > 0 each run also trains a fresh copy of the last blocks of the
    image encoder (``source.pixel_inputs`` must then be set).

    Returns:
        One flat record per run (for JSON and CSV), the full :class:`RunResult` per run id, and the
        noise summary of each training set used.
    """
    specs = list(specs)
    records, results, noise_summaries = [], {}, []
    train_cache: dict[tuple[str, int], TrainData] = {}

    for spec in tqdm(specs, desc="runs", unit="run"):
        key = (spec.setting.label, spec.train_images)
        if key not in train_cache:
            train_cache[key], summary = source.train_data(train_images[spec.train_images], spec.setting)
            noise_summaries.append(summary)
            logger.info("Training set %s: %s", key, summary)

        tower = FineTunedImageTower(source.image_encoder, finetune_blocks) if finetune_blocks else None
        result = train_run(
            spec.loss, train_cache[key], dev, test, config, spec.seed,
            loss_options=spec.loss_options, keep_embeddings=spec.keep_embeddings,
            image_tower=tower, tower_learning_rate=finetune_learning_rate, device=device,
        )
        run_id = f"{spec.study}/{spec.setting.label}/n{spec.train_images}/{spec.variant}/seed{spec.seed}"
        results[run_id] = result
        record = {
            "run_id": run_id,
            "study": spec.study,
            "setting": spec.setting.label,
            "train_images": spec.train_images,
            "loss": spec.loss,
            "variant": spec.variant,
            "loss_options": result.loss_options,
            "seed": spec.seed,
            "best_epoch": result.best_epoch,
            "seconds": round(result.seconds, 3),
            **{f"test_{name}": value for name, value in result.test.items()},
            **{f"dev_{name}": value for name, value in result.dev.items()},
        }
        records.append(record)
        logger.info(
            "%s: test rsum %.1f, R@5 i2t %.1f t2i %.1f (best epoch %d, %.1f s).",
            run_id, result.test["rsum"], result.test["i2t_r5"], result.test["t2i_r5"],
            result.best_epoch, result.seconds,
        )
    return records, results, noise_summaries


def comparison_specs(study: str, settings: list[NoiseSetting], losses: list[str], seeds: list[int],
                     train_images: int) -> list[RunSpec]:
    """Return runs of every loss and seed on every noise setting; seed 0 on clean keeps embeddings."""
    return [
        RunSpec(study, setting, train_images, loss, seed, variant=loss,
                keep_embeddings=(seed == seeds[0] and setting.kind == "clean" and loss in ("symmetric", "variance")))
        for setting in settings for loss in losses for seed in seeds
    ]


def sample_efficiency_specs(sizes: list[int], losses: list[str], seeds: list[int]) -> list[RunSpec]:
    """Return clean runs of every loss and seed for each training-set size."""
    clean = NoiseSetting("clean")
    return [
        RunSpec("sample-efficiency", clean, size, loss, seed, variant=loss)
        for size in sizes for loss in losses for seed in seeds
    ]


# One factor at a time around the default (statistic="log_prob", mapping="direct", decay=0.9).
ABLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "default (log_prob, direct, 0.9)": {"statistic": "log_prob", "mapping": "direct", "decay": 0.9},
    "mapping=inverse": {"statistic": "log_prob", "mapping": "inverse", "decay": 0.9},
    "statistic=prob": {"statistic": "prob", "mapping": "direct", "decay": 0.9},
    "statistic=logit": {"statistic": "logit", "mapping": "direct", "decay": 0.9},
    "decay=0": {"statistic": "log_prob", "mapping": "direct", "decay": 0.0},
    "decay=0.5": {"statistic": "log_prob", "mapping": "direct", "decay": 0.5},
    "decay=0.99": {"statistic": "log_prob", "mapping": "direct", "decay": 0.99},
}


def ablation_specs(seeds: list[int], train_images: int, setting: NoiseSetting) -> list[RunSpec]:
    """Return the baseline and each VarianceAwareInfoNCE variant for every seed."""
    specs = [RunSpec("ablations", setting, train_images, "symmetric", seed, variant="symmetric") for seed in seeds]
    for variant, options in ABLATION_VARIANTS.items():
        specs.extend(
            RunSpec("ablations", setting, train_images, "variance", seed, variant=variant, loss_options=dict(options))
            for seed in seeds
        )
    return specs


def check_losses(losses: list[str]) -> list[str]:
    """Validate loss names; the baseline must be among them for the paired differences."""
    for loss in losses:
        if loss not in LOSS_NAMES:
            raise ValueError(f"Unknown loss {loss!r}: expected names from {', '.join(LOSS_NAMES)}.")
    if "symmetric" not in losses:
        raise ValueError("The loss list must include 'symmetric', the fixed baseline of the paired differences.")
    return losses
