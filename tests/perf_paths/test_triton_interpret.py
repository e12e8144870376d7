"""The Triton kernels under ``TRITON_INTERPRET=1`` on CPU tensors, against the dense reference.

Triton reads ``TRITON_INTERPRET`` when it is imported and when it decorates a kernel, so this module
sets it before it imports ``triton`` and leaves it set for the session. Setting it later, per test,
leaves the nested ``@triton.jit`` helpers uncallable under the interpreter (Triton 3.9.0). The
variable only changes how Triton runs kernels, and no other test imports Triton.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import torch  # noqa: E402

import adaptive_contrastive as ac  # noqa: E402
from adaptive_contrastive.dense import symmetric_terms  # noqa: E402
from adaptive_contrastive.functional import compute_direction_terms  # noqa: E402
from adaptive_contrastive.kernels import triton_symmetric_terms  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="TRITON_INTERPRET is set to something other than 1"
)

# Relative tolerance of the feature gradients per input dtype. The reference rounds its gradients to the
# input dtype too, so half types differ by a few units in their last place.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def run_terms(terms_fn, image, text, scale, image_ids):
    image = image.clone().requires_grad_()
    text = text.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    terms = terms_fn(image, text, scale, image_ids=image_ids)
    (0.7 * terms.loss_i2t + 1.3 * terms.loss_t2i).backward()
    return terms, image.grad, text.grad, scale.grad


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "n, d, with_ids",
    [(1, 5, False), (2, 5, True), (3, 5, False), (127, 72, False), (127, 72, True)],
)
def test_triton_matches_reference(n, d, with_ids, dtype):
    generator = torch.Generator().manual_seed(n + d)
    image = torch.randn(n, d, generator=generator).to(dtype)
    text = torch.randn(n, d, generator=generator).to(dtype)
    image_ids = torch.randint(0, max(1, n // 3), (n,), generator=generator) if with_ids else None
    scale = torch.tensor(2.0)

    expected, expected_image, expected_text, expected_scale = run_terms(symmetric_terms, image, text, scale, image_ids)
    actual, actual_image, actual_text, actual_scale = run_terms(triton_symmetric_terms, image, text, scale, image_ids)

    assert torch.allclose(actual.loss_i2t, expected.loss_i2t, rtol=1e-5, atol=1e-6)
    assert torch.allclose(actual.loss_t2i, expected.loss_t2i, rtol=1e-5, atol=1e-6)
    assert torch.allclose(actual.sums, expected.sums, rtol=1e-4, atol=1e-4)
    assert actual_image.dtype == dtype
    assert actual_text.dtype == dtype
    assert relative_error(actual_image, expected_image) < GRAD_RTOL[dtype]
    assert relative_error(actual_text, expected_text) < GRAD_RTOL[dtype]
    assert relative_error(actual_scale, expected_scale) < 1e-4


@pytest.mark.parametrize("with_ids", [False, True])
def test_triton_direction_matches_reference(monkeypatch, with_ids):
    generator = torch.Generator().manual_seed(7)
    queries = torch.randn(19, 24, generator=generator)
    keys = torch.randn(45, 24, generator=generator)
    targets = None if with_ids else torch.randint(0, 45, (19,), generator=generator)
    query_ids = torch.randint(0, 5, (19,), generator=generator) if with_ids else None
    key_ids = torch.randint(0, 5, (45,), generator=generator) if with_ids else None
    if with_ids:
        key_ids[:19] = query_ids

    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("ADAPTIVE_CONTRASTIVE_BACKEND", backend)
        q = queries.clone().requires_grad_()
        k = keys.clone().requires_grad_()
        s = torch.tensor(3.0, requires_grad=True)
        loss, sums = compute_direction_terms(q, k, s, targets=targets, query_ids=query_ids, key_ids=key_ids)
        loss.backward()
        results[backend] = (loss.detach(), sums, q.grad, k.grad, s.grad)

    for name, actual, expected in zip(("loss", "sums", "grad_query", "grad_key", "grad_scale"), results["triton"], results["reference"]):
        assert relative_error(actual, expected) < 1e-5, name


def test_triton_backend_runs_module(monkeypatch):
    generator = torch.Generator().manual_seed(8)
    image = torch.nn.functional.normalize(torch.randn(24, 20, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(24, 20, generator=generator), dim=-1)

    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("ADAPTIVE_CONTRASTIVE_BACKEND", backend)
        module = ac.VarianceAwareInfoNCE()
        x = image.clone().requires_grad_()
        loss = module(x, text, torch.tensor(10.0))
        loss.backward()
        results[backend] = (loss.detach(), x.grad, module.ema_statistic.clone())

    for name, actual, expected in zip(("loss", "grad", "ema_statistic"), results["triton"], results["reference"]):
        assert relative_error(actual, expected) < 1e-5, name


def test_triton_backend_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("ADAPTIVE_CONTRASTIVE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ac.SymmetricInfoNCE()(torch.randn(4, 3), torch.randn(4, 3), 1.0)


def test_triton_mixed_dtypes_return_each_dtype():
    generator = torch.Generator().manual_seed(9)
    image = torch.randn(5, 16, generator=generator).to(torch.bfloat16)
    text = torch.randn(5, 16, generator=generator)

    expected, expected_image, expected_text, _ = run_terms(symmetric_terms, image, text, torch.tensor(2.0), None)
    actual, actual_image, actual_text, _ = run_terms(triton_symmetric_terms, image, text, torch.tensor(2.0), None)

    assert actual_image.dtype == torch.bfloat16
    assert actual_text.dtype == torch.float32
    assert torch.allclose(actual.loss_i2t, expected.loss_i2t, rtol=1e-5)
    assert relative_error(actual_text, expected_text) < 1e-5
    assert relative_error(actual_image, expected_image) < GRAD_RTOL[torch.bfloat16]
