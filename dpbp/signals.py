"""Preemption: turn SIGTERM, SIGINT, SIGUSR1 and SIGHUP into a flag the training loop polls.

Slurm (``--signal``, ``scancel``, time limits) and ``mpirun`` deliver these to the
rank processes. The handler only records the signal; the ranks agree at the next
step boundary (the flag rides in the step's Allreduce), rank 0 writes a
checkpoint, and every rank exits with ``PREEMPTED_EXIT_CODE`` so a batch script can
requeue. A second signal exits at once.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)  # SIGHUP: the terminal closed
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" -- requeue


class StopRequest:
    """Records the first stop signal; a second one ends the process immediately.

    ``StopRequest.active()`` is the one installed in this process, if any: the ``dpbp train``
    process installs it before anything else (``dpbp.cli.entry``) and keeps it until it exits,
    so a signal at any moment of the command (MPI start-up, data loading, right after the last
    write) stops or is absorbed, never kills it with 128 + signal.
    """

    _active: StopRequest | None = None

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @classmethod
    def active(cls) -> StopRequest | None:
        return cls._active

    def install(self) -> StopRequest:
        """Install the handlers (main thread only; elsewhere this is a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            StopRequest._active = self
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if StopRequest._active is self:
            StopRequest._active = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # second signal: the user or scheduler insists
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
