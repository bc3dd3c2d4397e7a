"""Shared helpers of the dpbp benchmarks: config, machine/BLAS description, launching, CSV, plots.

Not a benchmark itself. Every benchmark goes through dpbp's public paths (``Trainer``,
``Trainer.step``, ``dpbp.comm``), so it measures whatever the current code is.
"""

from __future__ import annotations

import csv
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
WORKER = HERE / "_dpbp_worker.py"
REFERENCE_MODEL = "784,1024,1024,10"
# Both make a current numpy's OpenBLAS pick a slower kernel; benchmark commands unset them together.
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# ----------------------------------------------------------------------------- config


def parse_model(text: str) -> list[int]:
    """'784,1024,1024,10' -> [784, 1024, 1024, 10] (at least an input and an output size)."""
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise SystemExit(f"--model must be comma-separated layer sizes like {REFERENCE_MODEL}, got {text!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise SystemExit(f"--model needs at least two positive sizes, got {text!r}")
    return sizes


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{what} must be positive integers, got {text!r}")
    return values


def dpbp_overrides(layers: Sequence[int], batch: int, optimizer: str, threads: int, n: int,
                   lr: float = 1e-3, extra: Sequence[str] = ()) -> list[str]:
    """``key=value`` overrides for the benchmark model on synthetic ``highdim`` data (no download).

    ``extra`` (from ``--set``) comes last, so it can change any dpbp option being benchmarked.
    """
    return [
        f"model.layers=[{','.join(str(s) for s in layers)}]",
        "model.activation=relu", "model.output=softmax", "model.loss=cross_entropy", "model.dtype=float32",
        f"data.train=highdim:n={n},d={layers[0]},classes={max(2, layers[-1])}",
        "data.normalize=none", "data.val_fraction=0",
        f"train.batch_size={batch}", f"train.optimizer={optimizer}", f"train.lr={lr}",
        f"train.threads={threads}", "train.check_sync_every=0", *extra,
    ]


def load_dpbp_config(layers, batch, optimizer, threads, n, lr=1e-3, extra: Sequence[str] = ()):
    from dpbp.config import load_config

    return load_config(None, dpbp_overrides(layers, batch, optimizer, threads, n, lr, extra))


SET_HELP = "extra dpbp config override key=value (repeatable), e.g. --set train.node_shared=off"


def add_workload_args(p, *, batch_help: str = "global batch", writes: str = "CSV/PNG") -> None:
    """The options every benchmark script takes: --model, --batch, --set and --out."""
    p.add_argument("--model", default=REFERENCE_MODEL, help="layer sizes (default %(default)s)")
    p.add_argument("--batch", type=int, default=512, help=f"{batch_help} (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--out", default=None, help=f"folder for {writes} (default scripts/bench/results)")


def set_args(values: Sequence[str] | None) -> list[str]:
    """``--set`` values as worker arguments."""
    return [a for v in values or () for a in ("--set", v)]


def train_step(trainer, order, i: int):
    """Global step ``i`` of ``trainer`` over ``order``, counted as ``Trainer.run`` counts it.

    Advancing ``state.global_step`` matters: the learning-rate schedule and the
    gradient-norm diagnostics (about 10 per epoch) follow it, so a benchmark that
    did not advance it would compute those diagnostics on every step.
    """
    out = trainer.step(order, i % trainer.steps_per_epoch)
    trainer.state.global_step += 1
    return out


class TimedCalls:
    """Times calls by wrapping functions or methods in this process only (dpbp's files are not touched).

    ``wrap(obj, name, record)`` replaces ``obj.name`` with a function that calls the original and
    passes its seconds to ``record(seconds)``; leaving the ``with`` block puts every original back
    (an instance's own attribute, or the class's method again).
    """

    def __init__(self):
        self._saved: list[tuple[object, str, object, bool]] = []

    def wrap(self, obj, name: str, record: Callable[[float], object]) -> None:
        if not hasattr(obj, name):
            return
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                record(time.perf_counter() - t0)

        self._saved.append((obj, name, original, name in vars(obj)))
        setattr(obj, name, timed)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for obj, name, original, own in reversed(self._saved):
            if own:
                setattr(obj, name, original)
            else:
                delattr(obj, name)  # back to the class's method
        self._saved.clear()


def default_rows(batch: int) -> int:
    """Synthetic rows: 40 reference batches, at least 8 batches of the given size."""
    return max(20480, 8 * batch)


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def blas_entries() -> list[dict]:
    from threadpoolctl import threadpool_info

    return [i for i in threadpool_info() if i.get("user_api") == "blas"]


def blas_line() -> str:
    """'openblas 0.3.31 arch=SkylakeX threads=2; OPENBLAS_CORETYPE unset, OPENBLAS_L2_SIZE unset'."""
    libs = [f"{i.get('internal_api')} {i.get('version')} arch={i.get('architecture', '?')} "
            f"threads={i.get('num_threads')}" for i in blas_entries()] or ["no BLAS found by threadpoolctl"]
    env = ", ".join(f"{k}={os.environ[k]}" if k in os.environ else f"{k} unset" for k in OPENBLAS_VARS)
    return "; ".join(libs) + f" ({env})"


def blas_arch() -> str:
    return ",".join(str(i.get("architecture", "?")) for i in blas_entries()) or "?"


def machine_line() -> str:
    import numpy as np

    return (f"{cores()} cores ({cpu_model()}), Python {platform.python_version()}, numpy {np.__version__}, "
            f"BLAS: {blas_line()}")


def openblas_env_warning() -> str | None:
    """A hint when the slowing OpenBLAS variables are set in this command's environment."""
    present = [k for k in OPENBLAS_VARS if k in os.environ]
    if not present:
        return None
    return (f"note: {', '.join(present)} set here; OpenBLAS runs kernel {blas_arch()}. For the fast kernel rerun with "
            f"`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python ...` and report both if the kernels differ.")


def dpbp_revision() -> str:
    """'dpbp 0.1.0 @ 50d6326' (+ ' with uncommitted changes in dpbp/' when the working tree differs)."""
    import dpbp

    text = f"dpbp {dpbp.__version__}"
    repo = Path(dpbp.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "dpbp"], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return text
    if rev.returncode == 0:
        text += f" @ {rev.stdout.strip()}" + (" with uncommitted changes in dpbp/" if dirty.stdout.strip() else "")
    return text


def header(title: str) -> None:
    print(f"== {title}")
    print(f"   code: {dpbp_revision()}")
    print(f"   machine: {machine_line()}")
    warning = openblas_env_warning()
    if warning:
        print(f"   {warning}")
    load = load_note()
    if load:
        print(f"   {load}")


def load_note() -> str | None:
    """A warning when other work already keeps the cores busy (timings are then noisy)."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return None
    if load1 < 0.5 * cores():
        return None
    return f"warning: 1-minute load average is {load1:.1f} on {cores()} cores before starting: other work competes"


# ----------------------------------------------------------------------------- statistics, output


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def out_dir(path: str | None) -> Path:
    folder = Path(path) if path else DEFAULT_OUT
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"   wrote {path}")


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as an aligned table; ``columns``: (key, title, format spec)."""
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key, "")
            if isinstance(value, float) and spec:
                line.append("-" if value != value else format(value, spec))  # NaN -> '-'
            else:
                line.append(str(value))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("   " + "  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if n == 0:
            print("   " + "  ".join("-" * w for w in widths))


def plot(path: Path, draw: Callable) -> None:
    """Call ``draw(plt)`` and save a PNG, or say why not (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"   (plot skipped: matplotlib is not installed; `pip install matplotlib` for {path.name})")
        return
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"   wrote {path}")


# ----------------------------------------------------------------------------- launching


def launcher_argv(launcher: str, ranks: int) -> list[str]:
    """``launcher`` (e.g. 'mpirun --bind-to core') plus ``-n ranks``; exits with a clear message if missing."""
    argv = shlex.split(launcher)
    if not argv:
        raise SystemExit("--launcher is empty")
    if shutil.which(argv[0]) is None:
        raise SystemExit(f"{argv[0]!r} not found on PATH: install MPI (pip install 'dpbp[mpi]' brings MPICH's "
                         "mpirun) or pass --launcher with the MPI launcher to use")
    return argv + ["-n", str(ranks)]


def under_mpi_launcher() -> bool:
    from dpbp.comm import launched_by_mpi

    return launched_by_mpi()


def relaunch_under_mpi(ranks: int, launcher: str = "mpirun") -> None:
    """Run this same script under ``launcher -n ranks`` and exit with its status."""
    argv = launcher_argv(launcher, ranks) + [sys.executable, sys.argv[0], *sys.argv[1:]]
    print(f"   launching: {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    raise SystemExit(subprocess.call(argv))


def run_worker(launcher: str | None, ranks: int, args: Sequence[str], timeout: float = 900,
               script: Path = WORKER) -> dict:
    """Run ``script`` (default _dpbp_worker.py) under ``launcher -n ranks``, or plainly when launcher is None;
    return the JSON of its ``RESULT`` line."""
    import json

    argv = (launcher_argv(launcher, ranks) if launcher else []) + [sys.executable, str(script), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"timed out after {timeout:.0f} s: {' '.join(argv)}") from None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"worker failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stdout[-2000:]}\n"
                     f"{proc.stderr[-3000:]}")
