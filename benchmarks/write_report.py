"""Measure the target cells (or a larger grid) and write ``docs/benchmarks.md``.

Usage::

    .venv/bin/python benchmarks/write_report.py --grid targets --repeats 5 --threads 2,1 --notes benchmarks/notes.md
    .venv/bin/python benchmarks/write_report.py --render-only --notes benchmarks/notes.md

The first form measures and stores the numbers in ``benchmarks/results.json``. It took 7 minutes on the
2-core machine named in ``docs/benchmarks.md``, at low load. The second form rewrites the page from that
file, for example after editing the notes, which explain the missed targets of the stored run.

Each cell times every loss interleaved with the reference and one matrix product, so the ratios come
from the same run. See ``harness.py`` for the timing and memory method.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

REFERENCE = "reference (open_clip formula)"
ADAPTIVE = list(harness.ADAPTIVE_CLASSES)
TIME_TARGET = 1.05
MATMUL_TARGET = 4.0
MEMORY_TARGET = 0.10
CHUNKED_TIME_TARGET = 1.25


def weighting_tail_microseconds(repeats: int = 200) -> tuple[float, float]:
    """Return the time of the statistics-to-weights step and of the finiteness check, in microseconds."""
    from adaptive_contrastive.functional import check_values
    from adaptive_contrastive.dense import ContrastiveTerms
    from adaptive_contrastive.statistics import NUM_SUMS, summarize
    from adaptive_contrastive.strategies import variance_statistic
    from adaptive_contrastive.weighting import debiased_ema, ema_update_, weights_from_statistics

    sums = torch.rand(2, NUM_SUMS, dtype=torch.float64) + 1.0
    ema, step = torch.zeros(2), torch.zeros((), dtype=torch.int64)

    def tail():
        statistic = variance_statistic(summarize(sums)).float()
        ema_update_(ema, step, statistic, 0.9)
        weights_from_statistics(debiased_ema(ema, step, 0.9))

    terms = ContrastiveTerms(torch.tensor(1.0), torch.tensor(1.0), None)
    image = torch.zeros(4, 4)

    results = []
    for fn in (tail, lambda: check_values(terms, image, image, torch.tensor(10.0))):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        results.append((time.perf_counter() - start) / repeats * 1e6)
    return results[0], results[1]


def measure_memory_in_subprocess(n: int, dim: int, dtype: torch.dtype, chunk_size: int | None) -> dict[str, int]:
    """Return each loss's peak extra bytes, measured by ``harness.py --memory`` in a fresh process.

    glibc raises its mmap threshold after large frees and then serves later tensors from pages it
    already holds, so the resident size stops rising and the measurement reads too little. The child
    process fixes the threshold with ``MALLOC_MMAP_THRESHOLD_``. That makes every large allocation a
    fresh mapping, which slows it down, so the timings come from this process instead.
    """
    command = [sys.executable, str(Path(__file__).resolve().parent / "harness.py"), "--memory", str(n), str(dim),
               str(dtype).replace("torch.", ""), str(chunk_size or 0)]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])


def format_bytes(value: int) -> str:
    return f"{value / 2**20:,.0f} MiB"


def cell_table(result: harness.CellResult) -> list[str]:
    mode = "dense" if result.chunk_size is None else f"chunked, chunk_size={result.chunk_size}"
    lines = [
        f"### N = {result.n}, D = {result.dim}, {result.dtype}, {mode}",
        "",
        f"One N x N x D matrix product: {result.matmul_seconds * 1e3:.2f} ms.",
        "",
        "| loss | forward+backward (ms) | / reference | matmul equivalents | peak extra memory | / reference |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    reference_bytes = result.peak_bytes.get(REFERENCE)
    for name, seconds in result.seconds.items():
        memory = result.peak_bytes.get(name)
        memory_text = format_bytes(memory) if memory is not None else "not measured"
        memory_ratio = f"{memory / reference_bytes:.3f}" if memory is not None and reference_bytes else "-"
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} | {result.ratio(name):.3f} | {result.matmul_equivalents(name):.2f} "
            f"| {memory_text} | {memory_ratio} |"
        )
    lines.append("")
    return lines


def target_rows(results: list[harness.CellResult]) -> list[str]:
    rows = ["| target | measured | limit | status |", "| --- | ---: | ---: | --- |"]

    def status(value: float, limit: float) -> str:
        if value <= limit:
            return "met"
        return f"missed by {value / limit - 1:.1%}"

    for result in results:
        label = f"N={result.n}, D={result.dim}, {result.dtype}"
        if result.chunk_size is None:
            for name in ADAPTIVE:
                for suffix in ("", " (validate_values=False)"):
                    ratio = result.ratio(name + suffix)
                    rows.append(f"| {name}{suffix} time / reference, {label} | {ratio:.3f} | {TIME_TARGET} | {status(ratio, TIME_TARGET)} |")
            for name in ["SymmetricInfoNCE", *ADAPTIVE]:
                equivalents = result.matmul_equivalents(name)
                rows.append(
                    f"| {name} dense matmul equivalents, {label} | {equivalents:.2f} | {MATMUL_TARGET} | {status(equivalents, MATMUL_TARGET)} |"
                )
            reference_equivalents = result.matmul_equivalents(REFERENCE)
            rows.append(f"| reference matmul equivalents (for comparison), {label} | {reference_equivalents:.2f} | - | - |")
        else:
            reference_bytes = max(result.peak_bytes[REFERENCE], 1)
            for name in ["SymmetricInfoNCE", *ADAPTIVE]:
                memory_ratio = result.peak_bytes[name] / reference_bytes
                time_ratio = result.ratio(name)
                rows.append(
                    f"| {name} chunked peak extra memory / reference, {label} | {memory_ratio:.3f} | {MEMORY_TARGET} "
                    f"| {status(memory_ratio, MEMORY_TARGET)} |"
                )
                rows.append(
                    f"| {name} chunked time / reference, {label} | {time_ratio:.3f} | {CHUNKED_TIME_TARGET} "
                    f"| {status(time_ratio, CHUNKED_TIME_TARGET)} |"
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=harness.GRIDS, default="targets", help="cells to measure")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per loss; the minimum is reported")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk in the chunked cells")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"), help="the Markdown page to write")
    parser.add_argument("--notes", type=Path, default=None, help="Markdown appended verbatim after the tables")
    parser.add_argument(
        "--threads", default=str(torch.get_num_threads()),
        help="comma-separated PyTorch intra-op thread counts; every cell is measured once per count",
    )
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results.json"),
                        help="JSON file that stores the measurements, for --render-only")
    parser.add_argument("--render-only", action="store_true",
                        help="skip the measurements and write the page from --results, for example after editing --notes")
    args = parser.parse_args()

    if args.render_only:
        write_page(args, **json.loads(args.results.read_text()))
        return

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    thread_counts = [int(value) for value in args.threads.split(",")]
    memory_by_cell: dict[tuple, dict[str, int]] = {}
    results_by_threads: dict[int, list[harness.CellResult]] = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        results = results_by_threads.setdefault(threads, [])
        for n, dim, dtype, chunk in harness.grid_cells(args.grid, args.chunk_size):
            # The largest cells take seconds per step, so they get fewer repetitions and no second row per loss.
            large = n >= 16384
            repeats = max(2, args.repeats // 2) if large else args.repeats
            print(f"measuring N={n} D={dim} {dtype} chunk_size={chunk}, {threads} threads, {repeats} repeats", flush=True)
            result = harness.measure_cell(
                n, dim, dtype, chunk, repeats=repeats, memory=False, include_unvalidated=not large
            )
            cell_key = (n, dim, dtype, chunk)
            if cell_key not in memory_by_cell:
                memory_by_cell[cell_key] = measure_memory_in_subprocess(n, dim, dtype, chunk)
            result.peak_bytes = {name: memory_by_cell[cell_key][name] for name in result.seconds}
            results.append(result)
            for name in result.seconds:
                print(f"  {name}: {result.seconds[name] * 1e3:.1f} ms, x{result.ratio(name):.3f}, "
                      f"{result.matmul_equivalents(name):.2f} mm-eq, {format_bytes(result.peak_bytes[name])}", flush=True)
    load_after = os.getloadavg()

    tail_us, check_us = weighting_tail_microseconds()
    measured = {
        "started": started.strftime("%Y-%m-%d %H:%M"),
        "load_before": list(load_before),
        "load_after": list(load_after),
        "tail_us": tail_us,
        "check_us": check_us,
        "environment": harness.environment(),
        "command": "python " + " ".join(sys.argv),
        "results_by_threads": {
            str(threads): [dataclasses.asdict(result) for result in results] for threads, results in results_by_threads.items()
        },
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(measured, indent=1))
    write_page(args, **measured)


def write_page(
    args: argparse.Namespace,
    *,
    started: str,
    load_before: list[float],
    load_after: list[float],
    tail_us: float,
    check_us: float,
    environment: dict[str, str],
    command: str,
    results_by_threads: dict[str, list[dict]],
) -> None:
    """Write the Markdown page from the measurements."""
    env = environment
    results_by_threads = {
        int(threads): [harness.CellResult(**result) for result in results] for threads, results in results_by_threads.items()
    }

    lines = [
        "# Benchmarks",
        "",
        "Forward plus backward time and peak extra memory of each loss against a plain symmetric InfoNCE",
        "reference written out as open_clip's `ClipLoss` computes it for one process",
        "(`0.5 * (CE(s X Yt, y) + CE((s X Yt)t, y))`, see `benchmarks/harness.py`).",
        "",
        "## Machine and method",
        "",
        f"- Date: {started} UTC",
        f"- CPU: {env['cpu']}, {env['logical_cpus']} logical CPUs",
        f"- PyTorch {env['torch']} ({env['blas']} BLAS), Python {env['python']}, OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}",
        f"- Command: `{command}`",
        f"- Load average (1, 5, 15 min) before the run: {load_before[0]:.2f}, {load_before[1]:.2f}, {load_before[2]:.2f};"
        f" after: {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f}. Other processes share this machine.",
        "- Inputs: L2-normalised random features, learnable logit scale 1/0.07 (the CLIP start value),",
        "  gradients into both features and the scale. The package losses run with their default settings,",
        "  plus a second row with `validate_values=False`.",
        "- Time: minimum over repetitions of one forward and backward pass. All losses of a cell run",
        "  interleaved with the reference and one N x N x D matrix product, so the ratios and matmul",
        "  equivalents come from the same run.",
        "- Peak extra memory: the rise of the process's peak resident set size (`VmHWM`, reset through",
        "  `/proc/self/clear_refs`) during one forward and backward pass, over the resident size before it,",
        "  with `MALLOC_MMAP_THRESHOLD_=131072` so that every large tensor is mapped and unmapped.",
        f"- Statistics-to-weights step (summary, EMA update, bias correction, weights): {tail_us:.0f} us per call.",
        f"  The finiteness check `check_values` (one host read, skipped under `torch.compile`): {check_us:.0f} us per call.",
        "",
    ]
    for threads, results in results_by_threads.items():
        lines.extend([f"## Targets, {threads} PyTorch thread{'s' if threads > 1 else ''}", "", *target_rows(results), ""])
    for threads, results in results_by_threads.items():
        lines.extend([f"## Cells, {threads} PyTorch thread{'s' if threads > 1 else ''}", ""])
        for result in results:
            lines.extend(cell_table(result))
    if args.notes is not None:
        lines.extend(["## Notes", "", args.notes.read_text().strip(), ""])

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
