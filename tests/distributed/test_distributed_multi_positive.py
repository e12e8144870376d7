"""Multiple positives from ``image_ids``: hand-computed values and gradients, and agreement with the plain loss.

The 3x3 case uses ``X = I`` and ``Y = S.T``, so the similarity matrix is exactly the chosen ``S``.
Pairs 0 and 1 share image id 7, so image rows 0 and 1 each have texts 0 and 1 as positives, and text
columns 0 and 1 each have images 0 and 1 as positives. The target of a row is uniform over its positives.
"""

from __future__ import annotations

import math

import pytest
import torch

import adaptive_contrastive as ac
from adaptive_contrastive.functional import compute_direction_terms

SIMILARITIES = [
    [2.0, 1.0, 0.0],
    [0.0, 1.0, 0.0],
    [1.0, 0.0, 3.0],
]
IMAGE_IDS = [7, 7, 9]


def log_sum_exp(*values: float) -> float:
    return math.log(sum(math.exp(value) for value in values))


def expected_losses(scale: float) -> tuple[float, float]:
    """Return ``(L_i2t, L_t2i)`` of the 3x3 case, written out row by row and column by column."""
    s = [[scale * value for value in row] for row in SIMILARITIES]

    # Image rows: row 0 and row 1 have positives {text 0, text 1}, row 2 has {text 2}.
    image_row_0 = log_sum_exp(*s[0]) - (s[0][0] + s[0][1]) / 2
    image_row_1 = log_sum_exp(*s[1]) - (s[1][0] + s[1][1]) / 2
    image_row_2 = log_sum_exp(*s[2]) - s[2][2]

    # Text columns: column 0 and column 1 have positives {image 0, image 1}, column 2 has {image 2}.
    columns = [[s[row][column] for row in range(3)] for column in range(3)]
    text_row_0 = log_sum_exp(*columns[0]) - (columns[0][0] + columns[0][1]) / 2
    text_row_1 = log_sum_exp(*columns[1]) - (columns[1][0] + columns[1][1]) / 2
    text_row_2 = log_sum_exp(*columns[2]) - columns[2][2]

    return (image_row_0 + image_row_1 + image_row_2) / 3, (text_row_0 + text_row_1 + text_row_2) / 3


def case_inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image_features = torch.eye(3, dtype=dtype)
    text_features = torch.tensor(SIMILARITIES, dtype=dtype).T.contiguous()
    return image_features, text_features, torch.tensor(IMAGE_IDS)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_multi_positive_value_by_hand(scale: float) -> None:
    image_features, text_features, image_ids = case_inputs()
    expected_i2t, expected_t2i = expected_losses(scale)

    output = ac.SymmetricInfoNCE()(image_features, text_features, scale, image_ids=image_ids, return_details=True)

    assert output.loss_i2t.item() == pytest.approx(expected_i2t, abs=1e-12)
    assert output.loss_t2i.item() == pytest.approx(expected_t2i, abs=1e-12)
    assert output.loss.item() == pytest.approx(0.5 * (expected_i2t + expected_t2i), abs=1e-12)


def test_multi_positive_gradient_by_hand() -> None:
    scale = 2.0
    image_features, text_features, image_ids = case_inputs()
    text_features.requires_grad_(True)

    ac.SymmetricInfoNCE()(image_features, text_features, scale, image_ids=image_ids).backward()

    # With uniform targets Q, dl_i/dS_ij = scale * (softmax(scale * S_i)_j - Q_ij) for each direction.
    logits = scale * torch.tensor(SIMILARITIES, dtype=torch.float64)
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    grad_i2t = scale * (logits.softmax(dim=1) - targets) / 3
    grad_t2i = scale * (logits.softmax(dim=0) - targets.T) / 3
    grad_similarities = 0.5 * (grad_i2t + grad_t2i)

    # S = X @ Y.T with X = I, so dL/dY = (dL/dS).T.
    torch.testing.assert_close(text_features.grad, grad_similarities.T, atol=1e-12, rtol=0)


def test_multi_positive_gradcheck() -> None:
    generator = torch.Generator().manual_seed(3)
    image_features = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    text_features = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    logit_scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    image_ids = torch.tensor([0, 1, 0, 2, 1])
    loss_fn = ac.SymmetricInfoNCE(normalize=True)

    assert torch.autograd.gradcheck(
        lambda images, texts, scale: loss_fn(images, texts, scale, image_ids=image_ids),
        (image_features, text_features, logit_scale),
    )


@pytest.mark.parametrize(
    "loss_fn",
    [ac.SymmetricInfoNCE(), ac.VarianceAwareInfoNCE(decay=0.0), ac.EntropyWeighted(decay=0.0), ac.SpreadWeighted(decay=0.0)],
    ids=lambda loss_fn: type(loss_fn).__name__,
)
def test_distinct_ids_equal_plain_loss(loss_fn: ac.ContrastiveLoss) -> None:
    generator = torch.Generator().manual_seed(5)
    image_features = torch.nn.functional.normalize(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=-1)
    text_features = torch.nn.functional.normalize(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=-1)
    distinct_ids = torch.tensor([40, 11, 3, 25, 8, 0])

    plain = loss_fn(image_features, text_features, 10.0, return_details=True)
    with_ids = loss_fn(image_features, text_features, 10.0, image_ids=distinct_ids, return_details=True)

    torch.testing.assert_close(with_ids.loss, plain.loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(with_ids.weight_i2t, plain.weight_i2t, atol=1e-12, rtol=0)


def test_direction_terms_ids_match_square_case() -> None:
    image_features, text_features, image_ids = case_inputs()
    expected_i2t, expected_t2i = expected_losses(1.5)

    # Rows 1 and 2 of the images scored against all texts, as one rank of the local-loss layout would.
    loss_i2t, _ = compute_direction_terms(
        image_features[1:], text_features, 1.5, query_ids=image_ids[1:], key_ids=image_ids
    )
    loss_row_0, _ = compute_direction_terms(
        image_features[:1], text_features, 1.5, query_ids=image_ids[:1], key_ids=image_ids
    )
    loss_t2i, _ = compute_direction_terms(text_features, image_features, 1.5, query_ids=image_ids, key_ids=image_ids)

    assert ((2 * loss_i2t + loss_row_0) / 3).item() == pytest.approx(expected_i2t, abs=1e-12)
    assert loss_t2i.item() == pytest.approx(expected_t2i, abs=1e-12)
