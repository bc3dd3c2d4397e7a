"""dpbp's gradient reduction inside real steps versus a raw mpi4py Allreduce of the same bytes.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE mpirun -n 2 python scripts/bench/allreduce.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/allreduce.py --ranks 2  # launches itself

Builds a real ``Trainer`` over ``MPIComm`` and replaces ``trainer.comm`` with a timing proxy
(dpbp is not edited): every ``allreduce_`` the step makes gets a barrier first and is timed;
with ``--set train.overlap_allreduce=true`` the bucketed ``iallreduce_`` path is timed as the time
it exposes (starting each bucket + the final wait; no barrier, since it overlaps backprop);
with ``--set train.shard_optimizer=on`` the reduce-scatter + all-gather pair is timed; with the
node-shared exchange (``train.node_shared``, the default on one node) its node barriers (each
after a plain barrier) plus the summing of every rank's gradient slot over this rank's span.
Interleaved with each real step, a raw ``MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)`` on a
float32 buffer of the same size is timed after a barrier. A time is the slowest rank's; the
table gives medians over ``--repeats`` steps and raw/dpbp (target >= 0.9: dpbp's reduction
costs no more than the bare collective).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import (
    add_workload_args,
    blas_arch,
    cores,
    default_rows,
    header,
    load_dpbp_config,
    median,
    out_dir,
    parse_model,
    print_table,
    relaunch_under_mpi,
    train_step,
    under_mpi_launcher,
    write_csv,
)


class _TimedRequest:
    """A request from ``iallreduce_``: ``Wait``/``wait`` are timed, everything else forwarded."""

    def __init__(self, request, owner: TimedComm):
        self._request, self._owner = request, owner

    def _timed_wait(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self._owner.records.append([time.perf_counter() - t0, 0, "wait"])
        return out

    def Wait(self, *args, **kwargs):  # noqa: N802 - mpi4py's name
        return self._timed_wait(self._request.Wait, *args, **kwargs)

    def wait(self, *args, **kwargs):
        return self._timed_wait(self._request.wait, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._request, name)


class TimedComm:
    """Forwards everything to dpbp's communicator and times its gradient reduction.

    ``records``: [seconds, bytes reduced, call] per call. Blocking collectives get a barrier
    first, so their time is the collective's, not the wait for a slower rank. With the sharded
    optimizer the step's communication is reduce-scatter + a small allreduce + all-gather of
    the parameters; all three are counted (the all-gather carries no gradient bytes). The non-blocking
    path (``iallreduce_`` per bucket, then ``waitall`` or waits) is timed as the time it
    exposes: starting each bucket plus the final wait; no barrier (it overlaps backprop).
    """

    def __init__(self, inner):
        self._inner = inner
        self.records: list[list] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def allreduce_(self, buf):
        self._inner.barrier()
        t0 = time.perf_counter()
        out = self._inner.allreduce_(buf)
        self.records.append([time.perf_counter() - t0, buf.nbytes, "allreduce_"])
        return out

    def iallreduce_(self, buf):
        t0 = time.perf_counter()
        request = self._inner.iallreduce_(buf)
        self.records.append([time.perf_counter() - t0, buf.nbytes, "iallreduce_"])
        return _TimedRequest(request, self)

    def reduce_scatter_(self, send, recv, counts):
        """The sharded optimizer's gradient reduction (``train.shard_optimizer``): timed like ``allreduce_``."""
        self._inner.barrier()
        t0 = time.perf_counter()
        out = self._inner.reduce_scatter_(send, recv, counts)
        self.records.append([time.perf_counter() - t0, send.nbytes, "reduce_scatter_"])
        return out

    def node_barrier(self) -> None:
        """The node-shared exchange's barriers (``train.node_shared``): each after a plain barrier, like the rest."""
        self._inner.barrier()
        t0 = time.perf_counter()
        self._inner.node_barrier()
        self.records.append([time.perf_counter() - t0, 0, "node_barrier"])

    def time_node_sum(self, node, nbytes: int) -> None:
        """Time ``node.sum_span`` (adding up every rank's slot over this rank's span) as the reduction of ``nbytes``."""
        real = node.sum_span

        def timed() -> None:
            t0 = time.perf_counter()
            real()
            self.records.append([time.perf_counter() - t0, nbytes, "sum_span"])

        node.sum_span = timed

    def allgather_(self, buf, counts):
        """The sharded optimizer's parameter exchange after its update: counted, no bytes of gradient."""
        self._inner.barrier()
        t0 = time.perf_counter()
        out = self._inner.allgather_(buf, counts)
        self.records.append([time.perf_counter() - t0, 0, "allgather_"])
        return out

    def waitall(self, requests) -> None:
        plain = [r._request if isinstance(r, _TimedRequest) else r for r in requests]
        t0 = time.perf_counter()
        self._inner.waitall(plain)
        self.records.append([time.perf_counter() - t0, 0, "waitall"])


def main() -> None:
    p = argparse.ArgumentParser(description="dpbp gradient Allreduce vs raw mpi4py Allreduce")
    p.add_argument("--ranks", type=int, default=2, help="ranks when not started by mpirun (default %(default)s)")
    p.add_argument("--launcher", default="mpirun", help="launcher for --ranks (default %(default)s)")
    add_workload_args(p, writes="CSV")
    p.add_argument("--optimizer", default="adam", help="(default %(default)s)")
    p.add_argument("--repeats", type=int, default=60, help="timed steps, >= 50 (default %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="(default %(default)s)")
    args = p.parse_args()
    if args.repeats < 50:
        p.error("--repeats must be >= 50")
    if not under_mpi_launcher():
        relaunch_under_mpi(args.ranks, args.launcher)

    from mpi4py import MPI

    from dpbp import data as data_mod
    from dpbp.comm import MPIComm
    from dpbp.train import Trainer

    comm = MPIComm()
    layers = parse_model(args.model)
    threads = max(1, cores() // comm.local_size)
    cfg = load_dpbp_config(layers, args.batch, args.optimizer, threads, default_rows(args.batch), extra=args.set)
    trainer = Trainer(cfg, comm, echo=lambda s: None)
    if comm.is_root:
        header(f"allreduce.py: {comm.size} ranks x {trainer.threads} threads, model {args.model}, global batch "
               f"{args.batch}, median of {args.repeats} steps")
    timed = TimedComm(trainer.comm)
    trainer.comm = timed
    if getattr(trainer, "node", None) is not None:  # node-shared exchange: the sum over the slots is the reduction
        timed.time_node_sum(trainer.node, trainer.reduce_buf.nbytes)
    order = data_mod.epoch_permutation(trainer.data.train.n_samples, 0, 0)
    world = MPI.COMM_WORLD
    raw = None
    raw_t, dpbp_t, dpbp_bytes, dpbp_calls, step_t, by_call = [], [], [], [], [], []
    for i in range(args.warmup + args.repeats):
        timed.records.clear()
        comm.barrier()
        t0 = time.perf_counter()
        train_step(trainer, order, i)
        t_step = time.perf_counter() - t0
        nbytes = sum(r[1] for r in timed.records)
        if raw is None:
            raw = np.empty(nbytes // trainer.reduce_buf.itemsize, trainer.reduce_buf.dtype)
        raw[...] = 1e-3  # fresh values, as the gradient is freshly written before dpbp reduces it
        world.Barrier()
        t0 = time.perf_counter()
        world.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)
        t_raw = time.perf_counter() - t0
        if i >= args.warmup:
            raw_t.append(t_raw)
            dpbp_t.append(sum(r[0] for r in timed.records))
            dpbp_bytes.append(nbytes)
            dpbp_calls.append(sum(1 for r in timed.records if r[1]))
            calls: dict[str, float] = {}
            for seconds, _, name in timed.records:
                calls[name] = calls.get(name, 0.0) + seconds
            by_call.append(calls)
            step_t.append(t_step)
    trainer.comm = timed._inner
    every = comm.allgather_obj((raw_t, dpbp_t, step_t, by_call))
    if not comm.is_root:
        return
    raw_s = median(np.max([e[0] for e in every], axis=0).tolist())
    dpbp_s = median(np.max([e[1] for e in every], axis=0).tolist())
    step_s = median(np.max([e[2] for e in every], axis=0).tolist())
    nbytes = int(median(dpbp_bytes))
    kinds = list(dict.fromkeys(r[2] for r in timed.records))
    per_call = {k: median([max(e[3][i].get(k, 0.0) for e in every) for i in range(len(by_call))]) * 1e3
                for k in kinds}
    row = {"ranks": comm.size, "threads": threads, "arch": blas_arch(), "model": args.model, "batch": args.batch,
           "bytes_per_step": nbytes, "calls_per_step": int(median(dpbp_calls)), "dpbp_call": "+".join(kinds),
           "dpbp_ms": dpbp_s * 1e3, "raw_ms": raw_s * 1e3, "raw_over_dpbp": raw_s / dpbp_s,
           "dpbp_GBps": nbytes / dpbp_s / 1e9, "raw_GBps": nbytes / raw_s / 1e9, "step_ms": step_s * 1e3,
           "reduce_pct_of_step": 100 * dpbp_s / step_s, "repeats": args.repeats, "library": comm.library}
    print_table([row], [("ranks", "ranks", ""), ("bytes_per_step", "bytes/step", ""),
                        ("calls_per_step", "calls", ""), ("dpbp_ms", "dpbp ms", ".3f"), ("raw_ms", "raw ms", ".3f"),
                        ("raw_over_dpbp", "raw/dpbp", ".3f"), ("dpbp_GBps", "dpbp GB/s", ".2f"),
                        ("raw_GBps", "raw GB/s", ".2f"), ("step_ms", "step ms", ".1f"),
                        ("reduce_pct_of_step", "% of step", ".1f")])
    split = ", ".join(f"{k} {v:.3f} ms" for k, v in per_call.items())
    print(f"   MPI: {comm.library}; dpbp's calls per step (median, slowest rank): {split}; "
          f"options: {args.set or 'defaults'}")
    write_csv(out_dir(args.out) / f"allreduce_{comm.size}ranks.csv", [row])
    print(f"SUMMARY allreduce.py [{comm.size} ranks, {nbytes / 1e6:.2f} MB/step, arch={blas_arch()}]: "
          f"raw/dpbp={row['raw_over_dpbp']:.3f} (target >= 0.9); dpbp {row['dpbp_ms']:.2f} ms vs raw "
          f"{row['raw_ms']:.2f} ms per step; reduction = {row['reduce_pct_of_step']:.1f}% of a {step_s * 1e3:.1f} "
          "ms step")


if __name__ == "__main__":
    main()
