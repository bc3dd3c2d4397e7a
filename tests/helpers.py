"""Small helpers shared by the tests (importable as ``helpers``)."""

from __future__ import annotations

import numpy as np

from dpbp.config import load_config


def small_config(*overrides: str, dtype: str = "float64"):
    """A quick float64 run whose data (301 rows, 271 after the split) and batch (17) divide by no rank count."""
    base = [
        "data.train=spirals:n=301", "data.val_fraction=0.1", "model.layers=[2,8,8,3]",
        f"model.dtype={dtype}", "train.batch_size=17", "train.epochs=2", "train.lr=0.05",
        "train.optimizer=adam", "train.check_sync_every=5", "run.dir=unused",
    ]
    return load_config(None, base + list(overrides))


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def mpirun(n: int) -> list[str]:
    """The launcher prefix for n ranks (MPICH from PyPI, or Open MPI run as root)."""
    import shutil
    import subprocess

    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        raise RuntimeError("mpirun not found: install the MPI extra with pip install '.[mpi,test]'")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    extra = ["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version else []
    return [exe, *extra, "-n", str(n)]


def as_format_1(path, out, normalize: str | None = None):
    """Rewrite checkpoint ``path`` to ``out`` as format 1 wrote it: no normaliser arrays or meta ``normalize``.

    ``normalize`` replaces the saved config's ``data.normalize``. Returns ``out``.
    """
    from dpbp import checkpoint as ckpt

    arrays, meta = ckpt.load_checkpoint(path)
    for name in ("norm_shift", "norm_scale"):
        arrays.pop(name)
    meta.pop("normalize")
    meta["format_version"] = 1
    if normalize is not None:
        meta["config"]["data"]["normalize"] = normalize
    ckpt.atomic_write_npz(out, arrays, meta)
    return out


def invoke(*args, comm: str = "serial", restore_signals: bool = True):
    """Run the ``dpbp`` CLI in-process (click's CliRunner) as one serial process, or on every rank
    (``comm="mpi"``, under mpirun); the signal handlers that ``dpbp train`` installs are put back."""
    import signal

    from click.testing import CliRunner

    from dpbp.cli import main
    from dpbp.signals import STOP_SIGNALS

    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        return CliRunner().invoke(main, [str(a) for a in args], env={"DPBP_COMM": comm})
    finally:
        if restore_signals:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


# Every way the ranks combine gradients (dpbp/exchange.py), as the tests under tests/mpi run them:
# one Allreduce; node-shared memory on one node; hierarchical: the same ranks split into virtual
# nodes (MPIComm(node_size=...)), so spans are also reduced between nodes. Real hosts: test_cluster_sim.py.
EXCHANGES = ("allreduce", "shared", "hierarchical")


def exchange_comm(kind: str):
    """The world communicator for exchange ``kind`` (under mpirun)."""
    from dpbp.comm import MPIComm

    if kind != "hierarchical":
        return MPIComm()
    size = MPIComm().size
    return MPIComm(node_size=2 if size % 2 == 0 and size > 2 else 1)  # 4 ranks: 2 x 2; 2 or 3: one per node


def exchange_setting(kind: str) -> str:
    """The config override that forces exchange ``kind``."""
    return "train.node_shared=off" if kind == "allreduce" else "train.node_shared=on"


def check_exchange(trainer, kind: str) -> None:
    """The trainer runs exchange ``kind`` (on more than one node for hierarchical)."""
    ex = trainer.exchange
    assert ex.kind == ("allreduce" if kind == "allreduce" else "shared"), ex.name
    if kind != "allreduce":
        assert (ex.nodes > 1) == (kind == "hierarchical"), ex.name
