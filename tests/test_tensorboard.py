"""run.tensorboard: the per-epoch metrics and per-layer gradient norms as TensorBoard event files, read back with
TensorBoard's own reader; rank 0 alone writes them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import invoke, mpirun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dpbp.tensorboard import scalars

ARGS = ["--set", "data.train=spirals:n=300", "--set", "model.hidden=[8,8]", "--epochs", "4", "--batch-size", "32",
        "--set", "run.tensorboard=true"]


def read_events(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_every_epoch_and_every_layer_is_read_back(tmp_path, task):
    extra = [] if task == "classification" else ["--set", "data.train=xor:repeat=50", "--set", "model.loss=mse",
                                                  "--set", "model.output=identity", "--set", "model.hidden=[8,8]"]
    result = invoke("train", *ARGS, *extra, "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert f"TensorBoard events in {tmp_path / 'run' / 'tensorboard'}" in result.output
    events = read_events(tmp_path / "run" / "tensorboard")
    metrics = records(tmp_path / "run")
    kind = "accuracy" if task == "classification" else "rmse"
    expected = {"loss/train", "loss/validation", f"{kind}/train", f"{kind}/validation", "lr", "samples_per_s",
                "seconds", *(f"{name}/layer_{i}" for name in ("grad_norm", "weight_norm") for i in (1, 2, 3))}
    assert expected <= set(events)
    if task == "regression":
        assert {"mse/train", "mse/validation", "mae/validation", "r2/validation"} <= set(events)
    for tag, key in (("loss/train", "train_loss"), ("loss/validation", "val_loss"), (f"{kind}/validation",
                                                                                      f"val_{kind}")):
        assert [s for s, _ in events[tag]] == [1, 2, 3, 4]  # step = epoch
        np.testing.assert_allclose([v for _, v in events[tag]], [r[key] for r in metrics], rtol=1e-6)  # float32
    for layer in range(3):
        np.testing.assert_allclose([v for _, v in events[f"grad_norm/layer_{layer + 1}"]],
                                   [r["grad_norm"][layer] for r in metrics], rtol=1e-6)


def test_scalars_names_and_skips():
    record = {"epoch": 2, "step": 10, "train_loss": 0.5, "val_loss": None, "val_r2": 0.9, "lr": 0.01,
              "grad_norm": [1.0, 2.0], "weight_norm": None}
    assert scalars(record) == {"loss/train": 0.5, "r2/validation": 0.9, "lr": 0.01, "grad_norm/layer_1": 1.0,
                               "grad_norm/layer_2": 2.0}


def test_under_mpirun_rank_0_alone_writes(tmp_path):
    proc = subprocess.run([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", *ARGS, "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("TensorBoard events in") == 1
    files = list((tmp_path / "run" / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents."), files
    assert [s for s, _ in read_events(tmp_path / "run" / "tensorboard")["loss/train"]] == [1, 2, 3, 4]


def test_without_tensorboardx_the_run_is_refused_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    result = invoke("train", *ARGS, "--run-dir", tmp_path / "run")
    assert result.exit_code == 1
    assert result.output.count("error:") == 1 and "pip install 'dpbp[tensorboard]'" in result.output
    assert not (tmp_path / "run").exists()


def test_the_estimators_write_events_into_their_run_directory(tmp_path):
    from sklearn.datasets import load_iris

    from dpbp import MLPClassifier

    X, y = load_iris(return_X_y=True)
    est = MLPClassifier((8,), max_iter=3, run_dir=tmp_path, config={"run.tensorboard": True}).fit(X, y)
    events = read_events(est.run_dir_ / "tensorboard")
    np.testing.assert_allclose([v for _, v in events["loss/train"]], est.loss_curve_, rtol=1e-6)


def test_a_resumed_or_branched_run_shows_every_epoch_once(tmp_path):
    """Events of epochs written after the checkpoint a run resumes from (a run killed before its next
    checkpoint, or the abandoned future of a branch) are purged: each epoch reads back once, with the
    value of the current lineage, and two starts within one second keep both files."""
    run = tmp_path / "run"
    assert invoke("train", *ARGS, "--epochs", "4", "--run-dir", run).exit_code == 0
    branch = invoke("train", *ARGS, "--epochs", "5", "--run-dir", run, "--lr", "0.001",
                    "--resume", run / "checkpoints" / "step-000000018.npz")  # end of epoch 2 (9 steps an epoch)
    assert branch.exit_code == 0 and "branching from step 18" in branch.output, branch.output
    events = read_events(run / "tensorboard")["loss/train"]
    assert [s for s, _ in events] == [1, 2, 3, 4, 5], events
    np.testing.assert_allclose([v for _, v in events], [r["train_loss"] for r in records(run)], rtol=1e-6)
    assert len(list((run / "tensorboard").iterdir())) == 2
