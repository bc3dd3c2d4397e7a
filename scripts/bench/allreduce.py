"""dpbp's gradient exchange inside real steps versus a raw mpi4py Allreduce of the same bytes.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE mpirun -n 2 python scripts/bench/allreduce.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/allreduce.py --ranks 2  # launches itself

Builds a real ``Trainer`` over ``MPIComm`` and wraps its exchange's ``combine`` (dpbp is not
edited): each call gets a barrier first and is timed, so the time is the combining itself (one
Allreduce; or, node-shared, the node barriers plus the sum of every rank's slot over this rank's
span, and across nodes the reduction of that span with its peers), not the wait for a slower
rank. Interleaved with each real step, a raw ``MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)`` of
the gradient's bytes is timed after a barrier. A time is the slowest rank's; the table gives
medians over ``--repeats`` steps and raw/dpbp (target >= 0.9: dpbp's exchange costs no more than
the bare collective).
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


def time_combine(trainer, comm, records: list) -> None:
    """Wrap ``trainer.exchange.combine``: a barrier, then the call, timed into ``records``."""
    real = trainer.exchange.combine

    def timed(*args, **kwargs):
        comm.barrier()
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        records.append(time.perf_counter() - t0)
        return out

    trainer.exchange.combine = timed


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
    records: list[float] = []
    time_combine(trainer, comm, records)
    nbytes = trainer.model.n_params * trainer.model.dtype.itemsize
    order = data_mod.epoch_permutation(trainer.data.train.n_samples, 0, 0)
    world = MPI.COMM_WORLD
    raw = None
    raw_t, dpbp_t, step_t = [], [], []
    for i in range(args.warmup + args.repeats):
        records.clear()
        comm.barrier()
        t0 = time.perf_counter()
        train_step(trainer, order, i)
        t_step = time.perf_counter() - t0
        if raw is None:
            raw = np.empty(trainer.model.n_params, trainer.model.dtype)
        raw[...] = 1e-3  # fresh values, as the gradient is freshly written before dpbp reduces it
        world.Barrier()
        t0 = time.perf_counter()
        world.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)
        t_raw = time.perf_counter() - t0
        if i >= args.warmup:
            raw_t.append(t_raw)
            dpbp_t.append(sum(records))
            step_t.append(t_step)
    every = comm.allgather_obj((raw_t, dpbp_t, step_t))
    if not comm.is_root:
        return
    raw_s = median(np.max([e[0] for e in every], axis=0).tolist())
    dpbp_s = median(np.max([e[1] for e in every], axis=0).tolist())
    step_s = median(np.max([e[2] for e in every], axis=0).tolist())
    row = {"ranks": comm.size, "threads": threads, "arch": blas_arch(), "model": args.model, "batch": args.batch,
           "bytes_per_step": nbytes, "exchange": trainer.exchange.name,
           "dpbp_ms": dpbp_s * 1e3, "raw_ms": raw_s * 1e3, "raw_over_dpbp": raw_s / dpbp_s,
           "dpbp_GBps": nbytes / dpbp_s / 1e9, "raw_GBps": nbytes / raw_s / 1e9, "step_ms": step_s * 1e3,
           "reduce_pct_of_step": 100 * dpbp_s / step_s, "repeats": args.repeats, "library": comm.library}
    print_table([row], [("ranks", "ranks", ""), ("bytes_per_step", "bytes/step", ""),
                        ("dpbp_ms", "dpbp ms", ".3f"), ("raw_ms", "raw ms", ".3f"),
                        ("raw_over_dpbp", "raw/dpbp", ".3f"), ("dpbp_GBps", "dpbp GB/s", ".2f"),
                        ("raw_GBps", "raw GB/s", ".2f"), ("step_ms", "step ms", ".1f"),
                        ("reduce_pct_of_step", "% of step", ".1f")])
    print(f"   MPI: {comm.library}; exchange: {trainer.exchange.name}; options: {args.set or 'defaults'}")
    write_csv(out_dir(args.out) / f"allreduce_{comm.size}ranks.csv", [row])
    print(f"SUMMARY allreduce.py [{comm.size} ranks, {nbytes / 1e6:.2f} MB/step, arch={blas_arch()}]: "
          f"raw/dpbp={row['raw_over_dpbp']:.3f} (target >= 0.9); dpbp {row['dpbp_ms']:.2f} ms vs raw "
          f"{row['raw_ms']:.2f} ms per step; reduction = {row['reduce_pct_of_step']:.1f}% of a {step_s * 1e3:.1f} "
          "ms step")


if __name__ == "__main__":
    main()
