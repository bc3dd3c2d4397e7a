"""How the ranks' gradient sums are combined and the update applied: one interface, two ways.

Every exchange gives the training step the same four things, so the step reads the
same whatever runs underneath (the seed's four parts: zero, forward+backprop into the
gradient sum, combine across ranks, the same eta update):

* ``grad``: the ``(n_params,)`` buffer (model dtype) that backprop writes this rank's
  gradient SUM into (``MLP.loss_and_grad_sum(..., out=exchange.grad)``);
* ``combine(stats, vote)`` (collective): the global loss sum, row count, correct count and
  stop votes, and the per-layer squared norms of the summed gradient, identical on every
  rank (``Sums``), with this rank's ``span`` of the summed gradient ready;
* ``bad_layer(squares)``: this rank's exact answer to "which layer of my span holds
  NaN/Inf" (only looked for where a squared norm is not finite);
* ``exact_norm()`` (collective): the L2 norm of the whole summed gradient in float64, for the
  rare step whose squared norms overflowed the model dtype (gradient clipping needs it then);
* ``update(params, optimizer, lr, scale)`` (collective): the optimizer applied to this
  rank's span of ``params`` with the gradient times ``scale`` (1 / global rows); afterwards
  every rank reads the complete, updated parameters.

The ways (``train.node_shared``):

* ``Allreduce``: every rank holds the parameters and optimizer state; one in-place
  ``Allreduce`` over gradient + (loss, rows, correct, vote); every rank updates all of it.
  One process (``SerialComm``) is this with a no-op reduction.
* ``SharedMemory``: the ranks of a node hold ONE copy of the parameters and optimizer state
  in an MPI-3 shared window, plus one gradient slot per rank. Each rank sums every slot over
  its own span (rank order, so the totals are identical everywhere); across nodes it then
  reduces that span with the ranks that hold the same span on the other nodes (its *peers*:
  the same node rank), so each byte of gradient crosses the network once per node, not once
  per rank. It updates its span of the node's copy in place; node barriers separate the phases.

Which exchange runs is decided here (``choose``) and nowhere else.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from dpbp import data as data_mod
from dpbp.comm import all_or_nothing
from dpbp.errors import ConfigError
from dpbp.optim import CHUNK_ELEMENTS

SHM_DIR = "/dev/shm"  # where MPICH and Open MPI place shared-memory windows on Linux
SHM_RESERVE = 64 * 2**20  # room left there for MPI's own shared-memory transport
TAIL = 4  # after the gradient in every reduced buffer: loss sum, row count, correct count, stop votes


@dataclass
class Sums:
    """One step's global numbers, the same on every rank after ``combine``.

    ``squares``: per layer, the squared norm of the summed gradient (weights and biases);
    NaN/Inf when that layer holds NaN/Inf, or finite values so large that their squares overflow.
    """

    loss_sum: float
    count: float
    correct: float
    votes: float
    squares: list[float]


class Exchange:
    """The interface (see the module docstring); ``Allreduce`` and ``SharedMemory`` implement it."""

    name = ""  # in words, for the start-up header
    kind = ""  # the config's word for it
    copies = "per rank"  # how many copies of the parameters exist: "per rank" or "per node"
    nodes = 1  # how many copies the checksum of train.check_sync_every compares: 1 = nothing can drift
    grad: np.ndarray
    span: tuple[int, int]  # [lo, hi) of the parameter vector this rank updates

    def __init__(self, model, comm):
        self.comm = comm
        # flat [start, stop) of each layer's weights and biases (and batch norm's gamma and beta)
        self.layer_ranges = model.layer_blocks()

    def combine(self, stats, vote: bool) -> Sums:
        raise NotImplementedError

    def update(self, params: np.ndarray, optimizer, lr: float, scale: float) -> None:
        raise NotImplementedError

    def span_grad(self) -> np.ndarray:
        """The summed gradient of this rank's span (valid after ``combine``; the optimizer clobbers it)."""
        raise NotImplementedError

    def bad_layer(self, squares: list[float]) -> int | None:
        """The first layer whose part of this rank's span of the summed gradient holds NaN/Inf.

        Looks only at layers whose squared norm in ``squares`` is not finite (NaN/Inf entries make
        it so, but so do finite ones beyond ~1.8e19 in float32), so normally costs nothing.
        """
        lo, hi = self.span
        grad = self.span_grad()
        for layer, ((a, b), q) in enumerate(zip(self.layer_ranges, squares)):
            a, b = max(a, lo) - lo, max(min(b, hi), lo) - lo
            if not math.isfinite(q) and b > a and not bool(np.isfinite(grad[a:b]).all()):
                return layer
        return None

    def exact_norm(self) -> float:
        """The L2 norm of the whole summed gradient, in float64 without overflow (valid after ``combine``).

        Identical on every rank. Collective (call on every rank alike); one pass over this rank's span.
        """
        raise NotImplementedError

    def write_params(self, model, params: np.ndarray, optimizer=None, state: dict | None = None) -> None:
        """Every rank: the parameters (and optimizer ``state``, if given) become these (collective)."""
        model.params[...] = params
        if state is not None:
            optimizer.load_state_dict(state)

    def _span_squares(self, grad: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
        """out[layer] += squared norm of ``grad`` (parameters [lo, hi)) inside each layer."""
        for layer, (a, b) in enumerate(self.layer_ranges):
            first, last = max(a, lo), min(b, hi)
            if last > first:
                part = grad[first - lo : last - lo]
                out[layer] += np.dot(part, part)


class Allreduce(Exchange):
    """One in-place ``Allreduce`` of gradient + tail per step; every rank updates every parameter."""

    kind = "allreduce"

    def __init__(self, model, comm):
        super().__init__(model, comm)
        n = model.n_params
        # DP: one contiguous buffer = gradient sum | loss sum | row count | correct count | stop votes
        self.buf = np.zeros(n + TAIL, model.dtype)
        self.grad = self.buf[:n]
        self.span = (0, n)
        self.squares = np.zeros(model.n_layers, model.dtype)
        self.name = "single process" if comm.size == 1 else "one Allreduce per step"
        self.nodes = comm.size  # every rank holds its own copy

    def combine(self, stats, vote: bool) -> Sums:
        tail = self.buf[self.span[1] :]
        tail[...] = (stats.loss_sum, stats.n, stats.n_correct, 1.0 if vote else 0.0)
        self.comm.allreduce_(self.buf)  # DP: the one collective of the step
        self.squares[...] = 0.0
        self._span_squares(self.grad, 0, self.span[1], self.squares)  # the same sums, so the same on every rank
        loss_sum, count, correct, votes = (float(v) for v in tail)
        return Sums(loss_sum, count, correct, votes, [float(q) for q in self.squares])

    def span_grad(self) -> np.ndarray:
        return self.grad

    def exact_norm(self) -> float:
        return wide_norm(self.grad)  # every rank holds the same whole sum: nothing to exchange

    def update(self, params: np.ndarray, optimizer, lr: float, scale: float) -> None:
        bound = float(np.sum(self.squares, dtype=np.float64)) * scale * scale
        optimizer.step(params, self.grad, lr, grad_scale=scale, squares=bound)


class SharedMemory(Exchange):
    """One copy of parameters and optimizer state per node; gradients meet in node memory, spans cross nodes.

    Window layout (views): ``params``; the optimizer's state vectors; ``slots``: (node ranks,
    n_params + 4) rows, node rank r's gradient sum then its loss sum, row count, correct count and
    stop vote; ``posted``: (node ranks, layers + 4) rows, each rank's squared norms of its span of the
    summed gradient, and (node rank 0) the global tail. ``span``: [lo, hi) of the parameters this
    rank sums and updates, the same on every node; ``buf``: that span of the summed gradient and the
    node's tail (private), which goes to the peers.
    """

    kind = "shared"
    copies = "per node"

    @staticmethod
    def window_elements(model, optimizer, local_size: int) -> int:
        """Elements of the window: params, optimizer state, one slot per node rank, the posted norms."""
        n = model.n_params
        return n * (1 + len(optimizer.state_names)) + local_size * (n + TAIL) + local_size * (model.n_layers + TAIL)

    def __init__(self, model, optimizer, comm):
        super().__init__(model, comm)
        n, k, layers = model.n_params, comm.local_size, model.n_layers
        names = optimizer.state_names
        window = comm.node_shared_array(self.window_elements(model, optimizer, k), model.dtype)
        first = comm.local_rank == 0  # DP: one rank fills the shared copies, the barrier publishes them
        model.move_params(window[:n], copy=first)
        optimizer.move_state({name: window[n * (1 + i) : n * (2 + i)] for i, name in enumerate(names)}, copy=first)
        start = n * (1 + len(names))
        self.slots = window[start : start + k * (n + TAIL)].reshape(k, n + TAIL)
        self.posted = window[start + k * (n + TAIL) :].reshape(k, layers + TAIL)
        self.me = comm.local_rank
        self.grad = self.slots[self.me, :n]
        self.span = data_mod.shard_bounds(n, k, self.me)
        lo, hi = self.span
        self.buf = np.empty(hi - lo + TAIL, model.dtype)
        self.peers = comm.peers() if comm.local_size < comm.size else None  # DP: my span's holders elsewhere
        self.nodes = comm.size // k
        self.n = n
        comm.node_barrier()
        if self.nodes == 1:
            self.name = "node-shared memory (each rank sums and updates its span)"
        else:
            self.name = (f"hierarchical: node-shared memory on each of {self.nodes} nodes, each rank's span "
                         "reduced with its peers on the other nodes")

    def combine(self, stats, vote: bool) -> Sums:
        comm, n, (lo, hi) = self.comm, self.n, self.span
        self.slots[self.me, n:] = (stats.loss_sum, stats.n, stats.n_correct, 1.0 if vote else 0.0)
        comm.node_barrier()  # DP: (1) every slot of the node is written
        grad, tail = self.buf[: hi - lo], self.buf[hi - lo :]
        np.sum(self.slots[:, n:], axis=0, out=tail)  # the node's sums, in rank order
        mine = self.posted[self.me]
        mine[...] = 0.0
        squares = mine[:-TAIL]
        for start in range(lo, hi, CHUNK_ELEMENTS):  # chunk by chunk: summed (and squared) while in cache
            stop = min(start + CHUNK_ELEMENTS, hi)
            out = grad[start - lo : stop - lo]
            np.copyto(out, self.slots[0, start:stop])
            for row in self.slots[1:]:
                out += row[start:stop]
            if self.peers is None:
                self._span_squares(out, start, stop, squares)
        if self.peers is not None:
            self.peers.allreduce_(self.buf)  # DP: my span (and the node's tail) with the same span of every node
            self._span_squares(grad, lo, hi, squares)
        if self.me == 0:
            mine[-TAIL:] = tail  # the global tail as node rank 0's peers agreed it: one value for the whole job
        comm.node_barrier()  # DP: (2) every span's norms are posted; nobody reads the slots any more
        loss_sum, count, correct, votes = (float(v) for v in self.posted[0, -TAIL:])
        return Sums(loss_sum, count, correct, votes, [float(q) for q in self.posted[:, :-TAIL].sum(axis=0)])

    def span_grad(self) -> np.ndarray:
        lo, hi = self.span
        return self.buf[: hi - lo]

    def exact_norm(self) -> float:
        # DP: every node holds the same spans; take each node rank's once, in node-rank order
        norms = dict(reversed(self.comm.allgather_obj((self.me, wide_norm(self.span_grad())))))
        return math.hypot(*(norms[r] for r in sorted(norms)))

    def update(self, params: np.ndarray, optimizer, lr: float, scale: float) -> None:
        bound = float(np.sum(self.posted[self.me, :-TAIL], dtype=np.float64)) * scale * scale
        optimizer.step(params, self.span_grad(), lr, grad_scale=scale, span=self.span, squares=bound)
        self.comm.node_barrier()  # DP: (3) the node's copy of the parameters is complete

    def write_params(self, model, params: np.ndarray, optimizer=None, state: dict | None = None) -> None:
        if self.comm.local_rank == 0:  # DP: one copy per node: one rank writes it
            super().write_params(model, params, optimizer, state)
        elif state is not None:
            optimizer.t = int(state["t"])
        self.comm.node_barrier()


def wide_norm(x: np.ndarray) -> float:
    """The L2 norm of the 1-D array ``x`` in float64, scaled chunk by chunk so that no square overflows.

    Allocates one float64 chunk at a time; ``x`` is not modified. NaN/Inf entries give NaN/Inf.
    """
    norms = []
    for start in range(0, x.shape[0], CHUNK_ELEMENTS):
        chunk = x[start : start + CHUNK_ELEMENTS].astype(np.float64)
        top = float(np.max(np.abs(chunk)))
        if top > 0 and math.isfinite(top):
            chunk /= top
            norms.append(top * math.sqrt(float(np.dot(chunk, chunk))))
        elif top != 0:
            norms.append(top)  # NaN or Inf
    return math.hypot(*norms)


def shm_free_bytes() -> int | None:
    """Free bytes in ``SHM_DIR`` (None where it does not exist)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def use_shared_memory(mode: str, comm, window_bytes: int = 0) -> bool:
    """Combine gradients through node-shared memory (``train.node_shared`` = ``mode``)?

    Needs as many ranks on every node (every rank's span must have a peer on each other node)
    and room for the window in /dev/shm (Docker gives 64 MiB unless ``--shm-size`` says more):
    touching a window larger than that would crash the job, so ``auto`` then keeps the
    Allreduce. ``on`` turns either problem into a ConfigError. Collective.
    """
    if comm.size == 1 or mode == "off":
        return False
    sizes = comm.allgather_obj(comm.local_size)
    uniform = all(s == sizes[0] for s in sizes)
    free = shm_free_bytes()
    room = free is None or window_bytes + SHM_RESERVE <= free
    if mode == "on":
        if not uniform:
            raise ConfigError("train.node_shared", f"'on' needs the same number of ranks on every node; the "
                              f"nodes hold {sorted(set(sizes))} ranks; use auto or off")
        if not room:
            raise ConfigError("train.node_shared", f"'on' needs {(window_bytes + SHM_RESERVE) / 2**20:.0f} MiB "
                              f"of shared memory in {SHM_DIR}, {free / 2**20:.0f} MiB are free (in Docker: docker "
                              "run --shm-size=1g ...); or set train.node_shared=off")
    return uniform and room


def choose(cfg, comm, model, optimizer) -> Exchange:
    """The exchange this run uses (collective: every rank gets the same kind).

    ``train.node_shared``: ``auto`` (shared memory wherever it can run, on one node or several),
    ``on`` (required: ConfigError otherwise), ``off`` (one Allreduce per step).
    """
    window = SharedMemory.window_elements(model, optimizer, comm.local_size) * model.dtype.itemsize
    shared = all_or_nothing(comm, lambda: use_shared_memory(cfg.train.node_shared, comm, window),
                            "choosing the gradient exchange")
    if comm.size > 1 and not comm.any(not shared):  # DP: shared only if every rank agrees
        return SharedMemory(model, optimizer, comm)
    exchange = Allreduce(model, comm)
    if comm.size > 1 and cfg.train.node_shared == "auto":  # say why, in the header
        sizes = comm.allgather_obj(comm.local_size)  # DP: every rank takes this branch alike
        exchange.name += (f" (not shared memory: the nodes hold different numbers of ranks, {sorted(set(sizes))})"
                          if len(set(sizes)) > 1 else f" (not shared memory: no room for its window in {SHM_DIR})")
    return exchange
