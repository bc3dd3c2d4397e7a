"""Real multi-process runs under mpirun (subprocesses): the distributed tests and the CLI end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import max_rel_diff, mpirun

from dpbp.checkpoint import load_model

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(cmd, timeout=240, cwd=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_distributed_suite_under_mpirun(ranks):
    proc = run([*mpirun(ranks), sys.executable, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider",
                str(TESTS / "mpi")])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count(" passed") == ranks and "failed" not in proc.stdout


TRAIN_ARGS = ["--set", "data.train=spirals:n=403", "--set", "model.dtype=float64", "--set", "model.layers=[2,16,3]",
              "--batch-size", "23", "--epochs", "3", "--lr", "0.02"]


def test_cli_train_under_mpirun_equals_one_process(tmp_path):
    serial = run([sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS, "--run-dir", str(tmp_path / "one")])
    assert serial.returncode == 0, serial.stderr
    dist = run([*mpirun(3), sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS,
                "--run-dir", str(tmp_path / "three")])
    assert dist.returncode == 0, dist.stdout + dist.stderr
    assert dist.stdout.count("done:") == 1, "rank 0 alone prints the result"
    assert "3 ranks" in dist.stdout
    assert "gradients: node-shared memory" in dist.stdout  # one node: train.node_shared=auto uses it
    a = load_model(tmp_path / "one" / "model.npz")
    b = load_model(tmp_path / "three" / "model.npz")
    assert max_rel_diff(b.params, a.params) < 1e-10
    for name in ("config.toml", "metrics.jsonl", "model.npz"):
        assert (tmp_path / "three" / name).is_file()
    ev = run([*mpirun(2), sys.executable, "-m", "dpbp.cli", "evaluate",
              "--model", str(tmp_path / "three" / "model.npz"), "--data", "spirals:n=403", "--json"])
    assert ev.returncode == 0 and ev.stdout.count('"n": 403') == 1, ev.stdout + ev.stderr


def test_bad_config_under_mpirun_is_one_message_and_exit_2(tmp_path):
    proc = run([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", "--set", "train.lr=-1",
                "--run-dir", str(tmp_path)])
    assert proc.returncode == 2
    assert proc.stderr.count("train.lr") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_failure_on_one_rank_ends_the_job_quickly(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "from helpers import small_config\n"
        "from dpbp.cli import collective\n"
        "from dpbp.train import Trainer\n"
        "@collective\n"
        "def body(comm):\n"
        "    def boom(trainer):\n"
        "        if comm.rank == 1 and trainer.state.global_step == 5:\n"
        "            raise MemoryError('injected on rank 1')\n"
        "        return False\n"
        "    cfg = small_config('train.epochs=1000')\n"
        "    Trainer(cfg, comm, None, echo=lambda s: None).run(on_step_end=boom)\n"
        "body()\n"
    )
    env_path = f"{TESTS}{os.pathsep}{ENV.get('PYTHONPATH', '')}"
    proc = subprocess.run([*mpirun(3), sys.executable, str(script)], capture_output=True, text=True, timeout=30,
                          env={**ENV, "PYTHONPATH": env_path})
    assert proc.returncode != 0
    assert "error on rank 1: MemoryError: injected on rank 1" in proc.stderr
    assert "stopped answering" not in proc.stderr  # rank 1 said goodbye before MPI_Abort: an abort, not a death


def test_predict_under_mpirun_writes_every_row_once(tmp_path):
    train = run([sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS, "--run-dir", str(tmp_path)])
    assert train.returncode == 0, train.stderr
    x = np.random.default_rng(0).normal(size=(11, 2))
    np.save(tmp_path / "x.npy", x)
    proc = run([*mpirun(3), sys.executable, "-m", "dpbp.cli", "predict", "--model", str(tmp_path / "model.npz"),
                "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "out.npy")])
    assert proc.returncode == 0, proc.stderr
    out = np.load(tmp_path / "out.npy")
    expected = load_model(tmp_path / "model.npz").predict(x)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


PREEMPT_ARGS = ["--set", "data.train=spirals:n=2000", "--set", "model.dtype=float64", "--set",
                "model.layers=[2,32,32,3]", "--batch-size", "8", "--epochs", "60", "--lr", "0.001",
                "--set", "checkpoint.every_epochs=0"]


def rank_pids(marker: str) -> list[int]:
    """PIDs of the rank processes (not the launcher) whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in a for a in argv) and b"dpbp.cli" in argv and b"-m" in argv:
            if not any(b"mpi" in Path(a.decode(errors="ignore")).name.encode() for a in argv[:1]):
                pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("signame,target", [("SIGTERM", "all"), ("SIGUSR1", "one")])
def test_signalled_run_resumes_to_the_uninterrupted_model(tmp_path, signame, target):
    import signal
    import time

    full = tmp_path / "full"
    ref = run([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", *PREEMPT_ARGS, "--run-dir", str(full)])
    assert ref.returncode == 0, ref.stderr
    part = tmp_path / "part"
    proc = subprocess.Popen([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", *PREEMPT_ARGS,
                             "--run-dir", str(part)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    deadline = time.time() + 60
    while time.time() < deadline and not (part / "metrics.jsonl").exists():
        time.sleep(0.01)
    time.sleep(0.05)
    pids = rank_pids(str(part))
    assert len(pids) == 2, pids
    for pid in pids if target == "all" else pids[-1:]:  # Slurm signals every task; one rank is enough
        os.kill(pid, getattr(signal, signame))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, out + err
    assert err.count("stopped by ") == 1 and "error" not in err and "Traceback" not in err, err  # not an error
    assert f"stopped by {signame}" in err or (target == "one" and "stop signal on another rank" in err), err
    resumed = run([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", *PREEMPT_ARGS, "--run-dir", str(part),
                   "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = load_model(full / "model.npz"), load_model(part / "model.npz")
    np.testing.assert_array_equal(a.params, b.params)


def test_rank0_failing_to_save_ends_every_rank(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    proc = run([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS, "--run-dir", str(tmp_path),
                "--set", "checkpoint.every_steps=3"], timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.count("could not write checkpoint") == 1 and "Traceback" not in proc.stderr


def test_ranks_with_different_configs_are_refused():
    base = [sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS]
    launcher = mpirun(1)
    proc = run([*launcher, *base, "--run-dir", "/tmp/dpbp-unused", "--lr", "0.1", ":", "-n", "1", *base,
                "--run-dir", "/tmp/dpbp-unused", "--lr", "0.2"], timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("rank(s) [1] started with a different config") == 1


def ranks_by_number(marker: str) -> dict[int, int]:
    """{rank: PID} of the rank processes whose command line contains ``marker`` (PMI_RANK names the rank)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((v[len(b"PMI_RANK="):] for v in env if v.startswith(b"PMI_RANK=")), None)
        if rank is not None and any(marker.encode() in a for a in argv):
            found[int(rank)] = int(entry.name)
    return found


def stop_and_wait(proc: subprocess.Popen, pids: dict[int, int], rank: int, limit: float) -> tuple[str, str, float]:
    """SIGSTOP ``rank`` and wait for the job to end; returns (stdout, stderr, seconds it took)."""
    import signal
    import time

    os.kill(pids[rank], signal.SIGSTOP)
    start = time.time()
    try:
        out, err = proc.communicate(timeout=limit)
    finally:
        for pid in pids.values():  # never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return out, err, time.time() - start


@pytest.mark.parametrize("stopped", [1, 0])
def test_a_rank_that_stops_answering_ends_the_job(tmp_path, stopped):
    """SIGSTOP one rank during training (as a hung node would look): the heartbeats name it within seconds."""
    import socket
    import time

    run_dir = tmp_path / "stall"
    proc = subprocess.Popen([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", *PREEMPT_ARGS,
                             "--epochs", "100000", "--set", "train.heartbeat_timeout=3", "--run-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 60
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.02)
    pids = ranks_by_number(str(run_dir))
    assert sorted(pids) == [0, 1], pids
    _, err, took = stop_and_wait(proc, pids, stopped, 60)
    assert proc.returncode != 0
    assert took < 20, err
    host = re.escape(socket.gethostname())
    who = (rf"error: rank 1 \(host {host}\)" if stopped == 1 else rf"error on rank 1: rank 0 \(host {host}\)")
    assert re.search(who + r" stopped answering: no heartbeat for \d+ s \(last seen: [^)]+\); "
                     r"the host may be down or its network cut \(train.heartbeat_timeout\); aborting the job", err), err
    assert err.count("stopped answering") == 1, err


def test_a_rank_that_stops_answering_while_loading_data_ends_the_job(tmp_path):
    """The config's heartbeat timeout applies from the moment the config is read: a rank frozen while it
    loads a large data set is named after 3 s, not after the default 30 s."""
    import socket
    import time

    run_dir = tmp_path / "loading"
    proc = subprocess.Popen([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", "--set",
                             "data.train=spirals:n=20000000", "--set", "model.layers=[2,8,3]",
                             "--set", "train.heartbeat_timeout=3", "--run-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 60
    pids = {}
    while time.time() < deadline and len(pids) < 2:
        pids = ranks_by_number(str(run_dir))
        time.sleep(0.05)
    assert sorted(pids) == [0, 1], pids
    time.sleep(3)  # started, config read; generating 20,000,000 points takes far longer (nothing is written yet)
    assert proc.poll() is None and not run_dir.exists()
    _, err, took = stop_and_wait(proc, pids, 1, 60)
    assert proc.returncode != 0 and took < 20, err
    assert (f"error: rank 1 (host {socket.gethostname()}) stopped answering: no heartbeat for " in err
            and "s (last seen: loading data); the host may be down" in err), err


def test_info_under_mpirun_shows_the_heartbeats():
    """Every MPI command starts the watchdog before its body runs (``info`` never reads a config)."""
    proc = run([*mpirun(3), sys.executable, "-m", "dpbp.cli", "info"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^watchdog +heartbeats with 2 ranks on port \d+, every 1 s, timeout 30 s; collective "
                     r"timeout 300 s$", proc.stdout, re.M), proc.stdout


# One script, several scenarios: the body runs under dpbp's own `collective` wrapper, as the CLI commands do.
WATCHED = """
import os, sys, time
from pathlib import Path
from dpbp import watchdog
from dpbp.cli import collective

scenario, heartbeat, collective_timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
if scenario == "firewall" and os.environ.get("PMI_RANK") == "1":
    watchdog.connect_to_hub = lambda offer, hello: (None, "blocked by the test")

@collective
def body(comm):
    comm.configure_watchdog(heartbeat, collective_timeout)
    if scenario == "stall":  # rank 1 is slow to load its data, then freezes (the test stops it)
        with comm.phase("loading data"):
            if comm.rank == 1:
                Path(sys.argv[4]).touch()
                time.sleep(600)
            comm.barrier()
    elif scenario == "busy":  # rank 0 writes to slow storage; the others wait inside MPI meanwhile
        with comm.phase("writing checkpoint"):
            if comm.rank == 0:
                time.sleep(3.5)
            comm.barrier()
        comm.barrier()
        if comm.rank == 0:
            print("finished", flush=True)
    elif scenario == "firewall":  # no heartbeats: the job runs, and the per-rank timer still ends a stall
        comm.barrier()
        if comm.rank == 0:
            print("still running", flush=True)
        if comm.rank == 1:
            time.sleep(4)
        comm.barrier()

body()
"""


def watched(tmp_path, ranks: int, *args: str, wait: bool = True):
    script = tmp_path / "watched.py"
    script.write_text(WATCHED)
    cmd = [*mpirun(ranks), sys.executable, str(script), *args]
    if wait:
        return run(cmd, timeout=60)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def test_a_rank_that_stops_answering_during_set_up_ends_the_job(tmp_path):
    """Before any training: rank 1 loads data (busy, so the job waits for it), then freezes: it is named."""
    import socket
    import time

    marker = tmp_path / "rank1-loading"
    proc = watched(tmp_path, 2, "stall", "3", "2", str(marker), wait=False)
    deadline = time.time() + 60
    while time.time() < deadline and not marker.exists():
        time.sleep(0.02)
    time.sleep(3)  # longer than collective_timeout: rank 0 waits inside MPI, rank 1 is busy, nobody aborts
    assert proc.poll() is None, proc.communicate()
    pids = ranks_by_number(str(tmp_path / "watched.py"))
    assert sorted(pids) == [0, 1], pids
    _, err, took = stop_and_wait(proc, pids, 1, 60)
    assert proc.returncode != 0 and took < 20, err
    assert (f"error: rank 1 (host {socket.gethostname()}) stopped answering: no heartbeat for " in err
            and "s (last seen: loading data); the host may be down" in err), err
    assert err.count("error") == 1, err


def test_a_busy_rank_does_not_end_the_job(tmp_path):
    """Rank 0 busy outside MPI for 3.5x train.collective_timeout while 2 ranks wait for it: the job finishes."""
    proc = watched(tmp_path, 3, "busy", "3", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("finished") == 1
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, proc.stderr
    assert re.fullmatch(r"note: (rank [12] has|ranks 1, 2 have) waited \d s inside MPI for rank 0 "
                        r"\(writing checkpoint\), which still answers: the job goes on", notes[0]), notes


def test_a_rank_that_cannot_reach_rank_0_turns_heartbeats_off_but_not_the_timer(tmp_path):
    proc = watched(tmp_path, 2, "firewall", "3", "2")
    assert proc.stdout.count("still running") == 1, proc.stdout + proc.stderr  # no hang, no abort for that alone
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and warning[0].startswith("warning: heartbeats are off: rank 1 could not reach rank 0 "
                                                       "at "), proc.stderr
    assert "(rank 1: blocked by the test)" in warning[0]
    assert proc.returncode != 0
    assert "error on rank 0: no progress inside MPI for 2 s (setting up; a rank or host stopped answering; " \
           "train.collective_timeout); aborting the job" in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", ["content", "rows"])
def test_ranks_with_different_data_are_refused_naming_them(tmp_path, case):
    """Node-local copies of a data file that differ: refused at start-up with exit 2, never a hang."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 2)), rng.integers(0, 3, 60)
    for rank in range(3):
        folder = tmp_path / f"rank{rank}"
        folder.mkdir()
        xr = x.copy()
        if rank == 2:
            xr = xr[:-1] if case == "rows" else xr + 1e-9
        np.savez(folder / "data.npz", x=xr, y=y[: len(xr)])
    script = tmp_path / "train_here.py"
    script.write_text(
        "import os, sys\n"
        "os.chdir(os.path.join(sys.argv[1], 'rank' + os.environ['PMI_RANK']))  # same config, own file\n"
        "from dpbp.cli import main\n"
        "main(['train', '--set', 'data.train=data.npz', '--set', 'model.layers=[2,4,3]', '--epochs', '1',\n"
        "      '--run-dir', os.path.join(sys.argv[1], 'run')])\n")
    proc = run([*mpirun(3), sys.executable, str(script), str(tmp_path)], timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "ranks do not have the same train data: rank(s) [2] differ from rank 0" in proc.stderr
    assert ("different content" if case == "content" else "rank 2 has 53 rows") in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_sigterm_during_set_up_under_mpirun_exits_75_once_and_writes_nothing(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*mpirun(2), sys.executable, "-m", "dpbp.cli", "train", "--set",
                             "data.train=highdim:n=1500000", "--set", "model.layers=[100,8,10]", "--run-dir",
                             str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(2.0)  # both ranks are generating 1,500,000 x 100 points (about 4 s)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # mpirun forwards it to every rank
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, out + err
    assert err.count("stopped by SIGTERM before training started") == 1 and "error" not in err, err
    assert not run_dir.exists()


def test_evaluate_with_different_data_per_rank_is_refused(tmp_path):
    train = run([sys.executable, "-m", "dpbp.cli", "train", *TRAIN_ARGS, "--run-dir", str(tmp_path / "run")])
    assert train.returncode == 0, train.stderr
    rng = np.random.default_rng(0)
    for rank in range(2):
        (tmp_path / f"rank{rank}").mkdir()
        np.savez(tmp_path / f"rank{rank}" / "test.npz", x=rng.normal(size=(50, 2)), y=rng.integers(0, 3, 50))
    script = tmp_path / "evaluate_here.py"
    script.write_text(
        "import os, sys\n"
        "os.chdir(os.path.join(sys.argv[1], 'rank' + os.environ['PMI_RANK']))\n"
        "from dpbp.cli import main\n"
        "main(['evaluate', '--model', os.path.join(sys.argv[1], 'run', 'model.npz'), '--data', 'test.npz'])\n")
    proc = run([*mpirun(2), sys.executable, str(script), str(tmp_path)], timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("ranks do not have the same evaluation data: rank(s) [1]") == 1, proc.stderr


# A user's script: every rank passes the full data; rank 0 alone prints (verbose) and writes the run directory.
FIT_SCRIPT = """
import os, sys
import numpy as np
from sklearn.datasets import load_digits
from dpbp import MLPClassifier

X, y = load_digits(return_X_y=True)
est = MLPClassifier((32,), batch_size=37, max_iter=4, learning_rate_init=0.003, dtype="float64", random_state=2,
                    early_stopping=True, verbose=True, run_dir=sys.argv[1]).fit(X, y)
rank = os.environ.get("PMI_RANK", "single")
np.savez(os.path.join(sys.argv[2], f"rank-{rank}.npz"), params=est.model_.params, pred=est.predict(X),
         score=est.score(X, y))
"""


def test_a_script_fitting_under_mpirun_equals_one_process(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    (tmp_path / "one").mkdir()
    (tmp_path / "four").mkdir()
    one = run([sys.executable, str(script), str(tmp_path / "runs-one"), str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    four = run([*mpirun(4), sys.executable, str(script), str(tmp_path / "runs-four"), str(tmp_path / "four")])
    assert four.returncode == 0, four.stdout + four.stderr
    for line in ("epoch 4/4:", "restored the best model"):  # printed by rank 0 alone
        assert four.stdout.count(line) == one.stdout.count(line) == 1, four.stdout
    assert [p.name for p in (tmp_path / "runs-four").iterdir()] == ["run-001"]  # one run directory, one model
    ref = np.load(tmp_path / "one" / "rank-single.npz")
    ranks = [np.load(tmp_path / "four" / f"rank-{r}.npz") for r in range(4)]
    for r in ranks:  # the fitted estimator is complete on every rank
        assert max_rel_diff(r["params"], ref["params"]) < 1e-10
        np.testing.assert_array_equal(r["pred"], ref["pred"])
        assert r["score"] == ref["score"] > 0.8
    saved = load_model(tmp_path / "runs-four" / "run-001" / "model.npz")
    assert max_rel_diff(saved.params, load_model(tmp_path / "runs-one" / "run-001" / "model.npz").params) < 1e-10
