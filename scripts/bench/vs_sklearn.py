"""dpbp.MLPClassifier against scikit-learn's MLPClassifier: the same network on the same data, time and test accuracy.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/vs_sklearn.py   # MNIST: ~4 min on 2 cores

Data: MNIST from the IDX files in ``--mnist`` (default ``../shared/data/mnist`` beside this checkout,
or any folder holding ``train-images-idx3-ubyte.gz`` and the three others), pixels scaled to [0, 1];
without them, the built-in ``highdim`` set (70,000 x 784, 10 classes, 10,000 rows held out), so
nothing has to be downloaded. Both estimators get the same float32 arrays and the same settings:
hidden layers ``--hidden`` (256), relu, softmax + cross-entropy, Adam at lr ``--lr`` (1e-3), batch
``--batch`` (200, scikit-learn's 'auto'), ``--epochs`` epochs (10) with no early stopping and no
weight penalty (scikit-learn ``alpha=0``; dpbp ``normalize='none'``, the pixels are scaled already).
Timed: the whole ``fit`` call as a user makes it (each library's input checks included), median over
``--repeats`` rounds, interleaved. dpbp runs in this process (one rank, all cores as BLAS threads) and,
with ``--ranks K`` (default 2; 0 skips it), as the same script under ``mpirun -n K`` where every rank
calls ``fit`` on the full data (data-parallel, one BLAS thread each); rank 0 times it after a barrier.

A fourth row, the floor, times only the matrix products of the same training (forward, weight
gradients and backpropagated deltas of every step, NumPy float32 on preallocated arrays, this
process's BLAS threads): scikit-learn's time over it is the largest speedup that any trainer computing
the same products with NumPy's BLAS in one process could show at this network and these settings.

SUMMARY: scikit-learn's fit time / dpbp's (target >= 3 at equal test accuracy on 2 cores), with both
test accuracies, in one run. The ratio is formed within each round (the contestants run back to
back) and the median over rounds is reported, so a round disturbed by other work on the machine
moves it less than a ratio of medians would.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _common import header, median, out_dir, print_table, run_worker, write_csv

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's dpbp

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")


def load(mnist: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(name, X_train, y_train, X_test, y_test): float32 features, int64 labels."""
    from dpbp.data import load_source

    folder = Path(mnist)
    if all((folder / f).is_file() for f in MNIST_FILES):
        train = load_source(f"{folder / MNIST_FILES[0]},{folder / MNIST_FILES[1]}", dtype="float32")
        test = load_source(f"{folder / MNIST_FILES[2]},{folder / MNIST_FILES[3]}", dtype="float32")
        return f"MNIST ({folder})", train.x, train.y, test.x, test.y
    ds = load_source("highdim:n=70000,d=784,classes=10", dtype="float32", seed=0)
    return "built-in highdim:n=70000,d=784,classes=10 (no MNIST files found)", ds.x[:60000], ds.y[:60000], \
        ds.x[60000:], ds.y[60000:]


def estimators(args):
    from sklearn.neural_network import MLPClassifier as SkMLP

    from dpbp import MLPClassifier

    common = {"hidden_layer_sizes": tuple(args.hidden), "activation": "relu", "solver": "adam",
              "learning_rate_init": args.lr, "batch_size": args.batch, "max_iter": args.epochs, "random_state": 0}
    sk = SkMLP(**common, alpha=0.0, n_iter_no_change=args.epochs + 1, tol=0.0)
    dp = MLPClassifier(**common, normalize="none", n_iter_no_change=None, dtype="float32")
    return sk, dp


def products_floor(args, n_rows: int, n_features: int, n_classes: int) -> dict:
    """The matrix products alone of the same training (NumPy float32, preallocated, this process's BLAS threads).

    Per step of ``--batch`` rows (the last one of an epoch shorter), forward ``A W^T`` and, per layer,
    ``dW = delta^T A_prev`` and (below the top) ``delta W``: what any backprop trainer on NumPy must
    compute. Its time bounds every such trainer's fit time from below, so scikit-learn's time over
    it bounds the speedup any of them can show at the same network and settings.
    """
    from step import MatmulFloor

    sizes = [n_features, *args.hidden, n_classes]
    batches = [args.batch] * (n_rows // args.batch) + ([n_rows % args.batch] if n_rows % args.batch else [])
    floors = {n: MatmulFloor(sizes, n) for n in set(batches)}  # one step's operands per batch size
    start = time.perf_counter()
    for _ in range(args.epochs):
        for n in batches:
            floors[n].step()
    return {"seconds": time.perf_counter() - start, "accuracy": float("nan"), "epochs": args.epochs}


def timed_fit(est, X, y, X_test, y_test) -> dict:
    start = time.perf_counter()
    est.fit(X, y)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "accuracy": float(est.score(X_test, y_test)), "epochs": int(est.n_iter_)}


def worker(args) -> None:
    """Under mpirun: every rank loads the data and fits dpbp's estimator; rank 0 prints the RESULT line."""
    from dpbp.comm import get_comm

    comm = get_comm()
    _, X, y, X_test, y_test = load(args.mnist)
    _, dp = estimators(args)
    comm.barrier()
    result = timed_fit(dp, X, y, X_test, y_test)
    if comm.is_root:
        print("RESULT " + json.dumps(result), flush=True)


def run_ranks(args, ranks: int) -> dict:
    return run_worker(args.launcher, ranks, ["--worker", *sys.argv[1:]], timeout=3600, script=Path(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"),
                   help="folder with the four MNIST IDX files (default %(default)s); else a built-in set")
    p.add_argument("--hidden", type=int, nargs="+", default=[256], help="hidden layer sizes (default 256)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=2, help="rounds, each timing every contestant once")
    p.add_argument("--ranks", type=int, default=2, help="also time dpbp under mpirun -n RANKS (0: no)")
    p.add_argument("--launcher", default="mpirun")
    p.add_argument("--out", help="folder for vs_sklearn.csv (default scripts/bench/results)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*Stochastic Optimizer.*")  # scikit-learn's ConvergenceWarning
    if args.worker:
        worker(args)
        return
    header("dpbp.MLPClassifier vs scikit-learn MLPClassifier: fit time and test accuracy")
    name, X, y, X_test, y_test = load(args.mnist)
    print(f"   data: {name}: {len(X)} training and {len(X_test)} test rows, {X.shape[1]} features")
    print(f"   both: hidden {args.hidden} relu, softmax + cross-entropy, adam lr {args.lr:g}, batch {args.batch}, "
          f"{args.epochs} epochs, float32, no early stopping, no weight penalty")
    runs: dict[str, list[dict]] = {"scikit-learn": [], "dpbp, 1 process": []}
    if args.ranks:
        runs[f"dpbp, mpirun -n {args.ranks}"] = []
    floor = "floor: the matrix products alone (1 process)"
    runs[floor] = []
    for round_ in range(args.repeats):
        sk, dp = estimators(args)
        runs["scikit-learn"].append(timed_fit(sk, X, y, X_test, y_test))
        runs["dpbp, 1 process"].append(timed_fit(dp, X, y, X_test, y_test))
        if args.ranks:
            runs[f"dpbp, mpirun -n {args.ranks}"].append(run_ranks(args, args.ranks))
        runs[floor].append(products_floor(args, len(X), X.shape[1], int(y.max()) + 1))
        print(f"   round {round_ + 1}: " + ", ".join(f"{k} {v[-1]['seconds']:.1f} s ({100 * v[-1]['accuracy']:.2f} %)"
                                                    for k, v in runs.items()), flush=True)
    sk_times = [r["seconds"] for r in runs["scikit-learn"]]
    rows = [{"contestant": k, "fit_s": median([r["seconds"] for r in v]), "accuracy": v[-1]["accuracy"],
             "epochs": v[-1]["epochs"], "speedup": median([t / r["seconds"] for t, r in zip(sk_times, v)]),
             "all_s": " ".join(f"{r['seconds']:.1f}" for r in v),
             "ratios": " ".join(f"{t / r['seconds']:.2f}" for t, r in zip(sk_times, v))} for k, v in runs.items()]
    print_table(rows, [("contestant", "contestant", "s"), ("fit_s", "fit s (median)", ".1f"),
                       ("speedup", "sklearn/this (median of rounds)", ".2f"), ("accuracy", "test acc", ".4f"),
                       ("epochs", "epochs", "d"), ("all_s", "each round s", "s"), ("ratios", "each round ratio", "s")])
    write_csv(out_dir(args.out) / "vs_sklearn.csv", rows)
    floor_row = rows.pop()
    best = max(rows[1:], key=lambda r: r["speedup"])
    print(f"SUMMARY sklearn/dpbp fit time {rows[1]['speedup']:.2f} (1 process)"
          + (f", {rows[2]['speedup']:.2f} ({rows[2]['contestant']})" if len(rows) > 2 else "")
          + f"; test accuracy sklearn {100 * rows[0]['accuracy']:.2f} %, dpbp {100 * best['accuracy']:.2f} % "
          f"(target: >= 3 at equal accuracy); sklearn / the products alone {floor_row['speedup']:.2f} (the most "
          f"any NumPy backprop trainer can show with this network and these settings in one process)")


if __name__ == "__main__":
    main()
