"""Under mpirun: bf16-mixed on N ranks, on every exchange (see tests/test_products.py for the bound).

The shards' gradient sums are rounded to bf16 per rank before the float32 exchange, so N ranks
match 1 rank to the bf16 error of the step, not bit for bit; the weights after the exchange are
the same bits on every rank all the same.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import EXCHANGES, check_exchange, exchange_comm, exchange_setting, small_config

from dpbp import products
from dpbp.comm import SerialComm
from dpbp.train import Trainer

pytestmark = pytest.mark.mpi(min_size=2)
U = 2.0**-8  # bfloat16 unit roundoff
STEP_BOUND = 8 * 3 * U  # tests/test_products.py: 3L - 1 products of <= 3u each, L = 3 layers


@pytest.fixture(autouse=True)
def bf16_cpu(monkeypatch, tmp_path_factory):
    """Pretend every rank's CPU has AVX-512 BF16, so this runs on any x86 host."""
    info = tmp_path_factory.mktemp("cpu") / "cpuinfo"
    info.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    monkeypatch.setattr(products, "CPUINFO", info)


def quiet(cfg, comm):
    return Trainer(cfg, comm, None, echo=lambda text: None)


@pytest.mark.parametrize("kind", EXCHANGES)
def test_one_bf16_step_on_n_ranks_is_within_the_bf16_bound_of_float32(kind):
    """SGD: the update is -lr * gradient sum / count, so the updates compare as the gradients do."""
    over = ("train.batch_size=64", "train.optimizer=sgd", "model.layers=[2,32,32,3]", exchange_setting(kind))
    f32 = quiet(small_config(*over, dtype="float32"), SerialComm())
    world = exchange_comm(kind)
    dist = quiet(small_config(*over, "model.precision=bf16-mixed", dtype="float32"), world)
    check_exchange(dist, kind)
    start = dist.model.params.copy()
    np.testing.assert_array_equal(start, f32.model.params)
    order = np.arange(f32.data.train.n_samples)
    f32.step(order, 1)
    dist.step(order, 1)
    ref_update, update = f32.model.params - start, dist.model.params - start
    rel = float(np.linalg.norm(update - ref_update) / np.linalg.norm(ref_update))
    assert 1e-5 < rel <= STEP_BOUND, rel  # bf16 is in use (float32 would agree to ~1e-6), within its error
    digests = world.comm.allgather(dist.model.params.tobytes())
    assert all(d == digests[0] for d in digests)


def test_bf16_training_on_n_ranks_keeps_every_rank_identical():
    world = exchange_comm("shared")
    result = quiet(small_config("model.precision=bf16-mixed", dtype="float32"), world).run()
    digests = world.comm.allgather(result.model.params.tobytes())
    assert all(d == digests[0] for d in digests)
    assert result.model.params.dtype == np.float32
