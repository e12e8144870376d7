"""The fused and chunked PyTorch paths against the dense reference: values, sums and gradients."""

import pytest
import torch

import adaptive_contrastive as ac
from adaptive_contrastive.chunked import chunked_direction_terms, chunked_symmetric_terms
from adaptive_contrastive.dense import symmetric_terms
from adaptive_contrastive.fixed_shift import fixed_shift_bound
from adaptive_contrastive.fused import fused_symmetric_terms
from adaptive_contrastive.functional import compute_direction_terms, compute_terms

# (N, D, with_ids, chunk_size): odd sizes, a batch of one, chunks that do not divide N, chunk > N.
CASES = [
    (1, 3, False, 1),
    (2, 3, True, 1),
    (3, 5, False, 2),
    (7, 4, True, 3),
    (33, 8, False, 5),
    (33, 8, True, 4),
    (64, 16, False, 100),
]


def make_inputs(n, d, with_ids, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=generator, dtype=dtype)
    text = torch.randn(n, d, generator=generator, dtype=dtype)
    image_ids = torch.randint(0, max(1, n // 2), (n,), generator=generator) if with_ids else None
    return image, text, image_ids


def run_terms(terms_fn, image, text, scale, image_ids, weights=(0.7, 1.3)):
    """Return loss values, sums and the gradients of ``w0 * loss_i2t + w1 * loss_t2i``."""
    image = image.clone().requires_grad_()
    text = text.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    terms = terms_fn(image, text, scale, image_ids=image_ids)
    (weights[0] * terms.loss_i2t + weights[1] * terms.loss_t2i).backward()
    return {
        "loss_i2t": terms.loss_i2t.detach(),
        "loss_t2i": terms.loss_t2i.detach(),
        "sums": terms.sums,
        "grad_image": image.grad,
        "grad_text": text.grad,
        "grad_scale": scale.grad,
    }


def assert_all_close(actual, expected, rtol, atol):
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.allclose(actual[name], expected[name], rtol=rtol, atol=atol), (
            f"{name}: max abs difference {(actual[name] - expected[name]).abs().max().item():.3g}"
        )


# 0.5 keeps every logit bound inside the fixed-shift range; 200 sends the same inputs down the general pass.
SCALES = [0.5, 200.0]


@pytest.mark.parametrize("scale_value", SCALES)
@pytest.mark.parametrize("n, d, with_ids, chunk_size", CASES)
def test_fused_matches_reference_float64(n, d, with_ids, chunk_size, scale_value):
    image, text, image_ids = make_inputs(n, d, with_ids)
    scale = torch.tensor(scale_value, dtype=torch.float64)

    expected = run_terms(symmetric_terms, image, text, scale, image_ids)
    actual = run_terms(fused_symmetric_terms, image, text, scale, image_ids)

    assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale_value", SCALES)
@pytest.mark.parametrize("n, d, with_ids, chunk_size", CASES)
def test_chunked_matches_reference_float64(n, d, with_ids, chunk_size, scale_value):
    image, text, image_ids = make_inputs(n, d, with_ids, seed=1)
    scale = torch.tensor(scale_value, dtype=torch.float64)

    def chunked(*args, **kwargs):
        return chunked_symmetric_terms(*args, chunk_size=chunk_size, **kwargs)

    expected = run_terms(symmetric_terms, image, text, scale, image_ids)
    actual = run_terms(chunked, image, text, scale, image_ids)

    assert_all_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale_value", [0.5, 150.0])
@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_blockwise_gradcheck(with_ids, chunk_size, scale_value):
    image, text, image_ids = make_inputs(5, 3, with_ids, seed=2)
    image = torch.nn.functional.normalize(image, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    scale = torch.tensor(scale_value, dtype=torch.float64)

    def loss(image, text, scale):
        terms = fused_symmetric_terms(image, text, scale, image_ids=image_ids, chunk_size=chunk_size)
        return 0.6 * terms.loss_i2t + 1.4 * terms.loss_t2i

    inputs = tuple(t.clone().requires_grad_() for t in (image, text, scale))
    assert torch.autograd.gradcheck(loss, inputs)


@pytest.mark.parametrize("scale_value", [30.0, 100.0])
@pytest.mark.parametrize("with_ids", [False, True])
def test_chunked_float32_grad_within_1e5(with_ids, scale_value):
    image, text, image_ids = make_inputs(300, 48, with_ids, dtype=torch.float32, seed=3)
    image = torch.nn.functional.normalize(image, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    scale = torch.tensor(scale_value)

    def chunked(*args, **kwargs):
        return chunked_symmetric_terms(*args, chunk_size=64, **kwargs)

    expected = run_terms(symmetric_terms, image, text, scale, image_ids)
    actual = run_terms(chunked, image, text, scale, image_ids)

    for name in ("grad_image", "grad_text", "grad_scale"):
        relative = (actual[name] - expected[name]).norm() / expected[name].norm()
        assert relative < 1e-5, f"{name}: relative error {relative.item():.3g}"
    assert torch.allclose(actual["loss_i2t"], expected["loss_i2t"], rtol=1e-6)
    assert torch.allclose(actual["loss_t2i"], expected["loss_t2i"], rtol=1e-6)
    assert torch.allclose(actual["sums"], expected["sums"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_half_inputs_promote_and_return_dtype(dtype, chunk_size):
    image, text, image_ids = make_inputs(20, 16, False, dtype=dtype, seed=4)
    scale = torch.tensor(5.0)

    def fused(*args, **kwargs):
        return fused_symmetric_terms(*args, chunk_size=chunk_size, **kwargs)

    expected = run_terms(symmetric_terms, image, text, scale, image_ids)
    actual = run_terms(fused, image, text, scale, image_ids)

    assert actual["loss_i2t"].dtype == torch.float32
    assert actual["grad_image"].dtype == dtype
    assert actual["grad_text"].dtype == dtype
    assert_all_close(actual, expected, rtol=1e-2, atol=1e-3)


def test_python_float_scale_has_no_grad_input():
    image, text, _ = make_inputs(6, 4, False)
    image.requires_grad_()

    fused = fused_symmetric_terms(image, text, 2.0)
    reference = symmetric_terms(image.detach(), text, 2.0)

    assert torch.allclose(fused.loss_i2t, reference.loss_i2t, rtol=1e-12)
    fused.loss_t2i.backward()
    assert image.grad is not None


def test_no_statistics_returns_none_sums():
    image, text, _ = make_inputs(6, 4, False)

    terms = fused_symmetric_terms(image, text, 2.0, need_statistics=False)

    assert terms.sums is None


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("use_targets", [False, True])
def test_chunked_direction_matches_reference(with_ids, use_targets):
    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(9, 6, generator=generator, dtype=torch.float64)
    keys = torch.randn(23, 6, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 23, (9,), generator=generator) if use_targets else None
    query_ids = torch.randint(0, 4, (9,), generator=generator) if with_ids else None
    key_ids = torch.randint(0, 4, (23,), generator=generator) if with_ids else None
    if with_ids:
        # Every query needs at least one positive key.
        key_ids[:9] = query_ids

    results = []
    for chunk_size in (None, 4):
        q = queries.clone().requires_grad_()
        k = keys.clone().requires_grad_()
        s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        loss, sums = compute_direction_terms(
            q, k, s, targets=targets, query_ids=query_ids, key_ids=key_ids, chunk_size=chunk_size
        )
        loss.backward()
        results.append((loss.detach(), sums, q.grad, k.grad, s.grad))

    for name, actual, expected in zip(("loss", "sums", "grad_query", "grad_key", "grad_scale"), results[1], results[0]):
        assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12), name


def test_chunked_direction_default_targets_need_enough_keys():
    queries = torch.randn(5, 3)
    keys = torch.randn(4, 3)

    with pytest.raises(ValueError, match="n=5 queries and M=4 keys"):
        chunked_direction_terms(queries, keys, 1.0, chunk_size=2)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "64"])
def test_chunk_size_rejects_invalid(bad):
    with pytest.raises((TypeError, ValueError), match=f"chunk_size must be .*got {bad!r}"):
        ac.VarianceAwareInfoNCE(chunk_size=bad)
    with pytest.raises((TypeError, ValueError), match="chunk_size"):
        ac.SymmetricInfoNCE(chunk_size=bad)
    with pytest.raises((TypeError, ValueError), match="chunk_size"):
        compute_terms(torch.randn(4, 3), torch.randn(4, 3), 1.0, chunk_size=bad)


@pytest.mark.parametrize("loss_class", [ac.SymmetricInfoNCE, ac.VarianceAwareInfoNCE, ac.EntropyWeighted, ac.SpreadWeighted])
def test_module_chunk_size_matches_dense(loss_class):
    image, text, image_ids = make_inputs(17, 6, True, seed=6)
    dense_module = loss_class()
    chunked_module = loss_class(chunk_size=5)

    for step in range(2):
        outputs = []
        for module in (dense_module, chunked_module):
            x = (image + step).clone().requires_grad_()
            loss = module(x, text, torch.tensor(4.0, dtype=torch.float64), image_ids=image_ids)
            loss.backward()
            outputs.append((loss.detach(), x.grad))
        assert torch.allclose(outputs[1][0], outputs[0][0], rtol=1e-10)
        assert torch.allclose(outputs[1][1], outputs[0][1], rtol=1e-9, atol=1e-12)

    if hasattr(dense_module, "ema_statistic"):
        assert torch.allclose(chunked_module.ema_statistic, dense_module.ema_statistic, rtol=1e-9)


def test_chunked_saves_no_square_tensor():
    n, chunk_size = 64, 8
    image, text, _ = make_inputs(n, 4, False, dtype=torch.float32)
    image.requires_grad_()
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        terms = chunked_symmetric_terms(image, text, torch.tensor(2.0), chunk_size=chunk_size)

    assert saved_sizes, "the chunked function saved nothing for the backward pass"
    assert max(saved_sizes) < n * n
    (terms.loss_i2t + terms.loss_t2i).backward()


def test_backend_variable_selects_reference(monkeypatch):
    image, text, _ = make_inputs(6, 4, False)
    image.requires_grad_()
    monkeypatch.setenv("ADAPTIVE_CONTRASTIVE_BACKEND", "reference")

    terms = compute_terms(image, text, 2.0)

    assert "BlockwiseTerms" not in type(terms.loss_i2t.grad_fn).__name__


def test_backend_variable_rejects_unknown(monkeypatch):
    monkeypatch.setenv("ADAPTIVE_CONTRASTIVE_BACKEND", "cuda-magic")

    with pytest.raises(ValueError, match="ADAPTIVE_CONTRASTIVE_BACKEND must be one of"):
        compute_terms(torch.randn(4, 3), torch.randn(4, 3), 1.0)


def test_default_path_is_fused():
    image, text, _ = make_inputs(6, 4, False)
    image.requires_grad_()

    terms = compute_terms(image, text, 2.0)

    assert "BlockwiseTerms" in type(terms.loss_i2t.grad_fn).__name__



def test_fixed_shift_bound_range():
    image, text, _ = make_inputs(8, 16, False, dtype=torch.float32)
    image = torch.nn.functional.normalize(image, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)

    assert fixed_shift_bound(image, text, torch.tensor(14.3)) == pytest.approx(14.3, rel=1e-5)
    assert fixed_shift_bound(image, text, torch.tensor(60.0)) is None
    assert fixed_shift_bound(image.double(), text.double(), torch.tensor(300.0, dtype=torch.float64)) is not None
    assert fixed_shift_bound(image.double(), text.double(), torch.tensor(400.0, dtype=torch.float64)) is None


@pytest.mark.parametrize(
    "loss_fn", [ac.variance_aware_info_nce, ac.entropy_weighted_info_nce, ac.spread_weighted_info_nce, ac.symmetric_info_nce]
)
def test_functional_chunk_size_matches_dense(loss_fn):
    image, text, image_ids = make_inputs(13, 5, True, seed=9)

    dense = loss_fn(image, text, 3.0, image_ids=image_ids, return_details=True)
    chunked = loss_fn(image, text, 3.0, image_ids=image_ids, return_details=True, chunk_size=4)

    assert torch.allclose(chunked.loss, dense.loss, rtol=1e-12)
    assert torch.allclose(chunked.weight_i2t, dense.weight_i2t, rtol=1e-12)
    assert torch.allclose(chunked.summary.mean_entropy, dense.summary.mean_entropy, rtol=1e-10)
