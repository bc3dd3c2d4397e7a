"""Run under mpirun with several ranks: N ranks train the same model as 1 rank, on every exchange.

Every rank computes the 1-rank reference itself with SerialComm over the same config, then
compares with the MPI result. Each test that involves the exchange is written once and runs on
every one of them (helpers.EXCHANGES). Launched by tests/test_mpi_runs.py at 2, 3 and 4 ranks.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from helpers import EXCHANGES, check_exchange, exchange_comm, exchange_setting, max_rel_diff, small_config

from dpbp.comm import MPIComm, SerialComm
from dpbp.train import Trainer, TrainingError, evaluate

pytestmark = pytest.mark.mpi(min_size=2)


def quiet(cfg, comm, run_dir=None):
    return Trainer(cfg, comm, run_dir, echo=lambda text: None)


@pytest.fixture(params=["serial", "mpi"])
def comm(request):
    """Each test here runs once on SerialComm and once on MPIComm(COMM_WORLD)."""
    return SerialComm() if request.param == "serial" else MPIComm()


@pytest.mark.parametrize("kind", EXCHANGES)
@pytest.mark.parametrize("batch", [17, 2, 1])  # 2 and 1 leave some ranks with zero rows
def test_one_step_equals_one_rank(batch, kind):
    cfg = small_config(f"train.batch_size={batch}", "train.optimizer=sgd", exchange_setting(kind))
    ref, dist = quiet(cfg, SerialComm()), quiet(cfg, exchange_comm(kind))
    check_exchange(dist, kind)
    order = np.arange(ref.data.train.n_samples)
    ref_out = ref.step(order, 3)
    dist_out = dist.step(order, 3)
    assert dist_out[2] == ref_out[2] == batch  # global count, every row once
    assert dist_out[1] == ref_out[1]
    assert abs(dist_out[0] - ref_out[0]) <= 1e-12 * abs(ref_out[0])
    assert max_rel_diff(dist.model.params, ref.model.params) < 1e-12


@pytest.mark.parametrize("kind", EXCHANGES)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop", "adam"])
def test_whole_run_equals_one_rank(optimizer, kind):
    cfg = small_config(f"train.optimizer={optimizer}", "train.schedule=cosine", "train.warmup_epochs=0.5",
                       "train.weight_decay=0.01", exchange_setting(kind))
    ref = quiet(cfg, SerialComm()).run()
    world = exchange_comm(kind)
    dist = quiet(cfg, world).run()
    assert max_rel_diff(dist.model.params, ref.model.params) < 1e-10
    assert ref.state.global_step == dist.state.global_step == 2 * 16
    for a, b in zip(ref.history, dist.history):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-10 * a["val_loss"]
        assert a["val_accuracy"] == b["val_accuracy"]
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-10)
    digests = world.comm.allgather(dist.model.params.tobytes())  # and the very same weights on every rank
    assert all(d == digests[0] for d in digests)


@pytest.mark.parametrize("kind", EXCHANGES)
def test_clipping_and_plateau_run_equals_one_rank(kind):
    """Clipping active on most steps and plateau reductions: the same factors, rates and weights as 1 rank."""
    cfg = small_config("train.clip_grad_norm=0.2", "train.weight_decay=0.01", "train.schedule=plateau",
                       "train.plateau_patience=0", "train.min_delta=1.0", "train.epochs=3", exchange_setting(kind))
    ref = quiet(cfg, SerialComm()).run()
    world = exchange_comm(kind)
    dist = quiet(cfg, world)
    check_exchange(dist, kind)
    dist = dist.run()
    assert max_rel_diff(dist.model.params, ref.model.params) < 1e-10
    assert [r["clipped_steps"] for r in dist.history] == [r["clipped_steps"] for r in ref.history]
    assert sum(r["clipped_steps"] for r in ref.history) > 0
    np.testing.assert_allclose([r["clip_factor_min"] for r in dist.history],
                               [r["clip_factor_min"] for r in ref.history], rtol=1e-10)
    assert [r["lr"] for r in dist.history] == [r["lr"] for r in ref.history] == [0.05, 0.05, 0.05 * 0.1]
    digests = world.comm.allgather(dist.model.params.tobytes())
    assert all(d == digests[0] for d in digests)


@pytest.mark.parametrize("kind", EXCHANGES)
@pytest.mark.parametrize("batch", [17, 2])  # 2 leaves some ranks with zero rows
def test_exact_gradient_norm_equals_one_rank(batch, kind):
    """The float64 norm clipping falls back on (squares beyond the dtype) counts every span once."""
    cfg = small_config(f"train.batch_size={batch}", exchange_setting(kind))
    ref, dist = quiet(cfg, SerialComm()), quiet(cfg, exchange_comm(kind))
    norms = {}
    for name, t in (("ref", ref), ("dist", dist)):
        def spy(stats, vote, t=t, name=name, combine=t.exchange.combine):
            sums = combine(stats, vote)
            norms[name] = (t.exchange.exact_norm(), sums.squares)
            return sums

        t.exchange.combine = spy
        t.step(np.arange(t.data.train.n_samples), 3)
    (mine, squares), (theirs, _) = norms["dist"], norms["ref"]
    assert mine == pytest.approx(theirs, rel=1e-12) and mine == pytest.approx(np.sqrt(sum(squares)), rel=1e-12)
    assert len(set(dist.comm.comm.allgather(mine))) == 1  # the very same number on every rank


@pytest.mark.parametrize("kind", EXCHANGES)
def test_weights_identical_on_every_rank_after_training(kind):
    world = exchange_comm(kind)
    result = quiet(small_config(exchange_setting(kind), dtype="float32"), world).run()
    digests = world.comm.allgather(result.model.params.tobytes())
    assert all(d == digests[0] for d in digests)


def test_initial_weights_agree_and_divergence_is_caught():
    from dpbp.comm import check_in_sync

    world = MPIComm()
    trainer = quiet(small_config("train.node_shared=off"), world)  # private copies of the weights
    check_in_sync(world, trainer.model.params, "now")  # equal: no error
    if world.rank == world.size - 1:
        trainer.model.params[0] += 1e-9
    with pytest.raises(TrainingError, match=rf"rank\(s\) \[{world.size - 1}\] differ"):
        check_in_sync(world, trainer.model.params, "now")


def test_evaluation_counts_every_sample_once(comm):
    cfg = small_config()
    trainer = quiet(cfg, comm)
    ds = trainer.data.val  # 30 rows: uneven over 4 ranks
    got = evaluate(trainer.model, ds, comm)
    full = trainer.model.evaluate_sum(ds.x, ds.y)
    assert got["n"] == ds.n_samples == full.n
    assert got["accuracy"] == full.n_correct / full.n
    assert abs(got["loss"] - full.loss_sum / full.n) <= 1e-12 * abs(got["loss"])


def test_evaluation_reports_count_every_sample_once(comm):
    """Confusion matrix, per-class scores and regression sums over ranks equal the one-process report."""
    from dpbp.data import Dataset
    from dpbp.model import MLP
    from dpbp.targets import Targets

    rng = np.random.default_rng(3)
    x = rng.normal(size=(31, 3))  # 31 rows: uneven over every rank count
    labels = np.array(["a", "b", "c"])[rng.integers(0, 3, 31)]
    targets = Targets.fit("classification", labels)
    model = MLP([3, 5, 3], dtype="float64", seed=1)
    ds = Dataset(x, targets.encode(labels), "classes")
    got, ref = evaluate(model, ds, comm, targets), evaluate(model, ds, SerialComm(), targets)
    assert got["confusion_matrix"] == ref["confusion_matrix"] and sum(map(sum, got["confusion_matrix"])) == 31
    assert got["f1"] == pytest.approx(ref["f1"], rel=1e-15) and got["support"] == ref["support"]
    y = 1e6 + rng.normal(size=(31, 2))
    reg = Targets.fit("regression", y + 1.0, normalize="standard")
    model = MLP([3, 4, 2], output="identity", loss="mse", dtype="float64", seed=2)
    ds = Dataset(x, reg.encode(y), "values")
    got, ref = evaluate(model, ds, comm, reg), evaluate(model, ds, SerialComm(), reg)
    assert got["n"] == 31
    for key in ("loss", "mse", "rmse", "mae", "r2"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key


def _shared_dir(world) -> str:
    import tempfile

    return world.comm.bcast(tempfile.mkdtemp(prefix="dpbp-mpi-") if world.rank == 0 else None)


def _mid_epoch(folder):
    from dpbp import checkpoint as ckpt

    paths = [p for p in ckpt.periodic_checkpoints(folder) if int(p.stem[5:]) % 16]
    assert paths, "expected mid-epoch checkpoints"
    return paths[len(paths) // 2]


@pytest.mark.parametrize("kind", EXCHANGES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resume_on_the_same_rank_count_is_bit_identical(dtype, kind):
    from pathlib import Path

    world = exchange_comm(kind)
    folder = Path(_shared_dir(world))
    cfg = small_config("train.epochs=3", "checkpoint.every_steps=5", "checkpoint.keep=100", exchange_setting(kind),
                       dtype=dtype)
    full = quiet(cfg, world, folder).run()
    resumed = quiet(cfg, world)
    check_exchange(resumed, kind)
    resumed.restore(_mid_epoch(folder / "checkpoints"))
    out = resumed.run()
    np.testing.assert_array_equal(out.model.params, full.model.params)


@pytest.mark.parametrize("kind", EXCHANGES)
def test_resume_on_another_rank_count_matches_to_rounding(kind):
    import tempfile
    from pathlib import Path

    world = exchange_comm(kind)
    cfg = small_config("train.epochs=3", "checkpoint.every_steps=5", "checkpoint.keep=100", exchange_setting(kind))
    # A checkpoint written by 1 rank, continued on N ranks ...
    local = Path(tempfile.mkdtemp(prefix="dpbp-serial-"))
    serial_full = quiet(cfg, SerialComm(), local).run()
    on_n = quiet(cfg, world)
    on_n.restore(_mid_epoch(local / "checkpoints"))
    assert max_rel_diff(on_n.run().model.params, serial_full.model.params) < 1e-10
    # ... and one written by N ranks, continued on 1 rank.
    shared = Path(_shared_dir(world))
    quiet(cfg, world, shared).run()
    on_one = quiet(cfg, SerialComm())
    on_one.restore(_mid_epoch(shared / "checkpoints"))
    assert max_rel_diff(on_one.run().model.params, serial_full.model.params) < 1e-10


@pytest.mark.parametrize("kind", EXCHANGES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_gradient_on_one_rank_is_agreed_and_names_the_layer(kind, bad):
    """A rank may see only its span of the summed gradient; the NaN/Inf decision must still be agreed."""
    world = exchange_comm(kind)
    t = quiet(small_config(exchange_setting(kind)), world)
    real = t.model.loss_and_grad_sum

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        if world.rank == world.size - 1:
            t.model.layer_views(t.exchange.grad)[1][2][0] = bad  # layer 3's bias, on one rank only
        return stats

    t.model.loss_and_grad_sum = poisoned
    with pytest.raises(TrainingError, match="gradient of layer 3 is not finite"):
        t.run()


@pytest.mark.parametrize("kind", EXCHANGES)
def test_skip_nonfinite_skips_everywhere(kind):
    world = exchange_comm(kind)
    cfg = small_config(exchange_setting(kind), "train.on_nonfinite=skip", "train.epochs=1")
    t = quiet(cfg, world)
    real, calls = t.model.loss_and_grad_sum, []

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3 and world.rank == 0:
            t.model.layer_views(t.exchange.grad)[0][0][0, 0] = np.nan  # step 3, first layer, one rank
        return stats

    t.model.loss_and_grad_sum = poisoned
    snapshots = []
    t.run(on_step_end=lambda tr: snapshots.append(tr.model.params.copy()) and False)
    np.testing.assert_array_equal(snapshots[1], snapshots[2])  # step 3 changed nothing
    assert not np.array_equal(snapshots[2], snapshots[3])  # step 4 trained again
    assert np.all(np.isfinite(t.model.params)) and t.state.skipped_steps == 1


@pytest.mark.parametrize("kind", ["shared", "hierarchical"])
def test_node_shared_parameters_are_one_copy_per_node(kind):
    world = exchange_comm(kind)
    t = quiet(small_config(exchange_setting(kind)), world)
    check_exchange(t, kind)
    node = world._node
    spans = node.allgather(t.exchange.span)
    assert spans[0][0] == 0 and spans[-1][1] == t.model.n_params  # the node's spans tile the parameters
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert world.comm.allgather(t.exchange.span)[: node.Get_size()] == spans  # the same spans on every node
    before = float(t.model.params[0])
    world.barrier()
    if world.local_rank == world.local_size - 1:
        t.model.params[0] = 123.0 + world.rank  # one rank of each node writes ...
    world.node_barrier()
    writer = world.rank - world.local_rank + world.local_size - 1
    assert t.model.params[0] == 123.0 + writer  # ... every rank of that node reads it
    assert t.model.weights[0][0, 0] == 123.0 + writer  # through the layer views as well
    world.node_barrier()
    if world.local_rank == 0:
        t.model.params[0] = before
    world.node_barrier()


@pytest.mark.parametrize("kind", ["mpi", "pipes"])
def test_node_barrier_orders_shared_writes(kind):
    """Round after round, no rank passes a node barrier before every rank's write of that round."""
    from dpbp.comm import _PipeBarrier

    world = MPIComm()
    counters = world.node_shared_array(world.size, np.int64)
    if kind == "pipes":  # the barrier dpbp uses when ranks outnumber cores, forced here
        world._pipes = _PipeBarrier.create(world._node)
        assert world._pipes is not None
    for round_ in range(1, 201):
        if world.rank == round_ % world.size:
            time.sleep(0.001)  # a late rank each round
        counters[world.rank] = round_
        world.node_barrier()
        assert np.all(counters == round_), (round_, counters)
        world.node_barrier()  # nobody writes the next round before all have checked this one
    oversubscribed = world.local_size > (os.cpu_count() or 1)
    assert (world._pipes is not None) == (kind == "pipes" or oversubscribed)


def test_pipe_barrier_set_up_failing_on_one_rank_gives_none_everywhere(monkeypatch):
    from dpbp.comm import _PipeBarrier

    world = MPIComm()
    if world.rank == world.size - 1:

        def no_fifo(*args, **kwargs):
            raise PermissionError("no FIFOs here")

        monkeypatch.setattr("os.mkfifo", no_fifo)
    assert _PipeBarrier.create(world._node) is None  # every rank, no hang: the node barrier polls instead
    world.node_barrier()
