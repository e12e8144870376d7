"""Output formats, functional forms, LogitScale and multiple positives through image_ids."""

import math

import pytest
import torch
import torch.nn.functional as F

import adaptive_contrastive as ac
from adaptive_contrastive.functional import adaptive_info_nce
from adaptive_contrastive.strategies import entropy_statistic

ALL_CLASSES = [ac.SymmetricInfoNCE, ac.VarianceAwareInfoNCE, ac.EntropyWeighted, ac.SpreadWeighted]
ADAPTIVE_PAIRS = [
    (ac.VarianceAwareInfoNCE, ac.variance_aware_info_nce),
    (ac.EntropyWeighted, ac.entropy_weighted_info_nce),
    (ac.SpreadWeighted, ac.spread_weighted_info_nce),
]


def make_pair(n=6, d=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=generator), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=generator), dim=-1)
    return image, text


@pytest.mark.parametrize("loss_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_output_dict_format(loss_class):
    image, text = make_pair()

    result = loss_class()(image, text, 10.0, output_dict=True)
    plain = loss_class()(image, text, 10.0)

    assert list(result) == ["contrastive_loss"]
    assert torch.equal(result["contrastive_loss"], plain)


@pytest.mark.parametrize("loss_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_return_details_format(loss_class):
    image, text = make_pair()

    details = loss_class()(image, text, 10.0, return_details=True)

    assert isinstance(details, ac.ContrastiveLossOutput)
    assert details.loss.shape == ()
    assert details.loss.dtype == torch.float32
    assert not details.loss_i2t.requires_grad
    assert not details.loss_t2i.requires_grad
    assert details.weight_i2t.dtype == torch.float32
    assert isinstance(details.summary, ac.DirectionSummary)
    assert details.summary.mean_loss.shape == (2,)
    assert torch.allclose(details.loss, 0.5 * (details.weight_i2t * details.loss_i2t + details.weight_t2i * details.loss_t2i))


def test_symmetric_details_have_no_statistic():
    image, text = make_pair()

    details = ac.SymmetricInfoNCE(weights=(0.5, 1.5))(image, text, 10.0, return_details=True)

    assert details.statistic_i2t is None
    assert details.smoothed_statistic_t2i is None
    assert details.weight_i2t.item() == 0.5
    assert details.weight_t2i.item() == 1.5


@pytest.mark.parametrize("loss_class", ALL_CLASSES, ids=lambda c: c.__name__)
def test_details_and_output_dict_flat(loss_class):
    image, text = make_pair()

    result = loss_class()(image, text, 10.0, output_dict=True, return_details=True)

    assert isinstance(result, dict)
    assert "contrastive_loss" in result
    assert "loss" not in result
    assert "weight_i2t" in result
    assert "summary_mean_entropy" in result
    assert all(value is not None for value in result.values())


def test_symmetric_functional_matches_module():
    image, text = make_pair()

    module_details = ac.SymmetricInfoNCE(weights=(0.4, 1.6))(image, text, 10.0, return_details=True)
    functional_details = ac.symmetric_info_nce(image, text, 10.0, weights=(0.4, 1.6), return_details=True)

    assert torch.equal(module_details.loss, functional_details.loss)
    assert torch.equal(module_details.weight_i2t, functional_details.weight_i2t)


@pytest.mark.parametrize(("loss_class", "function"), ADAPTIVE_PAIRS, ids=lambda x: getattr(x, "__name__", ""))
def test_functional_matches_decay_zero(loss_class, function):
    for seed in range(3):
        image, text = make_pair(seed=seed)

        expected = loss_class(decay=0.0, power=2.0, weight_bounds=(0.2, 1.8))(image, text, 10.0, return_details=True)
        actual = function(image, text, 10.0, power=2.0, weight_bounds=(0.2, 1.8), return_details=True)

        assert torch.equal(actual.loss, expected.loss)
        assert torch.equal(actual.weight_i2t, expected.weight_i2t)


@pytest.mark.parametrize(("loss_class", "function"), ADAPTIVE_PAIRS, ids=lambda x: getattr(x, "__name__", ""))
def test_functional_matches_first_step(loss_class, function):
    # With bias correction, the first training step's average is the batch statistic itself.
    image, text = make_pair()

    expected = loss_class()(image, text, 10.0)
    actual = function(image, text, 10.0)

    assert torch.allclose(actual, expected, rtol=1e-6)


def test_functional_variance_options():
    image, text = make_pair()

    expected = ac.VarianceAwareInfoNCE(decay=0.0, statistic="prob", mapping="inverse")(image, text, 10.0)
    actual = ac.variance_aware_info_nce(image, text, 10.0, statistic="prob", mapping="inverse")

    assert torch.equal(actual, expected)


def test_functional_variance_rejects_statistic():
    image, text = make_pair()

    with pytest.raises(ValueError, match=r"statistic must be one of .* got 'margin'"):
        ac.variance_aware_info_nce(image, text, 10.0, statistic="margin")


def test_adaptive_functional_with_buffers():
    module = ac.EntropyWeighted(decay=0.8)
    ema_statistic = torch.zeros(2)
    ema_step = torch.zeros((), dtype=torch.int64)

    for seed in range(3):
        image, text = make_pair(seed=seed)
        expected = module(image, text, 10.0)
        actual = adaptive_info_nce(
            image, text, 10.0, statistic_fn=entropy_statistic, ema_statistic=ema_statistic, ema_step=ema_step, decay=0.8
        )

        assert torch.equal(actual, expected)

    assert torch.equal(ema_statistic, module.ema_statistic)
    assert torch.equal(ema_step, module.ema_step)


def test_adaptive_functional_needs_both_buffers():
    image, text = make_pair()

    with pytest.raises(ValueError, match=r"ema_statistic and ema_step must be passed together"):
        adaptive_info_nce(image, text, 10.0, statistic_fn=entropy_statistic, ema_statistic=torch.zeros(2))


def test_functional_rejects_invalid_option():
    image, text = make_pair()

    with pytest.raises(ValueError, match=r"weight_bounds must satisfy .* got \(1.1, 1.5\)"):
        ac.entropy_weighted_info_nce(image, text, 10.0, weight_bounds=(1.1, 1.5))


def test_logit_scale_init():
    scale = ac.LogitScale()

    assert scale.log_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-7)
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert isinstance(scale.log_scale, torch.nn.Parameter)
    assert scale.log_scale.dtype == torch.float32


def test_logit_scale_clamp_in_place():
    scale = ac.LogitScale()
    parameter = scale.log_scale
    data_pointer = parameter.data_ptr()
    with torch.no_grad():
        parameter.fill_(10.0)

    scale.clamp_()

    assert scale.log_scale is parameter
    assert parameter.data_ptr() == data_pointer
    assert parameter.item() == pytest.approx(math.log(100.0), rel=1e-7)
    assert scale().item() == pytest.approx(100.0, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("max_scale", [100.0, 50.0, 14.285714])
def test_clamped_scale_not_above_max(dtype, max_scale):
    parameter = torch.nn.Parameter(torch.tensor(10.0, dtype=dtype))

    ac.clamp_logit_scale_(parameter, max_scale)

    assert parameter.exp().item() <= max_scale
    assert parameter.exp().item() == pytest.approx(max_scale, rel=1e-2)


def test_logit_scale_clamp_keeps_small():
    scale = ac.LogitScale(init_temperature=0.5)

    scale.clamp_()

    assert scale().item() == pytest.approx(2.0, rel=1e-6)


def test_logit_scale_clamp_keeps_optimizer_state():
    scale = ac.LogitScale()
    optimizer = torch.optim.Adam(scale.parameters(), lr=1.0)
    image, text = make_pair()

    for _ in range(3):
        optimizer.zero_grad()
        loss = -ac.SymmetricInfoNCE()(image, text, scale())
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            scale.log_scale.add_(5.0)
        scale.clamp_()
    state = optimizer.state[scale.log_scale]

    assert optimizer.param_groups[0]["params"][0] is scale.log_scale
    assert state["step"].item() == 3
    assert state["exp_avg"].shape == ()
    assert scale().item() <= 100.0 * (1 + 1e-6)


def test_clamp_function_returns_parameter():
    parameter = torch.nn.Parameter(torch.tensor(7.0))

    result = ac.clamp_logit_scale_(parameter, max_scale=50.0)

    assert result is parameter
    assert parameter.item() == pytest.approx(math.log(50.0), rel=1e-7)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init_temperature": 0.0}, r"init_temperature must be a finite number > 0, got 0.0"),
        ({"init_temperature": math.nan}, r"init_temperature .* got nan"),
        ({"max_scale": -1.0}, r"max_scale must be a finite number > 0, got -1.0"),
        ({"init_temperature": 0.001}, r"1 / init_temperature = 1000 exceeds max_scale = 100.0"),
    ],
)
def test_logit_scale_rejects_invalid(options, message):
    with pytest.raises(ValueError, match=message):
        ac.LogitScale(**options)


def test_clamp_function_rejects_max_scale():
    with pytest.raises(ValueError, match=r"max_scale must be a finite number > 0, got 0.0"):
        ac.clamp_logit_scale_(torch.nn.Parameter(torch.tensor(1.0)), max_scale=0.0)


def test_image_ids_distinct_match_plain():
    image, text = make_pair()

    expected = ac.SymmetricInfoNCE()(image, text, 10.0)
    actual = ac.SymmetricInfoNCE()(image, text, 10.0, image_ids=torch.tensor([5, 1, 2, 3, 4, 0]))

    assert torch.allclose(actual, expected, rtol=1e-6)


def test_image_ids_uniform_over_positives():
    # Pairs 0 and 1 share an image, so in both directions rows 0 and 1 each have two positives, and each
    # row's loss is minus the mean log-probability of its positives.
    image, text = make_pair(n=4)
    image_ids = torch.tensor([7, 7, 8, 9])
    logits = 10.0 * image @ text.T
    positives = image_ids[:, None] == image_ids[None, :]

    def direction_loss(direction_logits):
        log_probs = direction_logits.log_softmax(dim=1)
        return -((log_probs * positives).sum(dim=1) / positives.sum(dim=1)).mean()

    details = ac.SymmetricInfoNCE()(image, text, 10.0, image_ids=image_ids, return_details=True)

    assert details.loss_i2t.item() == pytest.approx(direction_loss(logits).item(), rel=1e-6)
    assert details.loss_t2i.item() == pytest.approx(direction_loss(logits.T).item(), rel=1e-6)


def test_image_ids_adaptive_weights_sum():
    image, text = make_pair(n=6)

    details = ac.VarianceAwareInfoNCE()(image, text, 10.0, image_ids=torch.tensor([0, 0, 1, 1, 2, 3]), return_details=True)

    assert (details.weight_i2t + details.weight_t2i).item() == pytest.approx(2.0, abs=1e-6)
    assert torch.isfinite(details.loss)


@pytest.mark.parametrize(
    ("image_ids", "error", "message"),
    [
        (torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), TypeError, r"image_ids must have an integer dtype .*torch.float32"),
        (torch.tensor([0, 1, 2]), ValueError, r"image_ids must have shape \(N,\) = \(6,\)"),
        ([0, 1, 2, 3, 4, 5], TypeError, r"image_ids must be a torch.Tensor .* got list"),
        (torch.zeros(6, dtype=torch.int64, device="meta"), ValueError, r"image_ids is on meta but the features are on cpu"),
    ],
    ids=["float", "shape", "list", "meta"],
)
def test_image_ids_rejects_invalid(image_ids, error, message):
    image, text = make_pair()

    with pytest.raises(error, match=message):
        ac.SymmetricInfoNCE()(image, text, 10.0, image_ids=image_ids)


def test_all_names_importable():
    for name in ac.__all__:
        assert hasattr(ac, name), name
