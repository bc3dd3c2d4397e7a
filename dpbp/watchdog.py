"""Heartbeats on a TCP side channel: a rank that stops answering ends the job, a busy one does not.

Why a side channel: a rank waiting inside an MPI collective cannot tell a dead peer
from a slow one, and MPI's own transport may be what is stuck (a cut link leaves
every rank spinning in MPI for the ~15 minutes TCP takes to give up). So every rank
runs one daemon thread that, independently of MPI, sends rank 0 (the hub) a small
beat every ``interval_for(heartbeat_timeout)`` seconds: its phase ("loading data",
"training", "writing checkpoint", ...) and how long it has been waiting inside the
current MPI collective, measured on its own clock. The hub sends its beats back.

The hub's rules (``Liveness.verdict``), why each cannot end a healthy job:

* no beat from a rank for ``heartbeat_timeout`` seconds (host down, link cut,
  process frozen), or its connection closed without a goodbye (process died): abort,
  naming every silent rank with its host and phase. A busy rank keeps beating: the
  thread runs while the main thread computes, reads or writes.
* "no progress" only when EVERY rank has waited inside MPI for more than
  ``collective_timeout`` (MPI itself is stuck). While one rank is busy outside MPI
  (rank 0 writing a checkpoint to slow storage) the others wait for it as long as it
  takes; after a minute the hub says once whom they wait for.

Other ranks watch the hub's beats by the same rules. Every process says goodbye
before it exits or calls MPI_Abort, so a finished rank is never taken for a dead one.
Until the channel is up, when it cannot be set up (a firewall: every rank agrees and
rank 0 warns once), and after the hub has said goodbye, each rank falls back to its
own timer: abort when one collective makes no progress for ``collective_timeout``.

Stdlib only: the communicator passes in its rank, size, collectives and abort. On the
wire: one JSON object per line (never pickle); a random token, broadcast over MPI,
keeps strangers that connect to the hub's port from counting as ranks.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

CONNECT_TIMEOUT = 2.0  # seconds per candidate address of the hub
WELCOME_TIMEOUT = 10.0  # the hub's answer to a hello (its thread may be slow on a loaded node)
HELLO_TIMEOUT = 10.0  # a connection to the hub must say hello within this
ABORT_GRACE = 15.0  # a peer announced MPI_Abort: if this process still runs after this, it ends itself
NOTE_AFTER = 60.0  # tell once that ranks wait for a busy one (sooner when collective_timeout is shorter)
MISSED_BEATS = 3  # a rank is silent only after missing at least this many of its own beats
MAX_HEAD_START = 5.0  # seconds: see Liveness.patience
SILENT_SHARE = 0.5  # when one rank is past the timeout, also name ranks silent for this share of it
MAX_LINE = 4096  # bytes; beats are ~100
PHASE_CHARS = 160  # a phase may name a file ("writing checkpoint /runs/a/checkpoints/step-120.npz")
SIOCGIFADDR = 0x8915  # Linux ioctl: the IPv4 address of an interface


def interval_for(heartbeat_timeout: float) -> float:
    """Seconds between beats: ten beats per timeout, at most one a second."""
    return min(1.0, heartbeat_timeout / 10)


# ----------------------------------------------------------------------------- decisions


@dataclass
class Peer:
    """What a watcher knows of one rank. Times are the watcher's clock, ``waiting`` the rank's own."""

    rank: int
    host: str = "?"
    heard: float = 0.0  # when its last beat arrived
    phase: str = "before its first heartbeat"
    waiting: float | None = None  # seconds inside its current MPI collective; None outside MPI
    timeout: float = 0.0  # its own heartbeat timeout: it beats every interval_for(timeout)
    left: str = ""  # "exit" or "abort" after its goodbye; "died" when its connection closed without one
    left_at: float = 0.0


class Liveness:
    """Rank ``me``'s view of the ranks it watches and what to do about them: pure logic, clock passed in.

    The hub (``me == 0``) watches every rank including itself (fed its own state each
    round) and judges progress; another rank watches rank 0 only. ``verdict`` returns
    (abort message or None, note or None); messages lack the "error: " prefix.
    """

    def __init__(self, me: int, ranks: Iterable[int], heartbeat_timeout: float, collective_timeout: float,
                 now: float, hosts: dict[int, str] | None = None):
        hosts = hosts or {}
        self.me = me
        self.peers = {r: Peer(r, host=hosts.get(r, "?"), heard=now, timeout=heartbeat_timeout) for r in ranks}
        self.heartbeat_timeout, self.collective_timeout = heartbeat_timeout, collective_timeout
        self.noted = False  # the "waiting for a busy rank" note of the current stall was printed
        # Ranks 2, 3, ... give rank 1 a head start in reporting a lost hub (a few seconds at most), so
        # that its MPI_Abort usually ends the job before each of them prints the same message.
        self.patience = 0.0 if me == 0 else min(me - 1, MAX_HEAD_START)

    def set_timeouts(self, heartbeat_timeout: float, collective_timeout: float) -> None:
        self.heartbeat_timeout, self.collective_timeout = heartbeat_timeout, collective_timeout

    def beat(self, rank: int, now: float, phase: str, waiting: float | None, timeout: float | None = None) -> None:
        """Rank ``rank`` reported ``phase`` and ``waiting`` seconds inside MPI (None: not in a collective)."""
        p = self.peers.get(rank)
        if p is None or p.left:
            return
        p.heard, p.phase, p.waiting = now, phase, waiting
        if timeout is not None:
            p.timeout = timeout

    def goodbye(self, rank: int, how: str, now: float) -> None:
        """Rank ``rank`` is leaving on purpose: ``exit`` (its process ends) or ``abort`` (it calls MPI_Abort)."""
        p = self.peers.get(rank)
        if p is not None and not p.left:
            p.left, p.left_at = ("abort" if how == "abort" else "exit"), now

    def closed(self, rank: int, now: float) -> None:
        """The connection to ``rank`` closed; without a goodbye first, its process died."""
        p = self.peers.get(rank)
        if p is not None and not p.left:
            p.left, p.left_at = "died", now

    def verdict(self, now: float) -> tuple[str | None, str | None]:
        others = [p for p in self.peers.values() if p.rank != self.me]
        died = [p for p in others if p.left == "died" and now - p.left_at >= self.patience]
        if died:
            return (f"{_who(died)} stopped answering: {'its process' if len(died) == 1 else 'their processes'} "
                    f"ended without saying goodbye ({_last_seen(died)}); aborting the job"), None
        live = [p for p in self.peers.values() if not p.left]
        if self.heartbeat_timeout > 0:
            # A rank that has not applied new timeouts yet beats at its old interval: allow it three beats.
            limit = {p.rank: max(self.heartbeat_timeout, MISSED_BEATS * interval_for(p.timeout)) + self.patience
                     for p in others}
            if any(not p.left and now - p.heard > limit[p.rank] for p in others):
                silent = [p for p in others if not p.left and now - p.heard > SILENT_SHARE * limit[p.rank]]
                longest = max(now - p.heard for p in silent)
                hint = ("the host may be down or its network cut" if len(silent) < len(others) or len(others) == 1
                        else f"every other rank went silent: rank {self.me}'s own host or network may be at fault")
                return (f"{_who(silent)} stopped answering: no heartbeat for {longest:.0f} s ({_last_seen(silent)}); "
                        f"{hint} (train.heartbeat_timeout); aborting the job"), None
        aborted = [p for p in others if p.left == "abort" and now - p.left_at > ABORT_GRACE]
        if aborted:
            return (f"{_who(aborted)} aborted the job {ABORT_GRACE:g} s ago, yet this rank still runs; "
                    "ending it"), None
        if self.me != 0 or not live:
            return None, None
        waits = [p.waiting for p in live if p.waiting is not None]
        ct = self.collective_timeout
        if ct > 0 and len(waits) == len(live) and min(waits) > ct:
            return (f"no progress inside MPI: every rank has waited more than {ct:g} s in a collective "
                    f"({_last_seen(live)}); MPI's own network may be down or stuck (train.collective_timeout); "
                    "aborting the job"), None
        note_after = min(NOTE_AFTER, ct) if ct > 0 else NOTE_AFTER
        long_waits = [w for w in waits if w > note_after]
        if not long_waits:
            self.noted = False
            return None, None
        busy = [p for p in live if p.waiting is None]
        if busy and not self.noted:
            self.noted = True
            waiters = [p for p in live if p.waiting is not None and p.waiting > note_after]
            return None, (f"{_ranks(waiters)} {'has' if len(waiters) == 1 else 'have'} waited "
                          f"{min(long_waits):.0f} s inside MPI for {_who(busy, phases=True)}, which still "
                          f"answer{'s' if len(busy) == 1 else ''}: the job goes on")
        return None, None


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5, 6': runs of three or more as a range."""
    parts, ranks = [], sorted(ranks)
    start = prev = ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.extend([f"{start}-{prev}"] if prev - start >= 2 else [str(x) for x in range(start, prev + 1)])
        if r is not None:
            start = prev = r
    return ", ".join(parts)


def _ranks(peers: list[Peer]) -> str:
    ranks = [p.rank for p in peers]
    return f"rank{'s' if len(ranks) > 1 else ''} {_ranges(ranks)}"


def _who(peers: list[Peer], phases: bool = False) -> str:
    """'rank 3 (host h1)', 'ranks 2, 3 (host h1) and 5 (host h2)'; with phases: 'rank 0 (writing checkpoint)'."""
    groups: dict[str, list[int]] = {}
    for p in sorted(peers, key=lambda p: p.rank):
        groups.setdefault(p.phase if phases else f"host {p.host}", []).append(p.rank)
    parts = [f"{_ranges(ranks)} ({label})" for label, ranks in groups.items()]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"rank{'s' if len(peers) > 1 else ''} {text}"


def _last_seen(peers: list[Peer]) -> str:
    phases: dict[str, list[int]] = {}
    for p in sorted(peers, key=lambda p: p.rank):
        phases.setdefault(p.phase, []).append(p.rank)
    if len(phases) == 1:
        return f"last seen: {next(iter(phases))}"
    return "last seen: " + "; ".join(f"{phase}: rank{'s' if len(r) > 1 else ''} {_ranges(r)}"
                                     for phase, r in phases.items())


# ----------------------------------------------------------------------------- addresses


def interface_addresses() -> list[str]:
    """IPv4 address of every network interface (Linux; empty elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        return []
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            found.append(socket.inet_ntoa(answer[20:24]))
    return found


def hostname_addresses() -> list[str]:
    """What this host's name resolves to (IPv4), or nothing where it does not resolve."""
    try:
        return socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        return []


def hub_addresses() -> list[str]:
    """Where other ranks may reach this host: its interfaces, its hostname's addresses, then loopback.

    Interfaces come first so that clusters whose hostnames do not resolve (or resolve to
    127.0.1.1) still work; 127.0.0.1 serves ranks on this node when nothing else does.
    """
    out: list[str] = []
    for addr in [*interface_addresses(), *hostname_addresses()]:
        if not addr.startswith("127.") and addr not in out:
            out.append(addr)
    return [*out, "127.0.0.1"]


# ----------------------------------------------------------------------------- wire


def encode(message: dict) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def _decode(line: bytes) -> dict | None:
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _read_line(sock: socket.socket) -> dict | None:
    """One message from a blocking socket, byte by byte (so nothing after it is consumed)."""
    data = b""
    while not data.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte or len(data) > MAX_LINE:
            return None
        data += byte
    return _decode(data)


def connect_to_hub(offer: dict, hello: dict) -> tuple[socket.socket | None, dict | str]:
    """Connect to the hub at one of ``offer["addresses"]`` and exchange hello/welcome.

    Returns (socket, the hub's welcome) or (None, why every address failed). The
    welcome must carry the broadcast token: a stranger on that port does not count.
    """
    failures = []
    for address in offer["addresses"]:
        try:
            sock = socket.create_connection((address, offer["port"]), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            failures.append(f"{address}: {exc.strerror or exc}")
            continue
        try:
            sock.settimeout(WELCOME_TIMEOUT)
            sock.sendall(encode(hello))
            welcome = _read_line(sock)
            if welcome is not None and hmac.compare_digest(str(welcome.get("welcome", "")), offer["token"]):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock, welcome
            failures.append(f"{address}: not the hub")
        except OSError as exc:
            failures.append(f"{address}: {exc.strerror or exc}")
        sock.close()
    return None, "; ".join(failures) or "no address to try"


# ----------------------------------------------------------------------------- the thread


class _Conn:
    """One socket of the side channel: its peer's rank (None until its hello), bytes in and out."""

    def __init__(self, sock: socket.socket, rank: int | None, since: float):
        self.sock, self.rank, self.since = sock, rank, since
        self.inbox = b""
        self.outbox = b""


class Watchdog:
    """This process's watchdog thread (one per process; ``dpbp.comm`` owns it).

    ``activity()`` returns (phase, seconds inside the current MPI collective or None);
    ``abort(code)`` ends the job (MPI_Abort) and should not return; ``write`` prints a line
    on stderr. The thread starts at once, on the per-rank timer; ``connect`` (collective)
    brings up the heartbeat channel.
    """

    def __init__(self, rank: int, size: int, activity: Callable[[], tuple[str, float | None]],
                 abort: Callable[[int], None], heartbeat_timeout: float, collective_timeout: float,
                 write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.rank, self.size = rank, size
        self.activity, self._abort, self.clock = activity, abort, clock
        self.write = write or (lambda text: (sys.stderr.write(text + "\n"), sys.stderr.flush()))
        self.heartbeat_timeout, self.collective_timeout = heartbeat_timeout, collective_timeout
        self.host = socket.gethostname()
        self.state = "local"  # local: per-rank timer only | up: heartbeats | ended: goodbye said
        self._channel = ""  # the heartbeat channel in words, or why there is none
        self.attempted = False  # connect ran (heartbeats up, or agreed off)
        self._lock = threading.RLock()
        self._selector = selectors.DefaultSelector()
        self._wake, self._waker = socket.socketpair()
        self._wake.setblocking(False)
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._conns: dict[socket.socket, _Conn] = {}
        self._listener: socket.socket | None = None
        self._token = ""
        self._watch: Liveness | None = None
        self._last_beat = self._last_judged = 0.0
        self._thread = threading.Thread(target=self._run, name="dpbp-watchdog", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------- main thread

    def connect(self, bcast: Callable[[object], object], allgather: Callable[[object], list]) -> None:
        """Collective: bring up the heartbeat channel, or agree on every rank to go on without it.

        ``bcast(obj)`` returns rank 0's object on every rank, ``allgather(obj)`` every
        rank's. Never raises for a network problem and never hangs on one: a rank that
        cannot reach the hub makes every rank keep the per-rank timer, and rank 0 warns once.
        """
        self.attempted = True
        if self.heartbeat_timeout <= 0 or self.size == 1:
            return
        offer: dict = {}
        if self.rank == 0:
            try:
                listener = socket.create_server(("", 0), family=socket.AF_INET, backlog=min(self.size, 4096))
                listener.setblocking(False)
                token = secrets.token_hex(16)
                offer = {"addresses": hub_addresses(), "port": listener.getsockname()[1], "token": token}
                with self._lock:
                    self._listener, self._token = listener, token
                    # Made now, so a hello, goodbye or closure before the channel is agreed is not lost.
                    self._watch = Liveness(0, range(self.size), self.heartbeat_timeout, self.collective_timeout,
                                           self.clock(), hosts={0: self.host})
                    self._selector.register(listener, selectors.EVENT_READ, None)
                self._poke()
            except OSError as exc:
                offer = {"error": f"rank 0 cannot listen: {exc.strerror or exc}"}
        offer = bcast(offer)
        sock, reply = None, None
        if self.rank != 0:
            if "error" in offer:
                reply = offer["error"]
            else:
                hello = {"hello": offer["token"], "r": self.rank, "host": self.host, "t": self.heartbeat_timeout}
                sock, reply = connect_to_hub(offer, hello)
        failures = allgather(reply if sock is None and self.rank != 0 else offer.get("error"))
        bad = {r: why for r, why in enumerate(failures) if why}
        with self._lock:
            if bad:
                self._close_all()
                if sock is not None:
                    sock.close()
                r, why = next(iter(bad.items()))
                where = f" at {', '.join(offer['addresses'])} port {offer['port']}" if "port" in offer else ""
                if self.rank == 0:
                    self.write(f"warning: heartbeats are off: {_ranks([Peer(r) for r in bad])} could not reach "
                               f"rank 0{where} (rank {r}: {why}); a lost host is noticed only after "
                               f"train.collective_timeout ({self.collective_timeout:g} s)")
                self._channel = f"heartbeats could not be set up: {why}"
                return
            now = self.clock()
            if self.rank == 0:
                for peer in self._watch.peers.values():
                    peer.heard = max(peer.heard, now)  # the agreement took a while: nobody was silent
                self._channel = f"with {self.size - 1} rank{'s' if self.size > 2 else ''} on port {offer['port']}"
            else:
                sock.setblocking(False)
                self._conns[sock] = _Conn(sock, 0, now)
                self._selector.register(sock, selectors.EVENT_READ, None)
                self._watch = Liveness(self.rank, [0], self.heartbeat_timeout, self.collective_timeout, now,
                                       hosts={0: str(reply.get("host", "?"))[:64]})
                hub_timeout = reply.get("t")
                if isinstance(hub_timeout, (int, float)):
                    self._watch.peers[0].timeout = float(hub_timeout)
                self._channel = f"with rank 0 at {sock.getpeername()[0]}:{offer['port']}"
            self.state = "up"
        self._poke()

    @property
    def status(self) -> str:
        """What watches this process, in words (for ``dpbp info``)."""
        ct = (f"collective timeout {self.collective_timeout:g} s" if self.collective_timeout > 0
              else "no collective timeout")
        if self.state == "up":
            return (f"heartbeats {self._channel}, every {interval_for(self.heartbeat_timeout):g} s, timeout "
                    f"{self.heartbeat_timeout:g} s; {ct}")
        return f"per-rank timer, {ct}" + (f" ({self._channel})" if self._channel else "")

    def configure(self, heartbeat_timeout: float, collective_timeout: float) -> None:
        """New timeouts; ``heartbeat_timeout = 0`` says goodbye and leaves the channel (no collective)."""
        with self._lock:
            self.heartbeat_timeout, self.collective_timeout = heartbeat_timeout, collective_timeout
            if self._watch is not None:
                self._watch.set_timeouts(heartbeat_timeout, collective_timeout)
            if heartbeat_timeout <= 0 and self.state == "up":
                self._say_goodbye("exit")
                self._close_all()
                self.state, self._channel = "local", "train.heartbeat_timeout = 0"
        self._poke()

    def goodbye(self, how: str = "exit") -> None:
        """Tell every peer this process is leaving on purpose (``exit`` or ``abort``), then stop watching."""
        with self._lock:
            if self.state == "ended":
                return
            self._say_goodbye(how)
            self._close_all()
            self.state = "ended"
        self._poke()

    # ---------------------------------------------------------- helpers (lock held)

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            self._waker.send(b"\0")

    def _say_goodbye(self, how: str) -> None:
        line = encode({"r": self.rank, "bye": how})
        for conn in self._conns.values():
            if conn.rank is None:
                continue
            with contextlib.suppress(OSError):
                conn.sock.settimeout(1.0)  # small: a beat's worth of bytes into a socket buffer
                conn.sock.sendall(conn.outbox + line)
                conn.sock.shutdown(socket.SHUT_WR)
                conn.sock.setblocking(False)
                while conn.sock.recv(65536):  # drain, so closing sends FIN, not a reset that could drop the bye
                    pass

    def _close_all(self) -> None:
        for sock in [*self._conns, *([self._listener] if self._listener else [])]:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._conns.clear()
        self._listener = None
        self._watch = None

    def _drop(self, conn: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        self._conns.pop(conn.sock, None)

    def _send(self, conn: _Conn, data: bytes) -> None:
        conn.outbox += data
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # the reader sees the closure
        conn.outbox = conn.outbox[sent:]

    # ---------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - a bug here must not pass for a dead rank, nor end the job
            self.write(f"warning on rank {self.rank}: the watchdog stopped ({type(exc).__name__}: {exc}); "
                       "this rank is no longer watched")
            self.goodbye("exit")

    def _loop(self) -> None:
        while True:
            with self._lock:
                interval = interval_for(self.heartbeat_timeout) if self.state == "up" else 1.0
            events = self._selector.select(timeout=interval)
            with self._lock:
                if self.state == "ended":
                    return
                now = self.clock()
                for key, _ in events:
                    self._ready(key.fileobj, now)
                abort, note = None, None
                if now - self._last_judged >= min(0.1, interval):  # many ranks wake the hub often: judge 10x/s
                    self._last_judged = now
                    abort, note = self._judge(now)
            if note:
                self.write(f"note: {note}")
            if abort:
                self.write(abort)
                self._abort(1)  # ends the job; the thread stops here either way
                return

    def _ready(self, sock, now: float) -> None:
        if sock is self._wake:
            with contextlib.suppress(OSError):
                while self._wake.recv(4096):
                    pass
            return
        if sock is self._listener:
            with contextlib.suppress(OSError):
                new, _ = sock.accept()
                new.setblocking(False)
                new.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._conns[new] = _Conn(new, None, now)
                self._selector.register(new, selectors.EVENT_READ, None)
            return
        conn = self._conns.get(sock)
        if conn is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.inbox += data
        *lines, conn.inbox = conn.inbox.split(b"\n")
        for line in lines:
            self._message(conn, _decode(line), now)
        if not data or len(conn.inbox) > MAX_LINE:
            if conn.rank is not None and self._watch is not None:
                self._watch.closed(conn.rank, now)
            self._drop(conn)

    def _message(self, conn: _Conn, msg: dict | None, now: float) -> None:
        if msg is None:
            return
        if conn.rank is None:  # the hub, before the peer's hello
            rank, token, timeout = msg.get("r"), str(msg.get("hello", "")), msg.get("t")
            known = {c.rank for c in self._conns.values()}
            if (self._token and hmac.compare_digest(token, self._token) and isinstance(rank, int)
                    and 0 < rank < self.size and rank not in known and self.state != "up"
                    and self._watch is not None):
                conn.rank = rank
                peer = self._watch.peers[rank]
                peer.host = str(msg.get("host", "?"))[:64]
                if isinstance(timeout, (int, float)):
                    peer.timeout = float(timeout)
                self._send(conn, encode({"welcome": self._token, "host": self.host, "t": self.heartbeat_timeout}))
            else:
                self._drop(conn)
            return
        if self._watch is None:
            return
        if "bye" in msg:
            self._watch.goodbye(conn.rank, str(msg["bye"]), now)
            self._drop(conn)
            return
        waiting = msg.get("w")
        timeout = msg.get("t")
        self._watch.beat(conn.rank, now, str(msg.get("p", "?"))[:PHASE_CHARS],
                         float(waiting) if isinstance(waiting, (int, float)) else None,
                         float(timeout) if isinstance(timeout, (int, float)) else None)

    def _judge(self, now: float) -> tuple[str | None, str | None]:
        """Beat if due, then (error line or None, note or None): the verdict, or the per-rank timer.

        The hub speaks for the job ("error: ..."); a rank's own timer, and a rank judging
        the hub, name the rank that noticed ("error on rank 3: ...").
        """
        phase, waiting = self.activity()
        for conn in list(self._conns.values()):
            if conn.rank is None and now - conn.since > HELLO_TIMEOUT:
                self._drop(conn)  # a stranger, or a rank that gave up
        watch = self._watch
        if self.state != "up" or watch is None or (self.rank != 0 and watch.peers[0].left == "exit"):
            if self.collective_timeout > 0 and waiting is not None and waiting > self.collective_timeout:
                return (f"error on rank {self.rank}: no progress inside MPI for {self.collective_timeout:g} s "
                        f"({phase}; a rank or host stopped answering; train.collective_timeout); "
                        "aborting the job"), None
            return None, None
        if now - self._last_beat >= 0.95 * interval_for(self.heartbeat_timeout):
            self._last_beat = now
            line = encode({"r": self.rank, "p": phase, "w": None if waiting is None else round(waiting, 2),
                           "t": self.heartbeat_timeout})
            for conn in self._conns.values():
                if conn.rank is not None:
                    self._send(conn, line)
        if self.rank == 0:
            watch.beat(0, now, phase, waiting)
        abort, note = watch.verdict(now)
        if abort:
            abort = f"error: {abort}" if self.rank == 0 else f"error on rank {self.rank}: {abort}"
        return abort, note
