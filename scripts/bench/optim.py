"""One rank: ``Optimizer.step`` alone, this checkout's against another checkout's, interleaved.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/optim.py --against /path/to/other/checkout

The optimizer's share of a step is a few ms, well inside the noise of whole steps on a shared
machine, so a change to ``dpbp/optim.py`` is timed here: both files are loaded into this one
process and their ``step`` calls alternate round by round on the same gradient (the reference
model's 1.86M float32 parameters, batch-mean scaling fused in as ``Trainer.step`` passes it), with
and without the squared norm the trainer already knows (``squares=``: no per-chunk dot; a checkout
whose ``step`` lacks that keyword is called as it can be, with ``check_finite`` where it has it, as
its trainer called it). Reported: medians and this/other. Without ``--against`` only this checkout
is timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import time
from pathlib import Path

import numpy as np
from _common import blas_arch, header, median, out_dir, parse_model, print_table, write_csv
from threadpoolctl import threadpool_limits

HERE = Path(__file__).resolve().parents[2]


def load_optim(checkout: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, checkout / "dpbp" / "optim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_kwargs(optimizer, hint: bool, squares: float) -> dict:
    """The keywords a trainer passes to this ``optimizer.step``: ``squares`` (or older: ``check_finite``)."""
    names = inspect.signature(optimizer.step).parameters
    if "squares" in names:
        return {"squares": squares} if hint else {}
    return {"check_finite": hint} if "check_finite" in names else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", help="another dpbp checkout (its dpbp/optim.py is timed alongside)")
    p.add_argument("--model", default="784,1024,1024,10", help="layer sizes giving the parameter count")
    p.add_argument("--optimizers", default="adam,rmsprop,momentum,sgd", help="optimizers to time")
    p.add_argument("--rounds", type=int, default=150, help="timed rounds, >= 20 (default 150)")
    p.add_argument("--out", help="folder for the CSV (default scripts/bench/results)")
    args = p.parse_args()
    if args.rounds < 20:
        p.error("--rounds must be >= 20")
    sizes = parse_model(args.model)
    n = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    versions = {"this": load_optim(HERE, "optim_this")}
    if args.against:
        versions["other"] = load_optim(Path(args.against).resolve(), "optim_other")
    header(f"optim.py: Optimizer.step alone, {n} float32 parameters, 1 BLAS thread, median of {args.rounds} rounds")
    rng = np.random.default_rng(0)
    grad_sum = (rng.standard_normal(n) * 40).astype(np.float32)
    scratch = np.empty(n, np.float32)
    rows = []
    with threadpool_limits(1):
        for name in args.optimizers.split(","):
            for hint in (True, False):
                opts = {v: m.make_optimizer(name, n, "float32") for v, m in versions.items()}
                known = float(np.dot(grad_sum.astype(np.float64), grad_sum.astype(np.float64))) / 512**2
                kwargs = {v: step_kwargs(o, hint, known) for v, o in opts.items()}
                params = {v: rng.standard_normal(n).astype(np.float32) for v in versions}
                times: dict[str, list[float]] = {v: [] for v in versions}
                order = list(versions)
                for r in range(args.rounds + 5):  # 5 untimed rounds first
                    for v in order if r % 2 else order[::-1]:
                        np.copyto(scratch, grad_sum)  # step clobbers its gradient
                        t0 = time.perf_counter()
                        opts[v].step(params[v], scratch, 1e-3, grad_scale=1 / 512, **kwargs[v])
                        if r >= 5:
                            times[v].append(time.perf_counter() - t0)
                row = {"optimizer": name, "hint": hint, "this_ms": median(times["this"]) * 1e3}
                if "other" in versions:
                    row["other_ms"] = median(times["other"]) * 1e3
                    row["this_over_other"] = row["this_ms"] / row["other_ms"]
                rows.append(row)
    columns = [("optimizer", "opt", ""), ("hint", "known squares", ""), ("this_ms", "this ms", ".3f")]
    if args.against:
        columns += [("other_ms", "other ms", ".3f"), ("this_over_other", "this/other", ".3f")]
    print_table(rows, columns)
    write_csv(out_dir(args.out) / "optim.csv", rows)
    key = "this_over_other" if args.against else "this_ms"
    print(f"SUMMARY optim.py [{n} params arch={blas_arch()}]: {key} "
          + " ".join(f"{r['optimizer']}{'+hint' if r['hint'] else ''}={r[key]:.3f}" for r in rows))


if __name__ == "__main__":
    main()
