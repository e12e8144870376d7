"""Train and evaluate image-text alignment on Flickr8k with each loss and write the comparison.

Run from the repository root:

    .venv/bin/python examples/flickr8k/run.py --data-dir ../shared/flickr8k

See docs/flickr8k.md for the studies, the metric definitions and the output files.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import resource
import subprocess
import sys
import math
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Started as a script: make "examples.flickr8k" importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from examples.flickr8k import report
from examples.flickr8k.data import DATA_DIR_ENV, LAYOUTS, DatasetFileNotFoundError, load_flickr8k, resolve_data_dir
from examples.flickr8k.download import DEFAULT_ARCHIVES, DEFAULT_MIRROR_URL, DownloadError, download_flickr8k, parse_checksums
from examples.flickr8k.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from examples.flickr8k.experiment import (
    FeatureSource,
    ablation_specs,
    check_losses,
    comparison_specs,
    eval_subset,
    run_all,
    sample_efficiency_specs,
    train_subset,
)
from examples.flickr8k.features import DEFAULT_CACHE_DIR
from examples.flickr8k.noise import NoiseSetting
from examples.flickr8k.train import LOSS_NAMES, TrainConfig

logger = logging.getLogger("examples.flickr8k")

STUDIES = ("compare", "noise", "sample-efficiency", "ablations", "all", "extract")
DEFAULT_NOISE = "clean,swap:0.2,swap:0.5"
STRESS_NOISE = "clean,swap:0.2,swap:0.5,words:0.1,words:0.3,pixels:0.25,pixels:0.5"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Image counts of the standard splits; check_split_sizes also checks the splits of the loaded dataset.
FULL_TRAIN_IMAGES = 6000
FULL_EVAL_IMAGES = 1000
FINETUNE_MAX_BLOCKS = 16  # MBConv blocks of EfficientNet-Lite0; finetune.py checks the loaded model.


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; every option states its unit or format."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", help=f"Flickr8k folder (path); defaults to ${DATA_DIR_ENV}.")
    data.add_argument("--layout", choices=LAYOUTS, default="auto",
                      help="dataset layout: original archives, Kaggle (Images/ + captions.txt) or Karpathy JSON.")
    data.add_argument("--download", action="store_true",
                      help="download and unpack the two published archives into --data-dir first.")
    data.add_argument("--mirror-url", default=DEFAULT_MIRROR_URL,
                      help="base URL (http or https) of the archives for --download.")
    data.add_argument("--sha256", action="append", default=[], metavar="NAME=DIGEST",
                      help="expected SHA-256 (64 hex digits) of an archive file; repeat for each archive.")
    data.add_argument("--download-timeout", type=float, default=60.0, help="socket timeout for --download, in seconds.")
    data.add_argument("--train-images", type=int, default=1000,
                      help="size of the seeded low-data subset of the 6,000-image train split, in images "
                           "(5 captions each), from 2 to 6,000; 0 uses the whole split.")
    data.add_argument("--eval-images", type=int, default=0,
                      help="limit dev and test to this many images for quick checks, in images (at most 1,000; "
                           "larger values are rejected); 0 uses the full 1,000-image splits (required for "
                           "reportable results).")
    data.add_argument("--data-seed", type=int, default=0,
                      help="seed (integer) of the training subset and the noise pattern, shared by all runs.")

    study = parser.add_argument_group("study")
    study.add_argument("--study", choices=STUDIES, default="compare",
                       help="compare: every loss on --noise settings; noise: the full stress test "
                            f"({STRESS_NOISE}); sample-efficiency: R@5 against --sample-sizes; "
                            "ablations: VarianceAwareInfoNCE options; all: the four studies in that order; extract: features only.")
    study.add_argument("--losses", default=",".join(LOSS_NAMES),
                       help="comma-separated losses; must include the baseline 'symmetric'.")
    study.add_argument("--seeds", type=int, default=5, help="number of seeds per configuration (seeds 0..N-1).")
    study.add_argument("--noise", default=DEFAULT_NOISE,
                       help="comma-separated training-data settings for --study compare: clean, swap:<fraction "
                            "of pairs>, words:<per-word probability>, pixels:<fraction of images>.")
    study.add_argument("--pixel-sigma", type=float, default=0.3,
                       help="standard deviation of the Gaussian pixel noise, in pixel units on a [0, 1] scale.")
    study.add_argument("--sample-sizes", default="500,1000,2000,6000",
                       help="comma-separated training-set sizes for the sample-efficiency curve, in images "
                            "(each from 2 to 6,000).")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=10, help="training epochs per run (passes over all pairs).")
    training.add_argument("--batch-size", type=int, default=256, help="image-caption pairs per step, at least 2.")
    training.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate.")
    training.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay of the heads.")
    training.add_argument("--warmup", type=float, default=0.05, help="linear warm-up, as a fraction in [0, 1) of all steps.")
    training.add_argument("--head", choices=("linear", "mlp"), default="linear", help="projection head type.")
    training.add_argument("--embed-dim", type=int, default=256, help="shared embedding size, in dimensions.")
    training.add_argument("--hidden-dim", type=int, default=512, help="hidden layer size of the MLP heads, in units.")
    training.add_argument("--dropout", type=float, default=0.1, help="dropout probability in [0, 1) in the MLP heads.")
    training.add_argument("--decay", type=float, default=0.9,
                          help="EMA decay in [0, 1) of the adaptive losses' batch statistics.")
    training.add_argument("--finetune-blocks", type=int, default=0,
                          help="also train the last N MBConv blocks of EfficientNet-Lite0 end to end, from pixels "
                               "(0 trains the heads on cached features only); meant for a GPU.")
    training.add_argument("--finetune-lr", type=float, default=1e-4,
                          help="peak AdamW learning rate of the fine-tuned encoder blocks.")
    training.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                          help="torch device for training, e.g. cpu or cuda.")

    system = parser.add_argument_group("features and system")
    system.add_argument("--image-encoder", default=DEFAULT_IMAGE_ENCODER,
                        help="frozen image encoder: 'efficientnet-lite0' or 'timm:<model name>'.")
    system.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER,
                        help="frozen caption encoder: 'all-MiniLM-L6-v2' or 'sentence-transformers:<local folder>'.")
    system.add_argument("--feature-scope", choices=("all", "needed"), default="all",
                        help="extract features of the whole dataset once (all) or only of the images a run uses.")
    system.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="feature cache folder (path).")
    system.add_argument("--image-batch-size", type=int, default=64, help="images per encoder forward pass.")
    system.add_argument("--text-batch-size", type=int, default=256, help="captions per encoder forward pass.")
    system.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for feature extraction; 0 keeps torch's default (one per core).")
    system.add_argument("--train-threads", type=int, default=1,
                        help="torch CPU threads for training the heads. One thread is as fast for these small "
                             "matrices and avoids large slowdowns when other processes share the cores.")
    system.add_argument("--output-dir", type=Path, default=None,
                        help="results folder (path); default examples/flickr8k/runs/<UTC timestamp>.")
    system.add_argument("--no-plots", action="store_true", help="skip the PNG figures.")
    system.add_argument("--replot", type=Path, metavar="DIR",
                        help="only re-render tables and figures (except t-SNE) from the JSON files in DIR, then exit.")
    system.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level.")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate every option value before any data loading; exit with status 2 through ``parser.error``.

    Each message names the option, the given value and the valid range, so a bad value fails in
    seconds instead of after the feature extraction.
    """
    def reject(option: str, value: Any, fix: str) -> None:
        parser.error(f"invalid {option} {value!r}: {fix}")

    if args.replot is not None and not args.replot.is_dir():
        reject("--replot", str(args.replot), "folder not found; pass a finished run folder, "
               "e.g. examples/flickr8k/runs/<UTC timestamp>.")

    check_data_args(args, reject)
    check_study_args(args, reject)
    check_training_args(args, reject)
    check_system_args(args, reject)


def check_data_args(args: argparse.Namespace, reject: Callable[[str, Any, str], None]) -> None:
    """Validate the data options; ``reject`` exits with the option, its value and the fix."""
    if urllib.parse.urlparse(args.mirror_url).scheme not in ("http", "https") or \
            not urllib.parse.urlparse(args.mirror_url).netloc:
        reject("--mirror-url", args.mirror_url, "expected an http:// or https:// URL.")
    try:
        checksums = parse_checksums(args.sha256)
    except ValueError as error:
        reject("--sha256", args.sha256, str(error))
    archive_names = [archive.file_name for archive in DEFAULT_ARCHIVES]
    for name in checksums:
        if name not in archive_names:
            reject("--sha256", name, f"unknown archive; expected one of {', '.join(archive_names)}.")
    if not args.download_timeout > 0:
        reject("--download-timeout", args.download_timeout, "expected a number of seconds greater than 0.")
    if args.train_images == 1 or args.train_images < 0 or args.train_images > FULL_TRAIN_IMAGES:
        reject("--train-images", args.train_images,
               f"expected 2 to {FULL_TRAIN_IMAGES:,} images (the train split), or 0 for the whole split.")
    if not 0 <= args.eval_images <= FULL_EVAL_IMAGES:
        reject("--eval-images", args.eval_images,
               f"expected 1 to {FULL_EVAL_IMAGES:,} images (the dev and test splits), or 0 for the whole splits.")
    if args.data_seed < 0:
        reject("--data-seed", args.data_seed, "expected an integer >= 0 (numpy seeds are non-negative).")


def check_study_args(args: argparse.Namespace, reject: Callable[[str, Any, str], None]) -> None:
    """Validate the study options; ``reject`` exits with the option, its value and the fix."""
    try:
        check_losses(parse_list(args.losses))
    except ValueError as error:
        reject("--losses", args.losses, str(error))
    if args.seeds < 1:
        reject("--seeds", args.seeds, "expected 1 or more seeds.")
    entries = parse_list(args.noise)
    if not entries:
        reject("--noise", args.noise, "expected at least one setting, e.g. clean,swap:0.2.")
    for entry in entries:
        try:
            NoiseSetting.parse(entry)
        except ValueError as error:
            reject("--noise", entry, f"{error} Valid settings: clean, swap:<fraction>, words:<probability>, "
                                     "pixels:<fraction>, each level in [0, 1].")
    if not args.pixel_sigma > 0:
        reject("--pixel-sigma", args.pixel_sigma, "expected a standard deviation greater than 0, e.g. 0.3.")

    entries = parse_list(args.sample_sizes)
    if not entries:
        reject("--sample-sizes", args.sample_sizes, "expected comma-separated image counts, e.g. 500,1000.")
    for entry in entries:
        try:
            size = int(entry)
        except ValueError:
            size = None
        if size is None or not 2 <= size <= FULL_TRAIN_IMAGES:
            reject("--sample-sizes", entry, f"every entry must be an integer from 2 to {FULL_TRAIN_IMAGES:,} "
                                            f"images (the train split); got {args.sample_sizes!r}.")


def check_training_args(args: argparse.Namespace, reject: Callable[[str, Any, str], None]) -> None:
    """Validate the training options; ``reject`` exits with the option, its value and the fix."""
    if args.epochs < 1:
        reject("--epochs", args.epochs, "expected 1 or more epochs.")
    if args.batch_size < 2:
        reject("--batch-size", args.batch_size,
               "expected 2 or more pairs per step, because InfoNCE on a single pair is always 0.")
    for option, value in (("--lr", args.lr), ("--finetune-lr", args.finetune_lr)):
        if not (value > 0 and math.isfinite(value)):
            reject(option, value, "expected a learning rate greater than 0, e.g. 1e-3.")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        reject("--weight-decay", args.weight_decay, "expected a weight decay >= 0, e.g. 0.05.")
    for option, value, meaning in (("--warmup", args.warmup, "fraction of all steps"),
                                   ("--dropout", args.dropout, "probability"),
                                   ("--decay", args.decay, "EMA decay")):
        if not 0 <= value < 1:
            reject(option, value, f"expected a {meaning} in [0, 1).")
    for option, value in (("--embed-dim", args.embed_dim), ("--hidden-dim", args.hidden_dim)):
        if value < 1:
            reject(option, value, "expected 1 or more dimensions.")
    if not 0 <= args.finetune_blocks <= FINETUNE_MAX_BLOCKS:
        reject("--finetune-blocks", args.finetune_blocks,
               f"expected 0 (heads only) to {FINETUNE_MAX_BLOCKS}, the MBConv blocks of EfficientNet-Lite0.")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        reject("--device", args.device, "expected a torch device such as cpu, cuda or cuda:0.")
    if device.type == "cuda" and not torch.cuda.is_available():
        reject("--device", args.device, "CUDA is not available on this machine; use --device cpu.")


def check_system_args(args: argparse.Namespace, reject: Callable[[str, Any, str], None]) -> None:
    """Validate the feature and system options; ``reject`` exits with the option, its value and the fix."""
    if args.image_encoder != DEFAULT_IMAGE_ENCODER and not (
            args.image_encoder.startswith("timm:") and args.image_encoder.removeprefix("timm:")):
        reject("--image-encoder", args.image_encoder, f"expected '{DEFAULT_IMAGE_ENCODER}' or 'timm:<model name>'.")
    prefix = "sentence-transformers:"
    if args.text_encoder != DEFAULT_TEXT_ENCODER and not (
            args.text_encoder.startswith(prefix) and args.text_encoder.removeprefix(prefix)):
        reject("--text-encoder", args.text_encoder,
               f"expected '{DEFAULT_TEXT_ENCODER}' or 'sentence-transformers:<local folder>'.")
    for option, value in (("--image-batch-size", args.image_batch_size),
                          ("--text-batch-size", args.text_batch_size)):
        if value < 1:
            reject(option, value, "expected 1 or more items per forward pass.")
    if args.threads < 0:
        reject("--threads", args.threads, "expected 1 or more threads, or 0 to keep torch's default.")
    if args.train_threads < 0:
        reject("--train-threads", args.train_threads,
               "expected 1 or more threads, or 0 to keep the feature extraction's thread count.")


def parse_list(text: str) -> list[str]:
    """Split a comma-separated option value into its non-empty, stripped entries."""
    return [item.strip() for item in text.split(",") if item.strip()]


def machine_description() -> dict[str, Any]:
    """Return the CPU model, core count, Python and torch versions for the result files."""
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def write_study(name: str, records: list[dict[str, Any]], results: dict, rows: list[dict[str, Any]],
                output_dir: Path, meta: dict[str, Any]) -> str:
    """Write a study's JSON, CSV and markdown table; return the markdown section."""
    report.write_records(records, output_dir, f"{name}-runs")
    report.write_json(
        {**meta, "study": name, "runs": records, "summary": rows,
         "curves": {run_id: {"steps": result.steps, "epochs": result.epochs} for run_id, result in results.items()}},
        output_dir / f"{name}.json",
    )
    section = [f"## {name}", "", report.markdown_table(rows), ""]
    section += [f"- {sentence}" for sentence in report.headline(rows)]
    text = "\n".join(section) + "\n"
    (output_dir / f"{name}.md").write_text(text, encoding="utf-8")
    return text


def check_split_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      splits: dict[str, np.ndarray]) -> None:
    """Reject image counts larger than the loaded splits, which can be smaller than the standard ones."""
    train_size = len(splits["train"])
    requested = {"--train-images": [args.train_images]}
    if args.study in ("sample-efficiency", "all"):
        requested["--sample-sizes"] = [int(size) for size in parse_list(args.sample_sizes)]
    for option, sizes in requested.items():
        for size in sizes:
            if size > train_size:
                parser.error(f"invalid {option} {size}: the train split of this dataset has only "
                             f"{train_size:,} images; use at most {train_size:,}.")
    eval_size = min(len(splits["dev"]), len(splits["test"]))
    if args.eval_images > eval_size:
        parser.error(f"invalid --eval-images {args.eval_images}: the dev and test splits of this dataset "
                     f"have only {eval_size:,} images; use at most {eval_size:,}, or 0 for all.")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    if args.replot is not None:
        studies = report.replot(args.replot)
        if not studies:
            parser.error(f"invalid --replot {str(args.replot)!r}: the folder contains no study JSON files "
                         "(compare.json, noise.json, ...); pass a finished run folder.")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    data_dir = resolve_data_dir(args.data_dir)
    if args.download:
        download_flickr8k(data_dir, args.mirror_url, parse_checksums(args.sha256), timeout=args.download_timeout)
    dataset = load_flickr8k(data_dir, args.layout)

    losses = check_losses(parse_list(args.losses))
    seeds = list(range(args.seeds))
    compare_settings = [NoiseSetting.parse(text) for text in parse_list(args.noise)]
    stress_settings = [NoiseSetting.parse(text) for text in STRESS_NOISE.split(",")]
    sample_sizes = [int(size) for size in parse_list(args.sample_sizes)]
    check_split_sizes(parser, args, dataset.splits)
    main_size = args.train_images or len(dataset.splits["train"])
    sizes = sorted({main_size} | (set(sample_sizes) if args.study in ("sample-efficiency", "all") else set()))
    train_sets = {size: train_subset(dataset.splits["train"], size, args.data_seed) for size in sizes}
    dev_images = eval_subset(dataset.splits["dev"], args.eval_images or None, args.data_seed)
    test_images = eval_subset(dataset.splits["test"], args.eval_images or None, args.data_seed)

    needed = np.concatenate([dev_images, test_images, *train_sets.values()])
    source = FeatureSource(
        dataset, args.cache_dir, args.image_encoder, args.text_encoder, needed, args.feature_scope,
        args.pixel_sigma, args.data_seed, args.image_batch_size, args.text_batch_size,
        pixel_inputs=args.finetune_blocks > 0,
    )
    extract_started = time.perf_counter()
    source.load_clean()
    extract_seconds = time.perf_counter() - extract_started
    logger.info("Clean features ready in %.1f s.", extract_seconds)
    if args.study == "extract":
        return 0
    if args.train_threads:
        torch.set_num_threads(args.train_threads)

    output_dir = args.output_dir or REPO_ROOT / "examples" / "flickr8k" / "runs" / datetime.datetime.now(
        datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    output_dir.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
        warmup_fraction=args.warmup, embed_dim=args.embed_dim, hidden_dim=args.hidden_dim, head=args.head,
        dropout=args.dropout, decay=args.decay,
    )
    dev = source.eval_data(dev_images)
    test = source.eval_data(test_images)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "arguments": {key: str(value) for key, value in vars(args).items()},
        "machine": machine_description(),
        "dataset": {"root": str(dataset.root), "layout": dataset.layout, "images": len(dataset.image_names),
                    "captions": len(dataset.captions), "skipped_captions": dataset.skipped_captions,
                    "dev_images": len(dev_images), "test_images": len(test_images),
                    "test_captions": len(test.caption_image)},
        "config": vars(config),
    }
    logger.info("Writing results to %s.", output_dir)

    studies = ["compare", "noise", "sample-efficiency", "ablations"] if args.study == "all" else [args.study]
    markdown = [f"# Flickr8k results\n\nCommand: `{meta['command']}`\n"]
    timings = {"feature_extraction_or_cache_load_seconds": round(extract_seconds, 1)}
    for study in studies:
        study_started = time.perf_counter()
        if study in ("compare", "noise"):
            study_settings = compare_settings if study == "compare" else stress_settings
            specs = comparison_specs(study, study_settings, losses, seeds, main_size)
        elif study == "sample-efficiency":
            specs = sample_efficiency_specs(sorted(sample_sizes), losses, seeds)
        else:
            specs = ablation_specs(seeds, main_size, NoiseSetting("clean"))

        records, results, noise_summaries = run_all(
            specs, source, train_sets, dev, test, config, args.finetune_blocks, args.finetune_lr, args.device,
        )
        group_key = "variant" if study == "ablations" else "loss"
        rows = report.summarize(records, group_key)
        study_meta = {**meta, "noise": noise_summaries}
        markdown.append(write_study(study, records, results, rows, output_dir, study_meta))

        if not args.no_plots:
            if study in ("compare", "noise"):
                report.plot_loss_curves(results, records, output_dir / f"{study}-loss-curves.png")
                report.plot_noisy_recall(rows, records, output_dir / f"{study}-r5-after-noisy-training.png")
                report.plot_weight_trajectories(results, records, output_dir / f"{study}-weight-trajectories.png")
                report.plot_tsne(results, test.caption_image.numpy(), output_dir / f"{study}-tsne.png")
            elif study == "sample-efficiency":
                report.plot_sample_efficiency(rows, output_dir / "sample-efficiency.png")
            else:
                report.plot_ablations(rows, output_dir / "ablations.png")
        timings[f"{study}_seconds"] = round(time.perf_counter() - study_started, 1)
        logger.info("Study %s finished in %.1f s.", study, timings[f"{study}_seconds"])

    timings["total_seconds"] = round(time.perf_counter() - started, 1)
    # CPU seconds of this process and its threads; unlike wall time it barely changes when other jobs share the CPU.
    timings["cpu_seconds"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_utime
                                   + resource.getrusage(resource.RUSAGE_SELF).ru_stime, 1)
    report.write_json({**meta, "timings": timings}, output_dir / "run-info.json")
    (output_dir / "summary.md").write_text("\n".join(markdown), encoding="utf-8")
    logger.info("Done in %.1f s; summary in %s.", timings["total_seconds"], output_dir / "summary.md")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DatasetFileNotFoundError, DownloadError, FileExistsError, ValueError) as error:
        # Input and download errors carry their own fix; --log-level DEBUG adds the traceback.
        logger.error("%s", error)
        logger.debug("Traceback of the error above.", exc_info=True)
        sys.exit(2)
