"""Recall@K, median rank and rsum against hand-computed toy cases."""

from __future__ import annotations

import pytest
import torch

from examples.flickr8k.metrics import (
    image_to_text_ranks,
    metrics_from_similarity,
    retrieval_metrics,
    text_to_image_ranks,
)

# Two images with three captions each: captions 0-2 belong to image 0, captions 3-5 to image 1.
CAPTION_IMAGE = torch.tensor([0, 0, 0, 1, 1, 1])
SIMILARITY = torch.tensor([
    # c0   c1   c2   c3   c4   c5
    [0.1, 0.9, 0.2, 0.8, 0.3, 0.0],  # image 0: best own caption c1 (0.9) is first -> rank 1
    [0.7, 0.6, 0.5, 0.1, 0.4, 0.2],  # image 1: best own caption c4 (0.4); c0, c1, c2 are ahead -> rank 4
])


def test_image_to_text_best_caption_counts() -> None:
    ranks = image_to_text_ranks(SIMILARITY, CAPTION_IMAGE)

    assert ranks.tolist() == [1, 4]


def test_text_to_image_by_image_id() -> None:
    ranks = text_to_image_ranks(SIMILARITY, CAPTION_IMAGE)

    # c0: 0.1 vs image 1's 0.7 -> 2; c1: 0.9 > 0.6 -> 1; c2: 0.2 < 0.5 -> 2;
    # c3: 0.1 < 0.8 -> 2; c4: 0.4 > 0.3 -> 1; c5: 0.2 > 0.0 -> 1.
    assert ranks.tolist() == [2, 1, 2, 2, 1, 1]


def test_metrics_from_toy_case() -> None:
    metrics = metrics_from_similarity(SIMILARITY, CAPTION_IMAGE)

    assert metrics["i2t_r1"] == pytest.approx(50.0)
    assert metrics["i2t_r5"] == pytest.approx(100.0)
    assert metrics["i2t_r10"] == pytest.approx(100.0)
    assert metrics["t2i_r1"] == pytest.approx(50.0)
    assert metrics["t2i_r5"] == pytest.approx(100.0)
    assert metrics["t2i_medr"] == pytest.approx(1.5)
    assert metrics["i2t_medr"] == pytest.approx(2.5)
    assert metrics["rsum"] == pytest.approx(50 + 100 + 100 + 50 + 100 + 100)


def test_ties_count_against_query() -> None:
    similarity = torch.tensor([
        [0.5, 0.5, 0.5, 0.5],  # image 0 ties with every caption
        [0.5, 0.5, 0.9, 0.5],
    ])
    caption_image = torch.tensor([0, 0, 1, 1])

    i2t = image_to_text_ranks(similarity, caption_image)
    t2i = text_to_image_ranks(similarity, caption_image)

    # Image 0: both negatives tie its best positive, so both are ranked ahead -> rank 3.
    # Image 1: best positive c2 (0.9) beats everything -> rank 1.
    assert i2t.tolist() == [3, 1]
    # c0, c1: image 1 ties at 0.5 -> rank 2. c2: 0.9 > 0.5 -> 1. c3: image 0 ties -> 2.
    assert t2i.tolist() == [2, 2, 1, 2]


def test_constant_similarity_is_worst_case() -> None:
    similarity = torch.zeros(3, 15)
    caption_image = torch.arange(3).repeat_interleave(5)

    metrics = metrics_from_similarity(similarity, caption_image)

    assert metrics["i2t_r1"] == 0.0
    assert metrics["t2i_r1"] == 0.0
    assert metrics["i2t_medr"] == 11.0  # 10 negatives tie the best positive
    assert metrics["t2i_medr"] == 3.0


def test_recall_at_k_boundaries() -> None:
    # Image 0 owns only caption 5, and five captions of image 1 score higher, so its rank is 6.
    scores = torch.tensor([[0.99, 0.98, 0.97, 0.96, 0.95, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])
    caption_image = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1])
    similarity = torch.cat([scores, torch.zeros(1, 11)])

    ranks = image_to_text_ranks(similarity, caption_image)
    metrics = metrics_from_similarity(similarity, caption_image)

    assert ranks[0].item() == 6
    assert metrics["i2t_r5"] == pytest.approx(50.0)  # image 0 misses R@5; image 1 hits
    assert metrics["i2t_r10"] == pytest.approx(100.0)


def test_perfect_embeddings_score_600() -> None:
    images = torch.eye(4)
    caption_image = torch.arange(4).repeat_interleave(5)
    texts = images[caption_image]

    metrics = retrieval_metrics(images, texts, caption_image)

    assert metrics["rsum"] == pytest.approx(600.0)
    assert metrics["i2t_medr"] == 1.0
    assert metrics["t2i_medr"] == 1.0


def test_chunked_text_ranks_match() -> None:
    generator = torch.Generator().manual_seed(0)
    similarity = torch.randn(7, 35, generator=generator)
    caption_image = torch.arange(7).repeat_interleave(5)

    whole = metrics_from_similarity(similarity, caption_image, chunk_size=1000)
    chunked = metrics_from_similarity(similarity, caption_image, chunk_size=4)

    assert whole == chunked
