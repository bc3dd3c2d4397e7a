"""One rank: dpbp's full training step versus the matmul floor and a plain NumPy step.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/step.py [--profile]

For each BLAS thread count (set with threadpoolctl) and optimizer, three things are timed
interleaved, one iteration each per round, so machine noise hits them alike:

* floor: only the step's matrix products on preallocated float32 arrays with ``out=``:
  forward ``A @ W.T`` per layer, backward ``delta.T @ A`` per layer and ``delta @ W`` per layer
  except the input layer's. No step can be faster than this;
* dpbp: ``Trainer.step`` over ``SerialComm`` (gather, forward+backprop, reduce, divide, update);
* plain: a hand-written NumPy step (gather by fancy indexing, relu, softmax-CE, backprop, SGD)
  with ordinary allocation, the simplest honest code a user would write (SGD rows only).

Reported: medians over the timed rounds, floor/dpbp (target >= 0.90 at 784-1024-1024-10,
batch 512) and samples/s. ``--profile`` breaks real ``Trainer.step`` calls into gather,
forward+backprop, collectives, optimizer and the rest, by wrapping those calls on the trainer
instance (dpbp's files are untouched, so it follows the current code), and splits the
forward+backprop into the matmul floor and its element-wise pieces, timed separately at the
same shapes with the NumPy calls dpbp makes (what remains is "model: rest").
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import (
    TimedCalls,
    add_workload_args,
    blas_arch,
    blas_entries,
    default_rows,
    header,
    load_dpbp_config,
    median,
    out_dir,
    parse_ints,
    parse_model,
    plot,
    print_table,
    train_step,
    write_csv,
)
from threadpoolctl import threadpool_limits

F32 = np.float32


# ----------------------------------------------------------------------------- the matmul floor


class MatmulFloor:
    """Preallocated operands of exactly the step's matrix products."""

    def __init__(self, layers: list[int], batch: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        pairs = list(zip(layers[:-1], layers[1:]))
        self.x = rng.standard_normal((batch, layers[0]), F32)
        self.w = [(rng.standard_normal((o, i), F32) * np.sqrt(2.0 / i)).astype(F32) for i, o in pairs]
        self.z = [np.empty((batch, o), F32) for _, o in pairs]
        self.delta = [(0.01 * rng.standard_normal((batch, o), F32)) for _, o in pairs]
        self.gw = [np.empty((o, i), F32) for i, o in pairs]

    def forward(self) -> None:
        a = self.x
        for w, z in zip(self.w, self.z):
            np.matmul(a, w.T, out=z)
            a = z

    def backward_dw(self) -> None:
        for l in range(len(self.w)):
            np.matmul(self.delta[l].T, self.x if l == 0 else self.z[l - 1], out=self.gw[l])

    def backward_dx(self) -> None:
        for l in range(len(self.w) - 1, 0, -1):  # no delta for the input layer
            np.matmul(self.delta[l], self.w[l], out=self.delta[l - 1])

    def step(self) -> None:
        self.forward()
        for l in range(len(self.w) - 1, -1, -1):  # backprop order: dW(l), then delta(l-1)
            np.matmul(self.delta[l].T, self.x if l == 0 else self.z[l - 1], out=self.gw[l])
            if l > 0:
                np.matmul(self.delta[l], self.w[l], out=self.delta[l - 1])


# ----------------------------------------------------------------------------- a plain NumPy step


class PlainNumpy:
    """What a user would write by hand: allocation everywhere, relu, softmax-CE, SGD."""

    def __init__(self, layers: list[int], seed: int = 0):
        rng = np.random.default_rng(seed)
        self.W = [(rng.standard_normal((o, i)) * np.sqrt(2.0 / i)).astype(F32) for i, o in zip(layers[:-1], layers[1:])]
        self.b = [np.zeros(o, F32) for o in layers[1:]]

    def step(self, x: np.ndarray, y: np.ndarray, idx: np.ndarray, lr: float) -> float:
        X, t = x[idx], y[idx]
        acts = [X]
        for W, b in zip(self.W[:-1], self.b[:-1]):
            acts.append(np.maximum(acts[-1] @ W.T + b, 0.0))
        logits = acts[-1] @ self.W[-1].T + self.b[-1]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        rows = np.arange(len(t))
        loss = float(-np.log(p[rows, t] + 1e-30).mean())
        d = p
        d[rows, t] -= 1.0
        d /= len(t)
        for l in range(len(self.W) - 1, -1, -1):
            gW = d.T @ acts[l]
            gb = d.sum(axis=0)
            if l > 0:
                d = (d @ self.W[l]) * (acts[l] > 0)
            self.W[l] -= lr * gW
            self.b[l] -= lr * gb
        return loss


# ----------------------------------------------------------------------------- dpbp's step, in pieces


class ModelPieces:
    """The element-wise work inside dpbp's forward/backward at the step's shapes, replicating its NumPy calls."""

    def __init__(self, layers: list[int], n: int, labels: np.ndarray):
        self.n, self.labels = n, labels
        rng = np.random.default_rng(1)
        self.b = [np.zeros(o, F32) for o in layers[1:]]
        self.z = [rng.standard_normal((n, o), F32) for o in layers[1:]]
        self.delta = [0.01 * rng.standard_normal((n, o), F32) for o in layers[1:]]
        self.scratch = np.empty(n * max(layers[1:]), F32)
        n_out = layers[-1]
        self.out = np.empty((n, n_out), F32)
        self.out_delta = np.empty((n, n_out), F32)
        self.row_max = np.empty(n, F32)
        self.row_sum = np.empty(n, F32)
        self.gb = [np.empty(o, F32) for o in layers[1:]]

    def forward_elementwise(self) -> None:
        last = len(self.z) - 1
        for l, (z, b) in enumerate(zip(self.z, self.b)):
            z += b
            if l < last:
                np.maximum(z, 0.0, out=z)

    def loss(self) -> None:
        z, out, rmax, rsum = self.z[-1], self.out, self.row_max, self.row_sum
        np.max(z, axis=1, out=rmax)  # softmax
        np.subtract(z, rmax[:, None], out=out)
        np.exp(out, out=out)
        np.sum(out, axis=1, out=rsum)
        out /= rsum[:, None]
        int(np.count_nonzero(np.argmax(out, axis=1) == self.labels))  # correct count
        np.copyto(self.out_delta, out)  # cross-entropy and its fused gradient
        np.log(rsum, out=rsum)
        rsum += rmax
        rows = np.arange(self.n)
        self.out_delta[rows, self.labels] -= 1.0
        _ = float(np.sum(rsum)) - float(np.sum(z[rows, self.labels]))

    def backward_elementwise(self) -> None:
        for l in range(len(self.z) - 1, -1, -1):
            np.sum(self.delta[l], axis=0, out=self.gb[l])  # bias gradient
            if l > 0:
                a = self.z[l - 1]
                s = self.scratch[: a.size].reshape(a.shape)
                np.sign(a, out=s)  # relu'
                self.delta[l - 1] *= s


class Instrumented(TimedCalls):
    """Times the parts of real ``Trainer.step`` calls by wrapping, on this process only, the calls
    the step makes: ``dpbp.data.gather_rows``, ``trainer.model.loss_and_grad_sum``,
    ``trainer.optimizer.step`` and the communicator's collectives. dpbp's files are not touched;
    whatever the current step does in between is "rest of the step"."""

    COMM_METHODS = ("allreduce_", "node_barrier", "bcast_", "barrier")

    def __init__(self, trainer):
        from dpbp import data as data_mod

        super().__init__()
        self.trainer, self.data_mod = trainer, data_mod
        self.acc = {"gather": 0.0, "model": 0.0, "comm": 0.0, "optimizer": 0.0}

    def _add(self, key: str):
        def record(seconds: float) -> None:
            self.acc[key] += seconds

        return record

    def __enter__(self):
        t = self.trainer
        self.wrap(self.data_mod, "gather_rows", self._add("gather"))
        self.wrap(t.model, "loss_and_grad_sum", self._add("model"))
        self.wrap(t.optimizer, "step", self._add("optimizer"))
        for name in self.COMM_METHODS:
            self.wrap(t.comm, name, self._add("comm"))
        return self

    def reset(self) -> None:
        for k in self.acc:
            self.acc[k] = 0.0


# ----------------------------------------------------------------------------- runs


def time_interleaved(fns: dict, rounds: int, warmup: int, before: dict | None = None) -> dict[str, list[float]]:
    """Call each fn once per round, in order; return per-fn lists of seconds after ``warmup`` rounds."""
    before = before or {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if name in before:
                before[name]()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description="dpbp step vs matmul floor vs plain NumPy (one rank)")
    add_workload_args(p)
    p.add_argument("--threads", default="1,2", help="BLAS thread counts to run (default %(default)s)")
    p.add_argument("--optimizers", default="adam,sgd", help="dpbp optimizers (default %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed rounds, >= 20 (default %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default %(default)s)")
    p.add_argument("--profile", action="store_true", help="also break dpbp's step into its pieces")
    args = p.parse_args()
    if args.steps < 20:
        p.error("--steps must be >= 20")

    from dpbp import data as data_mod
    from dpbp.comm import SerialComm
    from dpbp.train import Trainer, prepare_data

    layers = parse_model(args.model)
    threads_list = parse_ints(args.threads, "--threads")
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    rows = default_rows(args.batch)
    folder = out_dir(args.out)
    lr = 1e-3

    header(f"step.py: one rank, model {args.model}, batch {args.batch}, float32, median of {args.steps} rounds")
    data = prepare_data(load_dpbp_config(layers, args.batch, "sgd", 1, rows))
    x, y = data.train.x, data.train.y
    order = data_mod.epoch_permutation(data.train.n_samples, 0, 0)
    floor = MatmulFloor(layers, args.batch)
    results, profile_rows = [], []
    for threads in threads_list:
        with threadpool_limits(limits=threads, user_api="blas"):
            for opt in optimizers:
                cfg = load_dpbp_config(layers, args.batch, opt, threads, rows, extra=args.set)
                trainer = Trainer(cfg, SerialComm(), echo=lambda s: None, data=data)
                in_force = [i.get("num_threads") for i in blas_entries()]
                spe, k = trainer.steps_per_epoch, [0]

                def dpbp_step(trainer=trainer, k=k):
                    train_step(trainer, order, k[0])
                    k[0] += 1

                fns = {"floor": floor.step, "dpbp": dpbp_step}
                if opt == "sgd":
                    plain, j = PlainNumpy(layers), [0]

                    def plain_step(plain=plain, j=j, spe=spe):
                        s = j[0] % spe
                        plain.step(x, y, order[s * args.batch:(s + 1) * args.batch], lr)
                        j[0] += 1

                    fns["plain"] = plain_step
                t = {name: median(v) for name, v in time_interleaved(fns, args.steps, args.warmup).items()}
                row = {"threads": threads, "blas_threads": in_force[0] if in_force else "?", "arch": blas_arch(),
                       "optimizer": opt, "model": args.model, "batch": args.batch,
                       "floor_ms": t["floor"] * 1e3, "dpbp_ms": t["dpbp"] * 1e3,
                       "floor_over_dpbp": t["floor"] / t["dpbp"], "dpbp_samples_per_s": args.batch / t["dpbp"],
                       "floor_samples_per_s": args.batch / t["floor"],
                       "plain_ms": t["plain"] * 1e3 if "plain" in t else float("nan"),
                       "plain_over_dpbp": t["plain"] / t["dpbp"] if "plain" in t else float("nan")}
                results.append(row)
                if args.profile:
                    profile_rows.extend(profile(trainer, floor, order, threads, opt, args.steps, args.warmup))

    print_table(results, [("threads", "threads", ""), ("blas_threads", "in force", ""), ("optimizer", "opt", ""),
                          ("floor_ms", "floor ms", ".2f"), ("dpbp_ms", "dpbp ms", ".2f"),
                          ("floor_over_dpbp", "floor/dpbp", ".3f"), ("dpbp_samples_per_s", "dpbp samples/s", ".0f"),
                          ("plain_ms", "plain ms", ".2f"), ("plain_over_dpbp", "plain/dpbp", ".2f")])
    write_csv(folder / "step.csv", results)
    if profile_rows:
        print_profile(profile_rows)
        write_csv(folder / "step_profile.csv", profile_rows)
    plot(folder / "step.png", lambda plt: draw(plt, results, profile_rows))

    parts = [f"{r['optimizer']}@{r['threads']}t={r['floor_over_dpbp']:.2f}" for r in results]
    speed = [f"{r['optimizer']}@{r['threads']}t={r['dpbp_samples_per_s']:.0f}" for r in results]
    plain = [f"{r['threads']}t={r['plain_over_dpbp']:.2f}x" for r in results if r["optimizer"] == "sgd"]
    print(f"SUMMARY step.py [{args.model} b{args.batch} arch={blas_arch()}]: floor/dpbp (target >= 0.90) "
          f"{' '.join(parts)}; dpbp samples/s {' '.join(speed)}"
          + (f"; plain-numpy time / dpbp time (sgd) {' '.join(plain)}" if plain else ""))


STEP_PARTS = (  # measured inside real Trainer.step calls
    ("gather", "step: gather rows (data.gather_rows)"),
    ("model", "step: forward+backprop (model.loss_and_grad_sum)"),
    ("comm", "step: collectives (no-ops on SerialComm)"),
    ("optimizer", "step: optimizer.step (update, + scaling/checks fused there)"),
    ("rest", "step: rest (Python, bookkeeping, grad norms, ...)"),
)
MODEL_PARTS = (  # timed separately at the step's shapes
    ("mm_fwd", "  model: matmul forward A@W.T"),
    ("mm_dw", "  model: matmul backward delta.T@A"),
    ("mm_dx", "  model: matmul backward delta@W"),
    ("act_fwd", "  model: bias add + relu forward"),
    ("loss", "  model: softmax + CE loss/delta + correct count"),
    ("act_bwd", "  model: bias grad sums + relu backward"),
    ("model_rest", "  model: rest (Python, other element-wise)"),
)


def profile(trainer, floor, order, threads, opt, steps, warmup) -> list[dict]:
    """Break Trainer.step into its measured parts, and the model pass into matmuls and element-wise work.

    Each round: one instrumented Trainer.step, then each separately timed piece once.
    """
    n = trainer.batch_size
    pieces = ModelPieces(list(trainer.model.sizes), n, np.asarray(trainer.data.train.y[order[:n]]))
    k = [0]
    per_step: dict[str, list[float]] = {key: [] for key, _ in STEP_PARTS}
    per_step["step"] = []
    with Instrumented(trainer) as ins:

        def step():
            ins.reset()
            t0 = time.perf_counter()
            train_step(trainer, order, k[0])
            total = time.perf_counter() - t0
            k[0] += 1
            for key in ins.acc:
                per_step[key].append(ins.acc[key])
            per_step["rest"].append(total - sum(ins.acc.values()))
            per_step["step"].append(total)

        fns = {"step": step, "mm_fwd": floor.forward, "mm_dw": floor.backward_dw, "mm_dx": floor.backward_dx,
               "act_fwd": pieces.forward_elementwise, "loss": pieces.loss, "act_bwd": pieces.backward_elementwise}
        t = {key: median(v) for key, v in time_interleaved(fns, steps, warmup).items()}
    for key, values in per_step.items():
        t[key] = median(values[warmup:])  # the instrumented parts, same rounds
    t["model_rest"] = t["model"] - sum(t[key] for key, _ in MODEL_PARTS if key != "model_rest")
    step_s = t["step"]
    rows = [{"threads": threads, "optimizer": opt, "piece": label, "ms": t[key] * 1e3,
             "pct_of_step": 100 * t[key] / step_s} for key, label in STEP_PARTS + MODEL_PARTS]
    matmuls = t["mm_fwd"] + t["mm_dw"] + t["mm_dx"]
    rows.append({"threads": threads, "optimizer": opt, "piece": "matmul floor (all matmuls)", "ms": matmuls * 1e3,
                 "pct_of_step": 100 * matmuls / step_s})
    rows.append({"threads": threads, "optimizer": opt, "piece": "Trainer.step (median, instrumented)",
                 "ms": step_s * 1e3, "pct_of_step": 100.0})
    return rows


def print_profile(rows: list[dict]) -> None:
    keys = sorted({(r["threads"], r["optimizer"]) for r in rows}, key=lambda k: (k[1] != "adam", k[1], k[0]))
    labels = list(dict.fromkeys(r["piece"] for r in rows))
    table = []
    for label in labels:
        line = {"piece": label}
        for th, opt in keys:
            r = next(r for r in rows if r["piece"] == label and r["threads"] == th and r["optimizer"] == opt)
            line[f"{opt}{th}"] = f"{r['ms']:.2f} ({r['pct_of_step']:.0f}%)"
        table.append(line)
    print(f"   profile (ms per step, % of the measured Trainer.step; arch={blas_arch()}):")
    print_table(table, [("piece", "piece", "")] + [(f"{o}{t}", f"{o} {t}t", "") for t, o in keys])


def draw(plt, results: list[dict], profile_rows: list[dict]):
    n_plots = 2 if profile_rows else 1
    fig, axes = plt.subplots(1, n_plots, figsize=(6 * n_plots, 4))
    axes = np.atleast_1d(axes)
    labels = [f"{r['optimizer']} {r['threads']}t" for r in results]
    xs = np.arange(len(results))
    for off, key, name in ((-0.27, "floor_ms", "matmul floor"), (0.0, "dpbp_ms", "dpbp Trainer.step"),
                           (0.27, "plain_ms", "plain NumPy (sgd)")):
        axes[0].bar(xs + off, [r[key] for r in results], 0.27, label=name)
    axes[0].set_xticks(xs, labels)
    axes[0].set_ylabel("ms per step")
    axes[0].legend()
    axes[0].set_title("one training step")
    if profile_rows:
        keys = list(dict.fromkeys((r["threads"], r["optimizer"]) for r in profile_rows))
        parts = [label for key, label in STEP_PARTS if key != "model"] + [label for _, label in MODEL_PARTS]
        left = np.zeros(len(keys))
        for label in parts:
            ms = np.array([next(r["ms"] for r in profile_rows if r["piece"] == label and (r["threads"], r["optimizer"])
                                == k) for k in keys])
            axes[1].barh(range(len(keys)), ms, left=left, label=label.strip().split(" (")[0])
            left += ms
        measured = [next(r["ms"] for r in profile_rows if r["piece"].startswith("Trainer.step")
                         and (r["threads"], r["optimizer"]) == k) for k in keys]
        axes[1].scatter(measured, range(len(keys)), marker="|", s=400, color="black", label="Trainer.step")
        axes[1].set_yticks(range(len(keys)), [f"{o} {t}t" for t, o in keys])
        axes[1].set_xlabel("ms")
        axes[1].legend(fontsize=6)
        axes[1].set_title("pieces of dpbp's step")
    return fig


if __name__ == "__main__":
    main()
