"""torch.compile(fullgraph=True) of each loss: no graph break, eager values and buffers.

Each class is compiled once, in a module-scoped fixture, because a CPU compile takes seconds.
"""

import pytest
import torch
import torch.nn.functional as F

import adaptive_contrastive as ac

ALL_CLASSES = [ac.SymmetricInfoNCE, ac.VarianceAwareInfoNCE, ac.EntropyWeighted, ac.SpreadWeighted]


def make_batches(count=3, n=8, d=6):
    generator = torch.Generator().manual_seed(0)
    return [
        (F.normalize(torch.randn(n, d, generator=generator), dim=-1), F.normalize(torch.randn(n, d, generator=generator), dim=-1))
        for _ in range(count)
    ]


@pytest.fixture(scope="module", params=ALL_CLASSES, ids=lambda c: c.__name__)
def compiled_run(request):
    """Run three training steps compiled and eagerly; return both modules and their losses and gradients."""
    torch._dynamo.reset()
    compiled_module = request.param()
    eager_module = request.param()
    compiled = torch.compile(compiled_module, fullgraph=True)
    results = {"compiled": [], "eager": []}

    for image, text in make_batches():
        for name, loss_fn in (("compiled", compiled), ("eager", eager_module)):
            image_leaf = image.clone().requires_grad_()
            scale = torch.tensor(14.0, requires_grad=True)
            loss = loss_fn(image_leaf, text, scale)
            loss.backward()
            results[name].append((loss.detach(), image_leaf.grad, scale.grad))

    return compiled_module, eager_module, results


def test_compiled_loss_matches_eager(compiled_run):
    _, _, results = compiled_run

    for (compiled_loss, _, _), (eager_loss, _, _) in zip(results["compiled"], results["eager"]):
        assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)


def test_compiled_grad_matches_eager(compiled_run):
    _, _, results = compiled_run

    for (_, compiled_image_grad, compiled_scale_grad), (_, eager_image_grad, eager_scale_grad) in zip(
        results["compiled"], results["eager"]
    ):
        assert torch.allclose(compiled_image_grad, eager_image_grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(compiled_scale_grad, eager_scale_grad, rtol=1e-4, atol=1e-6)


def test_compiled_buffers_match_eager(compiled_run):
    compiled_module, eager_module, _ = compiled_run
    if not isinstance(eager_module, ac.AdaptiveInfoNCE):
        pytest.skip("SymmetricInfoNCE has no buffers")

    assert torch.allclose(compiled_module.ema_statistic, eager_module.ema_statistic, rtol=1e-5, atol=1e-7)
    assert torch.equal(compiled_module.ema_step, eager_module.ema_step)
    assert compiled_module.ema_step.item() == 3
