"""Which exchange runs (dpbp/exchange.py), decided from the config and where the ranks are.

The exchanges' numbers (N ranks == 1 rank, NaN agreement, resume, zero-row ranks) are tested
on every exchange under mpirun in tests/mpi/test_data_parallel.py and, across simulated hosts,
in tests/test_cluster_sim.py.
"""

from __future__ import annotations

import pytest
from helpers import small_config

from dpbp import exchange
from dpbp.comm import SerialComm
from dpbp.errors import ConfigError
from dpbp.train import Trainer


class FakeComm:
    """Enough of a communicator for ``use_shared_memory``: ``size`` ranks, ``local[r]`` on rank r's node."""

    def __init__(self, local: list[int]):
        self.size, self.local_size, self._local = len(local), local[0], local

    def allgather_obj(self, obj):
        return list(self._local)


def test_shared_memory_wherever_every_node_holds_as_many_ranks():
    assert not exchange.use_shared_memory("auto", SerialComm())
    assert exchange.use_shared_memory("auto", FakeComm([4, 4, 4, 4]))  # one node
    assert exchange.use_shared_memory("auto", FakeComm([2, 2, 2, 2]))  # two nodes: hierarchical
    assert not exchange.use_shared_memory("auto", FakeComm([2, 2, 1]))  # a rank without peers: Allreduce
    assert not exchange.use_shared_memory("off", FakeComm([4, 4, 4, 4]))
    with pytest.raises(ConfigError, match=r"same number of ranks on every node; the nodes hold \[1, 2\]"):
        exchange.use_shared_memory("on", FakeComm([2, 2, 1]))


def test_shared_memory_needs_room_in_dev_shm(monkeypatch):
    one_node = FakeComm([8] * 8)
    monkeypatch.setattr(exchange, "shm_free_bytes", lambda: 64 * 2**20)  # Docker's default /dev/shm
    assert exchange.use_shared_memory("auto", one_node, window_bytes=1 * 2**20) is False  # the reserve
    assert exchange.use_shared_memory("auto", one_node, window_bytes=0) is True
    with pytest.raises(ConfigError, match="--shm-size"):
        exchange.use_shared_memory("on", one_node, window_bytes=100 * 2**20)
    monkeypatch.setattr(exchange, "shm_free_bytes", lambda: None)  # no /dev/shm to ask
    assert exchange.use_shared_memory("auto", one_node, window_bytes=100 * 2**20) is True


def test_one_process_is_the_allreduce_exchange_with_nothing_to_reduce():
    t = Trainer(small_config("train.node_shared=on"), SerialComm(), echo=lambda s: None)
    assert isinstance(t.exchange, exchange.Allreduce) and t.exchange.name == "single process"
    assert t.exchange.grad.shape == (t.model.n_params,) and t.exchange.span == (0, t.model.n_params)
