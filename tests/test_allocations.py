"""A training step allocates nothing parameter- or activation-sized after the first step (tracemalloc)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from helpers import small_config

from dpbp.comm import SerialComm
from dpbp.train import Trainer


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_steps_allocate_no_large_arrays(optimizer, dtype):
    cfg = small_config("data.train=highdim:n=2000,d=64,classes=10", "model.layers=[64,256,256,10]",
                       "train.batch_size=250", f"train.optimizer={optimizer}", "train.check_sync_every=0",
                       dtype=dtype)
    trainer = Trainer(cfg, SerialComm(), None, echo=lambda s: None)
    order = np.arange(trainer.data.train.n_samples)
    for step in range(2):  # the first steps build workspaces
        trainer.step(order, step)
    smallest_activation = 250 * 10 * trainer.model.dtype.itemsize  # the (batch, n_out) output layer
    params_bytes = trainer.model.params.nbytes
    tracemalloc.start()
    for step in range(2, 6):
        trainer.step(order, step)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # NumPy's fixed ufunc buffers and a few (batch,) index arrays are all a step may allocate.
    assert peak < min(smallest_activation, params_bytes // 10) + 48 * 1024, f"steps allocated {peak} bytes"
