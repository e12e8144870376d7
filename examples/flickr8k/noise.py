"""Noise injection for the stress test. Noise touches training pairs only; evaluation stays clean.

Three kinds, each with a level in [0, 1]:

* ``swap:p`` replaces the caption of exactly round(p * num_pairs) training pairs with a caption of
  another training image (a mismatched pair, as in web-scraped data).
* ``words:p`` corrupts every training caption at the token level: each word is dropped with
  probability p (at least one word stays), then adjacent words are swapped with probability p
  per position. The corrupted captions are re-encoded and cached separately.
* ``pixels:p`` adds Gaussian noise with standard deviation ``sigma`` (pixel values in [0, 1],
  clipped after the noise) to exactly round(p * num_images) training images. Their features are
  extracted and cached separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NOISE_KINDS = ("clean", "swap", "words", "pixels")


@dataclass(frozen=True)
class NoiseSetting:
    """A noise kind and its level, written "clean", "swap:0.2", "words:0.1" or "pixels:0.5"."""

    kind: str
    level: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "NoiseSetting":
        """Parse "kind:level"; raise ValueError naming the text if it is invalid."""
        kind, _, level_text = text.strip().partition(":")
        if kind not in NOISE_KINDS:
            raise ValueError(f"Invalid noise setting {text!r}: kind must be one of {', '.join(NOISE_KINDS)}.")
        if kind == "clean":
            if level_text:
                raise ValueError(f"Invalid noise setting {text!r}: 'clean' takes no level.")
            return cls("clean", 0.0)
        try:
            level = float(level_text)
        except ValueError:
            raise ValueError(f"Invalid noise setting {text!r}: expected '{kind}:<level in [0, 1]>'.") from None
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"Invalid noise setting {text!r}: level {level} is outside [0, 1].")
        return cls(kind, level)

    @property
    def label(self) -> str:
        """Short name used in file names, tables and plots."""
        return "clean" if self.kind == "clean" else f"{self.kind}:{self.level:g}"


def swap_captions(pair_image: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Give a fraction of pairs the caption of a pair from another image.

    Args:
        pair_image: (num_pairs,) image index of each training pair.
        fraction: share of pairs to corrupt, in [0, 1].
        rng: random generator.

    Returns:
        ``caption_source``: (num_pairs,) index of the pair whose caption each pair now carries
        (itself when untouched), and ``swapped``: (num_pairs,) bool mask of corrupted pairs.
        Exactly round(fraction * num_pairs) pairs are corrupted when at least two images exist.
    """
    num_pairs = len(pair_image)
    caption_source = np.arange(num_pairs)
    swapped = np.zeros(num_pairs, dtype=bool)
    num_swapped = int(round(fraction * num_pairs))
    if num_swapped == 0 or len(np.unique(pair_image)) < 2:
        return caption_source, swapped

    chosen = rng.choice(num_pairs, size=num_swapped, replace=False)
    for pair in chosen:
        source = int(rng.integers(num_pairs))
        while pair_image[source] == pair_image[pair]:
            source = int(rng.integers(num_pairs))
        caption_source[pair] = source
    swapped[chosen] = True
    return caption_source, swapped


@dataclass
class WordNoiseCounts:
    """Counts from :func:`corrupt_words`: words seen and dropped, swap decisions and swaps done."""

    words: int = 0
    dropped: int = 0
    swap_decisions: int = 0
    swaps: int = 0

    def add(self, other: "WordNoiseCounts") -> None:
        """Add another caption's counts to these."""
        self.words += other.words
        self.dropped += other.dropped
        self.swap_decisions += other.swap_decisions
        self.swaps += other.swaps


def corrupt_words(
    caption: str, drop_probability: float, swap_probability: float, rng: np.random.Generator
) -> tuple[str, WordNoiseCounts]:
    """Drop and swap words of one caption (whitespace tokens).

    Each word is dropped with ``drop_probability``; if all would go, one random word stays. Then a
    left-to-right pass swaps the words at positions i and i+1 with ``swap_probability`` and, after
    a swap, continues at i+2 so that no word moves twice.

    Returns:
        The corrupted caption and its counts.
    """
    words = caption.split()
    counts = WordNoiseCounts(words=len(words))
    if not words:
        return caption, counts

    keep = rng.random(len(words)) >= drop_probability
    if not keep.any():
        keep[rng.integers(len(words))] = True
    counts.dropped = int((~keep).sum())
    remaining = [word for word, flag in zip(words, keep) if flag]

    position = 0
    while position + 1 < len(remaining):
        counts.swap_decisions += 1
        if rng.random() < swap_probability:
            remaining[position], remaining[position + 1] = remaining[position + 1], remaining[position]
            counts.swaps += 1
            position += 2
        else:
            position += 1
    return " ".join(remaining), counts


def corrupt_captions(
    captions: list[str], probability: float, rng: np.random.Generator
) -> tuple[list[str], WordNoiseCounts]:
    """Apply :func:`corrupt_words` with drop and swap probability ``probability`` to every caption."""
    total = WordNoiseCounts()
    corrupted = []
    for caption in captions:
        text, counts = corrupt_words(caption, probability, probability, rng)
        corrupted.append(text)
        total.add(counts)
    return corrupted, total


def choose_noisy_images(num_images: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Return the sorted positions of exactly round(fraction * num_images) images to corrupt."""
    count = int(round(fraction * num_images))
    return np.sort(rng.choice(num_images, size=count, replace=False))


def add_gaussian_pixel_noise(pixels: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, sigma^2) noise to (H, W, 3) pixels in [0, 1] and clip the result to [0, 1]."""
    noisy = pixels + rng.normal(0.0, sigma, size=pixels.shape).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0)
