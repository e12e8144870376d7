"""Result files, summary statistics, the markdown table and the figures.

Paired differences compare each method with the fixed-weight baseline (SymmetricInfoNCE) at the
same seed, setting and training-set size, so both runs share initialisation and batches. The 95%
confidence interval of the mean difference uses Student's t distribution with n - 1 degrees of
freedom, from ``scipy.stats.t``. scipy is a dependency of scikit-learn.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import RECALL_KS
from .train import BASELINE, LOSS_LABELS, RunResult

logger = logging.getLogger(__name__)

METRIC_COLUMNS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS] + ["i2t_medr", "t2i_medr", "rsum"]


def mean_r5(record: dict[str, Any]) -> float:
    """Return the mean of image-to-text and text-to-image R@5 on test, in percent."""
    return 0.5 * (record["test_i2t_r5"] + record["test_t2i_r5"])


def t_confidence_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Return the mean and the two-sided ``level`` t-interval of the mean; the interval is NaN for n < 2."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else float("nan")
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half_width = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, mean - half_width, mean + half_width


def write_records(records: list[dict[str, Any]], output_dir: Path, stem: str) -> None:
    """Write one row per run to ``<stem>.csv`` (loss options as JSON text)."""
    if not records:
        return
    columns = list(records[0].keys())
    with open(output_dir / f"{stem}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for record in records:
            row = {key: json.dumps(value) if isinstance(value, dict) else value for key, value in record.items()}
            writer.writerow(row)


def write_json(content: dict[str, Any], path: Path) -> None:
    """Write JSON with NaN allowed (Python's json extension) and 1-space indentation."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=1, default=str)


def summarize(records: list[dict[str, Any]], group_key: str = "variant") -> list[dict[str, Any]]:
    """Aggregate runs per (setting, train_images, group) over seeds, with paired differences to the baseline.

    Returns:
        One row per group with the number of seeds and the mean and sample standard deviation
        of each metric. Rows of the other methods add the mean paired difference to the baseline
        in rsum and in mean R@5, each with its 95% t-interval, and the number of seeds where the
        method beat the baseline.
    """
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["setting"], record["train_images"], record[group_key])].append(record)

    rows = []
    for (setting, train_images, name), members in groups.items():
        row: dict[str, Any] = {"setting": setting, "train_images": train_images, "method": name,
                               "seeds": len(members)}
        for column in METRIC_COLUMNS:
            values = np.array([member[f"test_{column}"] for member in members])
            row[f"{column}_mean"] = float(values.mean())
            row[f"{column}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        r5 = np.array([mean_r5(member) for member in members])
        row["r5_mean"], row["r5_std"] = float(r5.mean()), float(r5.std(ddof=1)) if len(r5) > 1 else 0.0

        baseline = {member["seed"]: member for member in groups.get((setting, train_images, BASELINE), [])}
        if name != BASELINE and baseline:
            paired = [(member, baseline[member["seed"]]) for member in members if member["seed"] in baseline]
            rsum_delta = np.array([a["test_rsum"] - b["test_rsum"] for a, b in paired])
            r5_delta = np.array([mean_r5(a) - mean_r5(b) for a, b in paired])
            row["paired_seeds"] = len(paired)
            row["delta_rsum"], row["delta_rsum_low"], row["delta_rsum_high"] = t_confidence_interval(rsum_delta)
            row["delta_r5"], row["delta_r5_low"], row["delta_r5_high"] = t_confidence_interval(r5_delta)
            row["wins"] = int((rsum_delta > 0).sum())
        rows.append(row)
    return rows


def _format_delta(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "baseline"
    return f"{row[key]:+.2f} [{row[key + '_low']:+.2f}, {row[key + '_high']:+.2f}]"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Return a markdown table: mean ± std per method and the paired differences with 95% CIs."""
    header = (
        "| setting | train images | method | seeds | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 "
        "| i2t medR | t2i medR | rsum | Δ rsum vs baseline [95% CI] | Δ mean R@5 [95% CI] | wins |"
    )
    lines = [header, "|" + "---|" * 16]
    for row in rows:
        cells = [row["setting"], str(row["train_images"]), LOSS_LABELS.get(row["method"], row["method"]), str(row["seeds"])]
        cells += [f"{row[f'{column}_mean']:.2f} ± {row[f'{column}_std']:.2f}" for column in METRIC_COLUMNS]
        cells += [_format_delta(row, "delta_rsum"), _format_delta(row, "delta_r5")]
        cells.append(f"{row['wins']}/{row['paired_seeds']}" if "wins" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """Return one plain sentence per (setting, size): which method had the highest mean rsum and by how much."""
    sentences = []
    by_group: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_group[(row["setting"], row["train_images"])].append(row)
    for (setting, train_images), members in by_group.items():
        best = max(members, key=lambda row: row["rsum_mean"])
        label = LOSS_LABELS.get(best["method"], best["method"])
        where = f"{setting}, {train_images} training images"
        if best["method"] == BASELINE:
            runner_up = max((row for row in members if row["method"] != BASELINE), key=lambda row: row["rsum_mean"],
                            default=None)
            if runner_up is None:
                sentences.append(f"{where}: only the baseline ran.")
                continue
            runner_label = LOSS_LABELS.get(runner_up["method"], runner_up["method"])
            gap = ("ties it to two decimals" if abs(runner_up["delta_rsum"]) < 0.005
                   else f"trails it by {-runner_up['delta_rsum']:.2f} rsum")
            sentences.append(
                f"{where}: no adaptive loss beat the baseline. The best adaptive loss, {runner_label}, {gap} "
                f"(95% CI of the difference [{runner_up['delta_rsum_low']:+.2f}, {runner_up['delta_rsum_high']:+.2f}])."
            )
            continue
        if best["delta_rsum"] < 0.005:
            sentences.append(
                f"{where}: {label} had the highest mean rsum but ties the baseline to two decimals "
                f"(95% CI of the difference [{best['delta_rsum_low']:+.2f}, {best['delta_rsum_high']:+.2f}])."
            )
            continue
        if best["paired_seeds"] < 2:
            sentences.append(f"{where}: {label} had the highest mean rsum, {best['delta_rsum']:+.2f} over the "
                             "baseline, from one seed, so there is no confidence interval.")
            continue
        significant = best["delta_rsum_low"] > 0
        sentences.append(
            f"{where}: {label} had the highest mean rsum, {best['delta_rsum']:+.2f} over the baseline "
            f"(95% CI [{best['delta_rsum_low']:+.2f}, {best['delta_rsum_high']:+.2f}], better on "
            f"{best['wins']}/{best['paired_seeds']} seeds); "
            + ("the interval excludes zero." if significant else "the interval includes zero, so the gain is not significant.")
        )
    return sentences


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(results: dict[str, RunResult], records: list[dict[str, Any]], path: Path) -> None:
    """Plot the mean per-epoch training loss (unweighted mean of both directions) per loss, one line per setting."""
    plt = _pyplot()
    losses = sorted({record["loss"] for record in records}, key=list(LOSS_LABELS).index)
    settings = list(dict.fromkeys(record["setting"] for record in records))
    figure, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.4), sharey=True, squeeze=False)
    for axis, loss in zip(axes[0], losses):
        for setting in settings:
            curves = [results[record["run_id"]].epochs["train_symmetric_loss"]
                      for record in records if record["loss"] == loss and record["setting"] == setting]
            if not curves:
                continue
            curves = np.array(curves)
            epochs = np.arange(1, curves.shape[1] + 1)
            axis.plot(epochs, curves.mean(axis=0), label=setting, linestyle="-" if setting == "clean" else "--")
            axis.fill_between(epochs, curves.min(axis=0), curves.max(axis=0), alpha=0.15)
        axis.set_title(LOSS_LABELS[loss], fontsize=9)
        axis.set_xlabel("epoch")
    axes[0][0].set_ylabel("training loss (nats, mean of i2t and t2i)")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_noisy_recall(rows: list[dict[str, Any]], records: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of clean-test R@5 per direction after training on each setting; error bars are std over seeds."""
    plt = _pyplot()
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    losses = sorted({row["method"] for row in rows}, key=list(LOSS_LABELS).index)
    width = 0.8 / len(losses)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.0), sharey=True)
    for axis, direction in zip(axes, ("i2t", "t2i")):
        for offset, loss in enumerate(losses):
            means, stds = [], []
            for setting in settings:
                row = next(row for row in rows if row["setting"] == setting and row["method"] == loss)
                means.append(row[f"{direction}_r5_mean"])
                stds.append(row[f"{direction}_r5_std"])
            positions = np.arange(len(settings)) + (offset - (len(losses) - 1) / 2) * width
            axis.bar(positions, means, width, yerr=stds, capsize=3, label=LOSS_LABELS[loss])
        axis.set_xticks(np.arange(len(settings)), settings, rotation=30 if len(settings) > 4 else 0)
        axis.set_xlabel("training data")
        axis.set_title(f"{'image→text' if direction == 'i2t' else 'text→image'} R@5 on the clean test split", fontsize=9)
        low = min(row[f"{d}_r5_mean"] - row[f"{d}_r5_std"] for row in rows for d in ("i2t", "t2i"))
        axis.set_ylim(max(0.0, low - 5), None)
    axes[0].set_ylabel("R@5 (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(losses), fontsize=8)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_tsne(results: dict[str, RunResult], caption_image: np.ndarray, path: Path, seed: int = 0) -> bool:
    """Plot a t-SNE of test image embeddings and one caption per image, for the baseline and the variance-aware loss.

    Returns False when no run kept its embeddings.
    """
    from sklearn.manifold import TSNE

    plt = _pyplot()
    with_embeddings = {result.loss: result for result in results.values() if result.embeddings is not None}
    panels = [loss for loss in ("symmetric", "variance") if loss in with_embeddings]
    if not panels:
        return False

    first_caption = np.unique(np.asarray(caption_image), return_index=True)[1]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    for axis, loss in zip(axes[0], panels):
        embeddings = with_embeddings[loss].embeddings
        images = embeddings["images"]
        texts = embeddings["texts"][first_caption]
        # scikit-learn requires perplexity < number of points, which matters for small --eval-images.
        perplexity = min(30.0, (2 * len(images) - 1) / 3)
        points = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed,
                      metric="cosine").fit_transform(np.concatenate([images, texts]))
        image_points, text_points = points[: len(images)], points[len(images):]
        for index in range(0, len(images), max(1, len(images) // 40)):
            axis.plot(*zip(image_points[index], text_points[index]), color="0.6", linewidth=0.6)
        axis.scatter(*image_points.T, s=4, label="test images")
        axis.scatter(*text_points.T, s=4, label="first caption of each image")
        axis.set_title(f"{LOSS_LABELS[loss]} (seed {with_embeddings[loss].seed}); grey lines join 40 matched pairs", fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0][0].legend(fontsize=8, markerscale=3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_weight_trajectories(results: dict[str, RunResult], records: list[dict[str, Any]], path: Path) -> None:
    """Plot the image-to-text weight per training step (t2i weight = 2 - it) for each adaptive loss and setting."""
    plt = _pyplot()
    losses = [loss for loss in ("variance", "entropy", "spread") if any(record["loss"] == loss for record in records)]
    if not losses:
        return
    settings = list(dict.fromkeys(record["setting"] for record in records))
    figure, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.4), sharey=True, squeeze=False)
    for axis, loss in zip(axes[0], losses):
        for setting in settings:
            curves = np.array([results[record["run_id"]].steps["weight_i2t"]
                               for record in records if record["loss"] == loss and record["setting"] == setting])
            if not len(curves):
                continue
            steps = np.arange(1, curves.shape[1] + 1)
            axis.plot(steps, curves.mean(axis=0), label=setting, linestyle="-" if setting == "clean" else "--")
            axis.fill_between(steps, curves.min(axis=0), curves.max(axis=0), alpha=0.15)
        axis.axhline(1.0, color="0.5", linewidth=0.8)
        axis.set_title(LOSS_LABELS[loss], fontsize=9)
        axis.set_xlabel("training step")
    axes[0][0].set_ylabel("image→text weight (text→image: 2 minus it)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(settings), 7), fontsize=8)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_sample_efficiency(rows: list[dict[str, Any]], path: Path) -> None:
    """Plot mean R@5 (both directions) against training images per loss, and each loss's paired difference.

    Left: error bars are the standard deviation over seeds. Right: the mean paired difference in
    mean R@5 to the baseline, with its 95% t-interval.
    """
    plt = _pyplot()
    losses = sorted({row["method"] for row in rows}, key=list(LOSS_LABELS).index)
    sizes = sorted({row["train_images"] for row in rows})
    figure, (axis, delta_axis) = plt.subplots(1, 2, figsize=(11, 4.0))
    for offset, loss in enumerate(losses):
        members = sorted((row for row in rows if row["method"] == loss), key=lambda row: row["train_images"])
        member_sizes = [row["train_images"] for row in members]
        axis.errorbar(member_sizes, [row["r5_mean"] for row in members], yerr=[row["r5_std"] for row in members],
                      marker="o", capsize=3, label=LOSS_LABELS[loss])
        if loss == BASELINE:
            delta_axis.plot([], [])  # keep the colour cycle aligned with the left panel
            continue
        shifted = [size * (1 + 0.04 * (offset - 2)) for size in member_sizes]
        means = np.array([row["delta_r5"] for row in members])
        errors = np.array([[row["delta_r5"] - row["delta_r5_low"], row["delta_r5_high"] - row["delta_r5"]]
                           for row in members]).T
        delta_axis.errorbar(shifted, means, yerr=errors, marker="o", capsize=3, label=LOSS_LABELS[loss])
    delta_axis.axhline(0.0, color="0.5", linewidth=0.8)
    for panel in (axis, delta_axis):
        panel.set_xscale("log")
        panel.minorticks_off()
        panel.set_xticks(sizes, [str(size) for size in sizes])
        panel.set_xlabel("training images (5 captions each)")
    axis.set_ylabel("mean of i2t and t2i R@5 on test (%)")
    delta_axis.set_ylabel("Δ mean R@5 vs baseline (points, 95% CI)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_ablations(rows: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bar chart of test rsum per ablation variant; error bars are std over seeds."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1))
    labels = [LOSS_LABELS.get(row["method"], row["method"]) for row in rows]
    axis.barh(np.arange(len(rows)), [row["rsum_mean"] for row in rows],
              xerr=[row["rsum_std"] for row in rows], capsize=3)
    axis.set_yticks(np.arange(len(rows)), labels, fontsize=8)
    low = min(row["rsum_mean"] - row["rsum_std"] for row in rows)
    axis.set_xlim(max(0.0, low - 10), None)
    axis.set_xlabel("test rsum")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def replot(output_dir: Path) -> list[str]:
    """Re-render the tables, headlines and figures of every ``<study>.json`` in ``output_dir`` without training.

    The t-SNE figure is skipped because the result files do not store embeddings.

    Returns:
        The study names found.
    """
    from types import SimpleNamespace

    studies = []
    for path in sorted(Path(output_dir).glob("*.json")):
        content = json.loads(path.read_text(encoding="utf-8"))
        if "runs" not in content or "study" not in content:
            continue
        study, records = content["study"], content["runs"]
        results = {run_id: SimpleNamespace(**curves) for run_id, curves in content["curves"].items()}
        rows = summarize(records, "variant" if study == "ablations" else "loss")
        section = [f"## {study}", "", markdown_table(rows), ""] + [f"- {sentence}" for sentence in headline(rows)]
        (Path(output_dir) / f"{study}.md").write_text("\n".join(section) + "\n", encoding="utf-8")

        if study in ("compare", "noise"):
            plot_loss_curves(results, records, output_dir / f"{study}-loss-curves.png")
            plot_noisy_recall(rows, records, output_dir / f"{study}-r5-after-noisy-training.png")
            plot_weight_trajectories(results, records, output_dir / f"{study}-weight-trajectories.png")
        elif study == "sample-efficiency":
            plot_sample_efficiency(rows, output_dir / "sample-efficiency.png")
        elif study == "ablations":
            plot_ablations(rows, output_dir / "ablations.png")
        studies.append(study)
        logger.info("Re-rendered %s from %s.", study, path)
    return studies
