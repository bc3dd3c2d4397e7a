"""The communicator: the only module that imports mpi4py.

``SerialComm`` (one process, every collective a no-op, no MPI import) and
``MPIComm`` (mpi4py, buffers on the wire) share one interface, so no code outside
this module asks whether MPI exists. ``get_comm()`` picks MPI only when the
process was started by an MPI launcher (mpirun, mpiexec, srun).

Collectives must be called by every rank in the same order; nothing here may be
called inside ``if comm.is_root``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np

from dpbp.errors import AgreedError, DpbpError, TrainingError
from dpbp.watchdog import Watchdog

# Seconds MPI_Abort gets to end the job before this process exits on its own.
ABORT_FALLBACK = 10.0
# Sleep between polls of a node barrier when ranks outnumber cores.
NAP_SECONDS = 50e-6
# Variables that MPI launchers (MPICH/hydra, Open MPI, PMIx, Slurm's srun with PMI) set per rank.
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class SerialComm:
    """Size-1 communicator: rank 0 of 1, every collective returns its input."""

    rank = 0
    size = 1
    local_size = 1
    local_rank = 0
    is_root = True
    library = "none (single process)"

    def allreduce_(self, buf: np.ndarray) -> np.ndarray:
        """Sum ``buf`` over ranks, in place. Here: nothing to do."""
        return buf

    def sum_in_rank_order_(self, buf: np.ndarray) -> np.ndarray:
        """Sum ``buf`` over ranks in place, adding them in rank order (see MPIComm). Here: nothing to do."""
        return buf

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        return buf

    def bcast_obj(self, obj, root: int = 0):
        return obj

    def allgather_obj(self, obj) -> list:
        return [obj]

    def gather_rows(self, local: np.ndarray, root: int = 0) -> np.ndarray | None:
        return local

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return bool(flag)

    def barrier(self) -> None:
        pass

    def node_shared_array(self, n: int, dtype) -> np.ndarray:
        """A zeroed 1-D array of ``n`` elements shared by this node's ranks. Here: a private one."""
        return np.zeros(n, dtype)

    def node_barrier(self) -> None:
        """Wait for this node's ranks; their writes to node-shared arrays are visible afterwards."""

    def free_node_shared(self) -> None:
        """Give back every node-shared array (see MPIComm.free_node_shared). Here: nothing to free."""

    def phase(self, name: str):
        """Label what this rank is doing (see MPIComm.phase). Here: nothing to label."""
        return contextlib.nullcontext()

    def start_watchdog(self, heartbeat_timeout: float, collective_timeout: float) -> None:
        """Nothing to watch in one process: no thread, no socket."""

    def configure_watchdog(self, heartbeat_timeout: float, collective_timeout: float) -> None:
        """Nothing to watch in one process."""

    watchdog_status = "none (single process)"

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _Activity:
    """What this process is doing, for its watchdog thread: one per process, shared by every MPIComm."""

    phase = "setting up"  # set by MPIComm.phase
    busy_since: float | None = None  # monotonic time the MPI collective in progress started


_ACTIVITY = _Activity()
_WATCHDOG: Watchdog | None = None  # this process's watchdog (dpbp/watchdog.py), once started


def _activity() -> tuple[str, float | None]:
    since = _ACTIVITY.busy_since
    return _ACTIVITY.phase, None if since is None else time.monotonic() - since


class MPIComm:
    """A communicator over mpi4py (``MPI.COMM_WORLD`` unless another is given).

    ``node_size`` (tests and benchmarks only) splits each node's ranks into groups of that
    many, in rank order, each group then acting as a node of its own: the node-shared and
    hierarchical exchanges run on one machine as they would across machines.
    """

    def __init__(self, comm=None, *, node_size: int | None = None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_root = self.rank == 0
        self._node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        if node_size is not None:  # DP: virtual nodes inside one node (a subset of a shared-memory node)
            self._node = self._node.Split(self._node.Get_rank() // node_size, self.rank)
        self.local_size = self._node.Get_size()  # ranks on this node: sets BLAS threads per rank
        self.local_rank = self._node.Get_rank()
        self._windows: list = []
        # More ranks than cores: a waiting rank must not take the core a late rank needs.
        self._nap = self.local_size > (os.cpu_count() or 1)
        self._pipes: _PipeBarrier | None = None
        self.library = " ".join(MPI.Get_library_version().split()[:4])
        self._flag = np.zeros(1, np.int32)

    @contextlib.contextmanager
    def _collective(self):
        _ACTIVITY.busy_since = time.monotonic()  # the watchdog reports how long this rank waits inside MPI
        try:
            yield
        finally:
            _ACTIVITY.busy_since = None

    @contextlib.contextmanager
    def phase(self, name: str):
        """Label what this rank does inside the block ("loading data", "writing checkpoint", ...).

        The label travels in every heartbeat and names the rank's last known activity in
        the watchdog's messages. Blocks nest; the outer label returns afterwards.
        """
        previous, _ACTIVITY.phase = _ACTIVITY.phase, name
        try:
            yield
        finally:
            _ACTIVITY.phase = previous

    def start_watchdog(self, heartbeat_timeout: float, collective_timeout: float) -> None:
        """Start this process's watchdog (dpbp/watchdog.py); later calls do nothing. Collective.

        Every rank beats to rank 0 over a TCP side channel every
        ``min(1 s, heartbeat_timeout / 10)``; a rank silent for ``heartbeat_timeout`` seconds,
        or whose process died, ends the job with a message naming it; so does every rank
        waiting inside MPI for more than ``collective_timeout`` seconds. A rank busy outside
        MPI does not. Until the channel is up, or where it cannot be set up, each rank aborts
        the job when one collective makes no progress for ``collective_timeout``. 0 disables
        either. The daemon thread calls MPI_Abort (mpi4py releases the GIL inside MPI calls).
        """
        global _WATCHDOG
        if _WATCHDOG is None:
            _WATCHDOG = Watchdog(self.rank, self.size, _activity, self.abort, heartbeat_timeout, collective_timeout)
            atexit.register(_WATCHDOG.goodbye)  # a rank that ends is not a rank that died
            self._connect_watchdog()

    def configure_watchdog(self, heartbeat_timeout: float, collective_timeout: float) -> None:
        """Apply the config's timeouts; collective (every rank calls it, with the same values).

        Starts the watchdog if nobody did; ``heartbeat_timeout = 0`` leaves the channel.
        """
        if _WATCHDOG is None:
            self.start_watchdog(heartbeat_timeout, collective_timeout)
            return
        _WATCHDOG.configure(heartbeat_timeout, collective_timeout)
        if not _WATCHDOG.attempted:  # started with heartbeats off, now on: set up the channel
            self._connect_watchdog()

    def _connect_watchdog(self) -> None:
        _WATCHDOG.connect(lambda obj: self.comm.bcast(obj, root=0), self.comm.allgather)

    @property
    def watchdog_status(self) -> str:
        """This process's watchdog, in words (for ``dpbp info``)."""
        return _WATCHDOG.status if _WATCHDOG is not None else "not started"

    def allreduce_(self, buf: np.ndarray) -> np.ndarray:
        """Sum ``buf`` over ranks, in place (one ``MPI_Allreduce`` with ``MPI_IN_PLACE``)."""
        with self._collective():
            self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return buf

    def sum_in_rank_order_(self, buf: np.ndarray) -> np.ndarray:
        """Sum a small 1-D ``buf`` over ranks in place: one ``Allgather``, then rank 0's + rank 1's + ...

        Every rank adds the same numbers in the same order, so every rank gets the same bits
        whatever reduction algorithm the MPI library picks (batch norm's statistics: the running
        statistics, private to each rank, then cannot drift apart).
        """
        everyone = np.empty((self.size, buf.shape[0]), buf.dtype)
        with self._collective():
            self.comm.Allgather(np.ascontiguousarray(buf), everyone)
        np.copyto(buf, everyone[0])
        for row in everyone[1:]:
            buf += row
        return buf

    def peers(self) -> MPIComm:
        """The ranks with this rank's node rank, one per node, as a communicator (collective).

        With the same number of ranks on every node, peers hold the same span of the parameter
        vector in the node-shared exchange: reducing a span among them crosses the network once
        per node. Rank order follows the world's.
        """
        with self._collective():
            sub = self.comm.Split(self.local_rank, self.rank)
        return MPIComm(sub)

    def node_shared_array(self, n: int, dtype) -> np.ndarray:
        """A zeroed 1-D array of ``n`` elements that every rank of this node maps (collective over the node).

        One MPI-3 shared-memory window (``MPI_Win_allocate_shared``), allocated by the
        node's first rank and mapped by the others; it lives until the job ends. Writes by
        one rank are visible to the others after ``node_barrier()``.
        """
        MPI = self._MPI
        itemsize = np.dtype(dtype).itemsize
        with self._collective():
            win = MPI.Win.Allocate_shared(n * itemsize if self.local_rank == 0 else 0, itemsize, comm=self._node)
            win.Lock_all(MPI.MODE_NOCHECK)  # passive epoch for the job's life: Win.Sync orders memory
        self._windows.append(win)
        memory, _ = win.Shared_query(0)
        array = np.ndarray(buffer=memory, dtype=dtype, shape=(n,))
        if self.local_rank == 0:
            array.fill(0)
        if self._nap and self._pipes is None and self.local_size > 1:
            with self._collective():
                self._pipes = _PipeBarrier.create(self._node)  # None: polling with naps instead
        self.node_barrier()
        return array

    def free_node_shared(self) -> None:
        """Free every window ``node_shared_array`` made (collective over the node).

        For processes that train several models in turn (the scikit-learn estimators): the
        arrays must not be touched afterwards; copy out what is still needed first.
        """
        if not self._windows:
            return
        self.node_barrier()  # DP: nobody still reads a window that is about to go
        with self._collective():
            for win in self._windows:
                win.Unlock_all()
                win.Free()
        self._windows.clear()

    def node_barrier(self) -> None:
        """Barrier over this node's ranks with the memory fences node-shared arrays need.

        With more ranks than cores the waiting ranks block in the kernel (``_PipeBarrier``)
        instead of polling MPI, so the ranks still computing get the cores.
        """
        for win in self._windows:
            win.Sync()
        self._barrier(self._node)
        for win in self._windows:
            win.Sync()

    def _barrier(self, comm) -> None:
        """Barrier over ``comm`` (the node's or the world's ranks); how it waits depends on the load."""
        with self._collective():
            if self._pipes is not None and (comm is self._node or self.local_size == self.size):
                self._pipes.wait()  # one node, more ranks than cores: wait asleep in read()
            elif self._nap:
                req = comm.Ibarrier()
                while not req.Test():
                    time.sleep(NAP_SECONDS)
            else:
                comm.Barrier()

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        with self._collective():
            self.comm.Bcast(buf, root=root)
        return buf

    def bcast_obj(self, obj, root: int = 0):
        with self._collective():
            return self.comm.bcast(obj, root=root)  # small metadata only

    def allgather_obj(self, obj) -> list:
        with self._collective():
            return self.comm.allgather(obj)  # small metadata only

    def gather_rows(self, local: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Concatenate every rank's rows (in rank order) on ``root``; None elsewhere."""
        local = np.ascontiguousarray(local)
        counts = np.array(self.allgather_obj(local.shape[0]), np.int64)
        row = int(np.prod(local.shape[1:], dtype=np.int64))
        if self.rank != root:
            with self._collective():
                self.comm.Gatherv(local, None, root=root)
            return None
        out = np.empty((int(counts.sum()),) + local.shape[1:], local.dtype)
        with self._collective():
            self.comm.Gatherv(local, (out, counts * row), root=root)
        return out

    def any(self, flag: bool) -> bool:
        self._flag[0] = 1 if flag else 0
        with self._collective():
            self.comm.Allreduce(self._MPI.IN_PLACE, self._flag, op=self._MPI.MAX)
        return bool(self._flag[0])

    def barrier(self) -> None:
        self._barrier(self.comm)

    def abort(self, code: int = 1) -> None:
        """End every rank of the job. The pause lets the launcher forward this rank's last
        message before MPI_Abort kills the processes that would carry it. Where MPI_Abort
        cannot get through (a host cut off from the launcher), this process exits anyway."""
        if _WATCHDOG is not None:
            _WATCHDOG.goodbye("abort")  # the others learn it is an abort, not a death
        sys.stdout.flush()
        sys.stderr.flush()
        threading.Thread(target=lambda: (time.sleep(ABORT_FALLBACK), os._exit(code)), daemon=True).start()
        time.sleep(0.5)
        self.comm.Abort(code)


# ----------------------------------------------------------------------------- agreement


def all_or_nothing(comm, fn: Callable[[], object], what: str = "", *, root_only: bool = False):
    """Run ``fn`` on every rank; if it fails on any rank, raise the same AgreedError on all.

    Lets set-up work (reading config, data, files) fail on one node without
    leaving the other ranks waiting in a collective. Expected errors (DpbpError)
    keep their message and exit code; anything else is reported with its type.
    A failure on some ranks only is prefixed with the first failing rank, unless
    ``root_only`` (``fn`` does its work on rank 0 alone, so naming rank 0 says nothing).
    ``what`` also names the rank's phase while ``fn`` runs (see ``comm.phase``).
    """
    result, failure = None, None
    try:
        with comm.phase(what) if what else contextlib.nullcontext():
            result = fn()
    except DpbpError as exc:
        failure = (str(exc), exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - reported collectively below
        failure = (f"{what}{': ' if what else ''}{type(exc).__name__}: {exc}", 1)
    failures = comm.allgather_obj(failure)
    bad = [(rank, f) for rank, f in enumerate(failures) if f is not None]
    if bad:
        rank, (message, code) = bad[0]
        same_everywhere = len(bad) == comm.size and all(f == bad[0][1] for _, f in bad)
        if comm.size > 1 and not same_everywhere and not (root_only and rank == 0):
            message = f"rank {rank}: {message}"
        raise AgreedError(message, code)
    return result


def params_digest(params: np.ndarray) -> str:
    """Short sha256 of the parameter bytes: equal on all ranks iff the weights are identical."""
    return hashlib.sha256(params.tobytes()).hexdigest()[:16]


def differing_ranks(comm, value) -> list[int]:
    """The ranks whose ``value`` (small, picklable: a digest, a hash) differs from rank 0's (collective;
    the same list on every rank, [] when all agree)."""
    values = comm.allgather_obj(value)
    return [r for r, v in enumerate(values) if v != values[0]]


def check_in_sync(comm, params: np.ndarray, when: str) -> None:
    """Raise TrainingError on every rank if any rank's parameters differ from rank 0's (collective)."""
    differ = differing_ranks(comm, params_digest(params))
    if differ:
        raise TrainingError(
            f"ranks out of sync {when}: parameters on rank(s) {differ} differ from rank 0; "
            "check that every rank runs the same dpbp, numpy and config"
        )


def check_data_agrees(comm, mine: dict[str, dict | None]) -> dict[str, dict | None]:
    """Every rank must train on the same data: compare each rank's digests with rank 0's (collective).

    ``mine``: ``{role: digest}`` with the digests of ``dpbp.data.dataset_digest`` (None: no such
    data set). Ranks that read node-local copies of a file that differ would otherwise train
    silently as one (same length) or wait for each other forever (different lengths). Raises
    AgreedError (exit 2) naming the ranks and what differs; returns ``mine``.
    """
    everyone = comm.allgather_obj(mine)
    for role, ref in everyone[0].items():
        differ = [r for r, d in enumerate(everyone) if d[role] != ref]
        if not differ:
            continue
        other = everyone[differ[0]][role]
        if ref is None or other is None or other["shape"] != ref["shape"]:
            def size(d):
                return "none" if d is None else f"{d['rows']} rows, arrays {d['shape'][0]} and {d['shape'][1]}"

            what = f"rank {differ[0]} has {size(other)}, rank 0 has {size(ref)}"
        else:
            what = f"same {ref['rows']} rows, different content (sha256 {other['sha256'][:12]} vs {ref['sha256'][:12]})"
        raise AgreedError(f"ranks do not have the same {role} data: rank(s) {differ} differ from rank 0 ({what}); "
                          "check that every node reads the same files", 2)
    return mine


class _PipeBarrier:
    """A barrier for the ranks of one node in which waiting ranks sleep in ``read()``.

    Every rank owns a FIFO. A rank arriving writes one byte into the leader's (node
    rank 0) FIFO and blocks reading its own; the leader reads one byte per other rank,
    which blocks until the last one has arrived, then writes one byte into every other
    rank's FIFO. No rank polls, so with more ranks than cores the waiting ranks cost
    nothing while the late ones finish (MPI's barrier spins or, polled with naps, wakes
    every rank thousands of times a second). A rank cannot arrive at the next barrier
    before the leader released it from this one, so bytes never mix between barriers.
    The FIFOs are unlinked as soon as every rank has opened them: nothing is left on
    disk, even when the job is killed.
    """

    def __init__(self, node, folder: str):
        """Open the FIFOs in ``folder`` (every rank has made its own); raises OSError on failure."""
        self.size, rank = node.Get_size(), node.Get_rank()
        self.leader = rank == 0
        self.own = os.open(os.path.join(folder, str(rank)), os.O_RDWR)  # O_RDWR: opens without a writer
        others = range(1, self.size) if rank == 0 else [0]
        self.peers = [os.open(os.path.join(folder, str(r)), os.O_RDWR) for r in others]

    @classmethod
    def create(cls, node) -> _PipeBarrier | None:
        """Collective over ``node``: the barrier, or None on every rank if any rank could not set it up."""
        rank, barrier, folder = node.Get_rank(), None, None
        if rank == 0:
            try:
                folder = tempfile.mkdtemp(prefix="dpbp-barrier-")
            except OSError:
                folder = None
        folder = node.bcast(folder, root=0)
        if folder is None:
            return None
        try:
            os.mkfifo(os.path.join(folder, str(rank)), 0o600)
            made = True
        except OSError:
            made = False
        node.Barrier()  # every FIFO exists before anyone opens another rank's
        if made:
            try:
                barrier = cls(node, folder)
            except OSError:
                barrier = None
        ok = all(node.allgather(barrier is not None))
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, str(rank)))  # open descriptors keep the FIFOs alive
        node.Barrier()
        if rank == 0:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if not ok and barrier is not None:
            for fd in (barrier.own, *barrier.peers):
                os.close(fd)
        return barrier if ok else None

    def wait(self) -> None:
        if self.leader:
            missing = self.size - 1
            while missing:
                missing -= len(os.read(self.own, missing))
            for fd in self.peers:
                os.write(fd, b"\0")
        else:
            os.write(self.peers[0], b"\0")
            while not os.read(self.own, 1):
                pass


def launched_by_mpi(environ=None) -> bool:
    """True when an MPI launcher started this process (so several ranks may exist)."""
    env = os.environ if environ is None else environ
    return any(k in env for k in LAUNCHER_VARS)


# The rank, and the number of ranks on this node, as the launchers announce them (first match wins).
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def _first_int(env, names: tuple[str, ...]) -> int | None:
    for name in names:
        try:
            return int(env[name])
        except (KeyError, ValueError):
            continue
    return None


def launcher_rank(environ=None) -> int | None:
    """This process's rank as its launcher announced it, without initialising MPI.

    Reads ``RANK_VARS`` (MPICH/hydra, Open MPI, PMIx, Slurm); None when no launcher
    set one (a plain single process). For deciding who prints before a communicator
    exists (command-line errors, help); everything else uses ``comm.rank``.
    """
    return _first_int(os.environ if environ is None else environ, RANK_VARS)


def launcher_local_size(environ=None) -> int:
    """How many ranks the launcher started on this node (1 when it did not say), without MPI."""
    local = _first_int(os.environ if environ is None else environ, LOCAL_SIZE_VARS)
    return local if local is not None and local >= 1 else 1


class CommError(RuntimeError):
    """MPI was asked for but cannot be used."""


def get_comm():
    """The communicator for this process.

    ``DPBP_COMM=serial`` or ``=mpi`` forces a choice; the default (``auto``) uses MPI
    exactly when an MPI launcher started the process, so plain ``dpbp train`` never
    imports mpi4py and works where it is not installed.
    """
    choice = os.environ.get("DPBP_COMM", "auto").lower()
    if choice not in ("auto", "serial", "mpi"):
        raise CommError(f"DPBP_COMM must be auto, serial or mpi, not {choice!r}")
    if "DPBP_WAIT" in os.environ:  # no variable is silently ignored
        raise CommError("DPBP_WAIT no longer exists (yielding in MPI waits measured no gain and was removed, "
                        "see scripts/bench/README.md); unset it")
    if choice == "serial" or (choice == "auto" and not launched_by_mpi()):
        return SerialComm()
    try:
        import mpi4py  # noqa: F401
    except ImportError as exc:
        size = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "?"
        if choice == "auto" and size == "1":
            return SerialComm()
        raise CommError(
            f"started by an MPI launcher ({size} ranks) but mpi4py cannot be imported ({exc}); "
            "install it with: pip install 'dpbp[mpi]'"
        ) from exc
    return MPIComm()
