"""Smoke test of ``examples/clip_ddp/train.py`` launched with torchrun on two gloo processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch.distributed as dist

import ddp_helpers

REPOSITORY = Path(__file__).resolve().parents[2]
SCRIPT = REPOSITORY / "examples" / "clip_ddp" / "train.py"

# Seconds for torchrun to start two workers, train a few steps and exit, before the run is killed.
RUN_TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def run_torchrun(*script_args: str) -> str:
    """Run the example under torchrun on 127.0.0.1 and return its output, or fail the test on an error or timeout."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={ddp_helpers.find_free_port()}",
        str(SCRIPT),
        *script_args,
    ]
    environment = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")

    # A new session lets a timeout kill torchrun together with its workers. The output goes to a file, not
    # a pipe, so that a worker that escaped the kill cannot keep the test waiting for end-of-file.
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(
            command,
            cwd=REPOSITORY,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            log.seek(0)
            pytest.fail(f"torchrun timed out after {RUN_TIMEOUT_S} s and was killed. Output:\n{log.read()}")

        log.seek(0)
        output = log.read()

    assert process.returncode == 0, f"torchrun exited with {process.returncode}. Output:\n{output}"
    return output


def test_clip_ddp_example_local_loss_image_ids() -> None:
    output = run_torchrun("--loss", "variance", "--local-loss", "--image-ids", "--steps", "3", "--log-every", "1", "--num-images", "256")

    assert "world_size=2" in output
    comparison = re.search(r"ClipLoss=(\S+) SymmetricInfoNCE=(\S+)", output)
    assert comparison is not None, output
    assert abs(float(comparison.group(1)) - float(comparison.group(2))) < 1e-5, comparison.group(0)
    assert len(re.findall(r"^step +\d+ loss=\d", output, flags=re.MULTILINE)) == 3, output
    assert "weights=(" in output
    assert "done: 3 steps" in output
