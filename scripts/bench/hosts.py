"""The gradient exchanges across simulated hosts with throttled links (needs root: scripts/cluster-sim).

    python scripts/bench/hosts.py --hosts 2,4 --rates 1gbit,10gbit --before ../before

For each host count and link rate it builds one simulated cluster (network namespaces joined by
a bridge, every host's egress held to the rate by a token bucket, jumbo frames unless ``--mtu``),
then launches ``_dpbp_worker.py`` under mpiexec once per (exchange, optimizer), rounds
interleaved (the order rotates every round), and reads each host's link counters around the
timed steps. Exchanges:

* ``allreduce``: this checkout, ``train.node_shared=off`` (one flat Allreduce per step);
* ``hierarchical``: this checkout's default across nodes (node-shared memory on each host, each
  rank's span reduced with its peers on the other hosts);
* with ``--before DIR`` (a checkout that still has them): ``bucketed`` (``train.overlap_allreduce``),
  ``sharded`` (``train.shard_optimizer=on``), ``yield`` (flat Allreduce with ``DPBP_WAIT=yield``: MPI waits
  test and yield the core instead of spinning) and
  ``before-allreduce`` (its flat Allreduce, to compare the two checkouts).

Before each launch the cores' busy share over one second is recorded (``busy``: other work on
the machine; the simulated hosts share its cores, so ranks outnumber cores here).

Prints a table and one ``SUMMARY`` line; writes ``hosts.csv``. The byte bound is that of a
bandwidth-optimal reduction of S gradient bytes over N nodes, ``2 S (N - 1) / N`` per host and
direction; a host's counter also holds TCP/IP headers, acknowledgements and heartbeats.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import DEFAULT_OUT, OPENBLAS_VARS, REFERENCE_MODEL, median, write_csv

HERE = Path(__file__).resolve().parent
THIS = HERE.parent.parent
SIM = THIS / "scripts" / "cluster-sim"
WORKER = HERE / "_dpbp_worker.py"
VARIANTS = {  # name: (checkout: "this" or "before", dpbp overrides, environment)
    "allreduce": ("this", ["train.node_shared=off"], {}),
    "hierarchical": ("this", [], {}),
    "before-allreduce": ("before", ["train.node_shared=off"], {}),
    "bucketed": ("before", ["train.overlap_allreduce=true", "train.node_shared=off"], {}),
    "sharded": ("before", ["train.shard_optimizer=on"], {}),
    "yield": ("before", ["train.node_shared=off"], {"DPBP_WAIT": "yield"}),
}


def launch(cid: str, hosts: int, ranks: int, tree: Path, overrides: list[str], env: dict, args,
           optimizer: str) -> dict:
    """One mpiexec of the worker inside cluster ``cid``; returns its RESULT."""
    host_list = ",".join(f"dpbp-h{i}" for i in range(hosts))
    cmd = [str(SIM / "cluster.sh"), "exec", cid, "head", "env",
           "MPIR_CVAR_CH4_NETMOD=ucx", "UCX_TLS=self,tcp", "UCX_NET_DEVICES=eth0", f"DPBP_SIM_ID={cid}",
           f"PYTHONPATH={tree}", *(f"{k}={v}" for k, v in env.items()),
           "mpiexec", "-launcher", "ssh", "-launcher-exec", str(SIM / "ssh-ns"), "-iface", "eth0",
           "-hosts", host_list, "-ppn", str(ranks), "-n", str(hosts * ranks),
           sys.executable, str(WORKER), "--model", args.model, "--batch", str(args.batch), "--optimizer", optimizer,
           "--threads", "1", "--steps", str(args.steps), "--warmup", str(args.warmup), "--tx", "eth0",
           *(a for o in overrides for a in ("--set", o))]
    clean = {k: v for k, v in os.environ.items() if k not in OPENBLAS_VARS}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=clean)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def busy_share(seconds: float = 1.0) -> float:
    """The share of the machine's CPU time spent busy over ``seconds`` (from /proc/stat)."""
    def sample():
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    (t0, i0) = sample()
    time.sleep(seconds)
    (t1, i1) = sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", default="2,4", help="host counts (default %(default)s)")
    p.add_argument("--ranks-per-host", type=int, default=2)
    p.add_argument("--rates", default="1gbit,10gbit", help="link rates, tc units (default %(default)s)")
    p.add_argument("--mtu", type=int, default=9000, help="link MTU (default %(default)s: jumbo frames)")
    p.add_argument("--optimizers", default="sgd,adam")
    p.add_argument("--variants", default=",".join(VARIANTS), help="exchanges to time (default: all)")
    p.add_argument("--before", help="a checkout with the bucketed, sharded and yield variants")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model", default=REFERENCE_MODEL)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # the clusters come down in the finally blocks
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces): see scripts/cluster-sim/README.md")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if not args.before:
        variants = [v for v in variants if VARIANTS[v][0] == "this"]
    trees = {"this": THIS, "before": Path(args.before).resolve() if args.before else None}
    out = Path(args.out) if args.out else DEFAULT_OUT
    rows = []
    print(f"model {args.model}, global batch {args.batch}, {args.ranks_per_host} ranks per host, 1 BLAS thread each, "
          f"{os.cpu_count()} cores shared by every host; MTU {args.mtu}", flush=True)
    for hosts in (int(h) for h in args.hosts.split(",")):
        for rate in args.rates.split(","):
            cid = f"dpbp-b{os.getpid() % 100000}h{hosts}"
            up = [str(SIM / "cluster.sh"), "up", cid, "--hosts", str(hosts), "--rate", rate, "--mtu", str(args.mtu),
                  "--owner", str(os.getpid())]
            subprocess.run(up, check=True, timeout=120)
            try:
                for rnd in range(args.rounds):
                    order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
                    for optimizer in args.optimizers.split(","):
                        for variant in order:
                            tree, overrides, env = VARIANTS[variant]
                            load = busy_share()
                            r = launch(cid, hosts, args.ranks_per_host, trees[tree], overrides, env, args, optimizer)
                            grad_bytes = r["n_params"] * r["itemsize"]
                            bound = 2 * grad_bytes * (hosts - 1) / hosts
                            tx = list(r["tx_bytes_per_step"].values())
                            row = {"hosts": hosts, "rate": rate, "optimizer": optimizer, "variant": variant,
                                   "round": rnd, "step_ms": r["step_ms"], "samples_per_s": r["samples_per_s"],
                                   "tx_mean": sum(tx) / len(tx), "tx_max": max(tx), "bound": bound,
                                   "tx_over_bound": max(tx) / bound, "busy_before": load, "exchange": r["exchange"]}
                            rows.append(row)
                            print(f"{hosts} hosts {rate:>6} {optimizer:<4} {variant:<18} round {rnd}: "
                                  f"{r['step_ms']:7.1f} ms/step, tx/host {max(tx) / 1e6:6.2f} MB/step "
                                  f"({max(tx) / bound:.3f} x bound), busy before {load:.2f}  [{r['exchange'][:30]}]",
                                  flush=True)
            finally:
                subprocess.run([str(SIM / "cluster.sh"), "down", cid], timeout=120)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "hosts.csv", rows)
    print("\nmedian ms per step (x bound: tx bytes per host per step / 2 S (N-1)/N)")
    summary = []
    keys = sorted({(r["hosts"], r["rate"], r["optimizer"]) for r in rows}, key=lambda k: (k[0], len(k[1]), k[1], k[2]))
    for key in keys:
        cells, ms = [], {}
        for v in variants:
            these = [r for r in rows if (r["hosts"], r["rate"], r["optimizer"]) == key and r["variant"] == v]
            if these:
                ms[v] = median([r["step_ms"] for r in these])
                cells.append(f"{v} {ms[v]:.1f} ({median([r['tx_over_bound'] for r in these]):.2f}x)")
        print(f"{key[0]} hosts {key[1]:>6} {key[2]:<4}: " + ", ".join(cells))
        if "allreduce" in ms and "hierarchical" in ms:
            summary.append(f"h{key[0]}_{key[1]}_{key[2]}_flat/hier={ms['allreduce'] / ms['hierarchical']:.2f}")
    print("SUMMARY " + " ".join(summary))


if __name__ == "__main__":
    main()
