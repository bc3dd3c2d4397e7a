"""Real multi-process runs under mpirun (subprocesses): the distributed tests and the CLI end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import max_rel_diff, mpirun

from dpbp.checkpoint import load_model

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(cmd, timeout=240, cwd=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_distributed_suite_under_mpirun(ranks):
    proc = run([*mpirun(ranks), sys.executable, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider",
                str(TESTS / "mpi")])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count(" passed") == ranks and "failed" not in proc.stdout


TRAIN_ARGS = ["--set", "data.train=spirals:n=403", "--set", "model.dtype=float64", "--set", "model.layers=[2,16,3]",
              "--batch-size", "23", "--epochs", "3", "--lr", "0.02"]


def test_cli_train_under_mpirun_equals_one_process(tmp_path):
    serial = run([sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS, "--run-dir", str(tmp_path / "one")])
    assert serial.returncode == 0, serial.stderr
    dist = run([*mpirun(3), sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS,
                "--run-dir", str(tmp_path / "three")])
    assert dist.returncode == 0, dist.stdout + dist.stderr
    assert dist.stdout.count("done:") == 1, "rank 0 alone prints the result"
    assert "3 ranks" in dist.stdout
    a = load_model(tmp_path / "one" / "model.npz")
    b = load_model(tmp_path / "three" / "model.npz")
    assert max_rel_diff(b.params, a.params) < 1e-10
    for name in ("config.toml", "metrics.jsonl", "model.npz"):
        assert (tmp_path / "three" / name).is_file()
    ev = run([*mpirun(2), sys.executable, "-m", "dpbp.cli", "evaluate",
              "--model", str(tmp_path / "three" / "model.npz"), "--data", "spirals:n=403", "--json"])
    assert ev.returncode == 0 and ev.stdout.count('"n": 403') == 1, ev.stdout + ev.stderr


def test_bad_config_under_mpirun_is_one_message_and_exit_2(tmp_path):
    proc = run([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", "--set", "train.lr=-1",
                "--run-dir", str(tmp_path)])
    assert proc.returncode == 2
    assert proc.stderr.count("train.lr") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_failure_on_one_rank_ends_the_job_quickly(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "from helpers import small_config\n"
        "from dpbp.cli import collective\n"
        "from dpbp.train import Trainer\n"
        "@collective\n"
        "def body(comm):\n"
        "    def boom(trainer):\n"
        "        if comm.rank == 1 and trainer.state.global_step == 5:\n"
        "            raise MemoryError('injected on rank 1')\n"
        "        return False\n"
        "    cfg = small_config('train.epochs=1000')\n"
        "    Trainer(cfg, comm, None, echo=lambda s: None).run(on_step_end=boom)\n"
        "body()\n"
    )
    env_path = f"{TESTS}{os.pathsep}{ENV.get('PYTHONPATH', '')}"
    proc = subprocess.run([*mpirun(3), sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**ENV, "PYTHONPATH": env_path})
    assert proc.returncode != 0
    assert "error on rank 1: MemoryError: injected on rank 1" in proc.stderr


def test_predict_under_mpirun_writes_every_row_once(tmp_path):
    train = run([sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS, "--run-dir", str(tmp_path)])
    assert train.returncode == 0, train.stderr
    x = np.random.default_rng(0).normal(size=(11, 2))
    np.save(tmp_path / "x.npy", x)
    proc = run([*mpirun(3), sys.executable, "-m", "dpbp.cli", "predict", "--model", str(tmp_path / "model.npz"),
                "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "out.npy")])
    assert proc.returncode == 0, proc.stderr
    out = np.load(tmp_path / "out.npy")
    expected = load_model(tmp_path / "model.npz").predict(x)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
