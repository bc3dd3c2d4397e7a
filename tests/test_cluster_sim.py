"""dpbp across simulated hosts (scripts/cluster-sim): network namespaces on a private bridge, as root.

Each test builds its own cluster through run.sh (2 hosts, mpiexec on a third "head" namespace, ranks
started by hydra's ssh launcher) and checks that run.sh removed it. Without root, iproute2 or a working
``ip netns add`` the tests are skipped with the concrete reason; anywhere else they must pass.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import max_rel_diff

from dpbp import load_model

SIM = Path(__file__).resolve().parent.parent / "scripts" / "cluster-sim"
RUN_SH = SIM / "run.sh"
CLUSTER_SH = SIM / "cluster.sh"
STATE = Path("/run/dpbp-cluster-sim")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
TRAIN_ARGS = ["--set", "data.train=spirals:n=403", "--set", "model.dtype=float64", "--set", "model.layers=[2,16,3]",
              "--batch-size", "23", "--epochs", "3", "--lr", "0.02"]
_ids = itertools.count()


def _namespace_problem() -> str | None:
    """Why network namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "not root (network namespaces, veth pairs and bridges need CAP_NET_ADMIN)"
    for tool in ("ip", "unshare", "mpiexec"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found on PATH"
    probe = f"dpbp-probe{os.getpid()}"
    try:
        proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns add {probe}: {exc}"
    if proc.returncode != 0:
        return f"ip netns add {probe} failed: {proc.stderr.strip() or proc.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


@pytest.fixture(scope="module", autouse=True)
def _needs_namespaces():
    problem = _namespace_problem()
    if problem:
        pytest.skip(f"cannot create network namespaces: {problem}")


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _root_links() -> set[str]:
    """Names of the veth and bridge interfaces in the root namespace (the simulation adds none)."""
    names = set()
    for kind in ("veth", "bridge"):
        out = subprocess.run(["ip", "-o", "link", "show", "type", kind], capture_output=True, text=True).stdout
        names.update(line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line)
    return names


@pytest.fixture
def cluster_id():
    """A fresh cluster id; afterwards, whatever the test did, nothing of that cluster is left."""
    cid = f"dpbp-t{os.getpid()}x{next(_ids)}"
    links_before = _root_links()
    procs: list[subprocess.Popen] = []
    try:
        yield cid, procs
    finally:
        for proc in procs:  # a run.sh the test left running: stop it, then remove by hand
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if any(ns.startswith(cid + "-") for ns in _netns()) or (STATE / cid).exists():
            subprocess.run([str(CLUSTER_SH), "down", cid], capture_output=True, timeout=60)
        assert not [ns for ns in _netns() if ns.startswith(cid + "-")]
        assert _root_links() <= links_before


def assert_cluster_gone(cid: str) -> None:
    assert [ns for ns in _netns() if ns.startswith(cid + "-")] == [], "run.sh left namespaces behind"
    assert not (STATE / cid).exists(), "run.sh left its state directory behind"


def run_sh(cid: str, hosts: int, ranks_per_host: int, *cmd: str, netmod: str = "ucx", timeout: float = 50):
    return subprocess.run([str(RUN_SH), "--id", cid, "--hosts", str(hosts), "--ranks-per-host",
                           str(ranks_per_host), "--netmod", netmod, "--", *cmd],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The model one process trains with TRAIN_ARGS: what every simulated cluster must reproduce."""
    folder = tmp_path_factory.mktemp("one")
    one = [sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS, "--run-dir", str(folder)]
    serial = subprocess.run(one, capture_output=True, text=True, timeout=50, env=ENV)
    assert serial.returncode == 0, serial.stderr
    return load_model(folder / "model.npz")


@pytest.mark.parametrize(("hosts", "setting", "exchange"), [
    (2, "train.node_shared=auto", "hierarchical: node-shared memory on each of 2 nodes"),  # the default
    (3, "train.node_shared=auto", "hierarchical: node-shared memory on each of 3 nodes"),
    (2, "train.node_shared=off", "one Allreduce per step"),
])
def test_hosts_train_the_model_of_one_process(tmp_path, cluster_id, one_process, hosts, setting, exchange):
    cid, _ = cluster_id
    # tmp_path is on the shared filesystem: every simulated host writes and reads the same run dir.
    dist = run_sh(cid, hosts, 2, sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS, "--set", setting,
                  "--run-dir", str(tmp_path / "hosts"))
    assert dist.returncode == 0, dist.stdout + dist.stderr
    assert f"{2 * hosts} ranks" in dist.stdout and dist.stdout.count("done:") == 1, dist.stdout
    assert f"gradients: {exchange}" in dist.stdout, dist.stdout
    where = re.search(r"^cluster-sim: ranks by host: (.*)$", dist.stderr, re.M)
    expected = " ".join(f"dpbp-h{h}=[{2 * h},{2 * h + 1}]" for h in range(hosts))
    assert where and where.group(1) == expected, dist.stderr
    b = load_model(tmp_path / "hosts" / "model.npz")
    assert max_rel_diff(b.params, one_process.params) < 1e-10
    assert_cluster_gone(cid)


PROBE = """
import json, socket
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
def tx():
    with open("/sys/class/net/eth0/statistics/tx_bytes") as f:
        return int(f.read())
buf = np.ones(1 << 20)  # 8 MB: far more than the PMI and control traffic
before = tx()
comm.Allreduce(MPI.IN_PLACE, buf)
sent = tx() - before
node = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
rows = comm.gather({"host": socket.gethostname(), "sent": sent, "ranks_on_node": node, "sum": buf[0]})
if comm.rank == 0:
    print("PROBE " + json.dumps(rows))
"""


@pytest.mark.parametrize("netmod", ["ucx", "ofi"])
def test_ranks_on_two_hosts_talk_over_the_bridge(cluster_id, netmod):
    cid, _ = cluster_id
    proc = run_sh(cid, 2, 1, sys.executable, "-c", PROBE, netmod=netmod)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout.split("PROBE ", 1)[1])
    assert [r["host"] for r in rows] == ["dpbp-h0", "dpbp-h1"]
    assert all(r["ranks_on_node"] == 1 and r["sum"] == 2.0 for r in rows), rows
    # Each rank must push its half of the 8 MB through eth0, not through shared memory.
    assert all(r["sent"] > 4_000_000 for r in rows), rows
    assert_cluster_gone(cid)


def start_long_run(cid: str, procs: list, tmp_path: Path, run_dir: Path, *extra: str,
                   ranks_per_host: int = 1) -> subprocess.Popen:
    """Start an endless training run on 2 hosts and return once it is training."""
    out, err = (tmp_path / "stdout").open("w"), (tmp_path / "stderr").open("w")
    cmd = [str(RUN_SH), "--id", cid, "--hosts", "2", "--ranks-per-host", str(ranks_per_host), "--no-hostnames", "--",
           sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS, "--epochs", "100000", *extra,
           "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=ENV)  # files: a full pipe would stall rank 0
    procs.append(proc)
    deadline = time.monotonic() + 40
    while not (run_dir / "metrics.jsonl").exists():
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        assert time.monotonic() < deadline, "training did not start within 40 s"
        time.sleep(0.05)
    time.sleep(0.3)
    return proc


def test_losing_a_host_ends_the_job_quickly(tmp_path, cluster_id):
    """Host 1's processes die mid-training (as when its node crashes): the whole job must end, non-zero.

    Cutting host 1's link instead is the next test: MPI alone would hang there (see
    scripts/cluster-sim/README.md); dpbp's heartbeats end it.
    """
    cid, procs = cluster_id
    run_dir = tmp_path / "long"
    proc = start_long_run(cid, procs, tmp_path, run_dir)
    pids = subprocess.run(["ip", "netns", "pids", f"{cid}-h1"], capture_output=True, text=True).stdout.split()
    assert pids, "nothing runs on host 1"
    cut = time.monotonic()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job still runs 60 s after host 1 died:\n{(tmp_path / 'stderr').read_text()[-3000:]}")
    took = time.monotonic() - cut
    assert rc != 0, (tmp_path / "stderr").read_text()
    assert took < 60
    assert_cluster_gone(cid)


def test_cutting_a_hosts_link_ends_the_job(tmp_path, cluster_id):
    """Host 1's link goes down mid-training: MPI alone would wait ~15 minutes for TCP. With DEFAULT settings
    rank 0 misses host 1's heartbeats for train.heartbeat_timeout (30 s) and aborts, naming both its ranks."""
    cid, procs = cluster_id
    run_dir = tmp_path / "cut"
    proc = start_long_run(cid, procs, tmp_path, run_dir, ranks_per_host=2)
    cut = time.monotonic()
    subprocess.run(["ip", "-n", f"{cid}-h1", "link", "set", "eth0", "down"], check=True, timeout=10)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job still runs 90 s after the cut:\n{(tmp_path / 'stderr').read_text()[-3000:]}")
    took = time.monotonic() - cut
    err = (tmp_path / "stderr").read_text()
    assert rc != 0
    assert took < 60, err
    assert re.search(r"^error: ranks 2, 3 \(host dpbp-h1\) stopped answering: no heartbeat for 3\d s \(last seen: "
                     r"[^)]+\); the host may be down or its network cut \(train.heartbeat_timeout\); aborting the job$",
                     err, re.M), err
    assert "warning: heartbeats are off" not in err
    assert_cluster_gone(cid)


HEARTBEAT_PROBE = """
import json
from dpbp import watchdog
watchdog.hostname_addresses = lambda: []  # as on a cluster whose host names resolve to nothing useful
from dpbp.comm import MPIComm
comm = MPIComm()
comm.start_watchdog(30, 300)
rows = comm.allgather_obj(comm.watchdog_status)
if comm.rank == 0:
    print("STATUS " + json.dumps(rows))
"""


def test_heartbeats_reach_rank_0_through_its_interface_address(cluster_id):
    """With nothing from the host name, ranks on host 1 find rank 0 by the address of host 0's eth0."""
    cid, _ = cluster_id
    proc = run_sh(cid, 2, 2, sys.executable, "-c", HEARTBEAT_PROBE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout.split("STATUS ", 1)[1])
    assert rows[0].startswith("heartbeats with 3 ranks on port "), rows
    port = rows[0].split("port ", 1)[1].split(",")[0]
    assert all(row.startswith(f"heartbeats with rank 0 at 10.213.0.1:{port},") for row in rows[1:]), rows
    assert "warning" not in proc.stderr
    assert_cluster_gone(cid)
