"""Gradient clipping by global norm and the reduce-on-plateau schedule, checked against PyTorch itself.

The references are torch 2.13's own ``torch.nn.utils.clip_grad_norm_`` with ``torch.optim`` (float64)
and ``torch.optim.lr_scheduler.ReduceLROnPlateau``, fed what dpbp computed: its mean gradients, its
learning rates, its validation losses. N ranks equal 1 rank with both on: tests/mpi/test_data_parallel.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import invoke, small_config

from dpbp import checkpoint as ckpt
from dpbp import exchange as exchange_mod
from dpbp.comm import SerialComm
from dpbp.config import load_config
from dpbp.errors import ConfigError, DpbpError
from dpbp.optim import LRSchedule
from dpbp.train import Trainer, prepare_data

TIMING = ("samples_per_s", "seconds")


def trainer(cfg, run_dir=None, **kwargs):
    return Trainer(cfg, SerialComm(), run_dir, echo=lambda text: None, **kwargs)


def comparable(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


# dpbp optimizer -> (its config keys, the torch.optim class and keywords it follows)
OPTIMIZERS = {
    "sgd": ((), "SGD", {}),
    "momentum": (("train.momentum=0.8", "train.nesterov=true"), "SGD", {"momentum": 0.8, "nesterov": True}),
    "rmsprop": (("train.rho=0.95", "train.eps=1e-6"), "RMSprop", {"alpha": 0.95, "eps": 1e-6}),
    "adam": (("train.beta1=0.8", "train.beta2=0.99", "train.eps=1e-7"), "AdamW", {"betas": (0.8, 0.99), "eps": 1e-7}),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_clipping_follows_torch_clip_grad_norm_and_optimizer(optimizer):
    """Each step's mean gradient goes through clip_grad_norm_ (per-layer W and b tensors) and the torch
    optimizer with the same weight decay and learning rate; the parameters stay equal to rounding."""
    keys, cls, theirs = OPTIMIZERS[optimizer]
    max_norm = 0.3
    cfg = small_config(f"train.optimizer={optimizer}", *keys, "train.weight_decay=0.1", "train.lr=0.1",
                       f"train.clip_grad_norm={max_norm}", "train.epochs=1", "train.schedule=cosine",
                       "train.warmup_epochs=0.5")
    t = trainer(cfg)
    slices = [s for pair in t.model.layer_slices() for s in pair]  # W and b of each layer, as torch holds them
    shapes = [w.shape for pair in zip(t.model.weights, t.model.biases) for w in pair]
    tensors = [torch.tensor(t.model.params[s].reshape(shape), dtype=torch.float64, requires_grad=True)
               for s, shape in zip(slices, shapes)]
    wd = cfg.train.weight_decay
    topt = getattr(torch.optim, cls)(tensors, lr=cfg.train.lr, weight_decay=wd, **theirs)
    combine, seen = t.exchange.combine, []

    def spy(stats, vote):  # the mean gradient of every step, before dpbp clips it
        sums = combine(stats, vote)
        seen.append(t.exchange.grad / sums.count)
        return sums

    t.exchange.combine = spy
    order = np.arange(t.data.train.n_samples)
    clipped = []
    for step in range(t.steps_per_epoch):
        t.step(order, step)
        t.state.global_step += 1
        for x, s, shape in zip(tensors, slices, shapes):
            x.grad = torch.tensor(seen[-1][s].reshape(shape))
        norm = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm))
        clipped.append(norm > max_norm)
        for group in topt.param_groups:
            group["lr"] = t.schedule(step)
        topt.step()
        ref = np.concatenate([x.detach().numpy().reshape(-1) for x in tensors])
        np.testing.assert_allclose(t.model.params, ref, rtol=1e-11, atol=1e-13, err_msg=f"step {step}")
    assert any(clipped) and t.state.epoch_clipped_steps == sum(clipped)


def test_clip_records_the_clipped_steps_per_epoch_and_leaves_small_gradients_alone():
    base = ("train.optimizer=sgd", "train.lr=0.1", "train.epochs=2")
    plain = trainer(small_config(*base)).run()
    loose = trainer(small_config(*base, "train.clip_grad_norm=1e6")).run()
    tight = trainer(small_config(*base, "train.clip_grad_norm=1e-3")).run()
    np.testing.assert_array_equal(loose.model.params, plain.model.params)  # factor 1: the very same update
    assert all(r["clipped_steps"] == 0 and r["clip_factor_min"] == 1.0 for r in loose.history)
    assert "clipped_steps" not in plain.history[0]
    steps = tight.state.global_step // 2
    assert [r["clipped_steps"] for r in tight.history] == [steps, steps]
    assert all(0 < r["clip_factor_min"] < 1e-2 for r in tight.history)
    # The clipped SGD step is lr * max_norm * norm / (norm + 1e-6) along the mean gradient.
    moved = trainer(small_config(*base, "train.clip_grad_norm=1e-3", "train.epochs=1"))
    before = moved.model.params.copy()
    combine, norms = moved.exchange.combine, []

    def spy(stats, vote):
        sums = combine(stats, vote)
        norms.append(np.linalg.norm(moved.exchange.grad) / sums.count)
        return sums

    moved.exchange.combine = spy
    moved.step(np.arange(moved.data.train.n_samples), 0)
    expected = 0.1 * 1e-3 * norms[0] / (norms[0] + 1e-6)
    assert np.linalg.norm(moved.model.params - before) == pytest.approx(expected, rel=1e-12)


def test_clip_norm_of_overflowed_squares_is_computed_exactly(monkeypatch):
    """Squared norms beyond the model dtype (finite gradient): the norm is taken again in float64, not Inf."""
    cfg = small_config("train.clip_grad_norm=0.01", "train.epochs=1")
    ref, t = trainer(cfg), trainer(cfg)
    combine = t.exchange.combine

    def overflowed(stats, vote):
        sums = combine(stats, vote)
        sums.squares = [math.inf] * len(sums.squares)
        return sums

    t.exchange.combine = overflowed
    order = np.arange(t.data.train.n_samples)
    for step in range(3):
        ref.step(order, step)
        t.step(order, step)
    np.testing.assert_allclose(t.model.params, ref.model.params, rtol=1e-12)
    assert t.state.epoch_clipped_steps == ref.state.epoch_clipped_steps == 3


def test_wide_norm_does_not_overflow():
    x = np.full(300_000, 1e30, np.float32)  # squares overflow float32, chunks more than one
    assert exchange_mod.wide_norm(x) == pytest.approx(float(x[0]) * math.sqrt(300_000), rel=1e-12)
    assert exchange_mod.wide_norm(np.array([3e300, 4e300])) == pytest.approx(5e300, rel=1e-15)
    assert math.isnan(exchange_mod.wide_norm(np.array([1.0, np.nan]))) and exchange_mod.wide_norm(np.zeros(3)) == 0


# (factor, patience, cooldown, threshold, min_lr) of ReduceLROnPlateau
PLATEAUS = [(0.1, 0, 0, 0.0, 0.0), (0.5, 1, 2, 0.01, 0.0), (0.3, 2, 1, 0.05, 0.01), (0.5, 0, 0, 0.0, 0.0124)]
LOSSES = [1.0, 0.9, 0.95, 0.9, 0.89, 0.895, 0.7, math.nan, 0.71, 0.7, 0.69, 0.699, 0.698, 0.5, 0.6, 0.6, 0.6,
          0.6, 0.4, 0.41, 0.42, 0.43, 0.44, 0.45, 0.3]


@pytest.mark.parametrize("factor,patience,cooldown,threshold,min_lr", PLATEAUS)
def test_plateau_lr_sequence_equals_torch_reduce_lr_on_plateau(factor, patience, cooldown, threshold, min_lr):
    lr = 0.1
    ours = LRSchedule(lr, "plateau", gamma=factor, patience=patience, cooldown=cooldown, threshold=threshold,
                      min_lr=min_lr, warmup_steps=3)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=factor, patience=patience, cooldown=cooldown,
                                                        threshold=threshold, threshold_mode="abs", min_lr=min_lr)
    rates = []
    for loss in LOSSES:
        ours.observe(loss)
        theirs.step(loss)
        assert ours(10**6) == opt.param_groups[0]["lr"]  # the same float, not merely close
        p = ours.plateau
        assert (p.best, p.num_bad_epochs, p.cooldown_counter) == (theirs.best, theirs.num_bad_epochs,
                                                                theirs.cooldown_counter)
        rates.append(ours(10**6))
    assert len(set(rates)) >= 3  # it did reduce, more than once
    assert ours(0) == rates[-1] * (1 / 3)  # warm-up ramps to the current rate


def test_plateau_in_a_run_follows_torch_fed_the_same_validation_losses():
    cfg = small_config("train.schedule=plateau", "train.plateau_patience=1", "train.plateau_cooldown=1",
                       "train.gamma=0.5", "train.min_delta=0.1", "train.epochs=8", "train.lr=0.05")
    lines = []
    history = Trainer(cfg, SerialComm(), echo=lines.append).run().history
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1, cooldown=1, threshold=0.1,
                                                       threshold_mode="abs")
    expected = []
    for record in history:
        expected.append(opt.param_groups[0]["lr"])
        sched.step(record["val_loss"])
    assert [r["lr"] for r in history] == expected
    assert len(set(expected)) >= 2, expected  # at least one reduction happened in the run
    assert sum("plateau: validation loss" in line for line in lines) == len(set(expected)) - 1


def test_resume_mid_epoch_with_plateau_is_bit_identical(tmp_path):
    """Reductions before and after the checkpoint: the state (best, bad epochs, cooldown, reductions) is saved."""
    cfg = small_config("train.epochs=5", "checkpoint.every_steps=5", "checkpoint.keep=100", "train.schedule=plateau",
                       "train.plateau_patience=0", "train.plateau_cooldown=1", "train.min_delta=1.0",
                       "train.clip_grad_norm=0.5")
    full = trainer(cfg, tmp_path).run()
    assert [r["lr"] for r in full.history] == [0.05, 0.05, 0.05 * 0.1, 0.05 * 0.1, 0.05 * 0.1 * 0.1]
    mid = [p for p in ckpt.periodic_checkpoints(tmp_path / "checkpoints") if int(p.stem[5:]) % 16]
    assert len(mid) > 6
    best = full.history[0]["val_loss"]  # min_delta 1.0: only the first epoch improved
    saved = {int(p.stem[5:]) // 16: ckpt.load_checkpoint(p)[1]["schedule"]["plateau"] for p in mid}
    assert saved[3] == {"best": best, "num_bad_epochs": 0, "cooldown_counter": 0, "reductions": 1}  # epoch 4
    assert saved[4] == {"best": best, "num_bad_epochs": 0, "cooldown_counter": 1, "reductions": 2}  # epoch 5
    for path in mid:
        resumed = trainer(cfg)
        resumed.restore(path)
        out = resumed.run()
        np.testing.assert_array_equal(out.model.params, full.model.params)
        assert comparable(out.history) == comparable(full.history)


def test_plateau_needs_validation_data(tmp_path):
    with pytest.raises(ConfigError, match="train.schedule: 'plateau' is driven by the validation loss"):
        load_config(None, ["train.schedule=plateau", "data.val_fraction=0"])
    no_val = prepare_data(small_config("data.val_fraction=0"))  # data handed in, as the estimators do
    with pytest.raises(ConfigError, match="train.schedule: 'plateau' .* this run has no validation data"):
        trainer(small_config("train.schedule=plateau"), data=no_val)
    out = invoke("train", "--set", "train.schedule=plateau", "--set", "data.val_fraction=0",
                 "--run-dir", tmp_path / "run")
    assert out.exit_code == 2 and out.output.count("train.schedule") == 1, out.output
    assert "Traceback" not in out.output


@pytest.mark.parametrize("overrides,key,match", [
    (["train.schedule=plateau", "train.gamma=1.0"], "train.gamma", "would never reduce"),
    (["train.schedule=plateau", "train.early_stopping_patience=3", "train.plateau_patience=2"],
     "train.plateau_patience", r"early stopping .* ends the run before"),
    (["train.plateau_cooldown=2"], "train.plateau_cooldown", "applies only when train.schedule = plateau"),
    (["train.clip_grad_norm=-1"], "train.clip_grad_norm", ">= 0"),
])
def test_plateau_and_clip_settings_that_would_do_nothing_are_refused(overrides, key, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, overrides)
    assert info.value.key == key
    ok = load_config(None, ["train.schedule=plateau", "train.early_stopping_patience=4", "train.plateau_patience=2"])
    assert ok.train.plateau_patience == 2


@pytest.mark.parametrize("bad", [{"reductions": -1}, {"num_bad_epochs": 1.5}, {"best": "low"}])
def test_a_malformed_plateau_state_is_refused_by_name(tmp_path, bad):
    cfg = small_config("train.schedule=plateau", "train.epochs=1")
    trainer(cfg, tmp_path / "run").run()
    path = ckpt.periodic_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    arrays, meta = ckpt.load_checkpoint(path)
    meta["schedule"]["plateau"].update(bad)
    ckpt.atomic_write_npz(tmp_path / "bad.npz", arrays, meta)
    with pytest.raises(DpbpError, match="bad.npz: malformed checkpoint metadata"):
        trainer(cfg).restore(tmp_path / "bad.npz")
