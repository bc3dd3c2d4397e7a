"""Per-rank peak memory of a real dpbp training run versus what the run accounts for.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE mpirun -n 2 python scripts/bench/memory.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/memory.py --ranks 2   # launches itself

Every rank: (1) baseline RSS after importing numpy, mpi4py (MPI initialised) and dpbp, before
any data is loaded; (2) builds a ``Trainer`` (loads the data) and runs ``--steps`` steps; (3)
reports its peak RSS (``ru_maxrss`` and ``VmHWM`` from /proc/self/status) and the arrays it holds,
found by walking the trainer's objects (so new buffers in dpbp are counted without editing
this script): the data set, params + grads, the reduce buffer, optimizer state, the gather
buffers and the model's workspace (activations for this rank's shard); with
``train.node_shared`` the node-shared window (parameters, optimizer state, every rank's
gradient slot: mapped by every rank of the node, so it is counted once per rank, as RSS does
for the pages a rank touches). Ratio = peak RSS /
(baseline + accounted), target <= 1.5. Both peak counters are read and then reset
(``/proc/self/clear_refs``; it clears ``ru_maxrss`` too) at each phase boundary: baseline,
loading (``Trainer(...)``), first step, remaining steps. The whole-run peak is the largest of
them; the loading and steps peaks show where it comes from.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from _common import (
    add_workload_args,
    blas_arch,
    cores,
    default_rows,
    header,
    load_dpbp_config,
    out_dir,
    parse_model,
    print_table,
    relaunch_under_mpi,
    train_step,
    under_mpi_launcher,
    write_csv,
)

MB = 1024 * 1024


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM in bytes (empty off Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak() -> tuple[int, int]:
    """(ru_maxrss, VmHWM) in bytes since the start or the last reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, proc_status().get("VmHWM", 0)


def _owner(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def arrays_under(obj, seen: set[int], max_depth: int = 8) -> int:
    """Bytes of the NumPy arrays reachable from ``obj`` through dpbp objects and containers, not in ``seen``."""
    total, stack, visited = 0, [(obj, 0)], set()
    while stack:
        o, depth = stack.pop()
        if id(o) in visited or depth > max_depth:
            continue
        visited.add(id(o))
        if isinstance(o, np.ndarray):
            root = _owner(o)
            if id(root) not in seen:
                seen.add(id(root))
                total += root.nbytes
        elif isinstance(o, dict):
            stack.extend((v, depth + 1) for v in o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in o)
        elif type(o).__module__.startswith("dpbp") and hasattr(o, "__dict__"):
            stack.extend((v, depth + 1) for v in vars(o).values())
    return total


def main() -> None:
    p = argparse.ArgumentParser(description="peak RSS per rank vs accounted arrays")
    p.add_argument("--ranks", type=int, default=2, help="ranks when not started by mpirun (default %(default)s)")
    p.add_argument("--launcher", default="mpirun", help="launcher for --ranks (default %(default)s)")
    add_workload_args(p, writes="CSV")
    p.add_argument("--optimizer", default="adam", help="(default %(default)s)")
    p.add_argument("--rows", type=int, default=0, help="synthetic training rows (default: 40 batches, >= 20480)")
    p.add_argument("--source", default="builtin", choices=("builtin", "npz"),
                   help="builtin: dpbp's highdim generator (float32, in row blocks); npz: the same set "
                        "saved first as a float32 .npz, loaded by dpbp's file loader (default %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="training steps before measuring (default %(default)s)")
    args = p.parse_args()
    if not under_mpi_launcher():
        relaunch_under_mpi(args.ranks, args.launcher)

    from dpbp import data as data_mod
    from dpbp.comm import MPIComm
    from dpbp.train import Trainer

    comm = MPIComm()  # MPI initialised: part of the baseline
    layers = parse_model(args.model)
    rows = args.rows or default_rows(args.batch)
    extra = list(args.set)
    tmp = None
    if args.source == "npz":
        tmp = tempfile.mkdtemp(prefix="dpbp-bench-") if comm.is_root else None
        tmp = comm.bcast_obj(tmp)
        path = os.path.join(tmp, "train.npz")
        if comm.is_root:  # generated in a child process, so this rank's baseline stays clean
            source = f"highdim:n={rows},d={layers[0]},classes={max(2, layers[-1])}"
            code = ("import sys, numpy as np; from dpbp import data as d; "
                    f"ds = d.load_source({source!r}, dtype='float32'); np.savez(sys.argv[1], x=ds.x, y=ds.y)")
            subprocess.run([sys.executable, "-c", code, path], check=True)
        comm.barrier()
        extra = [f"data.train={path}", *extra]
    baseline = proc_status().get("VmRSS", 0)
    peaks = {"baseline": _peak()}  # (ru_maxrss, VmHWM) of each phase; each reset clears both counters
    can_reset = reset_peak()
    threads = max(1, cores() // comm.local_size)
    cfg = load_dpbp_config(layers, args.batch, args.optimizer, threads, rows, extra=extra)
    trainer = Trainer(cfg, comm, echo=lambda s: None)
    peaks["loading"] = _peak()
    order = data_mod.epoch_permutation(trainer.data.train.n_samples, 0, 0)
    reset_peak()
    train_step(trainer, order, 0)  # the first step allocates the workspace
    peaks["first step"] = _peak()
    reset_peak()
    for i in range(1, args.steps):
        train_step(trainer, order, i)
    peaks["steps"] = _peak()
    status = proc_status()

    seen: set[int] = set()
    model = trainer.model
    parts = {
        "data": arrays_under(trainer.data, seen),
        # train.node_shared: params, optimizer state and every rank's gradient slot, mapped by all ranks
        "node_window": arrays_under([model.params] if trainer.exchange.copies == "per node" else [], seen),
        "params": arrays_under([model.params], seen),
        "exchange": arrays_under(trainer.exchange, seen),  # gradient (+ tail) buffer, the span's sum
        "optimizer": arrays_under(trainer.optimizer, seen),
        "gather_buffers": arrays_under([trainer.x_shard, trainer.y_shard], seen),
        "workspace": arrays_under(model, seen),
        "other": arrays_under(trainer, seen),
    }
    accounted = sum(parts.values())
    held = trainer.data.train.n_samples
    shard_lo, shard_hi = data_mod.shard_bounds(trainer.batch_size, comm.size, comm.rank)
    row = {
        "rank": comm.rank, "ranks": comm.size, "threads": threads, "model": args.model, "batch": args.batch,
        "optimizer": args.optimizer, "steps": args.steps, "source": cfg.data.train, "shard_rows": shard_hi - shard_lo,
        "data_rows_held": held, "data_rows_total": rows, "data_held": "full" if held >= rows else "shard",
        "baseline_MB": baseline / MB, **{f"{k}_MB": v / MB for k, v in parts.items()},
        "accounted_MB": accounted / MB, "expected_MB": (baseline + accounted) / MB,
        "ru_maxrss_MB": max(p[0] for p in peaks.values()) / MB,
        "VmHWM_MB": max(p[1] for p in peaks.values()) / MB,
        "loading_peak_MB": peaks["loading"][1] / MB if can_reset else float("nan"),
        "steps_peak_MB": peaks["steps"][1] / MB if can_reset else float("nan"),
        "VmRSS_end_MB": status.get("VmRSS", 0) / MB,
    }
    expected = row["expected_MB"]
    row["ratio_maxrss"] = row["ru_maxrss_MB"] / expected
    row["ratio_steps_peak"] = row["steps_peak_MB"] / expected
    row["ratio_rss_end"] = row["VmRSS_end_MB"] / expected
    rows_all = comm.allgather_obj(row)
    if tmp is not None and comm.is_root:
        shutil.rmtree(tmp, ignore_errors=True)
    if not comm.is_root:
        return
    header(f"memory.py: {comm.size} ranks x {threads} threads, model {args.model}, global batch {args.batch}, "
           f"{args.optimizer}, {rows} rows from {args.source} ({cfg.data.train}), after {args.steps} steps (MB = MiB)")
    print_table(rows_all, [("rank", "rank", ""), ("baseline_MB", "baseline", ".1f"), ("data_MB", "data", ".1f"),
                           ("node_window_MB", "node window", ".1f"), ("params_MB", "params", ".1f"),
                           ("exchange_MB", "exchange", ".1f"),
                           ("optimizer_MB", "optim", ".1f"), ("gather_buffers_MB", "gather", ".1f"),
                           ("workspace_MB", "workspace", ".1f"), ("other_MB", "other", ".1f"),
                           ("expected_MB", "base+acct", ".1f"), ("ru_maxrss_MB", "ru_maxrss", ".1f"),
                           ("VmHWM_MB", "VmHWM", ".1f"),
                           ("loading_peak_MB", "peak loading", ".1f"),
                           ("steps_peak_MB", "peak in steps", ".1f"), ("VmRSS_end_MB", "RSS end", ".1f"),
                           ("ratio_maxrss", "maxrss/exp", ".2f"), ("ratio_steps_peak", "steps/exp", ".2f")])
    r0 = rows_all[0]
    print(f"   data: every rank holds the {r0['data_held']} training set ({r0['data_rows_held']} of "
          f"{r0['data_rows_total']} rows) and trains on a {r0['shard_rows']}-row shard of each global batch")
    write_csv(out_dir(args.out) / f"memory_{comm.size}ranks_{args.source}.csv", rows_all)
    worst_whole = max(r["ratio_maxrss"] for r in rows_all)
    worst_steps = max(r["ratio_steps_peak"] for r in rows_all)
    print(f"SUMMARY memory.py [{comm.size} ranks, {args.model}, {rows} rows, {args.source}, arch={blas_arch()}]: "
          "worst rank peak "
          f"RSS/(baseline+accounted) = {worst_whole:.2f} over the whole run, {worst_steps:.2f} during the training "
          f"steps (target <= 1.5); rank 0: peak {r0['ru_maxrss_MB']:.0f} MiB (loading {r0['loading_peak_MB']:.0f}, "
          f"steps {r0['steps_peak_MB']:.0f}) vs {r0['expected_MB']:.0f} MiB baseline+accounted")


if __name__ == "__main__":
    main()
