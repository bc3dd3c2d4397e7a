"""dpbp versus PyTorch on the same MLP, global batch and optimizer, float32 and bf16 mixed precision (CPU).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/vs_torch.py

Install PyTorch's CPU build with exactly ``pip install torch==2.13.0`` (another spec may
download a multi-GB CUDA build). Runs, each as a fresh process (group), round-robin
``--repeats`` times, for SGD and Adam, in each precision of ``--precisions`` (float32; bf16:
PyTorch under ``torch.autocast("cpu", dtype=torch.bfloat16)``, dpbp with
``model.precision=bf16-mixed``):

* torch DDP: K ranks (gloo) x cores/K threads, via torch.multiprocessing spawn;
* torch 1 proc: one process, all cores as intra-op threads;
* dpbp mpirun -n 1: one rank, all cores as BLAS (and PyTorch) threads;
* dpbp mpirun -n K: K ranks x cores/K threads;
* dpbp serial: no mpirun (SerialComm), all cores (float32 only).

Each run reports the median step time over ``--steps`` barrier-synchronised steps after
warm-up (scripts/bench/_dpbp_worker.py, _torch_worker.py); the table shows the median over
repeats as global samples/s, the ratio to the best PyTorch configuration of the same optimizer,
and for dpbp the share of the step spent outside the matrix products (the worker's
``--products-floor``: the same products through the same backend, timed alone in that process).
Targets: dpbp@K / torch DDP@K >= 1.3, best dpbp / best torch >= 1.0 (stretch 1.2).
Without torch the dpbp float32 rows are still timed and the script exits 0.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from _common import (
    HERE,
    add_workload_args,
    blas_arch,
    cores,
    header,
    median,
    out_dir,
    parse_model,
    plot,
    print_table,
    run_worker,
    set_args,
    write_csv,
)


def run_torch(ranks: int, threads: int, precision: str, common: list[str]) -> dict:
    import json

    argv = [sys.executable, str(HERE / "_torch_worker.py"), "--ranks", str(ranks), "--threads", str(threads),
            "--precision", precision, *common]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"torch worker failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")


DPBP_PRECISION = {"float32": [], "bf16": ["model.precision=bf16-mixed"]}


def main() -> None:
    p = argparse.ArgumentParser(description="dpbp vs PyTorch (CPU) samples/s")
    add_workload_args(p)
    p.add_argument("--optimizers", default="sgd,adam", help="(default %(default)s)")
    p.add_argument("--precisions", default="float32,bf16",
                   help="float32 and/or bf16 (PyTorch autocast, dpbp bf16-mixed) (default %(default)s)")
    p.add_argument("--ranks", type=int, default=2, help="K for the multi-rank runs (default %(default)s)")
    p.add_argument("--cores", type=int, default=0, help="cores to use (default: this machine's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run, >= 20 (default %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="(default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="runs of each configuration (default %(default)s)")
    p.add_argument("--launcher", default="mpirun", help="MPI launcher; '-n K' is appended (default %(default)s)")
    args = p.parse_args()
    if args.steps < 20:
        p.error("--steps must be >= 20")
    parse_model(args.model)
    n_cores = args.cores or cores()
    k = args.ranks
    per_rank = max(1, n_cores // k)
    folder = out_dir(args.out)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if not precisions or any(x not in DPBP_PRECISION for x in precisions):
        p.error("--precisions takes float32 and/or bf16")

    header(f"vs_torch.py: model {args.model}, global batch {args.batch}, {' and '.join(precisions)}, {n_cores} cores, "
           f"median step of {args.steps} (after {args.warmup} warm-up), median over {args.repeats} runs")
    print(f"   CPU: {cpu_bf16_line()}")
    have_torch = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0
    if not have_torch:
        print("   PyTorch is not importable: timing dpbp float32 only. Install the CPU build with exactly "
              "`pip install torch==2.13.0` (another spec may pull a huge CUDA build).")
        precisions = [x for x in precisions if x == "float32"] or ["float32"]
    have_mpi = shutil.which(args.launcher.split()[0]) is not None
    if not have_mpi:
        print(f"   {args.launcher.split()[0]!r} not found on PATH: skipping the dpbp mpirun rows "
              "(pip install 'dpbp[mpi]' brings MPICH's mpirun)")

    configs = []  # (key, label, framework, (kind, ranks, threads, precision))
    for prec in precisions:
        tag = "" if prec == "float32" else "_bf16"
        name = "f32" if prec == "float32" else "bf16"
        if have_torch:
            configs.append((f"torch_ddp{k}{tag}", f"torch DDP gloo {k}x{per_rank}t {name}", "torch",
                            ("torch", k, per_rank, prec)))
            configs.append((f"torch_1p{tag}", f"torch 1 proc {n_cores}t {name}", "torch", ("torch", 1, n_cores, prec)))
        if have_mpi:
            configs.append((f"dpbp_mpi1{tag}", f"dpbp mpirun -n 1 x{n_cores}t {name}", "dpbp",
                            ("mpi", 1, n_cores, prec)))
            configs.append((f"dpbp_mpi{k}{tag}", f"dpbp mpirun -n {k} x{per_rank}t {name}", "dpbp",
                            ("mpi", k, per_rank, prec)))
        if prec == "float32":
            configs.append(("dpbp_serial", f"dpbp serial {n_cores}t {name}", "dpbp", ("serial", 1, n_cores, prec)))

    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for opt in optimizers:
            common = ["--model", args.model, "--batch", str(args.batch), "--optimizer", opt,
                      "--steps", str(args.steps), "--warmup", str(args.warmup)]
            for key, label, _, (kind, ranks, threads, prec) in configs:
                if kind == "torch":
                    res = run_torch(ranks, threads, prec, common)
                else:
                    res = run_worker(args.launcher if kind == "mpi" else None, ranks,
                                     [*common, "--threads", str(threads), "--products-floor",
                                      *set_args([*DPBP_PRECISION[prec], *args.set])])
                runs.setdefault((opt, key), []).append(res)
                print(f"   run {rep + 1}/{args.repeats} {opt:>4} {label:<30} {res['samples_per_s']:8.0f} samples/s",
                      flush=True)

    floors = matmul_floors(parse_model(args.model), args.batch, k, n_cores, per_rank, args.steps)
    rows = []
    for opt in optimizers:
        for key, label, framework, (_, ranks, threads, prec) in configs:
            rs = runs[(opt, key)]
            step_ms = median([r["step_ms"] for r in rs])
            products_ms = median([r.get("products_ms", float("nan")) for r in rs])
            rows.append({"optimizer": opt, "config": key, "label": label, "framework": framework, "ranks": ranks,
                         "threads_per_rank": threads, "precision": prec, "step_ms": step_ms,
                         "samples_per_s": args.batch * 1e3 / step_ms, "products_ms": products_ms,
                         "outside_products": 1 - products_ms / step_ms if framework == "dpbp" else float("nan"),
                         "runs": len(rs), "arch": rs[0].get("arch", blas_arch() if framework == "dpbp" else "torch"),
                         "model": args.model, "global_batch": args.batch})
        best_torch = max((r["samples_per_s"] for r in rows if r["optimizer"] == opt and r["framework"] == "torch"),
                         default=float("nan"))
        for r in rows:
            if r["optimizer"] == opt:
                r["vs_best_torch"] = r["samples_per_s"] / best_torch
    print_table(rows + floors, [("optimizer", "opt", ""), ("label", "configuration", ""),
                                ("step_ms", "step ms", ".1f"), ("samples_per_s", "samples/s", ".0f"),
                                ("vs_best_torch", "/best torch", ".2f"), ("products_ms", "products ms", ".1f"),
                                ("outside_products", "outside products", ".0%")])
    print("   (/best torch: samples/s over the fastest PyTorch row of the same optimizer; products ms: only the "
          "step's matrix products through dpbp's own backend at the rank's shard shape, timed alone in the same "
          "process; outside products: the rest of the step (casts, element-wise work, optimizer, exchange). "
          "Floor rows: only the step's matmuls through NumPy's OpenBLAS, timed in this process; the K-rank floor "
          "is one shard's, with the other cores idle)")
    write_csv(folder / "vs_torch.csv", rows + floors)

    summary = []
    for opt in optimizers:
        get = {r["config"]: r["samples_per_s"] for r in rows if r["optimizer"] == opt}
        parts = []
        for tag in ("", "_bf16"):
            if f"torch_ddp{k}{tag}" in get and f"dpbp_mpi{k}{tag}" in get:
                parts.append(f"dpbp@{k}ranks{tag}/torchDDP@{k}ranks{tag}="
                             f"{get[f'dpbp_mpi{k}{tag}'] / get[f'torch_ddp{k}{tag}']:.2f}")
        dpbp_key = max((c for c in get if c.startswith("dpbp")), key=get.get)
        torch_keys = [c for c in get if c.startswith("torch")]
        if torch_keys:
            torch_key = max(torch_keys, key=get.get)
            parts.append(f"dpbp_best/torch_best={get[dpbp_key] / get[torch_key]:.2f} ({dpbp_key} vs {torch_key})")
        parts.append(f"dpbp_best={get[dpbp_key]:.0f}/s")
        summary.append(f"{opt}: " + " ".join(parts))
    plot(folder / "vs_torch.png", lambda plt: draw(plt, rows, optimizers, configs))
    targets = "targets dpbp@K/DDP@K >= 1.3, best/best >= 1.0" if have_torch else "torch not installed"
    print(f"SUMMARY vs_torch.py [{args.model} b{args.batch} {n_cores} cores arch={blas_arch()}] ({targets}): "
          + "; ".join(summary))


def cpu_bf16_line() -> str:
    """AMX / AVX-512 BF16 of this CPU, as dpbp reports it (the bf16 rows depend on them)."""
    try:
        from dpbp.products import describe_cpu
    except ImportError:  # a checkout without dpbp.products
        return "unknown (this dpbp has no dpbp.products)"
    return describe_cpu()


def matmul_floors(layers, batch, k, n_cores, per_rank, steps) -> list[dict]:
    """Reference rows: the OpenBLAS matmul floor of a 1-process step and of one of K shards."""
    import time

    from step import MatmulFloor
    from threadpoolctl import threadpool_limits

    out = []
    for ranks, threads in ((1, n_cores), (k, per_rank)):
        rows = -(-batch // ranks)
        floor = MatmulFloor(layers, rows)
        with threadpool_limits(limits=threads, user_api="blas"):
            times = []
            for i in range(steps + 3):
                t0 = time.perf_counter()
                floor.step()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
        step_ms = median(times) * 1e3
        out.append({"optimizer": "-", "config": f"floor_{ranks}x{threads}t",
                    "label": f"matmul floor {ranks}x{threads}t" + (f" ({rows}-row shard)" if ranks > 1 else ""),
                    "framework": "floor", "ranks": ranks, "threads_per_rank": threads, "step_ms": step_ms,
                    "samples_per_s": batch * 1e3 / step_ms, "runs": 1, "arch": blas_arch(), "model": ",".join(
                        str(s) for s in layers), "global_batch": batch})
    return out


def draw(plt, rows, optimizers, configs):
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(configs)
    xs = np.arange(len(optimizers))
    for i, (key, label, _, _) in enumerate(configs):
        vals = [next(r["samples_per_s"] for r in rows if r["optimizer"] == o and r["config"] == key)
                for o in optimizers]
        ax.bar(xs + (i - (len(configs) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(xs, optimizers)
    ax.set_ylabel("global samples/s")
    ax.legend(fontsize=7)
    ax.set_title("dpbp vs PyTorch, CPU")
    return fig


if __name__ == "__main__":
    main()
