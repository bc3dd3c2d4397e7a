"""What rank 0 prints while training: progress lines, epoch summaries.

On a terminal the progress line redraws in place; in a log file (Slurm, CI) it is
printed as a plain line every ``log_every`` steps, so logs stay readable.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable


def drop_stdout() -> None:
    """Send everything this process writes to stdout from now on to /dev/null.

    For when the reader went away (``dpbp train | head -1``, a closed terminal):
    training goes on silently, and the interpreter's final flush of what is still
    buffered cannot fail either. Mutates file descriptor 1 (or ``sys.stdout`` when it
    has none, as under click's CliRunner).
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
        sys.stdout = open(os.devnull, "w")  # lives as long as the process
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def write_stdout(text: str) -> None:
    """Write ``text`` to stdout and flush; once stdout is gone, drop it and all later output silently.

    Gone: the reader of a pipe went away (EPIPE) or the terminal hung up (EIO).
    """
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.EIO):
            raise
        drop_stdout()


def echo(text: str) -> None:
    """Print one line on stdout (rank 0's output), surviving a closed stdout like ``write_stdout``."""
    write_stdout(text + "\n")


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_rate(per_s: float | None) -> str:
    if per_s is None:
        return "-"
    return f"{per_s / 1000:.1f}k" if per_s >= 10_000 else f"{per_s:.0f}"


class Progress:
    """Progress reporting; a no-op unless ``enabled`` (rank 0)."""

    def __init__(self, echo: Callable[[str], None], *, enabled: bool, total_steps: int,
                 steps_per_epoch: int, epochs: int, log_every: int = 0, start_step: int = 0):
        self.echo, self.enabled = echo, enabled
        self.total_steps, self.steps_per_epoch, self.epochs = total_steps, steps_per_epoch, epochs
        # Explicit log_every: exactly that often. Automatic: ~10 lines an epoch, at most one per 5 s.
        self.log_every = log_every or max(1, steps_per_epoch // 10)
        self.min_interval = 0.0 if log_every else 5.0
        self.tty = enabled and sys.stdout.isatty()
        self.start_step, self.start_time = start_step, time.perf_counter()
        self._last_draw = -float("inf")  # the first due line prints at once

    def step(self, epoch: int, step_in_epoch: int, global_step: int, loss: float,
             epoch_samples: int, epoch_seconds: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        due = global_step % self.log_every == 0 or step_in_epoch == self.steps_per_epoch
        if self.tty:
            if now - self._last_draw < 0.1 and step_in_epoch != self.steps_per_epoch:
                return
        elif not due or now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        done = global_step - self.start_step
        eta = (now - self.start_time) / done * (self.total_steps - global_step) if done else 0.0
        rate = epoch_samples / epoch_seconds if epoch_seconds > 0 else None
        line = (f"epoch {epoch + 1}/{self.epochs} step {step_in_epoch}/{self.steps_per_epoch} "
                f"loss {loss:.4f} {format_rate(rate)} samples/s ETA {format_seconds(eta)}")
        if self.tty:
            write_stdout("\r" + line.ljust(78))
        else:
            self.echo(line)

    def clear(self) -> None:
        """Erase a redrawn progress line before other output."""
        if self.tty:
            write_stdout("\r" + " " * 78 + "\r")

    def epoch_summary(self, r: dict) -> None:
        """One line per epoch: loss and accuracy (classification) or RMSE, MAE and R2 (regression)."""
        if not self.enabled:
            return
        self.clear()
        val = ""
        if r.get("val_loss") is not None:
            val = f" | val loss {r['val_loss']:.4f} {_scores(r, 'val')}"
        self.echo(f"epoch {r['epoch']}/{self.epochs}: train loss {r['train_loss']:.4f} {_scores(r, 'train')}{val} | "
                  f"{format_rate(r['samples_per_s'])} samples/s {r['seconds']:.1f}s")


def _scores(r: dict, role: str) -> str:
    """'acc 97.10%' or 'rmse 52.1 mae 41.7 R2 0.412' (what the record has of them) for ``role``."""
    if f"{role}_accuracy" in r:
        return f"acc {100 * r[f'{role}_accuracy']:.2f}%"
    shown = (("rmse", "rmse", ".4g"), ("mae", "mae", ".4g"), ("r2", "R2", ".3f"))
    parts = [f"{name} {r[f'{role}_{key}']:{spec}}" for key, name, spec in shown if r.get(f"{role}_{key}") is not None]
    return " ".join(parts)
