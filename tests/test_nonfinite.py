"""NaN/Inf during training: skip mode's bound, and no checkpoint or model.npz with non-finite parameters.

Single process; tests/mpi/test_nonfinite_ranks.py checks that every rank agrees, on each exchange.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import invoke, small_config

from dpbp import checkpoint as ckpt
from dpbp import rundir
from dpbp.comm import SerialComm
from dpbp.errors import ConfigError
from dpbp.train import Trainer, TrainingError

STEPS_PER_EPOCH = 16  # small_config: 271 training rows, batch 17


def trainer(cfg, run_dir=None):
    return Trainer(cfg, SerialComm(), run_dir, echo=lambda text: None)


def poison_one_row(t: Trainer) -> None:
    """One Inf input row: exactly one batch per epoch has a non-finite loss (the one holding it)."""
    t.data.train.x[5] = np.inf


def blow_up_from(t: Trainer, step: int) -> None:
    """A learning rate beyond float32 from 0-based step ``step`` on: that update makes parameters Inf/NaN."""
    base = t.schedule
    t.schedule = lambda s: 1e39 if s >= step else base(s)


def newest_checkpoint(run_dir):
    path, invalid = rundir.find_latest(run_dir, ckpt.load_checkpoint)
    assert path is not None and invalid == []
    arrays, meta = ckpt.load_checkpoint(path)
    return arrays, meta


# ----------------------------------------------------------------------------- the skip bound


def test_skipped_steps_beyond_the_bound_end_the_run(tmp_path):
    cfg = small_config("train.on_nonfinite=skip", "train.max_skipped_steps=3", "train.epochs=6")
    t = trainer(cfg, tmp_path)
    poison_one_row(t)
    with pytest.raises(TrainingError, match=r"4 of (\d+) steps skipped, more than train.max_skipped_steps = 3") as info:
        t.run()
    assert info.value.exit_code == 3
    assert t.state.epoch == 3  # one skipped step per epoch: the fourth epoch ends it
    step = int(re.search(r"4 of (\d+) steps", str(info.value)).group(1))
    assert step == t.state.global_step + 1 and str(info.value).startswith(f"step {step} (epoch 4): loss is ")
    assert not (tmp_path / "model.npz").exists()
    arrays, meta = newest_checkpoint(tmp_path)
    assert meta["state"]["global_step"] == 3 * STEPS_PER_EPOCH and meta["state"]["skipped_steps"] == 3
    assert np.all(np.isfinite(arrays["params"]))


def test_skipped_steps_are_counted_across_resume(tmp_path):
    first = trainer(small_config("train.on_nonfinite=skip", "train.max_skipped_steps=3"), tmp_path)
    poison_one_row(first)
    result = first.run()
    assert result.state.skipped_steps == 2
    _, meta = newest_checkpoint(tmp_path)
    assert meta["state"]["skipped_steps"] == 2
    resumed = trainer(small_config("train.on_nonfinite=skip", "train.max_skipped_steps=3", "train.epochs=5"))
    poison_one_row(resumed)
    resumed.restore(rundir.find_latest(tmp_path, ckpt.load_checkpoint)[0])
    with pytest.raises(TrainingError, match="4 of .* steps skipped"):  # 2 before the resume + 2 after it
        resumed.run()
    assert resumed.state.epoch == 3


def test_max_skipped_steps_must_allow_one():
    with pytest.raises(ConfigError, match=">= 1"):
        small_config("train.max_skipped_steps=0")


# ----------------------------------------------------------------------------- non-finite parameters


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_an_update_that_makes_the_parameters_nonfinite_ends_the_run(tmp_path, mode):
    """The next loss is NaN; the parameters are checked first, so even skip mode stops, naming the update."""
    cfg = small_config(f"train.on_nonfinite={mode}", "train.epochs=3", dtype="float32")
    t = trainer(cfg, tmp_path)
    blow_up_from(t, 20)  # the update of (1-based) step 21
    with pytest.raises(TrainingError) as info:
        t.run()
    assert info.value.exit_code == 3
    assert re.match(r"the update of step 21 left the parameters of layer \d non-finite \(found at step 22\)",
                    str(info.value)), str(info.value)
    assert t.state.skipped_steps == 0
    assert not (tmp_path / "model.npz").exists()
    arrays, meta = newest_checkpoint(tmp_path)  # the end of epoch 1: finite, and still there
    assert meta["state"]["global_step"] == STEPS_PER_EPOCH and np.all(np.isfinite(arrays["params"]))


def hide_an_inf_weight(at_step: int):
    """on_step_end hook: an Inf first-layer weight that tanh hides from the loss (and the gradient)."""

    def hook(t: Trainer) -> bool:
        if t.state.global_step == at_step:
            t.model.weights[0][0, 0] = np.inf
        return False

    return hook


def test_a_hidden_nonfinite_parameter_is_never_checkpointed(tmp_path):
    cfg = small_config("model.activation=tanh", "checkpoint.every_steps=2", "checkpoint.keep=100")
    t = trainer(cfg, tmp_path)
    with pytest.raises(TrainingError, match=r"the update of step 4 left the parameters of layer 1 non-finite "
                                            r"\(before writing a checkpoint\)") as info:
        t.run(on_step_end=hide_an_inf_weight(3))
    assert info.value.exit_code == 3
    assert t.state.global_step == 4  # the loss never showed it: only the save found it
    arrays, meta = newest_checkpoint(tmp_path)
    assert meta["state"]["global_step"] == 2 and np.all(np.isfinite(arrays["params"]))


def test_nonfinite_parameters_after_the_last_step_write_no_model(tmp_path):
    cfg = small_config("model.activation=tanh", "checkpoint.every_epochs=0", "checkpoint.keep_best=false")
    t = trainer(cfg, tmp_path)
    with pytest.raises(TrainingError, match=r"the update of step 32 left the parameters of layer 1 non-finite "
                                            r"\(before writing a checkpoint\)"):  # the final one, then model.npz
        t.run(on_step_end=hide_an_inf_weight(2 * STEPS_PER_EPOCH))
    assert not (tmp_path / "model.npz").exists()
    assert not (tmp_path / "checkpoints").exists()


def test_model_npz_is_never_written_with_nonfinite_parameters(tmp_path):
    t = trainer(small_config("train.epochs=1"), tmp_path)
    t.claim_run_dir()
    t.model.params[3] = np.inf
    with pytest.raises(TrainingError, match=r"non-finite \(before writing model.npz\)"):
        t._finish("epochs", 0.0)
    t.release_run_dir()
    assert not (tmp_path / "model.npz").exists()


# ----------------------------------------------------------------------------- through the CLI



SMALL = ["--set", "data.train=spirals:n=300", "--set", "model.layers=[2,8,3]", "--batch-size", "30"]


def test_cli_exits_3_and_keeps_the_last_good_checkpoint(tmp_path):
    first = invoke("train", *SMALL, "--epochs", "1", "--run-dir", tmp_path)
    assert first.exit_code == 0, first.output
    (tmp_path / "model.npz").unlink()  # as after a preempted run
    again = invoke("train", *SMALL, "--epochs", "2", "--run-dir", tmp_path, "--resume", "auto", "--lr", "1e39")
    assert again.exit_code == 3, again.output
    assert again.output.count("error: ") == 1 and "Traceback" not in again.output
    assert re.search(r"error: the update of step 10 left the parameters of layer \d non-finite", again.output)
    assert not (tmp_path / "model.npz").exists()
    arrays, meta = newest_checkpoint(tmp_path)
    assert meta["state"]["global_step"] == 9 and np.all(np.isfinite(arrays["params"]))  # 270 rows / 30


def test_cli_done_line_reports_skipped_steps(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(90, 2)), rng.normal(size=90)
    y[7] = 1e30  # its squared error overflows float32: the one batch holding it is skipped each epoch
    data = tmp_path / "reg.csv"
    np.savetxt(data, np.c_[x, y], delimiter=",", header="a,b,y", comments="")
    out = invoke("train", "--set", f"data.train={data}", "--set", "data.val_fraction=0", "--set", "model.loss=mse",
                 "--set", "model.output=identity", "--set", "model.layers=[2,8,1]", "--set", "train.on_nonfinite=skip",
                 "--set", "data.normalize_targets=none",  # scaled targets would not overflow
                 "--batch-size", "30", "--epochs", "3", "--run-dir", tmp_path / "run")
    assert out.exit_code == 0, out.output
    assert out.output.count("skipping this update on all ranks") == 3
    done = next(line for line in out.output.splitlines() if line.startswith("done:"))
    assert "3 of 9 steps skipped" in done


def test_skipped_batches_are_left_out_of_the_epoch_loss(tmp_path):
    cfg = small_config("train.on_nonfinite=skip", "train.epochs=2")
    t = trainer(cfg, tmp_path)
    poison_one_row(t)
    result = t.run()
    assert result.state.skipped_steps == 2
    for record in result.history:
        assert np.isfinite(record["train_loss"]) and 0.0 <= record["train_accuracy"] <= 1.0
