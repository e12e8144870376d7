"""Overflow and dtype cases that once produced a silent NaN or a corrupted moving average."""

import pytest
import torch
import torch.nn.functional as F

import adaptive_contrastive as ac
from adaptive_contrastive.weighting import ema_update_, weights_from_statistics

ADAPTIVE_CLASSES = [ac.VarianceAwareInfoNCE, ac.EntropyWeighted, ac.SpreadWeighted]


def normalized_batch(rows: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
    return image, text


@pytest.mark.parametrize("power", [20.0, 50.0, 200.0])
@pytest.mark.parametrize("mapping", ["direct", "inverse"])
def test_weights_finite_at_large_power(power, mapping):
    statistic = torch.tensor([3.0e-4, 2.0e-4])

    weights = weights_from_statistics(statistic, mapping=mapping, power=power, weight_bounds=(0.1, 1.9))

    assert torch.isfinite(weights).all()
    assert weights.sum().item() == pytest.approx(2.0)


def test_weights_match_ratio_form():
    statistic = torch.tensor([0.3, 0.1])

    weights = weights_from_statistics(statistic, mapping="direct", power=2.0, weight_bounds=(0.01, 1.99), eps=1e-8)

    d0, d1 = (0.3 + 1e-8) ** 2, (0.1 + 1e-8) ** 2
    assert weights[0].item() == pytest.approx(2 * d0 / (d0 + d1), rel=1e-6)


@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
def test_large_power_loss_finite(loss_class):
    image, text = normalized_batch(256, 64, seed=0)

    details = loss_class(power=20.0)(image, text, 100.0, return_details=True)

    assert torch.isfinite(details.loss)
    assert torch.isfinite(details.weight_i2t)


def test_zero_statistic_inverse_power_finite():
    ones = torch.ones(8, 4)

    details = ac.SpreadWeighted(power=5.0)(ones, ones, 10.0, return_details=True)

    assert details.weight_i2t.item() == pytest.approx(1.0)


def test_statistic_overflow_raises():
    generator = torch.Generator().manual_seed(0)
    image = 1e10 * torch.randn(8, 4, generator=generator)
    text = 1e10 * torch.randn(8, 4, generator=generator)
    loss_fn = ac.VarianceAwareInfoNCE()

    with pytest.raises(ValueError, match="difficulty statistic overflowed float32"):
        loss_fn(image, text, 1.0)
    assert loss_fn.ema_step.item() == 0


def test_unvalidated_overflow_keeps_average():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(8, 4, generator=generator)
    text = torch.randn(8, 4, generator=generator)
    loss_fn = ac.VarianceAwareInfoNCE(validate_values=False)
    loss_fn(image, text, 10.0)
    before = loss_fn.ema_statistic.clone()

    loss_fn(1e10 * image, 1e10 * text, 1.0)
    after_bad_step = loss_fn.ema_statistic.clone()
    clean_loss = loss_fn(image, text, 10.0)

    assert torch.equal(after_bad_step, before)
    assert torch.isfinite(loss_fn.ema_statistic).all()
    assert torch.isfinite(clean_loss)


def test_ema_update_skips_non_finite_entry():
    average = torch.tensor([2.0, 4.0])
    step = torch.zeros((), dtype=torch.int64)

    ema_update_(average, step, torch.tensor([float("inf"), 0.0]), decay=0.5)

    assert average.tolist() == [2.0, 2.0]
    assert step.item() == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_module_cast_keeps_float32_average(dtype):
    loss_fn = ac.VarianceAwareInfoNCE(statistic="logit")
    image, text = normalized_batch(8, 4, seed=1)
    loss_fn(image, text, 10.0)
    expected = loss_fn.ema_statistic.clone()

    loss_fn.to(dtype)

    assert loss_fn.ema_statistic.dtype == torch.float32
    assert torch.equal(loss_fn.ema_statistic, expected)
    assert loss_fn.ema_step.dtype == torch.int64


def test_half_module_large_logits_finite():
    generator = torch.Generator().manual_seed(0)
    image = (30 * torch.randn(8, 4, generator=generator)).half()
    text = (30 * torch.randn(8, 4, generator=generator)).half()
    loss_fn = ac.VarianceAwareInfoNCE(statistic="logit").half()

    loss = loss_fn(image, text, 100.0)

    assert torch.isfinite(loss)
    assert torch.isfinite(loss_fn.ema_statistic).all()
