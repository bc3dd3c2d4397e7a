"""Pictures of a run: loss, accuracy (or RMSE and R2) and per-layer gradient norms from ``metrics.jsonl``.

matplotlib is an optional extra (``pip install 'dpbp[plot]'``); without it
``plot_run`` raises a DpbpError that says how to install it.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpbp.errors import DataError, DpbpError


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run directory, oldest first."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"no metrics.jsonl in {run_dir} (is it a dpbp run directory?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
    if not records:
        raise DataError(f"{path} has no epochs yet")
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train/val loss, accuracy (a regression: RMSE and validation R2) and per-layer gradient norms.

    Returns the PNG path.

    The default output is ``<run_dir>/training.png``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DpbpError("dpbp plot needs matplotlib: pip install 'dpbp[plot]' (or pip install matplotlib)") from None
    records = read_metrics(run_dir)
    if out is None:
        out = Path(run_dir) / "training.png"
        if out.is_symlink():  # a run directory is never written through a link
            raise DpbpError(f"{out} is a symbolic link; dpbp does not write through it (give -o FILE)")
    out = Path(out)
    epochs = [r["epoch"] for r in records]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in records]

    fig, (ax_loss, ax_acc, ax_grad) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    ax_loss.plot(epochs, series("train_loss"), label="train", marker=".")
    ax_loss.plot(epochs, series("val_loss"), label="validation", marker=".")
    ax_loss.set(title="loss", xlabel="epoch", yscale="log")
    if any("train_rmse" in r or "val_rmse" in r for r in records):  # a regression: no accuracy
        ax_acc.plot(epochs, series("train_rmse"), label="train", marker=".")
        ax_acc.plot(epochs, series("val_rmse"), label="validation", marker=".")
        ax_acc.set(title="RMSE (targets' own units)", xlabel="epoch", yscale="log")
        if any(r.get("val_r2") is not None for r in records):
            ax_r2 = ax_acc.twinx()
            ax_r2.plot(epochs, series("val_r2"), label="validation R2", color="tab:green", linestyle="--")
            ax_r2.set_ylabel("validation R2")
            ax_r2.legend(fontsize="small", loc="center right")
    else:
        ax_acc.plot(epochs, [100 * v for v in series("train_accuracy")], label="train", marker=".")
        ax_acc.plot(epochs, [100 * v for v in series("val_accuracy")], label="validation", marker=".")
        ax_acc.set(title="accuracy (%)", xlabel="epoch")
    norms = [r.get("grad_norm") for r in records]
    n_layers = max((len(n) for n in norms if n), default=0)
    for layer in range(n_layers):
        ax_grad.plot(epochs, [n[layer] if n else float("nan") for n in norms], label=f"layer {layer + 1}",
                     marker=".")
    ax_grad.set(title="gradient norm per layer (weights and biases)", xlabel="epoch",
                yscale="log")
    for ax in (ax_loss, ax_acc, ax_grad):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"dpbp run {Path(run_dir).resolve().name}: {len(records)} epochs, step {records[-1].get('step')}")
    try:
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise DpbpError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out
