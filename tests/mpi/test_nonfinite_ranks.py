"""Run under mpirun: NaN/Inf endings are agreed by every rank, on each way of exchanging gradients.

The single-process behaviour is in tests/test_nonfinite.py; here every rank must raise the
same error (no rank left waiting in a collective), exit 3 through the CLI, and leave no
model.npz and a finite newest checkpoint. Launched by tests/test_mpi_runs.py.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import EXCHANGES, check_exchange, exchange_comm, exchange_setting, max_rel_diff, small_config
from helpers import invoke as invoke_cli

from dpbp import checkpoint as ckpt
from dpbp import rundir
from dpbp.comm import MPIComm, SerialComm
from dpbp.train import Trainer, TrainingError

pytestmark = pytest.mark.mpi(min_size=2)

def shared_dir(world) -> Path:
    return Path(world.comm.bcast(tempfile.mkdtemp(prefix="dpbp-mpi-") if world.rank == 0 else None))


def agreed_error(world, run) -> TrainingError:
    """Run ``run()`` on every rank; it must raise the same TrainingError (exit 3) on all of them."""
    with pytest.raises(TrainingError) as info:
        run()
    messages = world.comm.allgather(str(info.value))
    assert all(m == messages[0] for m in messages), messages
    assert info.value.exit_code == 3
    return info.value


@pytest.mark.parametrize("mode", ["stop", "skip"])
@pytest.mark.parametrize("exchange", EXCHANGES)
def test_nonfinite_parameters_end_every_rank_alike(exchange, mode):
    world = exchange_comm(exchange)
    folder = shared_dir(world)
    cfg = small_config(exchange_setting(exchange), f"train.on_nonfinite={mode}", "train.epochs=3", dtype="float32")
    t = Trainer(cfg, world, folder, echo=lambda s: None)
    check_exchange(t, exchange)
    base = t.schedule
    t.schedule = lambda s: 1e39 if s >= 20 else base(s)  # the update of step 21 overflows the parameters
    error = agreed_error(world, t.run)
    assert re.match(r"the update of step 21 left the parameters of layer \d non-finite \(found at step 22\)",
                    str(error)), str(error)
    assert not (folder / "model.npz").exists()
    path, invalid = rundir.find_latest(folder, ckpt.load_checkpoint)
    arrays, meta = ckpt.load_checkpoint(path)
    assert invalid == [] and meta["state"]["global_step"] == 16 and np.all(np.isfinite(arrays["params"]))


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_a_hidden_nonfinite_parameter_stops_every_rank_before_the_checkpoint(exchange):
    world = exchange_comm(exchange)
    folder = shared_dir(world)
    cfg = small_config(exchange_setting(exchange), "model.activation=tanh", "checkpoint.every_steps=2",
                       "checkpoint.keep=100")
    t = Trainer(cfg, world, folder, echo=lambda s: None)
    check_exchange(t, exchange)

    def hide_inf(trainer: Trainer) -> bool:
        if trainer.state.global_step == 3 and (trainer.exchange.copies == "per rank" or world.local_rank == 0):
            trainer.model.weights[0][0, 0] = np.inf  # tanh hides it from the loss and the gradient
        return False

    error = agreed_error(world, lambda: t.run(on_step_end=hide_inf))
    assert str(error).startswith("the update of step 4 left the parameters of layer 1 non-finite "
                                 "(before writing a checkpoint)")
    path, _ = rundir.find_latest(folder, ckpt.load_checkpoint)
    arrays, meta = ckpt.load_checkpoint(path)
    assert meta["state"]["global_step"] == 2 and np.all(np.isfinite(arrays["params"]))


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_the_skip_bound_is_agreed_when_one_rank_sees_nan(exchange):
    world = exchange_comm(exchange)
    cfg = small_config(exchange_setting(exchange), "train.on_nonfinite=skip", "train.max_skipped_steps=2")
    t = Trainer(cfg, world, None, echo=lambda s: None)
    check_exchange(t, exchange)
    real = t.model.loss_and_grad_sum

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        if t.state.global_step >= 4 and world.rank == world.size - 1:
            t.model.layer_views(t.exchange.grad)[0][1][0, 0] = np.nan  # layer 2's gradient, on one rank only
        return stats

    t.model.loss_and_grad_sum = poisoned
    error = agreed_error(world, t.run)
    assert str(error) == ("step 7 (epoch 1): gradient of layer 2 is not finite; 3 of 7 steps skipped, "
                          "more than train.max_skipped_steps = 2; lower train.lr or check the data")
    assert t.state.skipped_steps == 3 and t.state.global_step == 6


@pytest.mark.parametrize("mode", ["stop", "skip"])
@pytest.mark.parametrize("exchange", EXCHANGES)
def test_a_huge_finite_gradient_is_trained_on_as_on_one_rank(exchange, mode):
    """Its squared norm overflows float32, but it is finite: no exchange may take it for NaN/Inf."""
    world = exchange_comm(exchange)
    cfg = small_config(exchange_setting(exchange), f"train.on_nonfinite={mode}", dtype="float32")
    ref, dist = (Trainer(cfg, comm, None, echo=lambda s: None) for comm in (SerialComm(), world))
    check_exchange(dist, exchange)
    for t, here in ((ref, True), (dist, world.rank == world.size - 1)):
        real = t.model.loss_and_grad_sum

        def huge(*args, t=t, here=here, real=real, **kwargs):
            stats = real(*args, **kwargs)
            if here:  # layer 2's first bias: its batch mean ~6e19 > sqrt(float32 max)
                t.model.layer_views(t.exchange.grad)[1][1][0] += np.float32(1e21)
            return stats

        t.model.loss_and_grad_sum = huge
    order = np.arange(ref.data.train.n_samples)
    for i in range(3):
        ref.step(order, i)
        dist.step(order, i)
    assert dist.state.skipped_steps == ref.state.skipped_steps == 0
    assert np.all(np.isfinite(dist.model.params))
    assert max_rel_diff(dist.model.params, ref.model.params) < 1e-6



def invoke(*args):
    return invoke_cli(*args, comm="mpi")

@pytest.mark.parametrize("exchange", ["allreduce", "shared"])  # the CLI runs on the machine's real nodes
def test_cli_exits_3_on_every_rank_and_keeps_the_last_good_checkpoint(exchange):
    world = MPIComm()
    folder = shared_dir(world)
    sets = [a for item in ("data.train=spirals:n=300", "model.layers=[2,8,3]", exchange_setting(exchange))
            for a in ("--set", item)]
    first = invoke("train", *sets, "--batch-size", "30", "--epochs", "1", "--run-dir", folder)
    assert first.exit_code == 0, first.output
    world.barrier()
    if world.rank == 0:
        (folder / "model.npz").unlink()  # as after a preempted run
    world.barrier()
    again = invoke("train", *sets, "--batch-size", "30", "--epochs", "2", "--run-dir", folder,
                   "--resume", "auto", "--lr", "1e39")
    assert again.exit_code == 3, again.output
    errors = [line for line in again.output.splitlines() if line.startswith("error")]
    counts = world.comm.allgather(len(errors))
    assert counts == [1] + [0] * (world.size - 1), counts  # printed once, by rank 0
    if world.rank == 0:
        assert re.match(r"error: the update of step 10 left the parameters of layer \d non-finite", errors[0])
    assert not (folder / "model.npz").exists()
    path, _ = rundir.find_latest(folder, ckpt.load_checkpoint)
    arrays, meta = ckpt.load_checkpoint(path)
    assert meta["state"]["global_step"] == 9 and np.all(np.isfinite(arrays["params"]))
