"""Grid selection for the pytest-benchmark suite.

``BENCH_GRID`` picks the cells of :func:`harness.grid_cells`: ``quick`` (default), ``targets`` or
``full``. ``BENCH_CHUNK_SIZE`` sets the chunk size of the chunked cells (default 1024).
"""

from __future__ import annotations

import os

import pytest

import harness


def chunk_size() -> int:
    return int(os.environ.get("BENCH_CHUNK_SIZE", "1024"))


def pytest_generate_tests(metafunc):
    if "cell" not in metafunc.fixturenames:
        return

    grid = os.environ.get("BENCH_GRID", "quick")
    if grid not in harness.GRIDS:
        raise pytest.UsageError(f"BENCH_GRID must be one of {harness.GRIDS}, got {grid!r}.")

    cells = harness.grid_cells(grid, chunk_size())
    ids = [
        f"N{n}-D{dim}-{str(dtype).replace('torch.', '')}-{'dense' if chunk is None else f'chunk{chunk}'}"
        for n, dim, dtype, chunk in cells
    ]
    metafunc.parametrize("cell", cells, ids=ids)
