"""Measurement helpers shared by the pytest-benchmark suite and ``write_report.py``.

Time is the minimum over repetitions of one forward and backward pass, so that other processes on the
machine inflate it as little as possible. Every loss in a cell is timed in the same loop, interleaved,
and divided by the time of the plain symmetric InfoNCE reference and of one ``(N, D) @ (D, N)`` matrix
product from the same loop. Those ratios carry across machines better than seconds do.

Peak extra memory is the rise of the process's peak resident set size (``VmHWM`` in
``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``) during one forward and
backward pass, over the resident size just before it. It counts every allocation, temporaries inside
operators included, and needs Linux. It is exact only when glibc maps every large block on its own,
which ``write_report.py`` ensures by running ``python harness.py --memory ...`` in a child process with
``MALLOC_MMAP_THRESHOLD_`` set. Otherwise glibc raises its mmap threshold after large frees and serves
later tensors from pages it already holds, so the measurement reads too little.
"""

from __future__ import annotations

import gc
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import adaptive_contrastive as ac

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# The initial CLIP temperature 0.07, as a learnable multiplier.
LOGIT_SCALE = 1.0 / 0.07


def clip_reference_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Compute the symmetric InfoNCE loss the way open_clip's ``ClipLoss`` does for one process.

    ``logits = s * X @ Y.T``, then ``0.5 * (CE(logits, y) + CE(logits.T, y))`` with ``y = arange(N)``,
    in the input dtype as under autocast.
    """
    logits_per_image = logit_scale * image_features @ text_features.T
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels))


ADAPTIVE_CLASSES = {
    "VarianceAwareInfoNCE": ac.VarianceAwareInfoNCE,
    "EntropyWeighted": ac.EntropyWeighted,
    "SpreadWeighted": ac.SpreadWeighted,
}


def make_losses(chunk_size: Optional[int], include_unvalidated: bool = True) -> dict[str, LossFn]:
    """Return the losses of one benchmark cell, keyed by the name that the report prints.

    Every package loss runs with its default settings; ``include_unvalidated`` adds a second row per loss
    with ``validate_values=False``, which skips the one host read of the finiteness check.
    """
    losses: dict[str, LossFn] = {"reference (open_clip formula)": clip_reference_loss}
    classes = {"SymmetricInfoNCE": ac.SymmetricInfoNCE, **ADAPTIVE_CLASSES}
    for name, loss_class in classes.items():
        losses[name] = loss_class(chunk_size=chunk_size)
        if include_unvalidated:
            losses[f"{name} (validate_values=False)"] = loss_class(chunk_size=chunk_size, validate_values=False)
    return losses


def make_inputs(n: int, dim: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return L2-normalised ``(n, dim)`` image and text features in ``dtype`` and a float32 scale."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(dtype)
    text = F.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(dtype)
    return image, text, torch.tensor(LOGIT_SCALE)


def forward_backward(loss_fn: LossFn, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> None:
    """Run one training step of the loss alone: forward, then backward into the features and the scale."""
    image = image.detach().requires_grad_()
    text = text.detach().requires_grad_()
    scale = scale.detach().requires_grad_()
    loss_fn(image, text, scale).backward()


def matmul_step(image: torch.Tensor, text: torch.Tensor) -> None:
    """Run one ``(N, D) @ (D, N)`` product in the input dtype: the matmul-equivalent unit."""
    image @ text.T


GRIDS = ("targets", "quick", "full")


def grid_cells(grid: str, chunk_size: int) -> list[tuple[int, int, torch.dtype, Optional[int]]]:
    """Return the ``(N, D, dtype, chunk_size or None)`` cells of a grid.

    ``targets`` contains exactly the cells that the targets on the benchmark page name, ``quick`` takes
    about a minute on two cores, and ``full`` (every N, D, dtype and mode) takes hours on two cores.
    """
    if grid == "targets":
        return [(1024, 512, torch.float32, None), (4096, 512, torch.float32, None), (16384, 512, torch.float32, chunk_size)]
    if grid == "quick":
        return [(n, 512, torch.float32, chunk) for n in (256, 1024) for chunk in (None, chunk_size)]
    if grid == "full":
        return [
            (n, dim, dtype, chunk)
            for n in (256, 1024, 4096, 16384)
            for dim in (256, 512, 1024)
            for dtype in (torch.float32, torch.bfloat16)
            for chunk in (None, chunk_size)
        ]
    raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}.")


def _resident_bytes() -> tuple[int, int]:
    with open("/proc/self/status") as status_file:
        status = status_file.read()
    resident = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    return resident, peak


def peak_extra_bytes(step: Callable[[], None]) -> int:
    """Return the rise of the process's peak resident size during ``step()``, in bytes."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before, _ = _resident_bytes()
    step()
    _, peak = _resident_bytes()
    return max(0, peak - before)


@dataclass
class CellResult:
    """Timings (seconds) and peak extra memory (bytes) of every loss in one (N, D, dtype, mode) cell."""

    n: int
    dim: int
    dtype: str
    chunk_size: Optional[int]
    matmul_seconds: float
    seconds: dict[str, float] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)

    def ratio(self, name: str) -> float:
        """Return the loss's time over the reference's, both from this cell."""
        return self.seconds[name] / self.seconds["reference (open_clip formula)"]

    def matmul_equivalents(self, name: str) -> float:
        """Return the loss's time in units of one ``N x N x D`` matrix product from this cell."""
        return self.seconds[name] / self.matmul_seconds


def measure_cell(
    n: int,
    dim: int,
    dtype: torch.dtype,
    chunk_size: Optional[int],
    *,
    repeats: int,
    memory: bool = True,
    include_unvalidated: bool = True,
    loss_names: Optional[list[str]] = None,
) -> CellResult:
    """Time every loss of a cell ``repeats`` times, interleaved, and measure each one's peak extra memory once.

    The reference always runs densely; ``chunk_size`` applies to the package losses.
    """
    image, text, scale = make_inputs(n, dim, dtype)
    losses = make_losses(chunk_size, include_unvalidated)
    if loss_names is not None:
        losses = {name: fn for name, fn in losses.items() if name in loss_names or name.startswith("reference")}

    steps: dict[str, Callable[[], None]] = {"matmul": lambda: matmul_step(image, text)}
    for name, loss_fn in losses.items():
        steps[name] = (lambda fn: lambda: forward_backward(fn, image, text, scale))(loss_fn)

    for step in steps.values():
        step()

    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)

    result = CellResult(n, dim, str(dtype).replace("torch.", ""), chunk_size, best.pop("matmul"))
    result.seconds = best
    if memory:
        for name in losses:
            result.peak_bytes[name] = peak_extra_bytes(steps[name])
    return result


def environment() -> dict[str, str]:
    """Return the facts about this machine that the benchmark page records."""
    import platform
    import subprocess

    model = "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"Model name:\s+(.+)", lscpu)
        model = match.group(1).strip() if match else model
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": model,
        "logical_cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "python": platform.python_version(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
    }


def _memory_main(arguments: list[str]) -> None:
    """Print a JSON object of each loss's peak extra bytes for one cell: ``--memory N D dtype chunk_size``."""
    import json

    n, dim, dtype_name, chunk = int(arguments[2]), int(arguments[3]), arguments[4], int(arguments[5])
    image, text, scale = make_inputs(n, dim, getattr(torch, dtype_name))
    losses = make_losses(chunk or None)
    peaks = {}
    for name, loss_fn in losses.items():
        # One unmeasured run first, so that one-time allocations (thread pools, caches) are not counted.
        forward_backward(loss_fn, image, text, scale)
        peaks[name] = peak_extra_bytes(lambda: forward_backward(loss_fn, image, text, scale))
    print(json.dumps(peaks))


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 6 and sys.argv[1] == "--memory":
        _memory_main(sys.argv)
    else:
        raise SystemExit("usage: python benchmarks/harness.py --memory N D dtype chunk_size (0 for dense)")
