"""The watchdog (dpbp/watchdog.py): the hub's decisions on an injected clock, then the real side channel
between Watchdog objects of one process (threads stand in for the ranks, so no MPI is needed here;
tests/test_mpi_runs.py runs it under mpirun)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dpbp import watchdog as wd
from dpbp.comm import SerialComm
from dpbp.watchdog import Liveness, Watchdog

HOSTS = {0: "h0", 1: "h0", 2: "h1", 3: "h1"}


def hub(hb=30.0, ct=300.0, size=4):
    return Liveness(0, range(size), hb, ct, now=0.0, hosts=HOSTS)


def beat_all(live: Liveness, now: float, ranks, phase="training", waiting=None):
    for r in ranks:
        live.beat(r, now, phase, waiting)


# ----------------------------------------------------------------------------- decisions


def test_a_silent_rank_is_named_with_its_host_and_phase_after_the_timeout():
    live = hub()
    beat_all(live, 10.0, range(4))
    for t in range(11, 41):  # rank 3 goes quiet after t = 10
        beat_all(live, float(t), range(3))
        abort, _ = live.verdict(float(t))
        assert abort is None, (t, abort)
    beat_all(live, 41.0, range(3))
    abort, _ = live.verdict(41.0)
    assert abort == ("rank 3 (host h1) stopped answering: no heartbeat for 31 s (last seen: training); the host may "
                     "be down or its network cut (train.heartbeat_timeout); aborting the job")


def test_every_rank_of_a_cut_host_is_named_not_only_the_first_past_the_timeout():
    live = hub()
    beat_all(live, 10.0, range(4), phase="evaluating")
    beat_all(live, 10.6, [0, 1, 3], phase="evaluating")  # rank 3's last beat came a little later
    beat_all(live, 40.5, [0, 1])
    abort, _ = live.verdict(40.5)
    assert abort is not None and abort.startswith("ranks 2, 3 (host h1) stopped answering: no heartbeat for 30 s "
                                                  "(last seen: evaluating)"), abort


def test_when_all_others_fall_silent_the_hub_suspects_its_own_host():
    live = hub()
    beat_all(live, 40.0, [0])
    abort, _ = live.verdict(40.0)
    assert "ranks 1-3 (host h0" not in abort and "ranks 1 (host h0) and 2, 3 (host h1)" in abort, abort
    assert "rank 0's own host or network may be at fault" in abort


def test_a_closed_connection_without_goodbye_aborts_at_once_and_a_goodbye_never_does():
    live = hub()
    beat_all(live, 1.0, range(4))
    live.goodbye(1, "exit", 1.0)
    live.closed(1, 1.0)  # rank 1 finished: its connection closes after its goodbye
    assert live.verdict(1.1) == (None, None)
    beat_all(live, 100.0, [0, 2, 3])  # and its silence afterwards is not death either
    assert live.verdict(100.0) == (None, None)
    live.closed(2, 100.5)  # rank 2's process ended without a goodbye (killed, crashed)
    abort, _ = live.verdict(100.5)
    assert abort == ("rank 2 (host h1) stopped answering: its process ended without saying goodbye (last seen: "
                     "training); aborting the job")


def test_every_rank_waiting_inside_mpi_past_the_collective_timeout_is_a_hang():
    live = hub(ct=300.0)
    beat_all(live, 299.0, range(4), waiting=299.0)
    assert live.verdict(299.0) == (None, None)
    beat_all(live, 301.0, range(4), waiting=301.0)
    abort, _ = live.verdict(301.0)
    assert abort.startswith("no progress inside MPI: every rank has waited more than 300 s in a collective "
                            "(last seen: training)"), abort


def test_a_busy_rank_keeps_the_job_alive_and_is_named_once():
    """Rank 0 writes a checkpoint for 3 minutes (60x the collective timeout); the others wait for it."""
    live = hub(ct=3.0)
    notes = []
    for t in range(1, 181):
        live.beat(0, float(t), "writing checkpoint", None)
        beat_all(live, float(t), [1, 2, 3], phase="writing checkpoint", waiting=float(t))
        abort, note = live.verdict(float(t))
        assert abort is None, (t, abort)
        if note:
            notes.append((t, note))
    assert notes == [(4, "ranks 1-3 have waited 4 s inside MPI for rank 0 (writing checkpoint), which still "
                          "answers: the job goes on")]
    beat_all(live, 181.0, range(4), phase="training", waiting=None)  # the wait is over: a later stall is noted again
    live.verdict(181.0)
    assert not live.noted


def test_the_default_note_comes_after_a_minute():
    live = hub()
    live.beat(0, 59.0, "writing checkpoint", None)
    beat_all(live, 59.0, [1, 2, 3], waiting=59.0)
    assert live.verdict(59.0) == (None, None)
    beat_all(live, 61.0, [1, 2, 3], waiting=61.0)
    live.beat(0, 61.0, "writing checkpoint", None)
    assert "for rank 0 (writing checkpoint)" in live.verdict(61.0)[1]


def test_a_rank_that_announced_an_abort_ends_a_job_that_outlived_it():
    live = hub()
    live.goodbye(2, "abort", 5.0)
    beat_all(live, 5.0 + wd.ABORT_GRACE, [0, 1, 3])
    assert live.verdict(5.0 + wd.ABORT_GRACE) == (None, None)
    beat_all(live, 6.0 + wd.ABORT_GRACE, [0, 1, 3])
    abort, _ = live.verdict(6.0 + wd.ABORT_GRACE)
    assert abort.startswith("rank 2 (host h1) aborted the job"), abort


def test_the_hubs_timeout_holds_but_a_rank_on_its_old_interval_gets_three_beats():
    live = Liveness(0, range(2), 30.0, 300.0, now=0.0, hosts=HOSTS)
    live.set_timeouts(3.0, 300.0)  # the config lowers the timeout; rank 1 still says 30 s (one beat a second)
    live.beat(0, 3.5, "training", None)
    assert live.verdict(3.5)[0].startswith("rank 1 (host h0) stopped answering: no heartbeat for 4 s")
    live = Liveness(0, range(2), 1.0, 300.0, now=0.0, hosts=HOSTS)
    live.beat(1, 0.0, "setting up", None, timeout=30.0)  # beats once a second until it applies 1 s
    live.beat(0, 2.9, "training", None)
    assert live.verdict(2.9) == (None, None)
    assert live.verdict(3.1)[0].startswith("rank 1 (host h0) stopped answering")


def test_a_non_root_rank_watches_rank_0_only():
    live = Liveness(1, [0], 5.0, 1.0, now=0.0, hosts={0: "h0"})
    live.beat(0, 1.0, "writing checkpoint", None)
    assert live.verdict(5.9) == (None, None)
    abort, _ = live.verdict(6.1)
    assert abort.startswith("rank 0 (host h0) stopped answering: no heartbeat for 5 s (last seen: writing checkpoint)")


def test_higher_ranks_give_rank_1_a_head_start_in_reporting_the_hub():
    """When rank 0 goes silent every other rank notices: rank 1 speaks first, the others a little later."""
    deadlines = []
    for me in (1, 2, 3, 9):
        live = Liveness(me, [0], 5.0, 300.0, now=0.0, hosts={0: "h0"})
        t = next(t / 10 for t in range(200) if live.verdict(t / 10)[0])
        deadlines.append(t)
    assert deadlines == [5.1, 6.1, 7.1, 10.1]
    live = Liveness(3, [0], 5.0, 300.0, now=0.0)
    live.closed(0, 1.0)
    assert live.verdict(2.9) == (None, None) and live.verdict(3.0)[0] is not None


def test_rank_lists_are_compact():
    assert wd._ranges([7, 1, 2, 3, 5, 8]) == "1-3, 5, 7, 8"


def test_hub_addresses_come_from_the_interfaces_first_and_end_with_loopback(monkeypatch):
    monkeypatch.setattr(wd, "interface_addresses", lambda: ["127.0.0.1", "10.213.0.1", "172.17.0.1"])
    monkeypatch.setattr(wd, "hostname_addresses", lambda: ["127.0.1.1", "10.213.0.1", "192.168.5.5"])
    assert wd.hub_addresses() == ["10.213.0.1", "172.17.0.1", "192.168.5.5", "127.0.0.1"]
    monkeypatch.setattr(wd, "hostname_addresses", lambda: [])  # a hostname that does not resolve
    assert wd.hub_addresses() == ["10.213.0.1", "172.17.0.1", "127.0.0.1"]


def test_interface_addresses_are_read_from_the_kernel():
    found = wd.interface_addresses()
    assert "127.0.0.1" in found  # lo
    assert all(socket.inet_aton(a) for a in found)


# ----------------------------------------------------------------------------- the side channel


class World:
    """Collectives for watchdogs on threads of one process (rank r's thread calls bcast/allgather)."""

    def __init__(self, size: int):
        self.size, self.barrier, self.slots, self.root = size, threading.Barrier(size, timeout=60), [None] * size, None

    def bcast(self, rank):
        def bcast(obj):
            if rank == 0:
                self.root = obj
            self.barrier.wait()
            out = self.root
            self.barrier.wait()
            return out

        return bcast

    def allgather(self, rank):
        def allgather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out

        return allgather


class Rank:
    """One watchdog with a settable activity; records what it would print and whether it aborted."""

    def __init__(self, rank, size, hb, ct):
        self.phase, self.waiting = "setting up", None
        self.lines, self.aborted = [], threading.Event()
        self.dog = Watchdog(rank, size, lambda: (self.phase, self.waiting), lambda code: self.aborted.set(),
                            hb, ct, write=self.lines.append)


def start(size=3, hb=1.0, ct=300.0):
    world, ranks = World(size), [Rank(r, size, hb, ct) for r in range(size)]
    threads = [threading.Thread(target=r.dog.connect, args=(world.bcast(i), world.allgather(i)))
               for i, r in enumerate(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return ranks


@pytest.fixture
def ranks():
    made = []

    def make(*args, **kwargs):
        made.extend(start(*args, **kwargs))
        return made

    yield make
    for r in made:
        r.dog.goodbye()


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_beats_carry_each_ranks_phase_to_the_hub(ranks):
    r0, r1, r2 = ranks()
    assert r0.dog.state == r1.dog.state == r2.dog.state == "up", r0.lines
    assert r0.dog.status.startswith("heartbeats with 2 ranks on port")
    assert r1.dog.status.startswith("heartbeats with rank 0 at ")
    r2.phase = "loading data"
    assert wait_for(lambda: r0.dog._watch.peers[2].phase == "loading data")
    time.sleep(2.5)  # past the 1 s timeout: everybody beats, nobody is aborted
    assert not any(r.aborted.is_set() for r in (r0, r1, r2)) and r0.lines == []


def test_a_rank_that_stops_beating_is_named_by_the_hub(ranks):
    r0, r1, r2 = ranks()
    r2.phase = "loading data"
    assert wait_for(lambda: r0.dog._watch.peers[2].phase == "loading data")
    with r2.dog._lock:
        r2.dog.state = "ended"  # its thread stops; the socket stays open, as in a frozen process
    r2.dog._poke()
    assert wait_for(r0.aborted.is_set, 10)
    assert r0.lines == [f"error: rank 2 (host {socket.gethostname()}) stopped answering: no heartbeat for 1 s "
                        "(last seen: loading data); the host may be down or its network cut "
                        "(train.heartbeat_timeout); aborting the job"]
    assert not r1.aborted.is_set()


def test_a_rank_whose_process_dies_is_named_at_once_and_one_that_says_goodbye_is_not(ranks):
    r0, r1, r2 = ranks(hb=5.0)
    r1.dog.goodbye()  # rank 1 ends normally
    time.sleep(0.5)
    assert not r0.aborted.is_set(), r0.lines
    with r2.dog._lock:  # rank 2 dies: the kernel closes its socket, nobody says goodbye
        r2.dog.state = "ended"
        for sock in list(r2.dog._conns):
            sock.close()
    r2.dog._poke()
    assert wait_for(r0.aborted.is_set, 3)  # well before the 5 s heartbeat timeout
    assert r0.lines == [f"error: rank 2 (host {socket.gethostname()}) stopped answering: its process ended without "
                        "saying goodbye (last seen: setting up); aborting the job"]


def test_an_announced_abort_is_not_taken_for_a_death(ranks):
    r0, r1, r2 = ranks(hb=5.0)
    r1.dog.goodbye("abort")  # what MPIComm.abort says before MPI_Abort
    assert wait_for(lambda: r0.dog._watch.peers[1].left == "abort", 3)
    time.sleep(0.5)
    assert not r0.aborted.is_set() and r0.lines == []  # MPI_Abort ends the job; no second message


def test_other_ranks_name_a_silent_hub(ranks):
    r0, r1, r2 = ranks()
    r0.phase = "writing checkpoint"
    assert wait_for(lambda: r1.dog._watch.peers[0].phase == "writing checkpoint")
    with r0.dog._lock:
        r0.dog.state = "ended"
    r0.dog._poke()
    assert wait_for(lambda: r1.aborted.is_set() and r2.aborted.is_set(), 10)
    assert r1.lines[0].startswith("error on rank 1: rank 0 (host ") and "(last seen: writing checkpoint)" in r1.lines[0]


def test_a_stranger_on_the_hubs_port_does_not_count(ranks):
    r0, _ = ranks(size=2)
    port = int(r0.dog._channel.rsplit(" ", 1)[1])
    stranger = socket.create_connection(("127.0.0.1", port), timeout=5)
    stranger.sendall(b'{"hello":"guess","r":1}\n')
    assert stranger.recv(100) == b""  # dropped without an answer
    stranger.close()
    time.sleep(0.3)
    assert not r0.aborted.is_set() and r0.lines == []


def test_a_stranger_during_start_up_cannot_take_a_ranks_place():
    """Before the channel is agreed, only a hello with the token broadcast over MPI counts as a rank."""
    world, r0, r1 = World(2), Rank(0, 2, 1.0, 300.0), Rank(1, 2, 1.0, 300.0)
    hub = threading.Thread(target=r0.dog.connect, args=(world.bcast(0), world.allgather(0)))
    hub.start()
    try:
        assert wait_for(lambda: r0.dog._listener is not None)
        port = r0.dog._listener.getsockname()[1]
        stranger = socket.create_connection(("127.0.0.1", port), timeout=5)
        stranger.sendall(b'{"hello":"0123456789abcdef0123456789abcdef","r":1,"host":"evil"}\n')
        assert stranger.recv(100) == b""  # dropped without an answer
        stranger.close()
        r1.dog.connect(world.bcast(1), world.allgather(1))
        hub.join(30)
        assert r0.dog.state == r1.dog.state == "up" and r0.lines == [], r0.lines
        assert r0.dog._watch.peers[1].host == socket.gethostname()
    finally:
        r0.dog.goodbye()
        r1.dog.goodbye()


def test_a_rank_that_cannot_reach_the_hub_turns_heartbeats_off_everywhere(ranks, monkeypatch):
    real = wd.connect_to_hub
    monkeypatch.setattr(wd, "connect_to_hub", lambda offer, hello: (None, "blocked by a firewall")
                        if hello["r"] == 2 else real(offer, hello))
    r0, r1, r2 = ranks(ct=0.5)
    assert [r.dog.state for r in (r0, r1, r2)] == ["local"] * 3
    assert r0.lines == [r0.lines[0]] and r0.lines[0].startswith("warning: heartbeats are off: rank 2 could not "
                                                                "reach rank 0 at "), r0.lines
    assert "(rank 2: blocked by a firewall)" in r0.lines[0] and r1.lines == r2.lines == []
    assert r1.dog.status == "per-rank timer, collective timeout 0.5 s (heartbeats could not be set up: " \
                            "blocked by a firewall)"
    time.sleep(1.5)
    assert not any(r.aborted.is_set() for r in (r0, r1, r2))  # no abort for that alone
    r1.waiting = 0.6  # but the per-rank timer still ends a stalled collective
    assert wait_for(r1.aborted.is_set, 5)
    assert r1.lines == ["error on rank 1: no progress inside MPI for 0.5 s (setting up; a rank or host stopped "
                        "answering; train.collective_timeout); aborting the job"]


def test_a_failing_watchdog_thread_says_so_and_leaves_instead_of_passing_for_dead(ranks):
    r0, r1, r2 = ranks()
    r2.waiting = "not a number"  # activity() returns garbage: formatting the beat raises in r2's thread
    assert wait_for(lambda: r2.lines, 5)
    assert r2.lines == ["warning on rank 2: the watchdog stopped (TypeError: type str doesn't define __round__ "
                        "method); this rank is no longer watched"]
    assert wait_for(lambda: r0.dog._watch.peers[2].left == "exit", 5)
    time.sleep(1.5)  # past the 1 s heartbeat timeout
    assert not r0.aborted.is_set() and r0.lines == []


class RecordingComm(SerialComm):
    """SerialComm that records the phases the trainer enters."""

    def __init__(self):
        self.phases = []

    def phase(self, name):
        self.phases.append(name)
        return super().phase(name)


def test_the_trainer_labels_set_up_training_evaluation_and_writes(tmp_path):
    from helpers import small_config

    from dpbp.train import Trainer

    comm = RecordingComm()
    cfg = small_config("train.epochs=1", "checkpoint.every_epochs=1")
    trainer = Trainer(cfg, comm, tmp_path, echo=lambda s: None)
    trainer.run()
    trainer.restore(sorted((tmp_path / "checkpoints").glob("*.npz"))[-1])
    seen = [p.split(" /")[0] for p in comm.phases]  # names without the file paths
    for phase in ("setting up", "loading data", "choosing the gradient exchange", "training", "evaluating",
                  "writing checkpoint", "saving the model", "reading checkpoint"):
        assert phase in seen, (phase, comm.phases)


def test_serial_comm_has_no_watchdog():
    before = threading.active_count()
    comm = SerialComm()
    comm.start_watchdog(30, 300)
    comm.configure_watchdog(3, 2)
    with comm.phase("training"):
        pass
    assert threading.active_count() == before
