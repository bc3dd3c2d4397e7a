"""Times PyTorch training steps of the benchmark MLP; started by vs_torch.py.

    python scripts/bench/_torch_worker.py --ranks 2 --threads 1 --optimizer adam   # DDP, gloo
    python scripts/bench/_torch_worker.py --ranks 1 --threads 2 --optimizer sgd    # one process
    python scripts/bench/_torch_worker.py --ranks 1 --threads 2 --precision bf16   # bf16 autocast

Same model (Linear/ReLU stack, softmax cross-entropy), float32, the same synthetic data
(dpbp's ``highdim`` generator), the same global batch split into the same contiguous rank
shards, ``torch.optim.SGD``/``Adam`` with default settings. ``--precision bf16`` runs the forward
pass (and so the backward) under ``torch.autocast("cpu", dtype=torch.bfloat16)``: PyTorch's own
mixed precision (bf16 products, float32 weights, optimizer and loss). With ``--ranks K > 1`` K processes
are spawned (torch.multiprocessing) and wrapped in DistributedDataParallel over gloo. Each
step is timed from a barrier to its end on every rank; a step takes as long as its slowest
rank; rank 0 prints ``RESULT {json}`` with the median.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from _common import REFERENCE_MODEL, default_rows, load_dpbp_config, median, parse_model


def run(rank: int, world: int, args: argparse.Namespace, init_file: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    from dpbp import data as data_mod
    from dpbp.train import prepare_data

    layers = parse_model(args.model)
    rows = args.rows or default_rows(args.batch)
    data = prepare_data(load_dpbp_config(layers, args.batch, args.optimizer, args.threads, rows))
    x = torch.from_numpy(data.train.x)
    y = torch.from_numpy(data.train.y.astype(np.int64))
    n = x.shape[0]
    order = torch.from_numpy(data_mod.epoch_permutation(n, 0, 0))

    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(layers[:-1], layers[1:])):
        mods.append(nn.Linear(n_in, n_out))
        if i < len(layers) - 2:
            mods.append(nn.ReLU())
    model: nn.Module = nn.Sequential(*mods)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    steps_per_epoch = data_mod.num_batches(n, args.batch)

    times = []
    for i in range(args.warmup + args.steps):
        s = i % steps_per_epoch
        lo, hi = data_mod.batch_bounds(n, args.batch, s)
        r0, r1 = data_mod.shard_bounds(hi - lo, world, rank)
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        idx = order[lo + r0 : lo + r1]
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = model(xb)
        loss = loss_fn(logits.float(), yb)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if world > 1:
        every_rank: list = [None] * world
        dist.all_gather_object(every_rank, times)
        dist.destroy_process_group()
    else:
        every_rank = [times]
    per_step = np.max(np.array(every_rank), axis=0)
    step_s = median(per_step.tolist())
    if rank == 0:
        result = {"ranks": world, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "model": args.model, "global_batch": args.batch, "optimizer": args.optimizer,
                  "steps": args.steps, "precision": args.precision, "step_ms": step_s * 1e3,
                  "samples_per_s": args.batch / step_s,
                  "step_ms_min": float(per_step.min()) * 1e3, "ddp": world > 1}
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=REFERENCE_MODEL)
    p.add_argument("--batch", type=int, default=512, help="GLOBAL batch size")
    p.add_argument("--optimizer", default="adam", choices=("sgd", "adam"))
    p.add_argument("--precision", default="float32", choices=("float32", "bf16"),
                   help="float32, or bf16 autocast (mixed precision)")
    p.add_argument("--ranks", type=int, default=1, help="processes; > 1 means DDP over gloo")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rows", type=int, default=0, help="synthetic training rows (0: 40 reference batches)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "ddp_init")
        if args.ranks == 1:
            run(0, 1, args, init_file)
        else:
            import torch.multiprocessing as mp

            mp.spawn(run, args=(args.ranks, args, init_file), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
