"""Option validation of the Flickr8k command line: bad values exit with status 2 before any data loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from examples.flickr8k import run

# Option values that must be rejected, with text the error message must contain.
INVALID_OPTIONS = [
    (["--epochs", "0"], "--epochs 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "1"], "InfoNCE on a single pair"),
    (["--threads", "-1"], "--threads -1"),
    (["--train-threads", "-1"], "--train-threads -1"),
    (["--seeds", "-1"], "--seeds -1"),
    (["--seeds", "0"], "--seeds 0"),
    (["--eval-images", "-3"], "--eval-images -3"),
    (["--eval-images", "5000"], "1,000"),
    (["--train-images", "7000"], "--train-images 7000"),
    (["--train-images", "1"], "--train-images 1"),
    (["--train-images", "-5"], "--train-images -5"),
    (["--sample-sizes", "0,-2"], "--sample-sizes '0'"),
    (["--sample-sizes", "500,-2"], "--sample-sizes '-2'"),
    (["--sample-sizes", "500,7000"], "--sample-sizes '7000'"),
    (["--sample-sizes", "500,abc"], "--sample-sizes 'abc'"),
    (["--sample-sizes", ","], "--sample-sizes ','"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--lr", "0"], "--lr 0.0"),
    (["--finetune-lr", "-1"], "--finetune-lr -1.0"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1"),
    (["--dropout", "1.5"], "--dropout 1.5"),
    (["--dropout", "-0.1"], "--dropout -0.1"),
    (["--embed-dim", "0"], "--embed-dim 0"),
    (["--hidden-dim", "0"], "--hidden-dim 0"),
    (["--pixel-sigma", "-1"], "--pixel-sigma -1.0"),
    (["--decay", "1"], "--decay 1.0"),
    (["--decay", "-0.5"], "--decay -0.5"),
    (["--warmup", "2"], "--warmup 2.0"),
    (["--warmup", "1"], "--warmup 1.0"),
    (["--mirror-url", "ftp://example.org/flickr8k"], "--mirror-url 'ftp://example.org/flickr8k'"),
    (["--mirror-url", "example.org"], "--mirror-url 'example.org'"),
    (["--download-timeout", "0"], "--download-timeout 0.0"),
    (["--download-timeout", "-5"], "--download-timeout -5.0"),
    (["--noise", "clean,blur:0.2"], "--noise 'blur:0.2'"),
    (["--noise", "swap:1.5"], "--noise 'swap:1.5'"),
    (["--noise", "words:x"], "--noise 'words:x'"),
    (["--noise", "clean:0.1"], "--noise 'clean:0.1'"),
    (["--noise", ","], "--noise ','"),
    (["--losses", "variance"], "must include 'symmetric'"),
    (["--losses", "symmetric,bogus"], "Unknown loss 'bogus'"),
    (["--sha256", "Flickr8k_text.zip=abc"], "Invalid checksum"),
    (["--sha256", f"other.zip={'a' * 64}"], "--sha256 'other.zip'"),
    (["--data-seed", "-1"], "--data-seed -1"),
    (["--finetune-blocks", "-1"], "--finetune-blocks -1"),
    (["--finetune-blocks", "17"], "--finetune-blocks 17"),
    (["--device", "nonsense"], "--device 'nonsense'"),
    (["--image-encoder", "resnet"], "--image-encoder 'resnet'"),
    (["--image-encoder", "timm:"], "--image-encoder 'timm:'"),
    (["--text-encoder", "bert"], "--text-encoder 'bert'"),
    (["--image-batch-size", "0"], "--image-batch-size 0"),
    (["--text-batch-size", "0"], "--text-batch-size 0"),
]


def fail_on_data_access(*args, **kwargs):
    raise AssertionError("option validation must run before any data loading")


@pytest.fixture
def no_data_access(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every data, download and replot entry point of run.main fail if it is reached."""
    for name in ("resolve_data_dir", "load_flickr8k", "download_flickr8k"):
        monkeypatch.setattr(run, name, fail_on_data_access)
    monkeypatch.setattr(run.report, "replot", fail_on_data_access)


@pytest.mark.parametrize(("arguments", "expected"), INVALID_OPTIONS,
                         ids=[" ".join(arguments) for arguments, _ in INVALID_OPTIONS])
def test_main_rejects_invalid_option(arguments: list[str], expected: str, no_data_access, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        run.main(["--data-dir", "/nonexistent-flickr8k", *arguments])

    assert caught.value.code == 2
    message = capsys.readouterr().err
    assert f"invalid {arguments[0]}" in message
    assert expected in message


def test_replot_missing_folder(no_data_access, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        run.main(["--replot", "/nonexistent-run-folder"])

    assert caught.value.code == 2
    message = capsys.readouterr().err
    assert "'/nonexistent-run-folder'" in message
    assert "folder not found" in message


def test_replot_folder_without_json(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        run.main(["--replot", str(tmp_path)])

    assert caught.value.code == 2
    assert "contains no study JSON files" in capsys.readouterr().err


def test_default_options_pass_validation() -> None:
    parser = run.build_parser()
    args = parser.parse_args(["--device", "cpu"])

    run.check_args(parser, args)


@pytest.mark.parametrize("arguments", [
    ["--train-images", "0"], ["--train-images", "6000"], ["--eval-images", "1000"], ["--batch-size", "2"],
    ["--threads", "0"], ["--warmup", "0"], ["--decay", "0"], ["--dropout", "0"], ["--noise", run.STRESS_NOISE],
    ["--mirror-url", "http://127.0.0.1:8000/mirror"], ["--sample-sizes", "2,6000"],
])
def test_boundary_values_pass_validation(arguments: list[str]) -> None:
    parser = run.build_parser()
    args = parser.parse_args(["--device", "cpu", *arguments])

    run.check_args(parser, args)


def test_split_sizes_checked_against_loaded_dataset(capsys) -> None:
    parser = run.build_parser()
    args = parser.parse_args(["--train-images", "20", "--device", "cpu"])
    splits = {"train": np.arange(10), "dev": np.arange(5), "test": np.arange(5)}

    with pytest.raises(SystemExit) as caught:
        run.check_split_sizes(parser, args, splits)

    assert caught.value.code == 2
    assert "invalid --train-images 20" in capsys.readouterr().err
