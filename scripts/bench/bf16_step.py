"""One process: dpbp's bf16-mixed step against PyTorch's bf16 autocast step, interleaved round by round.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/bf16_step.py --optimizers sgd,adam

vs_torch.py times each configuration in its own process, one after another, so on a noisy machine
its ratios move by several per cent between runs. This script builds both trainers in ONE process
(dpbp's ``Trainer`` with ``SerialComm`` and ``model.precision=bf16-mixed``; a PyTorch ``nn.Sequential``
of Linear/ReLU under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with ``torch.optim.SGD``/``Adam``),
on the same data, model, batch and thread count, and alternates ``--rounds`` rounds of ``--steps``
steps of each. It prints every round's ratio (PyTorch step time / dpbp step time: > 1 means dpbp is
faster), their median, and each side's median time per phase: PyTorch's gather, forward + loss,
backward and optimizer step; dpbp's gather, forward, loss, backprop, combine (the exchange's sums and
per-layer squared norms, the NaN/Inf rule's input) and update. Needs PyTorch (``pip install
torch==2.13.0``) and a CPU with AVX-512 BF16 or AMX.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import numpy as np
from _common import REFERENCE_MODEL, default_rows, header, load_dpbp_config, parse_model, train_step


def torch_trainer(layers, optimizer: str, x: np.ndarray, y: np.ndarray, batch: int, phases: dict):
    """A step function for PyTorch's autocast training of the same MLP on the same rows; fills ``phases``."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    mods: list = []
    for i, (n_in, n_out) in enumerate(zip(layers[:-1], layers[1:])):
        mods.append(nn.Linear(n_in, n_out))
        if i < len(layers) - 2:
            mods.append(nn.ReLU())
    model = nn.Sequential(*mods)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    steps = x.shape[0] // batch

    def step(i: int) -> None:
        t0 = time.perf_counter()
        idx = torch.arange((i % steps) * batch, (i % steps + 1) * batch)
        xb, yb = xt.index_select(0, idx), yt.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(xb)
        loss = loss_fn(logits.float(), yb)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        for name, dt in (("gather", t1 - t0), ("forward + loss", t2 - t1), ("backward", t3 - t2),
                         ("optimizer", t4 - t3)):
            phases[name].append(dt)

    return step


def dpbp_trainer(layers, optimizer: str, batch: int, threads: int, rows: int, phases: dict):
    """A step function for dpbp's Trainer (SerialComm, bf16-mixed); its phases are timed by wrapping, on
    the instances only, the model's passes and the exchange's combine and update."""
    from dpbp import data as data_mod
    from dpbp.comm import SerialComm
    from dpbp.train import Trainer

    cfg = load_dpbp_config(layers, batch, optimizer, threads, rows, extra=["model.precision=bf16-mixed"])
    trainer = Trainer(cfg, SerialComm(), echo=lambda text: None)
    order = np.arange(trainer.data.train.n_samples)  # the rows in file order, as the PyTorch side takes them

    def timed(obj, attr: str, name: str) -> None:
        inner = getattr(obj, attr)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                phases[name].append(time.perf_counter() - t0)

        setattr(obj, attr, wrapper)

    timed(trainer.model, "_forward", "forward")
    timed(trainer.model, "_loss_and_delta", "loss")
    timed(trainer.model, "_backward", "backprop")
    timed(trainer.exchange, "combine", "combine")
    timed(trainer.exchange, "update", "update")
    gather = data_mod.gather_rows

    def gather_timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = gather(*args, **kwargs)
        phases["gather"].append(time.perf_counter() - t0)
        return out

    data_mod.gather_rows = gather_timed  # the trainer calls it through the module
    return trainer, (lambda i: train_step(trainer, order, i % trainer.steps_per_epoch))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=REFERENCE_MODEL)
    p.add_argument("--batch", type=int, default=512, help="global batch (default %(default)s)")
    p.add_argument("--optimizers", default="sgd,adam", help="(default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads for both (default: all cores)")
    p.add_argument("--rounds", type=int, default=8, help="alternations, >= 3 (default %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="steps per round, >= 10 (default %(default)s)")
    args = p.parse_args()
    if args.rounds < 3 or args.steps < 10:
        p.error("--rounds must be >= 3 and --steps >= 10")
    try:
        import torch
    except ImportError:
        raise SystemExit("bf16_step.py needs PyTorch: pip install torch==2.13.0 (the CPU build)") from None
    from dpbp.products import check_bf16_cpu

    check_bf16_cpu()
    layers = parse_model(args.model)
    import os

    threads = args.threads or os.cpu_count() or 1
    header(f"bf16_step.py: dpbp bf16-mixed vs PyTorch bf16 autocast, one process, {threads} threads, "
           f"{args.rounds} rounds x {args.steps} steps")
    for optimizer in args.optimizers.split(","):
        tp: dict = collections.defaultdict(list)
        dp: dict = collections.defaultdict(list)
        trainer, dpbp_step = dpbp_trainer(layers, optimizer, args.batch, threads, default_rows(args.batch), dp)
        torch.set_num_threads(threads)  # after the trainer, which sets it from train.threads too
        torch_step = torch_trainer(layers, optimizer, trainer.data.train.x, trainer.data.train.y, args.batch, tp)
        for i in range(5):  # warm-up: buffers, caches, thread pools
            torch_step(i)
            dpbp_step(i)
        ratios, rounds = [], []
        for r in range(args.rounds):
            times = {}
            for name, step in (("torch", torch_step), ("dpbp", dpbp_step)):
                ts = []
                for i in range(args.steps):
                    t0 = time.perf_counter()
                    step(r * args.steps + i)
                    ts.append(time.perf_counter() - t0)
                times[name] = statistics.median(ts)
            ratios.append(times["torch"] / times["dpbp"])
            rounds.append(times)
        print(f"\n{optimizer}: PyTorch / dpbp step time per round: {', '.join(f'{x:.3f}' for x in ratios)}")
        print(f"{optimizer}: median {statistics.median(ratios):.3f} (> 1: dpbp faster); step ms PyTorch "
              f"{1e3 * statistics.median(t['torch'] for t in rounds):.2f}, dpbp "
              f"{1e3 * statistics.median(t['dpbp'] for t in rounds):.2f}")
        for side, phases in (("PyTorch", tp), ("dpbp", dp)):
            parts = [f"{name} {1e3 * statistics.median(v):.2f}" for name, v in phases.items()]
            print(f"  {side:8s} ms per step (median of each phase): {', '.join(parts)}")


if __name__ == "__main__":
    main()
