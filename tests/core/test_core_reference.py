"""Equality with an independent CLIP loss, hand-computed values and float64 gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

import adaptive_contrastive as ac

ADAPTIVE_CLASSES = [ac.VarianceAwareInfoNCE, ac.EntropyWeighted, ac.SpreadWeighted]
ALL_CLASSES = [ac.SymmetricInfoNCE, *ADAPTIVE_CLASSES]


def clip_reference(image_features, text_features, logit_scale):
    """Compute the CLIP loss as open_clip's ClipLoss writes it, without the package."""
    logits_per_image = logit_scale * image_features @ text_features.T
    labels = torch.arange(image_features.shape[0])
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels))


def make_pair(n=6, d=5, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=generator, dtype=dtype)
    text = torch.randn(n, d, generator=generator, dtype=dtype)
    return image, text


def loss_and_grads(loss_fn, image, text, scale):
    image = image.clone().requires_grad_()
    text = text.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    loss = loss_fn(image, text, scale)
    loss.backward()
    return loss.detach(), image.grad, text.grad, scale.grad


@pytest.mark.parametrize("equal_weight_loss", [
    ac.SymmetricInfoNCE(),
    ac.VarianceAwareInfoNCE(weight_bounds=(1.0, 1.0)),
    ac.EntropyWeighted(power=0.0),
    ac.SpreadWeighted(weight_bounds=(1.0, 1.0)),
], ids=["symmetric", "variance_bounds_1", "entropy_power_0", "spread_bounds_1"])
def test_equal_weights_match_clip_value_and_grad(equal_weight_loss):
    image, text = make_pair()
    scale = torch.tensor(3.0, dtype=torch.float64)

    expected = loss_and_grads(clip_reference, image, text, scale)
    actual = loss_and_grads(equal_weight_loss, image, text, scale)

    assert torch.allclose(actual[0], expected[0], rtol=1e-12, atol=0)
    assert torch.allclose(actual[1], expected[1], rtol=1e-10, atol=1e-12)
    assert torch.allclose(actual[2], expected[2], rtol=1e-10, atol=1e-12)
    assert torch.allclose(actual[3], expected[3], rtol=1e-10, atol=1e-12)


def test_symmetric_float32_matches_clip():
    image, text = make_pair(n=16, d=8, dtype=torch.float32)
    image = F.normalize(image, dim=-1)
    text = F.normalize(text, dim=-1)

    expected = clip_reference(image, text, 100.0)
    actual = ac.SymmetricInfoNCE()(image, text, 100.0)

    assert actual.dtype == torch.float32
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_kind", ["float", "tensor", "parameter"])
def test_symmetric_accepts_each_scale_kind(scale_kind):
    image, text = make_pair()
    scale = {"float": 2.5, "tensor": torch.tensor(2.5), "parameter": torch.nn.Parameter(torch.tensor(2.5))}[scale_kind]

    actual = ac.SymmetricInfoNCE()(image, text, scale)

    assert torch.allclose(actual, clip_reference(image, text, 2.5), rtol=1e-6)


def test_symmetric_fixed_weights_value():
    image, text = make_pair()
    logits = 2.0 * image @ text.T
    labels = torch.arange(6)
    expected = 0.5 * (0.3 * F.cross_entropy(logits, labels) + 1.7 * F.cross_entropy(logits.T, labels))

    actual = ac.SymmetricInfoNCE(weights=(0.3, 1.7))(image, text, 2.0)

    # The weights are stored as float32, so 0.3 and 1.7 carry float32 rounding.
    assert torch.allclose(actual, expected, rtol=1e-7)


def test_hand_2x2_identity_features():
    # S = s * I, so every row and column softmax gives the positive e^s / (e^s + 1) and each direction's
    # loss is log(1 + e^-s). With s = ln 3 that is log(4/3).
    eye = torch.eye(2, dtype=torch.float64)

    loss = ac.SymmetricInfoNCE()(eye, eye, math.log(3.0))

    assert loss.item() == pytest.approx(math.log(4.0 / 3.0), rel=1e-12)


def test_hand_2x2_directions_differ():
    # Images e1, e2 and texts e1, e1 at s = 1 give S = [[1, 1], [0, 0]]. Both image rows are flat, so
    # L_i2t = ln 2. The text columns are [1, 0] and [1, 0] with positives at index 0 and 1, so the
    # per-text losses are a = log(1 + 1/e) and log(1 + e) = 1 + a.
    image = torch.eye(2, dtype=torch.float64)
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    a = math.log(1.0 + math.exp(-1.0))

    details = ac.SymmetricInfoNCE()(image, text, 1.0, return_details=True)

    assert details.loss_i2t.item() == pytest.approx(math.log(2.0), rel=1e-12)
    assert details.loss_t2i.item() == pytest.approx(a + 0.5, rel=1e-12)
    assert details.loss.item() == pytest.approx(0.5 * (math.log(2.0) + a + 0.5), rel=1e-12)


@pytest.mark.parametrize("loss_class", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
def test_gradcheck_float64(loss_class, normalize):
    # The adaptive weights depend on the batch but carry no gradient, so finite differences would see
    # them move. In eval mode they come from the buffers alone, which keeps them fixed.
    image, text = make_pair(n=5, d=4, seed=1)
    loss_fn = loss_class(normalize=normalize)
    loss_fn(image, text, 2.0)
    loss_fn.eval()
    inputs = (image.requires_grad_(), text.requires_grad_(), torch.tensor(2.0, dtype=torch.float64, requires_grad=True))

    assert torch.autograd.gradcheck(lambda x, y, s: loss_fn(x, y, s), inputs)


@pytest.mark.parametrize("loss_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_float64_input_float64_loss(loss_class):
    image, text = make_pair()

    loss = loss_class()(image, text, 2.0)

    assert loss.dtype == torch.float64
