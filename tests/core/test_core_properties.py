"""Hypothesis properties: weight range and sum, batch permutation invariance, image-text swap symmetry."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import adaptive_contrastive as ac

ADAPTIVE_CLASSES = [ac.VarianceAwareInfoNCE, ac.EntropyWeighted, ac.SpreadWeighted]
SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def feature_batches(draw, min_rows=2, max_rows=12, magnitudes=(1.0, 30.0)):
    n = draw(st.integers(min_rows, max_rows))
    d = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from(magnitudes))
    generator = torch.Generator().manual_seed(seed)
    image = magnitude * torch.randn(n, d, generator=generator, dtype=torch.float64)
    text = magnitude * torch.randn(n, d, generator=generator, dtype=torch.float64)
    return image, text, seed


LOGIT_SCALES = st.sampled_from([0.5, 1.0, 14.285714, 100.0])
LOSS_OPTIONS = st.fixed_dictionaries(
    {
        "mapping": st.sampled_from(["direct", "inverse"]),
        "power": st.sampled_from([0.0, 0.5, 1.0, 3.0]),
        "weight_bounds": st.sampled_from([(0.5, 1.5), (0.1, 1.9), (1.0, 1.0), (0.9, 3.0)]),
        "normalize": st.booleans(),
    }
)


def weight_pair(details):
    return torch.stack([details.weight_i2t, details.weight_t2i])


def statistic_pair(details):
    return torch.stack([details.statistic_i2t, details.statistic_t2i])


# Allowed absolute difference of a variance statistic between two row orders. The float64 sums keep the
# rounding difference near 1e-14 (see statistics.sums_dtype), so this bound leaves a wide margin.
STATISTIC_NOISE = 1e-5


def weight_tolerance(statistic):
    # w_i2t = 2 c_i2t / (c_i2t + c_t2i) moves by at most about 2 / min(c) per unit change of a statistic.
    return 1e-5 + 2 * STATISTIC_NOISE / statistic.min().clamp_min(STATISTIC_NOISE).item()


@pytest.mark.filterwarnings("ignore:InfoNCE on a batch of one pair")
@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(batch=feature_batches(min_rows=1, magnitudes=(1e-3, 1.0, 30.0)), logit_scale=LOGIT_SCALES, options=LOSS_OPTIONS)
def test_weights_positive_sum_two(loss_class, batch, logit_scale, options):
    image, text, _ = batch
    low, high = options["weight_bounds"]

    details = loss_class(**options)(image, text, logit_scale, return_details=True)
    weights = weight_pair(details)

    assert torch.all(weights > 0)
    assert weights.sum().item() == pytest.approx(2.0, abs=1e-6)
    assert torch.all(weights >= low - 1e-6)
    assert torch.all(weights <= high + 1e-6)
    assert torch.isfinite(details.loss)


# The permutation and swap properties draw features of magnitude 1 and 30 only. The near-uniform softmax
# of magnitude-1e-3 features, whose true log-prob variance is about 1e-11, has its own test:
# test_variance_near_uniform_noise.
@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(batch=feature_batches(), logit_scale=LOGIT_SCALES)
def test_common_permutation_invariance(loss_class, batch, logit_scale):
    image, text, seed = batch
    permutation = torch.randperm(image.shape[0], generator=torch.Generator().manual_seed(seed))

    expected = loss_class()(image, text, logit_scale, return_details=True)
    actual = loss_class()(image[permutation], text[permutation], logit_scale, return_details=True)

    tolerance = weight_tolerance(statistic_pair(expected))
    assert torch.allclose(actual.loss, expected.loss, rtol=1e-6, atol=1e-9)
    assert torch.allclose(weight_pair(actual), weight_pair(expected), rtol=0, atol=tolerance)
    assert torch.allclose(statistic_pair(actual), statistic_pair(expected), rtol=1e-4, atol=STATISTIC_NOISE)


@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(batch=feature_batches(), logit_scale=LOGIT_SCALES)
def test_swap_modalities_swaps_directions(loss_class, batch, logit_scale):
    image, text, _ = batch

    forward = loss_class()(image, text, logit_scale, return_details=True)
    swapped = loss_class()(text, image, logit_scale, return_details=True)

    assert torch.allclose(swapped.loss_i2t, forward.loss_t2i, rtol=1e-9, atol=1e-12)
    assert torch.allclose(swapped.loss_t2i, forward.loss_i2t, rtol=1e-9, atol=1e-12)
    tolerance = weight_tolerance(statistic_pair(forward))
    assert torch.allclose(swapped.statistic_i2t, forward.statistic_t2i, rtol=1e-4, atol=STATISTIC_NOISE)
    assert torch.allclose(swapped.statistic_t2i, forward.statistic_i2t, rtol=1e-4, atol=STATISTIC_NOISE)
    assert torch.allclose(swapped.weight_i2t, forward.weight_t2i, rtol=0, atol=tolerance)
    assert torch.allclose(swapped.weight_t2i, forward.weight_i2t, rtol=0, atol=tolerance)
    assert torch.allclose(swapped.loss, forward.loss, rtol=tolerance, atol=1e-9)


@SETTINGS
@given(batch=feature_batches(), logit_scale=LOGIT_SCALES)
def test_symmetric_swap_same_loss(batch, logit_scale):
    image, text, _ = batch

    forward = ac.SymmetricInfoNCE()(image, text, logit_scale)
    swapped = ac.SymmetricInfoNCE()(text, image, logit_scale)

    assert torch.allclose(swapped, forward, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(batch=feature_batches(), logit_scale=LOGIT_SCALES)
def test_symmetric_matches_clip_property(batch, logit_scale):
    image, text, _ = batch
    logits = logit_scale * image @ text.T
    labels = torch.arange(image.shape[0])
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    actual = ac.SymmetricInfoNCE()(image, text, logit_scale)

    assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12)
