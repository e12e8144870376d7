"""Multi-process runs on the gloo backend, and the single-process runs they are compared with.

A case trains a tiny float64 two-tower model for a few SGD steps. The distributed run wraps it in
``DistributedDataParallel`` and gives rank ``r`` rows ``offset_r : offset_r + n_r`` of each step's global
batch. The reference run trains the same model in one process on the whole global batch. Each run
records, per step, the loss and its details, the parameter gradients (after DDP's average) and the
loss buffers, and saves them with ``torch.save`` for the test process to compare.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import adaptive_contrastive as ac
from adaptive_contrastive.distributed import GroupInfo, all_gather_with_grad

INPUT_SIZE_IMAGE = 6
INPUT_SIZE_TEXT = 7
EMBEDDING_SIZE = 5
LEARNING_RATE = 0.5

# Seconds that one collective may wait before gloo raises, so that a hang fails the test.
COLLECTIVE_TIMEOUT_S = 60


@dataclass(frozen=True)
class Case:
    """One training run: the loss, its distributed options and the batch layout of every step.

    Attributes:
        name: file-name-safe identifier.
        loss: ``"symmetric"``, ``"variance"``, ``"entropy"`` or ``"spread"``.
        local_loss: the loss module's ``local_loss``.
        gather_with_grad: the loss module's ``gather_with_grad``.
        uneven: give ranks different batch sizes, including a rank with a single row.
        with_ids: pass ``image_ids`` in which some images repeat across ranks.
        pass_batch_sizes: pass the per-rank sizes to ``forward`` instead of exchanging them.
        steps: number of SGD steps.
        loss_options: extra constructor arguments of the loss.
    """

    name: str
    loss: str
    local_loss: bool = False
    gather_with_grad: bool = True
    uneven: bool = False
    with_ids: bool = False
    pass_batch_sizes: bool = False
    steps: int = 3
    loss_options: dict[str, Any] = field(default_factory=dict)


CASES = (
    Case("symmetric_global_even", "symmetric"),
    Case("symmetric_local_uneven", "symmetric", local_loss=True, uneven=True),
    Case("variance_global_uneven_ids", "variance", uneven=True, with_ids=True),
    Case("variance_local_uneven_ids", "variance", local_loss=True, uneven=True, with_ids=True),
    Case("entropy_local_sizes_given", "entropy", local_loss=True, uneven=True, pass_batch_sizes=True),
    Case("spread_global_even", "spread", loss_options={"warmup_steps": 2}),
    Case("variance_global_no_grad_gather", "variance", gather_with_grad=False, steps=1),
    Case("variance_local_chunked_ids", "variance", local_loss=True, uneven=True, with_ids=True, loss_options={"chunk_size": 2}),
    Case("entropy_global_chunked", "entropy", uneven=True, loss_options={"chunk_size": 3}),
)


def batch_sizes_for(case: Case, world_size: int, step: int) -> list[int]:
    """Return every rank's batch size at ``step``. Uneven layouts change from step to step."""
    if not case.uneven:
        return [4] * world_size
    return [1 + (rank * 2 + step) % 4 for rank in range(world_size)]


def make_global_batch(case: Case, world_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Return the step's image inputs, text inputs and ids of the whole global batch, the same in every process."""
    total = sum(batch_sizes_for(case, world_size, step))
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(total, INPUT_SIZE_IMAGE, generator=generator, dtype=torch.float64)
    texts = torch.randn(total, INPUT_SIZE_TEXT, generator=generator, dtype=torch.float64)

    ids = None
    if case.with_ids:
        # About half as many distinct images as pairs, so most steps repeat an image across ranks.
        ids = torch.randint(0, max(2, total // 2), (total,), generator=generator) + 100
    return images, texts, ids


class TwoTowers(nn.Module):
    """A small MLP image tower, a linear text tower and a learned log logit scale, all float64."""

    def __init__(self) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.image_tower = nn.Sequential(nn.Linear(INPUT_SIZE_IMAGE, 8), nn.Tanh(), nn.Linear(8, EMBEDDING_SIZE))
        self.text_tower = nn.Linear(INPUT_SIZE_TEXT, EMBEDDING_SIZE)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(5.0)))
        torch.random.set_rng_state(generator_state)
        self.double()

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.image_tower(images), dim=-1)
        text_features = F.normalize(self.text_tower(texts), dim=-1)
        return image_features, text_features, self.log_logit_scale.exp()


def make_loss(case: Case, distributed: bool) -> ac.ContrastiveLoss:
    """Build the case's loss, with ``world_size=1`` for the single-process reference."""
    options: dict[str, Any] = dict(case.loss_options)
    options.update(local_loss=case.local_loss, gather_with_grad=case.gather_with_grad)
    if not distributed:
        options["world_size"] = 1

    if case.loss == "symmetric":
        return ac.SymmetricInfoNCE(**options)
    if case.loss == "variance":
        return ac.VarianceAwareInfoNCE(**options)
    if case.loss == "entropy":
        return ac.EntropyWeighted(**options)
    if case.loss == "spread":
        return ac.SpreadWeighted(**options)
    raise ValueError(f"unknown loss {case.loss!r} in case {case.name!r}")


def run_case(case: Case, world_size: int, rank: int, distributed: bool) -> list[dict[str, Any]]:
    """Train the case and return one record per step.

    With ``distributed`` false this is the single-process reference on the global batch of a run with
    ``world_size`` ranks.
    """
    model = TwoTowers()
    trained: nn.Module = model
    if distributed:
        trained = nn.parallel.DistributedDataParallel(model)
    loss_fn = make_loss(case, distributed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    records = []
    for step in range(case.steps):
        images, texts, ids = make_global_batch(case, world_size, step)
        sizes = batch_sizes_for(case, world_size, step)
        if distributed:
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            images, texts = images[rows], texts[rows]
            ids = None if ids is None else ids[rows]

        optimizer.zero_grad()
        image_features, text_features, logit_scale = trained(images, texts)
        forward_options: dict[str, Any] = {"image_ids": ids, "return_details": True}
        if distributed and case.pass_batch_sizes:
            forward_options["batch_sizes"] = sizes
        output = loss_fn(image_features, text_features, logit_scale, **forward_options)
        output.loss.backward()

        records.append(
            {
                "loss": output.loss.detach().clone(),
                "loss_i2t": output.loss_i2t.clone(),
                "loss_t2i": output.loss_t2i.clone(),
                "weights": torch.stack([output.weight_i2t, output.weight_t2i]).clone(),
                "mean_loss": output.summary.mean_loss.clone() if output.summary is not None else None,
                "grads": {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()},
                "buffers": {name: buffer.detach().clone() for name, buffer in loss_fn.named_buffers()},
            }
        )
        optimizer.step()
    return records


def check_gather_gradient(world_size: int, rank: int) -> dict[str, Any]:
    """Gather rows of uneven sizes with gradient, weight each rank's sum by ``rank + 1`` and return the results.

    The backward sums every rank's gradient, so each local row's gradient is ``W * (W + 1) / 2``.
    """
    sizes = [rank_index + 1 for rank_index in range(world_size)]
    local = torch.full((sizes[rank], 2), float(rank), dtype=torch.float64, requires_grad=True)
    gathered = all_gather_with_grad(local, sizes, GroupInfo(rank, world_size, None))
    ((rank + 1) * gathered.sum()).backward()
    return {"gathered": gathered.detach(), "grad": local.grad.clone()}


def collect_errors(world_size: int, rank: int) -> dict[str, str]:
    """Run the invalid layouts that every rank must reject together, and return each error message."""
    messages: dict[str, str] = {}
    loss_fn = ac.VarianceAwareInfoNCE()
    features = F.normalize(torch.randn(3, EMBEDDING_SIZE, dtype=torch.float64), dim=-1)

    empty = features[:0] if rank == world_size - 1 else features
    invalid_calls = {
        "empty_rank": lambda: loss_fn(empty, empty, 5.0),
        "world_size_mismatch": lambda: ac.SymmetricInfoNCE(world_size=world_size + 1)(features, features, 5.0),
        "rank_mismatch": lambda: ac.SymmetricInfoNCE(rank=(rank + 1) % world_size)(features, features, 5.0),
        "batch_sizes_length": lambda: loss_fn(features, features, 5.0, batch_sizes=[3] * (world_size + 1)),
        "batch_sizes_local": lambda: loss_fn(features, features, 5.0, batch_sizes=[2] * world_size),
    }
    for name, call in invalid_calls.items():
        try:
            call()
        except ValueError as error:
            messages[name] = str(error)
        else:
            messages[name] = "no error"
    return messages


def worker(rank: int, world_size: int, port: int, output_dir: str) -> None:
    """Join the gloo group on the loopback interface, run every case and save this rank's records."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        results: dict[str, Any] = {case.name: run_case(case, world_size, rank, distributed=True) for case in CASES}
        results["gather_gradient"] = check_gather_gradient(world_size, rank)
        results["errors"] = collect_errors(world_size, rank)
        torch.save(results, Path(output_dir) / f"rank{rank}.pt")
    except Exception:
        # The parent process gets only the exit code, so leave the traceback next to the results.
        (Path(output_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        # gloo can abort at teardown while a peer still sends, so meet before destroying the group.
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_world(world_size: int, output_dir: Path, timeout_s: float) -> list[dict[str, Any]]:
    """Run :func:`worker` on ``world_size`` spawned processes and return every rank's results.

    Raises:
        TimeoutError: when the processes have not finished after ``timeout_s`` seconds. They are killed first.
        torch.multiprocessing.ProcessRaisedException: when a worker raised.
    """
    context = mp.start_processes(
        worker,
        args=(world_size, find_free_port(), str(output_dir)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world_size} gloo workers timed out after {timeout_s} s and were killed.")

    return [torch.load(output_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
