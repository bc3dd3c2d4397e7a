"""Times dpbp training steps on K ranks; started by vs_torch.py and scaling.py.

    mpirun -n K python scripts/bench/_dpbp_worker.py --model 784,1024,1024,10 --batch 512 --threads 1

Builds a ``Trainer`` over ``dpbp.comm.get_comm()`` (MPIComm under an MPI launcher,
SerialComm otherwise), runs warm-up steps, then times each ``Trainer.step`` between a
barrier and its end on every rank. The time of a step is the slowest rank's; the result
is the median over the timed steps. ``--free-steps N`` then also times N steps back to back
without barriers (mean step time). ``--tx IFACE`` also reads the interface's byte counters
(``/sys/class/net/IFACE/statistics``) on every host around the timed steps: the bytes each
host sent and received per step (cluster-sim: what crossed its link). ``--products-floor`` then
also times only the step's matrix products, through the model's own backend (``model.products``:
NumPy, PyTorch float32 or bf16-mixed) at this rank's shard shape, every rank at once after a
barrier: ``products_ms`` beside ``step_ms`` gives the step's share outside them. Rank 0 prints one line
``RESULT {json}``. Only ``Trainer``, ``Trainer.step`` and ``dpbp.comm.get_comm`` are used, so
the worker also times another checkout (``PYTHONPATH=that/checkout``).
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

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
    p.add_argument("--products-floor", action="store_true",
                   help="also time only the step's matrix products through the model's backend (products_ms)")
    p.add_argument("--tx", metavar="IFACE", help="count the bytes IFACE sends and receives per timed step, per host")
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
    counters = []
    for i in range(args.warmup + args.steps):
        comm.barrier()
        if args.tx and i in (args.warmup, args.warmup + args.steps - 1):
            counters.append(link_bytes(args.tx))
        t0 = time.perf_counter()
        train_step(trainer, order, i)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    comm.barrier()
    if args.tx:
        counters[-1] = link_bytes(args.tx)
    per_host = comm.allgather_obj((socket.gethostname(), counters))
    free_s = float("nan")
    if args.free_steps:  # DP: steps back to back, no barrier: what a real run sees (ranks may drift)
        comm.barrier()
        t0 = time.perf_counter()
        for i in range(args.free_steps):
            train_step(trainer, order, args.warmup + args.steps + i)
        comm.barrier()
        free_s = (time.perf_counter() - t0) / args.free_steps
    products_ms = products_floor(trainer, comm, args.steps) if args.products_floor else float("nan")
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
            "exchange": exchange_name(trainer), "products_ms": products_ms,
            "products": describe_products(trainer),
            "n_params": trainer.model.n_params, "itemsize": trainer.model.dtype.itemsize,
        }
        if args.tx:  # one reading per host (its ranks share the interface): (after - before) / steps
            hosts = dict(per_host)
            result["tx_bytes_per_step"] = {h: (c[1][0] - c[0][0]) / args.steps for h, c in sorted(hosts.items())}
            result["rx_bytes_per_step"] = {h: (c[1][1] - c[0][1]) / args.steps for h, c in sorted(hosts.items())}
        print("RESULT " + json.dumps(result), flush=True)


def describe_products(trainer) -> str:
    """The header's words for the matrix products' library (NumPy in checkouts without ``model.products``)."""
    products = getattr(trainer.model, "products", None)
    return products.describe() if products is not None else "NumPy BLAS, model dtype"


def products_floor(trainer, comm, steps: int) -> float:
    """Median ms (slowest rank) of only one step's matrix products on this rank's shard shape.

    The model's backend on preallocated arrays (random inputs, the model's weights): forward per
    layer, then per layer from the last dW and (above the input layer) delta_prev, in the order
    and with the reuse of a real step. Collective: every rank calls it.
    """
    model = trainer.model
    backend = getattr(model, "products", None)
    rows = trainer.x_shard.shape[0]
    rng = np.random.default_rng(comm.rank)
    sizes, dt = model.sizes, model.dtype
    acts = [rng.standard_normal((rows, n)).astype(dt) for n in sizes[:-1]]
    zs = [np.empty((rows, n), dt) for n in sizes[1:]]
    deltas = [rng.standard_normal((rows, n)).astype(dt) for n in sizes[1:]]
    gws = [np.empty_like(w) for w in model.weights]
    prevs = [np.empty((rows, n), dt) for n in sizes[:-1]]
    times = []
    for i in range(3 + steps):
        comm.barrier()
        t0 = time.perf_counter()
        for l, W in enumerate(model.weights):
            if backend is None:
                np.matmul(acts[l], W.T, out=zs[l])
            else:
                backend.forward(l, acts[l], W, zs[l])
        for l in range(len(model.weights) - 1, -1, -1):
            if backend is None:
                np.matmul(deltas[l].T, acts[l], out=gws[l])
                if l:
                    np.matmul(deltas[l], model.weights[l], out=prevs[l])
            else:
                backend.weight_grad(l, deltas[l], acts[l], gws[l])
                if l:
                    backend.backprop(l, deltas[l], model.weights[l], prevs[l])
        if i >= 3:
            times.append(time.perf_counter() - t0)
    every_rank = comm.allgather_obj(times)
    return median(np.max(np.array(every_rank), axis=0).tolist()) * 1e3


def exchange_name(trainer) -> str:
    """The start-up header's words for the exchange (``trainer.exchange`` is a string in older checkouts)."""
    ex = getattr(trainer, "exchange", "")
    return getattr(ex, "name", str(ex))


def link_bytes(iface: str) -> tuple[int, int]:
    """(tx_bytes, rx_bytes) of network interface ``iface`` (Linux counters)."""
    stats = Path("/sys/class/net") / iface / "statistics"
    return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())


if __name__ == "__main__":
    main()
