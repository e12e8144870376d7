"""End-to-end run on a small subset of the local Flickr8k copy with the real encoders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from flickr8k_helpers import local_flickr8k_dir

DATA_DIR = local_flickr8k_dir()
pytestmark = pytest.mark.skipif(
    DATA_DIR is None,
    reason="no local Flickr8k copy: set FLICKR8K_DIR or place it at ../shared/flickr8k next to the repository",
)


def test_compare_smoke_run(tmp_path: Path) -> None:
    from examples.flickr8k.run import main

    output = tmp_path / "out"
    arguments = [
        "--data-dir", str(DATA_DIR), "--feature-scope", "needed", "--cache-dir", str(tmp_path / "cache"),
        "--train-images", "20", "--eval-images", "20", "--epochs", "2", "--seeds", "2",
        "--noise", "clean,swap:0.5,words:0.2,pixels:0.5", "--output-dir", str(output), "--threads", "2",
    ]

    assert main(arguments) == 0

    with open(output / "compare-runs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 2 * 4  # losses x seeds x settings
    assert {row["loss"] for row in rows} == {"symmetric", "variance", "entropy", "spread"}
    for row in rows:
        assert 0.0 <= float(row["test_rsum"]) <= 600.0
        assert 1.0 <= float(row["test_i2t_medr"]) <= 100.0  # 20 images x 5 captions
        assert 1.0 <= float(row["test_t2i_medr"]) <= 20.0

    content = json.loads((output / "compare.json").read_text())
    assert content["dataset"]["test_images"] == 20
    assert content["dataset"]["test_captions"] == 100
    noise = {summary["setting"]: summary for summary in content["noise"]}
    assert noise["swap:0.5"]["swapped_pairs"] == 50
    assert noise["pixels:0.5"]["noisy_images"] == 10
    run = next(iter(content["curves"].values()))
    assert len(run["epochs"]["dev_rsum"]) == 2
    adaptive = [curves for run_id, curves in content["curves"].items() if "/variance/" in run_id]
    weights = adaptive[0]["steps"]["weight_i2t"]
    assert all(0.0 < weight < 2.0 and math.isfinite(weight) for weight in weights)

    for name in ("summary.md", "compare.md", "compare-loss-curves.png", "compare-r5-after-noisy-training.png",
                 "compare-weight-trajectories.png", "compare-tsne.png", "run-info.json"):
        assert (output / name).is_file(), name
    assert "Δ rsum vs baseline" in (output / "summary.md").read_text()

    cache_files = sorted(path.name.split("-")[0] for path in (tmp_path / "cache").iterdir())
    assert cache_files == ["captions", "captions", "images", "images"]  # clean and noisy of each
