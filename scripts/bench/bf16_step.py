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
from _common import (
    TimedCalls,
    add_workload_args,
    blas_arch,
    default_rows,
    header,
    load_dpbp_config,
    out_dir,
    parse_model,
    train_step,
    write_csv,
)

OPTIMIZERS = ("sgd", "adam")  # the two both sides build alike (torch.optim.SGD / Adam, lr 1e-3, defaults)


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


def dpbp_trainer(layers, optimizer: str, batch: int, threads: int, rows: int, phases: dict, calls: TimedCalls,
                 extra=()):
    """A step function for dpbp's Trainer (SerialComm, bf16-mixed); its phases are timed through ``calls``,
    which wraps the model's passes, the exchange's combine and update, and ``dpbp.data.gather_rows``."""
    from dpbp import data as data_mod
    from dpbp.comm import SerialComm
    from dpbp.train import Trainer

    cfg = load_dpbp_config(layers, batch, optimizer, threads, rows, extra=["model.precision=bf16-mixed", *extra])
    trainer = Trainer(cfg, SerialComm(), echo=lambda text: None)
    order = np.arange(trainer.data.train.n_samples)  # the rows in file order, as the PyTorch side takes them
    for obj, attr, name in ((data_mod, "gather_rows", "gather"), (trainer.model, "_forward", "forward"),
                            (trainer.model, "_loss_and_delta", "loss"), (trainer.model, "_backward", "backprop"),
                            (trainer.exchange, "combine", "combine"), (trainer.exchange, "update", "update")):
        calls.wrap(obj, attr, phases[name].append)
    return trainer, (lambda i: train_step(trainer, order, i))


def alternate(steps: dict, rounds: int, per_round: int) -> list[dict]:
    """After 5 warm-up steps of each (buffers, caches, thread pools): ``rounds`` rounds, each running
    ``per_round`` steps of every step function in turn; per round, each one's median seconds per step."""
    for i in range(5):
        for step in steps.values():
            step(i)
    result = []
    for r in range(rounds):
        times = {}
        for name, step in steps.items():
            ts = []
            for i in range(per_round):
                t0 = time.perf_counter()
                step(r * per_round + i)
                ts.append(time.perf_counter() - t0)
            times[name] = statistics.median(ts)
        result.append(times)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p, writes="CSV")
    p.add_argument("--optimizers", default="sgd,adam", help="sgd and/or adam (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="threads for both sides (default: all cores)")
    p.add_argument("--rounds", type=int, default=8, help="alternations, >= 3 (default %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="steps per round, >= 10 (default %(default)s)")
    args = p.parse_args()
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not optimizers or any(o not in OPTIMIZERS for o in optimizers):
        p.error(f"--optimizers takes {' and/or '.join(OPTIMIZERS)}, got {args.optimizers!r}")
    if args.rounds < 3 or args.steps < 10 or args.threads < 0:
        p.error("--rounds must be >= 3, --steps >= 10 and --threads >= 0")
    try:
        import torch
    except ImportError:
        raise SystemExit("bf16_step.py needs PyTorch: pip install torch==2.13.0 (the CPU build)") from None
    from dpbp.errors import DpbpError
    from dpbp.products import check_bf16_cpu

    try:
        check_bf16_cpu()
    except DpbpError as e:
        raise SystemExit(f"bf16_step.py: {e}") from None
    layers = parse_model(args.model)
    import os

    threads = args.threads or os.cpu_count() or 1
    rows, summary = [], []
    for n, optimizer in enumerate(optimizers):
        tp: dict = collections.defaultdict(list)
        dp: dict = collections.defaultdict(list)
        with TimedCalls() as calls:  # put back (gather_rows is module-wide) before the next optimizer wraps
            try:
                trainer, dpbp_step = dpbp_trainer(layers, optimizer, args.batch, threads, default_rows(args.batch),
                                                  dp, calls, args.set)
            except DpbpError as e:  # a bad --set
                raise SystemExit(f"bf16_step.py: {e}") from None
            torch.set_num_threads(threads)  # after the trainer, which sets it from train.threads too
            if n == 0:  # once the trainer has set the thread pools, so the header shows them as timed
                header(f"bf16_step.py: dpbp bf16-mixed vs PyTorch bf16 autocast, one process, {threads} PyTorch "
                       f"threads, {args.rounds} rounds x {args.steps} steps")
            torch_step = torch_trainer(layers, optimizer, trainer.data.train.x, trainer.data.train.y, args.batch, tp)
            rounds = alternate({"torch": torch_step, "dpbp": dpbp_step}, args.rounds, args.steps)
        ratios = [t["torch"] / t["dpbp"] for t in rounds]
        rows.extend({"optimizer": optimizer, "round": r + 1, "torch_step_ms": 1e3 * t["torch"],
                     "dpbp_step_ms": 1e3 * t["dpbp"], "torch_over_dpbp": ratio}
                    for r, (t, ratio) in enumerate(zip(rounds, ratios)))
        median = statistics.median(ratios)
        summary.append(f"{optimizer}: torch/dpbp={median:.3f}")
        print(f"\n{optimizer}: PyTorch / dpbp step time per round: {', '.join(f'{x:.3f}' for x in ratios)}")
        print(f"{optimizer}: median {median:.3f} (> 1: dpbp faster); step ms PyTorch "
              f"{1e3 * statistics.median(t['torch'] for t in rounds):.2f}, dpbp "
              f"{1e3 * statistics.median(t['dpbp'] for t in rounds):.2f}")
        for side, phases in (("PyTorch", tp), ("dpbp", dp)):
            parts = [f"{name} {1e3 * statistics.median(v):.2f}" for name, v in phases.items()]
            print(f"  {side:8s} ms per step (median of each phase): {', '.join(parts)}")
            rows.extend({"optimizer": optimizer, "side": side, "phase": name, "median_ms": 1e3 * statistics.median(v)}
                        for name, v in phases.items())
    path = out_dir(args.out) / "bf16_step.csv"
    write_csv(path, rows)
    print(f"SUMMARY bf16_step.py [{args.model} b{args.batch} {threads} threads arch={blas_arch()}] "
          f"(target torch/dpbp >= 1.0): {'; '.join(summary)}")


if __name__ == "__main__":
    main()
