"""Diagnostics: per-layer gradient/weight norms in metrics.jsonl, dpbp plot, dpbp gradcheck."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dpbp.cli import main

DEEP_SIGMOID = ["--set", "data.train=spirals:n=400", "--set", "model.layers=[2,16,16,16,16,16,3]",
                "--set", "model.activation=sigmoid", "--set", "train.optimizer=sgd", "--lr", "0.5", "--epochs", "3"]


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("deep")
    result = CliRunner().invoke(main, ["train", *DEEP_SIGMOID, "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    return run_dir


def test_metrics_hold_per_layer_norms_showing_vanishing_gradients(deep_run):
    records = [json.loads(line) for line in (deep_run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert len(r["grad_norm"]) == len(r["weight_norm"]) == 6
        assert all(g > 0 for g in r["grad_norm"])
        # In a deep sigmoid net the first layer's gradient is orders of magnitude below the last's.
        assert r["grad_norm"][0] < 1e-2 * r["grad_norm"][-1]


def test_plot_writes_a_png(deep_run, tmp_path):
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", str(deep_run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_errors_are_clear(tmp_path):
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0}\n')
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{Path.cwd()}"}
    proc = subprocess.run([sys.executable, "-m", "dpbp.cli", "plot", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert "pip install 'dpbp[plot]'" in proc.stderr and "Traceback" not in proc.stderr


def test_gradcheck_command_reports_every_layer():
    result = CliRunner().invoke(main, ["gradcheck", *DEEP_SIGMOID[:8], "--samples", "10"])
    assert result.exit_code == 0, result.output
    layer_lines = [line for line in result.output.splitlines() if line.strip().startswith("layer ")]
    assert len(layer_lines) == 6
    assert result.output.splitlines()[-1].startswith("ok: worst relative error")


@pytest.mark.parametrize("rows", [1, 2])
def test_gradcheck_refuses_batch_norm_over_fewer_than_three_rows(rows):
    # one row: no batch variance (it raised a traceback); two: normalised values are +-1 whatever the weights
    result = CliRunner().invoke(main, ["gradcheck", "--set", "model.batch_norm=true", "--rows", str(rows)])
    assert result.exit_code == 2, result.output
    assert f"batch norm needs at least 3 rows to check, got {rows}" in result.output
    assert "Traceback" not in result.output


def test_plot_never_writes_through_a_link_in_the_run_directory(deep_run, tmp_path):
    target = tmp_path / "precious.png"
    target.write_bytes(b"mine")
    link = deep_run / "training.png"
    link.symlink_to(target)
    try:
        result = CliRunner().invoke(main, ["plot", str(deep_run)])
        assert result.exit_code == 2 and "symbolic link" in result.output
        assert target.read_bytes() == b"mine"
    finally:
        link.unlink()


def test_gradcheck_of_a_bf16_mixed_config_says_what_it_checks():
    result = CliRunner().invoke(main, ["gradcheck", "--set", "model.precision=bf16-mixed", "--samples", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("note: gradcheck runs in float64 with NumPy's products")
