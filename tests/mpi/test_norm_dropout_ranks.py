"""Under mpirun: with dropout and batch normalization on, N ranks train the same model as 1 rank.

Dropout masks follow each row's place in the global batch, and batch statistics are summed over
every rank (zero-row ranks included), so the 1-rank run over the same config is the reference,
on every exchange (helpers.EXCHANGES). Launched by tests/test_mpi_runs.py at 2, 3 and 4 ranks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import EXCHANGES, check_exchange, exchange_comm, exchange_setting, max_rel_diff, small_config

from dpbp.comm import SerialComm
from dpbp.train import Trainer

pytestmark = pytest.mark.mpi(min_size=2)

HELPERS = {"dropout": ("model.dropout=[0.3,0.1]",), "batch_norm": ("model.batch_norm=true",),
           "both": ("model.dropout=0.25", "model.batch_norm=true")}


def quiet(cfg, comm, run_dir=None):
    return Trainer(cfg, comm, run_dir, echo=lambda text: None)


def same_on_every_rank(world, array):
    everyone = world.comm.allgather(array.tobytes())
    return all(d == everyone[0] for d in everyone)


@pytest.mark.parametrize("kind", EXCHANGES)
@pytest.mark.parametrize("helper", sorted(HELPERS))
@pytest.mark.parametrize("batch", [17, 3])  # 17: uneven shards; 3 on 4 ranks: a rank with no rows every step
def test_whole_run_equals_one_rank(batch, helper, kind):
    cfg = small_config("data.train=spirals:n=300", f"train.batch_size={batch}", *HELPERS[helper],
                       exchange_setting(kind))  # 270 training rows: no batch of 1 row
    ref = quiet(cfg, SerialComm()).run()
    world = exchange_comm(kind)
    dist_trainer = quiet(cfg, world)
    check_exchange(dist_trainer, kind)
    dist = dist_trainer.run()
    assert ref.state.global_step == dist.state.global_step == 2 * -(-270 // batch)
    assert max_rel_diff(dist.model.params, ref.model.params) < 1e-10
    for a, b in zip(ref.history, dist.history):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-10 * a["val_loss"]
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-10 * a["train_loss"]
    assert same_on_every_rank(world, dist.model.params)
    if helper != "dropout":
        assert max_rel_diff(dist.model.running_mean, ref.model.running_mean) < 1e-10
        assert max_rel_diff(dist.model.running_var, ref.model.running_var) < 1e-10
        assert same_on_every_rank(world, dist.model.running_mean)  # private copies, summed in rank order
        assert same_on_every_rank(world, dist.model.running_var)


@pytest.mark.parametrize("kind", EXCHANGES)
@pytest.mark.parametrize("batch", [2, 1])  # on 3 or 4 ranks some ranks hold no row of the step
def test_one_dropout_step_with_idle_ranks_equals_one_rank(batch, kind):
    cfg = small_config(f"train.batch_size={batch}", "train.optimizer=sgd", "model.dropout=0.5",
                       exchange_setting(kind))
    ref, dist = quiet(cfg, SerialComm()), quiet(cfg, exchange_comm(kind))
    order = np.arange(ref.data.train.n_samples)
    assert ref.step(order, 3)[2] == dist.step(order, 3)[2] == batch
    assert max_rel_diff(dist.model.params, ref.model.params) < 1e-12


@pytest.mark.parametrize("kind", EXCHANGES)
def test_one_batch_norm_step_with_idle_ranks_equals_one_rank(kind):
    cfg = small_config("data.train=spirals:n=300", "train.batch_size=2", "train.optimizer=sgd",
                       "model.batch_norm=true", "model.dropout=0.2", exchange_setting(kind))
    ref, dist = quiet(cfg, SerialComm()), quiet(cfg, exchange_comm(kind))
    order = np.arange(ref.data.train.n_samples)
    assert ref.step(order, 3)[2] == dist.step(order, 3)[2] == 2  # 3 or 4 ranks: one or two hold no row
    assert max_rel_diff(dist.model.params, ref.model.params) < 1e-12
    assert max_rel_diff(dist.model.running_var, ref.model.running_var) < 1e-12


@pytest.mark.parametrize("kind", EXCHANGES)
def test_resume_mid_epoch_is_bit_identical(kind):
    """The masks depend on (epoch, step), not on a generator's state; the running statistics travel in the file."""
    world = exchange_comm(kind)
    folder = Path(world.comm.bcast(__import__("tempfile").mkdtemp(prefix="dpbp-mpi-") if world.rank == 0 else None))
    cfg = small_config("data.train=spirals:n=300", "train.epochs=3", "checkpoint.every_steps=5",
                       "checkpoint.keep=100", *HELPERS["both"], exchange_setting(kind))
    full = quiet(cfg, world, folder).run()
    from dpbp import checkpoint as ckpt

    middle = [p for p in ckpt.periodic_checkpoints(folder / "checkpoints") if int(p.stem[5:]) % 16][2]
    resumed = quiet(cfg, world)
    resumed.restore(middle)
    assert resumed.state.step_in_epoch > 0
    out = resumed.run()
    np.testing.assert_array_equal(out.model.params, full.model.params)
    np.testing.assert_array_equal(out.model.running_mean, full.model.running_mean)
    np.testing.assert_array_equal(out.model.running_var, full.model.running_var)
