"""A reader that goes away (``dpbp train | head -1``, ``| true``) does not end training.

Every run prints more than a pipe holds (64 KiB: one progress line per step), so the
trainer is certain to write after the reader closed its end, whatever the timing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mpirun

import dpbp

REPO = Path(dpbp.__file__).resolve().parent.parent
# 270 training rows, batch 1, 4 epochs: 1080 progress lines (~80 KiB) plus the summaries.
LOUD = ["train", "--set", "data.train=spirals:n=300", "--set", "model.layers=[2,4,3]", "--batch-size", "1",
        "--epochs", "4", "--set", "train.log_every=1", "--set", "checkpoint.every_epochs=1"]
PIPE_NOISE = ("BrokenPipe", "Broken pipe", "Exception ignored", "Traceback")


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "DPBP_COMM"}
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [out.get("PYTHONPATH")])])
    return out


def assert_run_complete(run_dir: Path) -> None:
    assert (run_dir / "model.npz").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.npz"))  # kept writing checkpoints
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


@pytest.mark.parametrize("lines_read", [1, 0], ids=["head-1", "true"])
def test_training_outlives_a_closed_stdout(tmp_path, lines_read):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dpbp.cli", *LOUD, "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    first = [proc.stdout.readline() for _ in range(lines_read)]
    proc.stdout.close()  # the reader goes away, like head after its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert all(line.startswith(b"dpbp ") for line in first)
    assert not any(noise in err for noise in PIPE_NOISE), err
    assert_run_complete(run_dir)


def test_training_under_mpirun_outlives_rank0s_closed_stdout(tmp_path):
    """Rank 0's own stdout closes (``... | head -1`` on rank 0); both ranks finish, exit 0, files complete.

    (``mpirun -n 2 dpbp train | head -1`` closes mpiexec's stdout instead: MPICH's mpiexec
    then ends the job itself, which no rank can prevent.)
    """
    run_dir = tmp_path / "run"
    train = " ".join([sys.executable, "-m", "dpbp.cli", *(f"'{a}'" for a in LOUD), "--run-dir", str(run_dir)])
    script = f'set -o pipefail; if [ "$PMI_RANK" = 0 ]; then {train} | head -1; else {train}; fi'
    proc = subprocess.run([*mpirun(2), shutil.which("bash"), "-c", script], capture_output=True, text=True,
                          timeout=180, env=env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpbp "), proc.stdout  # head's one line, nothing else
    assert not any(noise in proc.stderr for noise in PIPE_NOISE), proc.stderr
    assert_run_complete(run_dir)


def test_after_stdout_is_gone_any_later_write_is_dropped():
    """Once dpbp saw EPIPE, even a plain print() (and the exit-time flush) goes nowhere, silently."""
    code = ("import sys\n"
            "from dpbp.progress import echo\n"
            "sys.stdin.read()\n"  # wait until the parent has closed the pipe's reading end
            "echo('first')\n"
            "print('a plain print after the reader left')\n"
            "sys.stdout.write('left in the buffer at exit')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env())
    proc.stdout.close()
    proc.stdin.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""
