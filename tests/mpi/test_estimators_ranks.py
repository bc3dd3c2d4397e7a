"""Run under mpirun with several ranks: dpbp.MLPClassifier/MLPRegressor fitted on every rank (each passing the full
data) equal the same estimator fitted by this process alone, under both gradient exchanges; disagreeing ranks raise
on every rank. Launched by tests/test_mpi_runs.py."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import max_rel_diff

from dpbp import MLPClassifier, MLPRegressor
from dpbp.comm import MPIComm
from dpbp.errors import InputError

pytestmark = pytest.mark.mpi(min_size=2)


def dataset(cls):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(301, 4))  # 301 rows, batches of 17: uneven shards on every rank count
    if cls is MLPClassifier:
        return X, np.array(["a", "b", "c"])[(X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)]
    return X, np.c_[3 * X[:, 0] - X[:, 1] ** 2, X[:, 2] + 10]


KW = {"hidden_layer_sizes": (16, 8), "batch_size": 17, "max_iter": 4, "learning_rate_init": 0.01,
      "random_state": 5, "dtype": "float64"}


@pytest.mark.parametrize("exchange", ["off", "on"])
@pytest.mark.parametrize("early_stopping", [False, True])
@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
def test_fit_on_every_rank_equals_one_process(cls, early_stopping, exchange):
    X, y = dataset(cls)
    kw = {**KW, "early_stopping": early_stopping, "config": {"train.node_shared": exchange}}
    ref = cls(comm="serial", **kw).fit(X, y)
    dist = cls(comm="mpi", **kw).fit(X, y)
    assert max_rel_diff(dist.model_.params, ref.model_.params) < 1e-10
    assert dist.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(dist.loss_curve_, ref.loss_curve_, rtol=1e-10)
    world = MPIComm()
    pred = dist.predict(X)  # local: every rank holds the whole fitted model
    everyone = world.comm.allgather(pred.tobytes())
    assert all(p == everyone[0] for p in everyone)


def test_partial_fit_on_every_rank_equals_one_process():
    X, y = dataset(MLPClassifier)
    ref, dist = MLPClassifier(comm="serial", **KW), MLPClassifier(comm="mpi", **KW)
    for lo in (0, 150):
        ref.partial_fit(X[lo:lo + 151], y[lo:lo + 151], classes=["a", "b", "c"])
        dist.partial_fit(X[lo:lo + 151], y[lo:lo + 151], classes=["a", "b", "c"])
    assert max_rel_diff(dist.model_.params, ref.model_.params) < 1e-10


def test_a_rank_with_other_data_raises_on_every_rank():
    world = MPIComm()
    X, y = dataset(MLPClassifier)
    if world.rank == world.size - 1:
        X = X + 1e-9  # a node-local copy of the data that differs in the last digits
    with pytest.raises(InputError, match=rf"ranks do not have the same train data: rank\(s\) \[{world.size - 1}\]"):
        MLPClassifier(comm="mpi", **KW).fit(X, y)


def test_a_rank_with_bad_input_or_other_parameters_raises_on_every_rank():
    world = MPIComm()
    X, y = dataset(MLPClassifier)
    bad = world.rank == 1
    with pytest.raises(ValueError, match="NaN" if bad else r"rank 1, checking the parameters, X and y: .*NaN"):
        MLPClassifier(comm="mpi", **KW).fit(np.where(bad, np.nan, X), y)
    with pytest.raises(InputError, match=r"rank\(s\) \[1\] passed other estimator parameters than rank 0"):
        MLPClassifier(comm="mpi", **{**KW, "max_iter": 3 if bad else 4}).fit(X, y)
