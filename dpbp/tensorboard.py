"""TensorBoard event files of a run: the per-epoch metrics and per-layer gradient norms (``run.tensorboard``).

Written on rank 0 alone, through tensorboardX (the ``tensorboard`` extra: a pure-Python writer
of TensorBoard's own event format, a few hundred KB with its protobuf dependency, without
TensorFlow or PyTorch). One scalar per number of each epoch's record (``metrics.jsonl``), at
step = the epoch number, so runs with different batch sizes line up:

* ``loss/train``, ``loss/validation``; ``accuracy/...`` (classification) or ``rmse/...``,
  ``mse/...``, ``mae/validation``, ``r2/validation`` (regression);
* ``grad_norm/layer_1`` ... (the epoch's mean norm of each layer's gradient, the
  vanishing-gradient signal) and ``weight_norm/layer_1`` ...;
* ``lr``, ``samples_per_s``, ``seconds``.

View with ``tensorboard --logdir runs`` (every run directory's ``tensorboard/`` folder is one run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dpbp.errors import MissingExtraError

EVENTS_DIR = "tensorboard"  # inside the run directory
SPLITS = {"train": "train", "val": "validation"}


def require_writer():
    """The ``tensorboardX.SummaryWriter`` class; MissingExtraError (exit 1) naming the extra when it is missing."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as exc:
        raise MissingExtraError(f"run.tensorboard needs tensorboardX ({exc}): pip install 'dpbp[tensorboard]'") \
            from None
    return SummaryWriter


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard tags and values of one epoch record (see the module docstring); None values are left out."""
    out = {}
    for key, value in record.items():
        if key in ("epoch", "step") or value is None:
            continue
        split, _, metric = key.partition("_")
        tag = f"{metric}/{SPLITS[split]}" if split in SPLITS and metric else key
        if isinstance(value, list):
            out.update({f"{key}/layer_{i + 1}": float(v) for i, v in enumerate(value) if v is not None})
        elif isinstance(value, (int, float)):
            out[tag] = float(value)
    return out


class TensorBoardLog:
    """Writes each epoch record as scalars into ``folder`` (rank 0; other ranks hold no writer).

    Use as ``Trainer.on_epoch_end``; ``close()`` when training ends. Raises MissingExtraError
    on rank 0 when tensorboardX is not installed; OSError when the folder cannot be written.
    """

    def __init__(self, folder: str | Path, comm, first_epoch: int = 1):
        """``first_epoch``: the epoch this run writes first (a resumed run: the one after its checkpoint).

        Events of an earlier start of the run at that epoch or later (a run killed after its last
        checkpoint, or the abandoned future of a branch) are then purged by TensorBoard's readers
        (``purge_step``), so every epoch shows once, with the values of the current lineage. Each
        start writes its own file (the process id in the name: two starts in one second never
        overwrite each other).
        """
        self.folder = Path(folder)
        self.writer = None
        if comm.is_root:
            writer_class = require_writer()
            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer = writer_class(logdir=str(self.folder), purge_step=first_epoch,
                                       filename_suffix=f".{os.getpid()}.{time.monotonic_ns()}")

    def __call__(self, record: dict) -> None:
        if self.writer is None:
            return
        step = int(record["epoch"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a TensorBoard watching the run sees the epoch now

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
