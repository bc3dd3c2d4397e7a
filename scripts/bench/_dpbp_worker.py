"""Times dpbp training steps on K ranks; started by vs_torch.py and scaling.py.

    mpirun -n K python scripts/bench/_dpbp_worker.py --model 784,1024,1024,10 --batch 512 --threads 1

Builds a ``Trainer`` over ``dpbp.comm.get_comm()`` (MPIComm under an MPI launcher,
SerialComm otherwise), runs warm-up steps, then times each ``Trainer.step`` between a
barrier and its end on every rank. The time of a step is the slowest rank's; the result
is the median over the timed steps. ``--free-steps N`` then also times N steps back to back
without barriers (mean step time). Rank 0 prints one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _common import (
    REFERENCE_MODEL,
    SET_HELP,
    blas_arch,
    blas_entries,
    default_rows,
    load_dpbp_config,
    median,
    parse_model,
    train_step,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=REFERENCE_MODEL)
    p.add_argument("--batch", type=int, default=512, help="GLOBAL batch size")
    p.add_argument("--optimizer", default="adam", choices=("sgd", "momentum", "rmsprop", "adam"))
    p.add_argument("--threads", type=int, default=0, help="BLAS threads per rank (0: dpbp's automatic choice)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--free-steps", type=int, default=0,
                   help="then time this many steps back to back without barriers (0: skip)")
    p.add_argument("--rows", type=int, default=0, help="synthetic training rows (0: 40 reference batches)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    args = p.parse_args()

    from dpbp import data as data_mod
    from dpbp.comm import get_comm
    from dpbp.train import Trainer

    layers = parse_model(args.model)
    rows = args.rows or default_rows(args.batch)
    comm = get_comm()
    cfg = load_dpbp_config(layers, args.batch, args.optimizer, args.threads, rows, extra=args.set)
    trainer = Trainer(cfg, comm, echo=lambda s: None)
    blas_threads = [i.get("num_threads") for i in blas_entries()]
    order = data_mod.epoch_permutation(trainer.data.train.n_samples, cfg.train.seed, 0)
    times = []
    for i in range(args.warmup + args.steps):
        comm.barrier()
        t0 = time.perf_counter()
        train_step(trainer, order, i)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    free_s = float("nan")
    if args.free_steps:  # DP: steps back to back, no barrier: what a real run sees (ranks may drift)
        comm.barrier()
        t0 = time.perf_counter()
        for i in range(args.free_steps):
            train_step(trainer, order, args.warmup + args.steps + i)
        comm.barrier()
        free_s = (time.perf_counter() - t0) / args.free_steps
    every_rank = comm.allgather_obj(times)
    per_step = np.max(np.array(every_rank), axis=0)  # a global step ends when the slowest rank ends
    step_s = median(per_step.tolist())
    if comm.is_root:
        result = {
            "ranks": comm.size, "threads": trainer.threads, "blas_threads": blas_threads, "arch": blas_arch(),
            "model": args.model, "global_batch": trainer.batch_size, "optimizer": args.optimizer,
            "steps": args.steps, "step_ms": step_s * 1e3, "samples_per_s": trainer.batch_size / step_s,
            "step_ms_min": float(per_step.min()) * 1e3, "comm": type(comm).__name__,
            "set": args.set, "free_step_ms": free_s * 1e3, "free_samples_per_s": trainer.batch_size / free_s,
        }
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
