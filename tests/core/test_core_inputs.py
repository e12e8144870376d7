"""Rejected inputs, their messages, the batch-of-one warning and half-precision inputs."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import adaptive_contrastive as ac
from adaptive_contrastive import functional

ALL_CLASSES = [ac.SymmetricInfoNCE, ac.VarianceAwareInfoNCE, ac.EntropyWeighted, ac.SpreadWeighted]
IMAGE = torch.randn(4, 3)
TEXT = torch.randn(4, 3)


@pytest.fixture(params=ALL_CLASSES, ids=lambda c: c.__name__)
def loss_fn(request):
    return request.param()


@pytest.mark.parametrize(
    ("image", "text", "error", "message"),
    [
        (IMAGE, torch.randn(5, 3), ValueError, r"same number of rows .* got 4 and 5"),
        (IMAGE, torch.randn(4, 2), ValueError, r"same embedding size D, got 3 and 2"),
        (torch.randn(4), TEXT, ValueError, r"image_features must be 2-D .*shape=\(4,\)"),
        (IMAGE, torch.randn(4, 3, 1), ValueError, r"text_features must be 2-D .*shape=\(4, 3, 1\)"),
        (torch.randn(0, 3), torch.randn(0, 3), ValueError, r"empty \(batch size N = 0\)"),
        (torch.randn(4, 0), torch.randn(4, 0), ValueError, r"embedding size D = 0"),
        (torch.ones(4, 3, dtype=torch.int64), TEXT, TypeError, r"image_features must have a floating dtype .*torch.int64"),
        (IMAGE, torch.ones(4, 3, dtype=torch.int32), TypeError, r"text_features .*torch.int32.* text_features.float\(\)"),
        (IMAGE.numpy(), TEXT, TypeError, r"image_features must be a torch.Tensor .* got ndarray"),
    ],
    ids=["rows", "dim", "image_1d", "text_3d", "empty", "zero_dim", "int64", "int32", "numpy"],
)
def test_rejects_bad_features(loss_fn, image, text, error, message):
    with pytest.raises(error, match=message):
        loss_fn(image, text, 10.0)


@pytest.mark.parametrize("row", [0, 3])
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_rejects_nonfinite_image(loss_fn, row, bad_value):
    image = IMAGE.clone()
    image[row, 1] = bad_value

    with pytest.raises(ValueError, match=rf"image_features contains 1 non-finite values .* rows \[{row}\]"):
        loss_fn(image, TEXT, 10.0)


def test_rejects_nonfinite_text(loss_fn):
    text = TEXT.clone()
    text[2] = math.nan

    with pytest.raises(ValueError, match=r"text_features contains 3 non-finite values .* rows \[2\]"):
        loss_fn(IMAGE, text, 10.0)


@pytest.mark.parametrize(
    ("scale", "error", "message"),
    [
        (0.0, ValueError, r"logit_scale must be a finite number > 0 .* got 0.0"),
        (-1.0, ValueError, r"got -1.0. If you store the log, pass logit_scale.exp\(\)"),
        (math.nan, ValueError, r"got nan"),
        (math.inf, ValueError, r"got inf"),
        (torch.tensor(0.0), ValueError, r"logit_scale must be finite and > 0 .* got 0.0"),
        (torch.tensor(-2.0), ValueError, r"got -2.0"),
        (torch.tensor(math.nan), ValueError, r"logit_scale must be finite .* got nan"),
        (torch.tensor(math.inf), ValueError, r"logit_scale must be finite .* got inf"),
        (torch.tensor([1.0, 2.0]), ValueError, r"logit_scale must be a scalar .*shape=\(2,\).*Pass one multiplier"),
        (torch.tensor(10), TypeError, r"logit_scale must have a floating dtype.*torch.int64.*logit_scale.float\(\)"),
        (True, TypeError, r"logit_scale must be a float, a 0-d tensor or a Parameter, got bool"),
        ("10", TypeError, r"got str"),
    ],
    ids=["zero", "negative", "nan", "inf", "t_zero", "t_negative", "t_nan", "t_inf", "t_vector", "t_int", "bool", "str"],
)
def test_rejects_bad_logit_scale(loss_fn, scale, error, message):
    with pytest.raises(error, match=message):
        loss_fn(IMAGE, TEXT, scale)


def test_meta_image_cpu_text(loss_fn):
    image = torch.empty(4, 3, device="meta")

    with pytest.raises(ValueError, match=r"same device, got meta and cpu. Move one with .to\(other.device\)"):
        loss_fn(image, TEXT, 10.0)


def test_meta_logit_scale_cpu_features(loss_fn):
    scale = torch.empty((), device="meta")

    with pytest.raises(ValueError, match=r"logit_scale is on meta but the features are on cpu"):
        loss_fn(IMAGE, TEXT, scale)


def test_validate_values_off_returns_nan():
    image = IMAGE.clone()
    image[0, 0] = math.nan

    loss = ac.SymmetricInfoNCE(validate_values=False)(image, TEXT, 10.0)

    assert torch.isnan(loss)


def test_overflow_with_finite_inputs():
    # Each similarity is 3e40, beyond the float32 maximum of about 3.4e38.
    features = torch.full((4, 3), 1e20)

    with pytest.raises(ValueError, match=r"overflowed float32 .* normalize=True"):
        ac.SymmetricInfoNCE()(features, features, 10.0)


def test_batch_of_one_warns_once(monkeypatch):
    monkeypatch.setattr(functional, "_warned_batch_of_one", False)
    image = torch.randn(1, 3)
    text = torch.randn(1, 3)
    loss_fn = ac.VarianceAwareInfoNCE()

    with pytest.warns(RuntimeWarning, match=r"batch of one pair is identically 0"):
        first = loss_fn(image, text, 10.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = ac.SymmetricInfoNCE()(image, text, 10.0)

    assert first.item() == 0.0
    assert second.item() == 0.0
    assert caught == []


def test_batch_of_one_equal_weights(monkeypatch):
    monkeypatch.setattr(functional, "_warned_batch_of_one", True)

    details = ac.VarianceAwareInfoNCE()(torch.randn(1, 3), torch.randn(1, 3), 10.0, return_details=True)

    assert details.weight_i2t.item() == 1.0
    assert details.weight_t2i.item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalize"])
def test_half_precision_at_scale_100(loss_fn, dtype, normalize):
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(16, 8, generator=generator), dim=-1).to(dtype).requires_grad_()
    text = F.normalize(torch.randn(16, 8, generator=generator), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(100.0, dtype=dtype, requires_grad=True)
    loss_fn.normalize = normalize

    loss = loss_fn(image, text, scale)
    loss.backward()
    reference = ac.SymmetricInfoNCE(normalize=normalize)(image.detach().float(), text.detach().float(), 100.0)

    assert loss.dtype == torch.float32
    assert image.grad.dtype == dtype
    assert text.grad.dtype == dtype
    assert scale.grad.dtype == dtype
    assert torch.isfinite(loss)
    assert torch.isfinite(image.grad).all()
    assert torch.isfinite(text.grad).all()
    assert torch.isfinite(scale.grad)
    if isinstance(loss_fn, ac.SymmetricInfoNCE):
        assert torch.allclose(loss, reference, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_large_logits_finite(dtype):
    # Unnormalised features of norm 3 at scale 100 give logits of magnitude up to 900.
    generator = torch.Generator().manual_seed(1)
    image = (3 * F.normalize(torch.randn(8, 4, generator=generator), dim=-1)).to(dtype).requires_grad_()
    text = (3 * F.normalize(torch.randn(8, 4, generator=generator), dim=-1)).to(dtype).requires_grad_()

    loss = ac.EntropyWeighted()(image, text, 100.0)
    loss.backward()

    assert torch.isfinite(loss)
    assert torch.isfinite(image.grad).all()
