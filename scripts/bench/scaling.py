"""Strong and weak scaling of dpbp over K ranks on one machine (all its cores at every K).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/scaling.py
    python scripts/bench/scaling.py --ranks 1,2,4,8,16 --launcher "mpirun --bind-to core" --steps 30

For each K: ``LAUNCHER -n K python scripts/bench/_dpbp_worker.py`` with
threads per rank = max(1, cores // K); strong scaling keeps the global batch at ``--batch``
(512), weak scaling uses ``--weak-batch`` x K (256 x K). K above the core count oversubscribes
(MPICH from PyPI needs no flag; Open MPI needs ``--launcher "mpirun --oversubscribe"``, plus
``--allow-run-as-root`` as root). Reported: global samples/s (median step over ``--steps``
barrier-synchronised steps, median over ``--repeats`` launches; "free-running": the mean of as
many further steps run back to back without barriers, as in real training) and efficiency =
samples/s(K) / samples/s(1): the core count is fixed, so 1.0 means splitting into ranks costs nothing. Target:
throughput(8) / throughput(2) >= 0.6 (oversubscribed ranks degrade gracefully).
"""

from __future__ import annotations

import argparse

from _common import (
    add_workload_args,
    blas_arch,
    cores,
    header,
    launcher_argv,
    median,
    out_dir,
    parse_ints,
    parse_model,
    plot,
    print_table,
    run_worker,
    set_args,
    write_csv,
)


def main() -> None:
    p = argparse.ArgumentParser(description="dpbp strong/weak scaling over mpirun ranks")
    p.add_argument("--ranks", default="1,2,4,8", help="rank counts K (default %(default)s)")
    p.add_argument("--launcher", default="mpirun", help="MPI launcher and its flags; '-n K' is appended "
                   "(default %(default)s)")
    add_workload_args(p, batch_help="strong scaling global batch")
    p.add_argument("--weak-batch", type=int, default=256, help="weak scaling: global batch per rank "
                   "(default %(default)s)")
    p.add_argument("--modes", default="strong,weak", help="(default %(default)s)")
    p.add_argument("--optimizer", default="adam", help="(default %(default)s)")
    p.add_argument("--cores", type=int, default=0, help="cores to share among ranks (default: this machine's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per launch (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="(default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="launches per point (default %(default)s)")
    args = p.parse_args()
    parse_model(args.model)
    ranks = parse_ints(args.ranks, "--ranks")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"strong", "weak"}:
        p.error("--modes takes strong and/or weak")
    launcher_argv(args.launcher, 1)  # a clear error now if the launcher is missing
    n_cores = args.cores or cores()
    folder = out_dir(args.out)
    header(f"scaling.py: model {args.model}, {args.optimizer}, {n_cores} cores shared by K ranks "
           f"(threads/rank = max(1, {n_cores} // K)), launcher '{args.launcher} -n K', median step of {args.steps}")

    runs: dict[tuple[str, int], list[dict]] = {}
    for rep in range(args.repeats):
        for mode in modes:
            for k in ranks:
                batch = args.batch if mode == "strong" else args.weak_batch * k
                threads = max(1, n_cores // k)
                res = run_worker(args.launcher, k, ["--model", args.model, "--batch", str(batch), "--optimizer",
                                                    args.optimizer, "--threads", str(threads), "--steps",
                                                    str(args.steps), "--warmup", str(args.warmup),
                                                    "--free-steps", str(args.steps), *set_args(args.set)])
                runs.setdefault((mode, k), []).append(res)
                print(f"   run {rep + 1}/{args.repeats} {mode:>6} K={k:<3} x{threads}t batch {batch:<5} "
                      f"{res['samples_per_s']:8.0f} samples/s (free-running {res['free_samples_per_s']:.0f})",
                      flush=True)

    rows = []
    for mode in modes:
        base = None
        for k in ranks:
            rs = runs[(mode, k)]
            batch = rs[0]["global_batch"]
            step_ms = median([r["step_ms"] for r in rs])
            sps = batch * 1e3 / step_ms
            free_sps = batch * 1e3 / median([r["free_step_ms"] for r in rs])
            base = (sps, free_sps) if k == ranks[0] else base
            rows.append({"mode": mode, "ranks": k, "threads_per_rank": max(1, n_cores // k), "global_batch": batch,
                         "step_ms": step_ms, "samples_per_s": sps, "efficiency_vs_first": sps / base[0],
                         "free_samples_per_s": free_sps, "free_efficiency_vs_first": free_sps / base[1],
                         "oversubscribed": k * max(1, n_cores // k) > n_cores, "arch": rs[0]["arch"],
                         "model": args.model, "optimizer": args.optimizer, "cores": n_cores,
                         "launcher": args.launcher})
    print_table(rows, [("mode", "mode", ""), ("ranks", "K", ""), ("threads_per_rank", "threads", ""),
                       ("global_batch", "global batch", ""), ("step_ms", "step ms", ".1f"),
                       ("samples_per_s", "samples/s", ".0f"),
                       ("efficiency_vs_first", f"eff vs K={ranks[0]}", ".2f"),
                       ("free_samples_per_s", "free-run samples/s", ".0f"),
                       ("free_efficiency_vs_first", "free-run eff", ".2f"), ("oversubscribed", "oversub", "")])
    write_csv(folder / "scaling.csv", rows)
    plot(folder / "scaling.png", lambda plt: draw(plt, rows, modes))

    parts = []
    for mode in modes:
        get = {r["ranks"]: r["samples_per_s"] for r in rows if r["mode"] == mode}
        free = {r["ranks"]: r["free_samples_per_s"] for r in rows if r["mode"] == mode}
        line = " ".join(f"K{k}={get[k]:.0f}" for k in ranks)
        if 8 in get and 2 in get:
            line += f" thr(8)/thr(2)={get[8] / get[2]:.2f} (free-running {free[8] / free[2]:.2f})"
        parts.append(f"{mode}: {line}")
    print(f"SUMMARY scaling.py [{args.model} {n_cores} cores arch={blas_arch()}] samples/s "
          f"(target thr(8)/thr(2) >= 0.6): " + "; ".join(parts))


def draw(plt, rows, modes):
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode]
        line = ax.plot([r["ranks"] for r in rs], [r["samples_per_s"] for r in rs], marker="o", label=mode)[0]
        ax.plot([r["ranks"] for r in rs], [r["free_samples_per_s"] for r in rs], marker="x", linestyle="--",
                color=line.get_color(), label=f"{mode}, free-running")
    ax.set_xscale("log", base=2)
    ks = sorted({r["ranks"] for r in rows})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("ranks K (all cores shared)")
    ax.set_ylabel("global samples/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("dpbp scaling")
    return fig


if __name__ == "__main__":
    main()
