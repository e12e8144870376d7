"""Cross-modal retrieval metrics: Recall@K, median rank and rsum.

Definitions, for a similarity matrix ``S`` of shape (num_images, num_captions) where caption
``c`` belongs to image ``g(c)``:

* Image to text: the query is image ``i`` and the gallery is every caption. The rank of ``i`` is
  the 1-based position of its best-scoring own caption, so a hit at K means that at least one of
  the image's captions (five in Flickr8k) is in the top K.
* Text to image: the query is caption ``c`` and the gallery holds each image once. The rank of
  ``c`` is the 1-based position of image ``g(c)``, matched by image id.
* Ties count against the query (pessimistic rule): a wrong item whose score equals the score of
  the correct item is ranked ahead of it. A constant similarity matrix therefore scores the
  worst possible rank, never a lucky one.
* R@K is the percentage of queries with rank <= K. Median rank is the median of the ranks
  (numpy's median, so it can end in .5). rsum is the sum of the six recalls R@{1,5,10} in both
  directions, at most 600.
"""

from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 5, 10)


def image_to_text_ranks(similarity: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """Return the 1-based rank of each image's best own caption, ties counted against it.

    Args:
        similarity: (num_images, num_captions) scores, higher is more similar.
        caption_image: (num_captions,) int64 index of each caption's image.

    Returns:
        (num_images,) int64 ranks. An image without captions gets rank num_captions + 1.
    """
    num_images, num_captions = similarity.shape
    positive = caption_image.view(1, -1) == torch.arange(num_images).view(-1, 1)
    best_positive = similarity.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    negatives_ahead = ((similarity >= best_positive) & ~positive).sum(dim=1)
    ranks = negatives_ahead + 1
    has_caption = positive.any(dim=1)
    return torch.where(has_caption, ranks, torch.full_like(ranks, num_captions + 1))


def text_to_image_ranks(similarity: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """Return the 1-based rank of each caption's image among all images, ties counted against it.

    Args:
        similarity: (num_images, num_captions) scores, higher is more similar.
        caption_image: (num_captions,) int64 index of each caption's image.

    Returns:
        (num_captions,) int64 ranks.
    """
    columns = torch.arange(similarity.shape[1])
    positive_score = similarity[caption_image, columns]
    at_or_above = (similarity >= positive_score.view(1, -1)).sum(dim=0)
    return at_or_above  # includes the correct image itself, so this is already 1-based


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Return the percentage of ranks <= k."""
    return 100.0 * (ranks <= k).float().mean().item()


def retrieval_metrics(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    caption_image: torch.Tensor | np.ndarray,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Compute R@1/5/10 in both directions, both median ranks and rsum from embeddings.

    Similarity is the dot product, which is cosine similarity for L2-normalised embeddings.

    Args:
        image_embeddings: (num_images, D), one row per gallery image.
        text_embeddings: (num_captions, D).
        caption_image: (num_captions,) int64 row of ``image_embeddings`` that each caption belongs to.
        chunk_size: captions scored per block for the text-to-image ranks, to bound memory.

    Returns:
        Keys "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10" (percent), "i2t_medr",
        "t2i_medr" (1-based ranks) and "rsum".
    """
    caption_image = torch.as_tensor(caption_image, dtype=torch.int64)
    similarity = image_embeddings.float() @ text_embeddings.float().T
    return metrics_from_similarity(similarity, caption_image, chunk_size)


def metrics_from_similarity(
    similarity: torch.Tensor, caption_image: torch.Tensor, chunk_size: int = 1024
) -> dict[str, float]:
    """Compute the metrics of :func:`retrieval_metrics` from a (num_images, num_captions) similarity."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.int64)
    i2t = image_to_text_ranks(similarity, caption_image)
    t2i = torch.cat([
        text_to_image_ranks(similarity[:, start:start + chunk_size], caption_image[start:start + chunk_size])
        for start in range(0, similarity.shape[1], chunk_size)
    ])

    metrics: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in RECALL_KS:
            metrics[f"{direction}_r{k}"] = recall_at_k(ranks, k)
        metrics[f"{direction}_medr"] = float(np.median(ranks.numpy()))
    metrics["rsum"] = sum(metrics[f"{direction}_r{k}"] for direction in ("i2t", "t2i") for k in RECALL_KS)
    return metrics
