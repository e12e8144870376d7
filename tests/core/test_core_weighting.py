"""Weight maps, hand-computed statistics, the moving average, eval mode and checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

import adaptive_contrastive as ac
from adaptive_contrastive.weighting import weights_from_statistics

ADAPTIVE_CLASSES = [ac.VarianceAwareInfoNCE, ac.EntropyWeighted, ac.SpreadWeighted]


def batches(count, n=8, d=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        image = F.normalize(torch.randn(n, d, generator=generator), dim=-1)
        text = F.normalize(torch.randn(n, d, generator=generator), dim=-1)
        result.append((image, text))
    return result


def statistic_pair(details):
    return torch.stack([details.statistic_i2t, details.statistic_t2i])


def weight_pair(details):
    return torch.stack([details.weight_i2t, details.weight_t2i])


# Images e1, e2 and texts e1, e1 at logit_scale 1 give S = [[1, 1], [0, 0]]. The image rows [1, 1] and
# [0, 0] are flat. The text columns are [1, 0] and [1, 0], with the positive at index 0 and 1.
HAND_IMAGE = torch.eye(2)
HAND_TEXT = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
SIGMOID_1 = 1.0 / (1.0 + math.exp(-1.0))


def test_hand_2x2_summary_sums():
    details = ac.SymmetricInfoNCE()(HAND_IMAGE, HAND_TEXT, 1.0, return_details=True)
    summary = details.summary
    binary_entropy = -(SIGMOID_1 * math.log(SIGMOID_1) + (1 - SIGMOID_1) * math.log(1 - SIGMOID_1))

    # Per-text losses a and 1 + a have population variance 1/4, and the flat image rows have none.
    assert summary.log_prob_variance.tolist() == pytest.approx([0.0, 0.25], abs=1e-6)
    # Positive probabilities 1/2, 1/2 for images and sigmoid(1), 1 - sigmoid(1) for texts.
    assert summary.prob_variance.tolist() == pytest.approx([0.0, (SIGMOID_1 - 0.5) ** 2], abs=1e-6)
    # Margins: 0, 0 for images and +1/2, -1/2 for texts.
    assert summary.logit_variance.tolist() == pytest.approx([0.0, 0.25], abs=1e-6)
    assert summary.mean_entropy.tolist() == pytest.approx([math.log(2.0), binary_entropy], rel=1e-6)
    assert summary.mean_spread.tolist() == pytest.approx([0.0, 0.5], abs=1e-6)
    assert summary.count.tolist() == [2.0, 2.0]


def test_variance_hand_2x2_weights_clamped():
    # Statistics (0, 1/4) with the direct map push w_i2t to about 8e-8, which clamps to 0.5.
    details = ac.VarianceAwareInfoNCE()(HAND_IMAGE, HAND_TEXT, 1.0, return_details=True)
    a = math.log(1.0 + math.exp(-1.0))
    expected_loss = 0.5 * (0.5 * math.log(2.0) + 1.5 * (a + 0.5))

    assert weight_pair(details).tolist() == pytest.approx([0.5, 1.5], abs=1e-6)
    assert details.loss.item() == pytest.approx(expected_loss, rel=1e-6)


def test_entropy_hand_2x2_weights():
    details = ac.EntropyWeighted()(HAND_IMAGE, HAND_TEXT, 1.0, return_details=True)
    binary_entropy = -(SIGMOID_1 * math.log(SIGMOID_1) + (1 - SIGMOID_1) * math.log(1 - SIGMOID_1))
    expected_i2t = 2.0 * math.log(2.0) / (math.log(2.0) + binary_entropy)

    assert details.weight_i2t.item() == pytest.approx(expected_i2t, rel=1e-6)
    assert details.weight_t2i.item() == pytest.approx(2.0 - expected_i2t, rel=1e-6)


def test_spread_hand_2x2_inverse_weights():
    # Spread (0, 1/2): the inverse map gives the flat image rows the larger weight, clamped to 1.5.
    details = ac.SpreadWeighted()(HAND_IMAGE, HAND_TEXT, 1.0, return_details=True)

    assert weight_pair(details).tolist() == pytest.approx([1.5, 0.5], abs=1e-6)


@pytest.mark.parametrize(
    ("statistic", "mapping", "power", "expected_i2t"),
    [
        ((1.0, 3.0), "direct", 1.0, 0.5),
        ((1.0, 1.5), "direct", 1.0, 0.8),
        ((1.0, 1.5), "inverse", 1.0, 1.2),
        ((1.0, 1.5), "direct", 2.0, 2.0 * 1.0 / (1.0 + 2.25)),
        ((1.0, 1.5), "direct", 0.0, 1.0),
        ((0.0, 0.0), "direct", 1.0, 1.0),
        ((0.0, 0.0), "inverse", 1.0, 1.0),
    ],
)
def test_weight_map_table(statistic, mapping, power, expected_i2t):
    weights = weights_from_statistics(torch.tensor(statistic), mapping=mapping, power=power)

    assert weights[0].item() == pytest.approx(expected_i2t, rel=1e-6)
    assert weights[1].item() == pytest.approx(2.0 - expected_i2t, rel=1e-6)


def test_weight_map_asymmetric_bounds():
    # Bounds (0.8, 1.5): w_i2t may fall to 0.8 only, and may rise to 1.2 only, so that w_t2i >= 0.8.
    low = weights_from_statistics(torch.tensor([1.0, 100.0]), weight_bounds=(0.8, 1.5))
    high = weights_from_statistics(torch.tensor([100.0, 1.0]), weight_bounds=(0.8, 1.5))

    assert low.tolist() == pytest.approx([0.8, 1.2], rel=1e-6)
    assert high.tolist() == pytest.approx([1.2, 0.8], rel=1e-6)


@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
def test_ema_follows_recurrence(loss_class):
    decay = 0.7
    loss_fn = loss_class(decay=decay)
    average = torch.zeros(2)

    for step, (image, text) in enumerate(batches(5), start=1):
        details = loss_fn(image, text, 10.0, return_details=True)
        average = decay * average + (1 - decay) * statistic_pair(details)
        debiased = average / (1 - decay**step)
        smoothed = torch.stack([details.smoothed_statistic_i2t, details.smoothed_statistic_t2i])

        assert torch.allclose(loss_fn.ema_statistic, average, rtol=1e-5, atol=1e-7)
        assert loss_fn.ema_step.item() == step
        assert torch.allclose(smoothed, debiased, rtol=1e-5, atol=1e-7)
        assert torch.allclose(weight_pair(details), weights_from_statistics(debiased, mapping=loss_fn.mapping), atol=1e-6)


def test_decay_zero_uses_batch_statistic():
    loss_fn = ac.EntropyWeighted(decay=0.0)

    for image, text in batches(3):
        details = loss_fn(image, text, 10.0, return_details=True)
        smoothed = torch.stack([details.smoothed_statistic_i2t, details.smoothed_statistic_t2i])

        assert torch.equal(smoothed, statistic_pair(details))


def test_bias_correction_first_step_equals_batch():
    image, text = batches(1)[0]

    details = ac.VarianceAwareInfoNCE(decay=0.9)(image, text, 10.0, return_details=True)
    smoothed = torch.stack([details.smoothed_statistic_i2t, details.smoothed_statistic_t2i])

    assert torch.allclose(smoothed, statistic_pair(details), rtol=1e-6)


def test_bias_correction_off_first_step_shrunk():
    image, text = batches(1)[0]

    details = ac.VarianceAwareInfoNCE(decay=0.9, bias_correction=False)(image, text, 10.0, return_details=True)
    smoothed = torch.stack([details.smoothed_statistic_i2t, details.smoothed_statistic_t2i])

    assert torch.allclose(smoothed, 0.1 * statistic_pair(details), rtol=1e-6)


@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
def test_bias_correction_leaves_weights(loss_class):
    # Both directions' averages are divided by the same 1 - decay**t, and the weights depend on the
    # ratio of the two, so bias correction changes them only through eps.
    corrected = loss_class(decay=0.9, bias_correction=True)
    uncorrected = loss_class(decay=0.9, bias_correction=False)

    for image, text in batches(4):
        with_correction = weight_pair(corrected(image, text, 10.0, return_details=True))
        without_correction = weight_pair(uncorrected(image, text, 10.0, return_details=True))

        assert torch.allclose(with_correction, without_correction, rtol=0, atol=1e-5)


def test_bias_correction_matters_near_eps():
    # Statistics of the order of eps are the case where the shared factor is not cancelled.
    statistic = torch.tensor([1e-8, 3e-8])
    corrected = weights_from_statistics(statistic / 0.1, eps=1e-8)
    uncorrected = weights_from_statistics(statistic, eps=1e-8)

    assert not torch.allclose(corrected, uncorrected, atol=1e-3)


def test_warmup_blends_from_equal():
    warmup_steps = 4
    warm = ac.VarianceAwareInfoNCE(warmup_steps=warmup_steps)
    cold = ac.VarianceAwareInfoNCE()

    for step, (image, text) in enumerate(batches(6), start=1):
        warm_weights = weight_pair(warm(image, text, 10.0, return_details=True))
        cold_weights = weight_pair(cold(image, text, 10.0, return_details=True))
        progress = min(step / warmup_steps, 1.0)
        expected = 1.0 + progress * (cold_weights - 1.0)

        assert torch.allclose(warm_weights, expected, atol=1e-6)
        assert warm_weights.sum().item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
def test_eval_before_training_equal_weights(loss_class):
    image, text = batches(1)[0]
    loss_fn = loss_class().eval()

    details = loss_fn(image, text, 10.0, return_details=True)
    baseline = ac.SymmetricInfoNCE()(image, text, 10.0)

    assert weight_pair(details).tolist() == [1.0, 1.0]
    assert torch.equal(details.loss, baseline)


@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
def test_eval_leaves_buffers_unchanged(loss_class):
    train_batches = batches(3)
    loss_fn = loss_class()
    for image, text in train_batches:
        last_weights = weight_pair(loss_fn(image, text, 10.0, return_details=True))
    statistic_before = loss_fn.ema_statistic.clone()
    step_before = loss_fn.ema_step.clone()

    loss_fn.eval()
    for image, text in batches(3, seed=1):
        eval_weights = weight_pair(loss_fn(image, text, 10.0, return_details=True))

        assert torch.equal(eval_weights, last_weights)

    assert torch.equal(loss_fn.ema_statistic, statistic_before)
    assert torch.equal(loss_fn.ema_step, step_before)
    assert torch.equal(loss_fn.weights, last_weights)


@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
def test_state_dict_round_trip_bitwise(loss_class):
    train_batches = batches(4)
    original = loss_class(decay=0.8, warmup_steps=2)
    for image, text in train_batches[:3]:
        original(image, text, 10.0)

    restored = loss_class(decay=0.8, warmup_steps=2)
    restored.load_state_dict(original.state_dict())
    image, text = train_batches[3]
    expected = original(image, text, 10.0)
    actual = restored(image, text, 10.0)

    assert set(original.state_dict()) == {"ema_statistic", "ema_step"}
    assert torch.equal(actual, expected)
    assert torch.equal(restored.ema_statistic, original.ema_statistic)
    assert torch.equal(restored.ema_step, original.ema_step)


def test_reset_statistics_restores_equal_weights():
    loss_fn = ac.VarianceAwareInfoNCE()
    for image, text in batches(2):
        loss_fn(image, text, 10.0)

    loss_fn.reset_statistics()

    assert loss_fn.ema_step.item() == 0
    assert loss_fn.weights.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
def test_weights_carry_no_grad(loss_class):
    image, text = batches(1, n=6)[0]
    image = image.double().requires_grad_()
    text = text.double().requires_grad_()
    labels = torch.arange(6)

    details = loss_class()(image, text, 5.0, return_details=True)
    grad_image, grad_text = torch.autograd.grad(details.loss, (image, text))

    logits = 5.0 * image @ text.T
    i2t_image, i2t_text = torch.autograd.grad(F.cross_entropy(logits, labels), (image, text))
    logits = 5.0 * image @ text.T
    t2i_image, t2i_text = torch.autograd.grad(F.cross_entropy(logits.T, labels), (image, text))
    w_i2t = details.weight_i2t.double()
    w_t2i = details.weight_t2i.double()

    assert not details.weight_i2t.requires_grad
    assert not details.weight_t2i.requires_grad
    assert torch.allclose(grad_image, 0.5 * (w_i2t * i2t_image + w_t2i * t2i_image), rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad_text, 0.5 * (w_i2t * i2t_text + w_t2i * t2i_text), rtol=1e-10, atol=1e-12)


def test_buffers_follow_module_to():
    loss_fn = ac.VarianceAwareInfoNCE().to("meta")

    assert loss_fn.ema_statistic.device.type == "meta"
    assert loss_fn.ema_step.device.type == "meta"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"decay": 1.0}, ValueError, r"decay must be a number in \[0, 1\), got 1.0"),
        ({"decay": -0.1}, ValueError, r"decay .* got -0.1"),
        ({"decay": True}, TypeError, r"decay must be a number .* True"),
        ({"decay": "0.9"}, TypeError, r"decay must be a number .* str '0.9'"),
        ({"weight_bounds": (1.2, 1.5)}, ValueError, r"weight_bounds must satisfy .* got \(1.2, 1.5\)"),
        ({"weight_bounds": (0.5, 0.9)}, ValueError, r"weight_bounds .* got \(0.5, 0.9\)"),
        ({"weight_bounds": (0.0, 1.5)}, ValueError, r"weight_bounds .* got \(0.0, 1.5\)"),
        ({"weight_bounds": (0.5, math.inf)}, ValueError, r"weight_bounds must hold two finite numbers"),
        ({"weight_bounds": (0.5,)}, TypeError, r"weight_bounds must be a pair"),
        ({"power": -1.0}, ValueError, r"power must be a finite number >= 0, got -1.0"),
        ({"power": math.nan}, ValueError, r"power .* got nan"),
        ({"warmup_steps": -1}, ValueError, r"warmup_steps must be an int >= 0, got -1"),
        ({"warmup_steps": 2.5}, TypeError, r"warmup_steps must be an int, got float 2.5"),
        ({"eps": 0.0}, ValueError, r"eps must be a finite number > 0, got 0.0"),
        ({"mapping": "sqrt"}, ValueError, r"mapping must be one of .* got 'sqrt'"),
        ({"bias_correction": 1}, TypeError, r"bias_correction must be a bool, got 1"),
        ({"normalize": "yes"}, TypeError, r"normalize must be a bool, got 'yes'"),
        ({"validate_values": None}, TypeError, r"validate_values must be a bool, got None"),
    ],
)
@pytest.mark.parametrize("loss_class", ADAPTIVE_CLASSES, ids=lambda c: c.__name__)
def test_constructor_rejects_invalid(loss_class, options, error, message):
    with pytest.raises(error, match=message):
        loss_class(**options)


def test_variance_rejects_unknown_statistic():
    with pytest.raises(ValueError, match=r"statistic must be one of .* got 'logits'"):
        ac.VarianceAwareInfoNCE(statistic="logits")


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        ((0.0, 0.0), ValueError, r"weights must not both be 0"),
        ((-1.0, 1.0), ValueError, r"weights must be two finite numbers >= 0, got \(-1.0, 1.0\)"),
        ((1.0, math.nan), ValueError, r"got \(1.0, nan\)"),
        ((1.0,), TypeError, r"weights must be a pair .* got \(1.0,\)"),
    ],
)
def test_symmetric_rejects_invalid_weights(weights, error, message):
    with pytest.raises(error, match=message):
        ac.SymmetricInfoNCE(weights=weights)


def test_variance_near_uniform_noise():
    # Features of magnitude 1e-3 give a near-uniform softmax, whose per-row losses all lie within 1e-5 of
    # log 12, with a true variance near 1e-11. The statistic should stay far below eps-sized noise.
    generator = torch.Generator().manual_seed(0)
    image = 1e-3 * torch.randn(12, 8, generator=generator, dtype=torch.float64)
    text = 1e-3 * torch.randn(12, 8, generator=generator, dtype=torch.float64)

    details = ac.VarianceAwareInfoNCE()(image, text, 1.0, return_details=True)

    assert details.statistic_i2t.item() < 1e-8
