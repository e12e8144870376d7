"""Forward and backward time of every loss and of the plain symmetric InfoNCE reference, per grid cell.

Run with ``python -m pytest benchmarks --benchmark-only -p no:cacheprovider``; ``BENCH_GRID`` in
``conftest.py`` selects the cells. Each result's ``extra_info`` stores the time of one ``N x N x D``
matrix product measured in the same test, so ``mean / matmul_seconds`` is the time in matmul
equivalents. ``write_report.py`` produces the interleaved ratios that ``docs/benchmarks.md`` reports.
"""

from __future__ import annotations

import time

import pytest

import harness

LOSS_NAMES = list(harness.make_losses(None, include_unvalidated=True))


def _matmul_seconds(image, text, repeats=3) -> float:
    harness.matmul_step(image, text)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        harness.matmul_step(image, text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_forward_backward(benchmark, cell, loss_name):
    n, dim, dtype, chunk = cell
    if chunk is not None and loss_name.startswith("reference"):
        pytest.skip("the reference has no chunked mode; its dense row is the comparison")

    image, text, scale = harness.make_inputs(n, dim, dtype)
    loss_fn = harness.make_losses(chunk)[loss_name]
    rounds = 3 if n >= 4096 else 10

    benchmark.extra_info["matmul_seconds"] = _matmul_seconds(image, text)
    benchmark.extra_info["n"], benchmark.extra_info["dim"], benchmark.extra_info["dtype"] = n, dim, str(dtype)
    benchmark.extra_info["chunk_size"] = chunk
    benchmark.pedantic(harness.forward_backward, args=(loss_fn, image, text, scale), rounds=rounds, warmup_rounds=1)
