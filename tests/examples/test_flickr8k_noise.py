"""Noise injection rates and settings."""

from __future__ import annotations

import numpy as np
import pytest

from examples.flickr8k.noise import (
    NoiseSetting,
    add_gaussian_pixel_noise,
    choose_noisy_images,
    corrupt_captions,
    corrupt_words,
    swap_captions,
)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_swap_rate_exact(fraction: float) -> None:
    pair_image = np.repeat(np.arange(200), 5)

    source, swapped = swap_captions(pair_image, fraction, np.random.default_rng(0))

    assert swapped.sum() == round(fraction * len(pair_image))
    assert np.all(pair_image[source[swapped]] != pair_image[swapped])
    assert np.all(source[~swapped] == np.flatnonzero(~swapped))


def test_swap_single_image_unchanged() -> None:
    source, swapped = swap_captions(np.zeros(5, dtype=np.int64), 0.5, np.random.default_rng(0))

    assert not swapped.any()
    assert source.tolist() == list(range(5))


@pytest.mark.parametrize("probability", [0.1, 0.3])
def test_word_noise_rates(probability: float) -> None:
    captions = ["a dog runs across the green field with a red ball in its mouth ."] * 2000

    corrupted, counts = corrupt_captions(captions, probability, np.random.default_rng(1))

    drop_rate = counts.dropped / counts.words
    swap_rate = counts.swaps / counts.swap_decisions
    assert drop_rate == pytest.approx(probability, abs=0.01)
    assert swap_rate == pytest.approx(probability, abs=0.015)
    assert sum(len(text.split()) for text in corrupted) == counts.words - counts.dropped


def test_word_noise_keeps_one_word() -> None:
    text, counts = corrupt_words("two words", 1.0, 0.0, np.random.default_rng(0))

    assert len(text.split()) == 1
    assert counts.dropped == 1


def test_word_noise_zero_is_identity() -> None:
    caption = "a man rides a bike ."

    text, counts = corrupt_words(caption, 0.0, 0.0, np.random.default_rng(0))

    assert text == caption
    assert counts.dropped == 0
    assert counts.swaps == 0


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_pixel_noise_image_count_exact(fraction: float) -> None:
    chosen = choose_noisy_images(1000, fraction, np.random.default_rng(0))

    assert len(chosen) == round(fraction * 1000)
    assert len(np.unique(chosen)) == len(chosen)


def test_gaussian_pixel_noise_sigma() -> None:
    pixels = np.full((64, 64, 3), 0.5, dtype=np.float32)

    noisy = add_gaussian_pixel_noise(pixels, 0.1, np.random.default_rng(0))

    assert noisy.dtype == np.float32
    assert (noisy - pixels).std() == pytest.approx(0.1, rel=0.05)
    assert noisy.min() >= 0.0
    assert noisy.max() <= 1.0


def test_noise_setting_parse() -> None:
    assert NoiseSetting.parse("clean") == NoiseSetting("clean", 0.0)
    assert NoiseSetting.parse("swap:0.2") == NoiseSetting("swap", 0.2)
    assert NoiseSetting.parse("pixels:0.5").label == "pixels:0.5"
    for invalid in ("swap", "swap:1.5", "blur:0.1", "clean:0.1", "words:x"):
        with pytest.raises(ValueError, match="Invalid noise setting"):
            NoiseSetting.parse(invalid)
