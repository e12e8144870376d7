"""DistributedDataParallel on 2 and 3 gloo processes against one process on the concatenated batch.

Each world size is spawned once (module fixture) and runs every case of ``ddp_helpers.CASES``; the
tests then compare the saved records with single-process runs. Everything is float64, so the
tolerance of 1e-6 leaves room only for summation-order rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import ddp_helpers
from ddp_helpers import CASES, Case

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD_SIZES = (2, 3)
TOLERANCE = 1e-6

# Seconds for one spawned world to start, run every case and exit, before its processes are killed.
SPAWN_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def world_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    results = {}
    for world_size in WORLD_SIZES:
        output_dir = tmp_path_factory.mktemp(f"world{world_size}")
        results[world_size] = ddp_helpers.spawn_world(world_size, output_dir, SPAWN_TIMEOUT_S)
    return results


@pytest.fixture(scope="module")
def reference_results() -> dict[tuple[str, int], list[dict[str, Any]]]:
    return {
        (case.name, world_size): ddp_helpers.run_case(case, world_size, rank=0, distributed=False)
        for case in CASES
        for world_size in WORLD_SIZES
    }


def assert_close(actual: torch.Tensor, expected: torch.Tensor, description: str) -> None:
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0, msg=lambda message: f"{description}: {message}")


def rank_loss(records: list[list[dict[str, Any]]], step: int, case: Case, key: str) -> torch.Tensor:
    """Return the loss that matches the single-process one: the mean over ranks in the local-loss layout."""
    values = torch.stack([rank_records[step][key] for rank_records in records])
    if case.local_loss:
        return values.mean()
    return values[0]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", [case for case in CASES if case.gather_with_grad], ids=lambda case: case.name)
def test_ddp_matches_single_process(world_results, reference_results, case: Case, world_size: int) -> None:
    records = [rank_results[case.name] for rank_results in world_results[world_size]]
    reference = reference_results[(case.name, world_size)]

    for step in range(case.steps):
        where = f"{case.name}, world size {world_size}, step {step}"
        for key in ("loss", "loss_i2t", "loss_t2i"):
            assert_close(rank_loss(records, step, case, key), reference[step][key], f"{key} ({where})")
        if not case.local_loss:
            for rank, rank_records in enumerate(records):
                assert_close(rank_records[step]["loss"], reference[step]["loss"], f"loss of rank {rank} ({where})")

        for rank, rank_records in enumerate(records):
            record = rank_records[step]
            assert_close(record["weights"], reference[step]["weights"], f"weights of rank {rank} ({where})")
            if reference[step]["mean_loss"] is not None:
                assert_close(record["mean_loss"], reference[step]["mean_loss"], f"summary of rank {rank} ({where})")
            for name, grad in reference[step]["grads"].items():
                assert_close(record["grads"][name], grad, f"gradient of {name} on rank {rank} ({where})")
            for name, buffer in reference[step]["buffers"].items():
                assert_close(record["buffers"][name].double(), buffer.double(), f"buffer {name} on rank {rank} ({where})")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ddp_weights_and_buffers_identical(world_results, case: Case, world_size: int) -> None:
    records = [rank_results[case.name] for rank_results in world_results[world_size]]
    first = records[0]

    for rank, rank_records in enumerate(records[1:], start=1):
        for step in range(case.steps):
            assert torch.equal(rank_records[step]["weights"], first[step]["weights"]), f"weights of rank {rank}, step {step}"
            for name, buffer in first[step]["buffers"].items():
                assert torch.equal(rank_records[step]["buffers"][name], buffer), f"buffer {name} of rank {rank}, step {step}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ddp_buffers_advance_every_step(world_results, world_size: int) -> None:
    case = next(case for case in CASES if case.name == "variance_local_uneven_ids")
    records = world_results[world_size][0][case.name]

    steps = [int(record["buffers"]["ema_step"]) for record in records]
    assert steps == list(range(1, case.steps + 1))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ddp_gather_without_grad_scales_encoders(world_results, reference_results, world_size: int) -> None:
    case = next(case for case in CASES if not case.gather_with_grad)
    reference = reference_results[(case.name, world_size)][0]

    for rank, rank_results in enumerate(world_results[world_size]):
        record = rank_results[case.name][0]
        assert_close(record["loss"], reference["loss"], f"loss of rank {rank}")
        assert_close(record["weights"], reference["weights"], f"weights of rank {rank}")
        for name, grad in reference["grads"].items():
            # Detached remote rows leave each rank only its own rows' gradient, which DDP then divides by W.
            # The logit scale is not gathered, so its gradient stays complete.
            expected = grad if name == "log_logit_scale" else grad / world_size
            assert_close(record["grads"][name], expected, f"gradient of {name} on rank {rank}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_gather_with_grad_uneven(world_results, world_size: int) -> None:
    expected_rows = torch.cat(
        [torch.full((rank + 1, 2), float(rank), dtype=torch.float64) for rank in range(world_size)]
    )
    expected_grad = world_size * (world_size + 1) / 2

    for rank, rank_results in enumerate(world_results[world_size]):
        result = rank_results["gather_gradient"]
        assert torch.equal(result["gathered"], expected_rows), f"rank {rank}"
        assert result["grad"].shape == (rank + 1, 2), f"rank {rank}"
        assert torch.all(result["grad"] == expected_grad), f"rank {rank}"


ERROR_FRAGMENTS = {
    "empty_rank": "every rank needs at least one image-text pair",
    "world_size_mismatch": "does not match the size of the process group",
    "rank_mismatch": "does not match this process's rank",
    "batch_sizes_length": "batch_sizes must hold one size per rank",
    "batch_sizes_local": "but this rank's batch has 3 rows",
}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("error", sorted(ERROR_FRAGMENTS))
def test_invalid_layout_raises_on_every_rank(world_results, world_size: int, error: str) -> None:
    for rank, rank_results in enumerate(world_results[world_size]):
        message = rank_results["errors"][error]
        assert ERROR_FRAGMENTS[error] in message, f"rank {rank}: {message}"
