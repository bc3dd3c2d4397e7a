"""One run per directory, resume by lineage: the run directory's record, lock, branches and refusals.

Most tests drive the CLI in-process (click's CliRunner, one serial process); the lock and the
signal tests use real processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import invoke, small_config

from dpbp import checkpoint as ckpt
from dpbp import load_model, rundir
from dpbp.comm import SerialComm
from dpbp.config import load_config
from dpbp.train import Preempted, Trainer

SMALL = ["--set", "data.train=spirals:n=300", "--set", "model.layers=[2,8,3]", "--set", "model.dtype=float64"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "DPBP_COMM": "serial"}



def train(*args):
    return invoke("train", *SMALL, *args)


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its kind, content digest and modification time."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            if path.is_symlink():
                out[str(path.relative_to(folder))] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path.relative_to(folder))] = ("dir",)
            else:
                out[str(path.relative_to(folder))] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(),
                                                      st.st_mtime_ns)
    return out


def lineage(folder: Path) -> list[dict]:
    """The lineage entries of the checkpoints in ``folder``, by seq."""
    return sorted((rundir.peek_checkpoint_run(p) for p in folder.glob("*.npz")), key=lambda r: r["seq"])


# ----------------------------------------------------------------------------- one run per directory


def test_train_twice_without_run_dir_keeps_both_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = train("--epochs", "1"), train("--epochs", "1")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "run dir runs/run-001" in first.output and "run dir runs/run-002" in second.output
    ids = set()
    for name in ("run-001", "run-002"):
        folder = tmp_path / "runs" / name
        assert (folder / "model.npz").is_file() and len((folder / "metrics.jsonl").read_text().splitlines()) == 1
        record = json.loads((folder / "run.json").read_text())
        assert record["directory"] == str(folder) and record["command"][0] == "dpbp"
        ids.add(record["run_id"])
    assert len(ids) == 2


def test_a_directory_that_holds_a_run_is_refused_and_left_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    assert train("--epochs", "1", "--run-dir", run_dir).exit_code == 0
    before = snapshot(run_dir)
    again = train("--epochs", "1", "--run-dir", run_dir)
    assert again.exit_code == 2
    assert "already holds run" in again.output and "--resume auto" in again.output and "--overwrite" in again.output
    assert "Traceback" not in again.output
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("args,anywhere", [
    (["--set", "data.train=spirals:n=30O"], True),  # a typo in the data source
    (["--set", "train.lr=-1"], True),  # a config error
    (["--resume", "auto", "--set", "model.layers=[2,9,3]"], False),  # a refused resume (another model)
    (["--resume", "auto", "--set", "data.train=nothere.csv"], True),
    (["--overwrite", "--set", "data.train=nothere.csv"], True),  # refused before the old run is removed
    (["--overwrite", "--resume", "auto"], True),  # contradictory options
], ids=["data-typo", "config", "resume-other-model", "resume-bad-data", "overwrite-bad-data", "overwrite-resume"])
def test_a_refused_command_changes_nothing_on_disk(tmp_path, args, anywhere):
    run_dir = tmp_path / "run"
    assert train("--epochs", "1", "--run-dir", run_dir).exit_code == 0
    before = snapshot(run_dir)
    result = train("--epochs", "2", "--run-dir", run_dir, *args)
    assert result.exit_code == 2, result.output
    assert snapshot(run_dir) == before
    if anywhere:  # refused in a new directory too: it is not even created
        fresh = tmp_path / "fresh"
        assert train("--run-dir", fresh, *args).exit_code == 2
        assert not fresh.exists()


def test_overwrite_replaces_the_run_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    assert train("--epochs", "2", "--run-dir", run_dir).exit_code == 0
    old_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    (run_dir / "notes.txt").write_text("mine")
    result = train("--epochs", "1", "--run-dir", run_dir, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "--overwrite: removed the previous run's" in result.output
    assert json.loads((run_dir / "run.json").read_text())["run_id"] != old_id
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # the old epochs are gone
    assert (run_dir / "notes.txt").read_text() == "mine"  # not a dpbp output: left alone


def test_a_run_directory_in_use_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = rundir.RunLock.acquire(run_dir, ["dpbp", "train", "--run-dir", str(run_dir)])
    try:
        proc = subprocess.run([sys.executable, "-m", "dpbp.cli", "train", *SMALL, "--epochs", "1", "--run-dir",
                               str(run_dir)], capture_output=True, text=True, timeout=60, env=ENV)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("error:") == 1 and "in use by another dpbp run" in proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr and "dpbp train --run-dir" in proc.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]
    finally:
        holder.release()
    assert train("--epochs", "1", "--run-dir", run_dir).exit_code == 0  # free again once released


def test_the_lock_is_held_while_training_and_released_after(tmp_path):
    seen = []
    cfg = small_config("train.epochs=1")
    trainer = Trainer(cfg, SerialComm(), tmp_path / "run", echo=lambda s: None)
    trainer.run(on_step_end=lambda t: seen.append(rundir.is_locked(tmp_path / "run")) or False)
    assert seen and all(s is not None and f"pid {os.getpid()}" in s for s in seen)
    assert rundir.is_locked(tmp_path / "run") is None


# ----------------------------------------------------------------------------- lineage


def test_every_checkpoint_records_its_run_seq_and_parent(tmp_path):
    run_dir = tmp_path / "run"
    assert train("--epochs", "3", "--run-dir", run_dir, "--set", "checkpoint.every_steps=2",
                 "--set", "checkpoint.keep=100").exit_code == 0
    record = json.loads((run_dir / "run.json").read_text())
    entries = lineage(run_dir / "checkpoints")
    assert {e["run_id"] for e in entries} == {record["run_id"]}
    seqs = [e["seq"] for e in entries]
    assert len(set(seqs)) == len(seqs) and max(seqs) < record["next_seq"]
    assert entries[0]["parent"] is None
    for e in entries[1:]:  # every parent is an earlier save of the same run
        assert e["parent"]["run_id"] == record["run_id"] and e["parent"]["seq"] < e["seq"]
    model_run = rundir.peek_checkpoint_run(run_dir / "model.npz")
    assert model_run["seq"] == max(e["seq"] for e in entries if not e.get("best"))


def branch_args(run_dir):
    return ["--run-dir", run_dir, "--set", "checkpoint.keep=3", "--set", "checkpoint.every_epochs=1"]


def test_a_preempted_branch_resumes_where_it_stopped_not_in_the_abandoned_future(tmp_path):
    """The issue's scenario: a finished run, resumed from its oldest kept checkpoint with another
    learning rate, preempted; --resume auto must continue the branch (bit-identical to an
    uninterrupted branch), and the abandoned future must neither be picked nor prune the branch."""
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    for folder in (run_dir, ref_dir):
        assert train("--epochs", "6", *branch_args(folder)).exit_code == 0
    oldest = ckpt.periodic_checkpoints(run_dir / "checkpoints")[0]  # step 20 of 30
    ref = train("--epochs", "6", *branch_args(ref_dir), "--resume", ref_dir / "checkpoints" / oldest.name,
                "--lr", "0.001")
    assert ref.exit_code == 0, ref.output
    assert "branching from step 20" in ref.output and "abandoned" in ref.output

    # The same branch, preempted after three steps (a stop vote, as a signal would cast it).
    cfg = load_config(str(run_dir / "config.toml"), ["train.lr=0.001"])
    steps = []
    branch = Trainer(cfg, SerialComm(), run_dir, echo=lambda s: None, stop_requested=lambda: len(steps) >= 3)
    branch.restore(oldest)
    branch.claim_run_dir()
    with pytest.raises(Preempted) as info:
        branch.run(on_step_end=lambda t: steps.append(1) or False)
    saved_path = Path(str(info.value).split("checkpoint ")[1].split(";")[0])
    assert saved_path.is_file(), info.value  # the message names a file that exists
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.npz"))
    assert saved_path.name in names and oldest.name in names
    assert not [n for n in names if n > saved_path.name], names  # the abandoned future is not in the lineage

    resumed = train("--run-dir", run_dir, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed from {saved_path}" in resumed.output
    np.testing.assert_array_equal(load_model(run_dir / "model.npz").params, load_model(ref_dir / "model.npz").params)
    moved = list((run_dir / "abandoned").glob("*/checkpoints/step-*.npz"))
    assert sorted(p.name for p in moved) == ["step-000000025.npz", "step-000000030.npz"]
    assert list((run_dir / "abandoned").glob("*/model.npz")), "the old final model is kept aside"
    assert json.loads((run_dir / "run.json").read_text())["branches"][0]["from_step"] == 20


def test_resume_from_a_checkpoint_file_writes_into_its_own_run_directory(tmp_path, monkeypatch):
    run_dir = (tmp_path / "run").resolve()
    assert train("--epochs", "2", "--run-dir", run_dir).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "run.toml").write_text("[train]\nepochs = 3\n")
    result = invoke("train", "-c", "run.toml", "--resume", run_dir / "checkpoints" / "step-000000010.npz")
    assert result.exit_code == 0, result.output
    assert f"run dir {run_dir}" in result.output
    assert list(elsewhere.iterdir()) == [elsewhere / "run.toml"]  # nothing written where the command ran
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_checkpoint_resumed_into_a_new_directory_starts_a_run_that_records_its_origin(tmp_path):
    run_dir, fork = tmp_path / "run", tmp_path / "fork"
    assert train("--epochs", "2", "--run-dir", run_dir).exit_code == 0
    source = run_dir / "checkpoints" / "step-000000005.npz"
    result = train("--epochs", "3", "--run-dir", fork, "--resume", source)
    assert result.exit_code == 0, result.output
    origin = json.loads((fork / "run.json").read_text())["origin"]
    assert origin["run_id"] == json.loads((run_dir / "run.json").read_text())["run_id"]
    assert origin["seq"] == rundir.peek_checkpoint_run(source)["seq"]
    first = lineage(fork / "checkpoints")[0]  # the state it started from, recorded in the new run
    assert first["parent"] == {"run_id": origin["run_id"], "seq": origin["seq"]} and first["step"] == 5
    # --resume auto right after such a start (say it was preempted at once) finds that state
    assert rundir.find_latest(fork, ckpt.load_checkpoint)[0] is not None


def test_resume_auto_needs_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train("--resume", "auto")
    assert result.exit_code == 2 and "--resume auto continues the run in --run-dir" in result.output
    assert list(tmp_path.iterdir()) == []


def test_resume_auto_in_an_empty_directory_starts_the_run(tmp_path):
    result = train("--epochs", "1", "--run-dir", tmp_path / "new", "--resume", "auto")
    assert result.exit_code == 0 and "starting the run from the beginning" in result.output
    assert (tmp_path / "new" / "model.npz").is_file()


def test_a_directory_of_an_older_dpbp_is_not_continued_by_guessing(tmp_path):
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "config.toml").write_text("")
    result = train("--run-dir", old, "--resume", "auto")
    assert result.exit_code == 2 and "older dpbp" in result.output
    plain = train("--run-dir", old)  # the advice must not send the user to --resume auto
    assert plain.exit_code == 2 and "--resume auto" not in plain.output and "--overwrite" in plain.output
    assert f"--resume {old}/checkpoints/step-N.npz --run-dir NEW_DIR" in plain.output
    assert sorted(p.name for p in old.iterdir()) == ["checkpoints", "config.toml"]


def test_resume_auto_never_switches_to_another_runs_checkpoint_nor_overwrites_it(tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert train("--epochs", "1", "--run-dir", mine).exit_code == 0
    assert invoke("train", "--set", "data.train=spirals:n=300", "--set", "model.layers=[2,16,3]", "--epochs", "3",
                  "--run-dir", other).exit_code == 0
    foreign = (other / "checkpoints" / "step-000000015.npz").read_bytes()
    newer = mine / "checkpoints" / "step-000000999.npz"  # another run's newer checkpoint, copied in
    newer.write_bytes(foreign)
    clash = mine / "checkpoints" / "step-000000010.npz"  # ... and one where this run will save next
    clash.write_bytes(foreign)
    result = train("--epochs", "2", "--run-dir", mine, "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "step-000000005.npz" in result.output
    assert result.output.count("step-000000999.npz: belongs to run") == 1, result.output
    assert list(load_model(mine / "model.npz").sizes) == [2, 8, 3]
    aside = list((mine / "abandoned").glob("*-not-this-run/checkpoints"))
    assert len(aside) == 1 and (aside[0] / newer.name).read_bytes() == foreign  # kept, out of the lineage
    assert (aside[0] / clash.name).read_bytes() == foreign  # not overwritten by this run's own step 10
    assert rundir.peek_checkpoint_run(clash)["run_id"] == json.loads((mine / "run.json").read_text())["run_id"]


def test_a_run_that_never_checkpointed_restarts_as_recorded(tmp_path):
    """--resume auto on a run killed before its first checkpoint: it starts again with its recorded config;
    a change to what defines the model is refused, and the log of the lost epochs is kept aside."""
    run_dir = tmp_path / "run"
    cfg = small_config("data.train=spirals:n=300", "model.layers=[2,8,3]", "checkpoint.every_epochs=0",
                       "checkpoint.keep_best=false", "train.epochs=3")
    t = Trainer(cfg, SerialComm(), run_dir, echo=lambda s: None)
    with pytest.raises(KeyboardInterrupt):  # killed after its first epoch, before any checkpoint
        t.run(on_step_end=lambda t: (_ for _ in ()).throw(KeyboardInterrupt) if t.state.epoch == 1 else False)
    assert not (run_dir / "checkpoints").exists() and (run_dir / "metrics.jsonl").read_text()
    before = snapshot(run_dir)
    refused = invoke("train", "--run-dir", run_dir, "--resume", "auto", "--set", "model.layers=[2,16,3]")
    assert refused.exit_code == 2 and re.search(r"model.layers(, model.hidden)? cannot change", refused.output)
    assert snapshot(run_dir) == before
    again = invoke("train", "--run-dir", run_dir, "--resume", "auto")
    assert again.exit_code == 0, again.output
    assert "[2, 8, 3]" in again.output and "spirals:n=300" in again.output  # the recorded run, not the defaults
    assert "moved the log of the epochs that were never checkpointed" in again.output
    assert list((run_dir / "abandoned").glob("*-restart/metrics.jsonl"))
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------- the small ones


def test_temporary_files_of_an_interrupted_save_are_removed_at_the_next_start(tmp_path):
    run_dir = tmp_path / "run"
    assert train("--epochs", "1", "--run-dir", run_dir).exit_code == 0
    leftovers = [run_dir / "checkpoints" / ".step-000000010.npz.k2j3h4.tmp", run_dir / ".model.npz.x1y2.tmp",
                 run_dir / ".config.toml.abc.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    users = [run_dir / ".mynotes.tmp", run_dir / ".notes.txt.abc.tmp"]  # not dpbp's: kept
    for path in users:
        path.write_text("mine")
    result = train("--epochs", "2", "--run-dir", run_dir, "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert "removed 3 temporary files of an interrupted save" in result.output
    assert not any(p.exists() for p in leftovers)
    assert all(p.read_text() == "mine" for p in users)


@pytest.mark.parametrize("name", ["metrics.jsonl", "model.npz", "config.toml", "run.json",
                                  "checkpoints/step-000000005.npz"])
def test_a_symlink_in_the_run_directory_is_never_written_through(tmp_path, name):
    run_dir = tmp_path / "run"
    assert train("--epochs", "1", "--run-dir", run_dir).exit_code == 0
    precious = tmp_path / "precious"
    precious.write_text("do not touch")
    (run_dir / name).unlink()
    (run_dir / name).symlink_to(precious)
    result = train("--epochs", "2", "--run-dir", run_dir, "--resume", "auto")
    assert result.exit_code == 2 and "is a symbolic link" in result.output, result.output
    assert precious.read_text() == "do not touch"


@pytest.mark.parametrize("name", ["checkpoints", "abandoned"])
def test_a_symlinked_folder_in_the_run_directory_is_never_written_through(tmp_path, name):
    run_dir = tmp_path / "run"
    assert train("--epochs", "2", "--run-dir", run_dir).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    if name == "checkpoints":
        (run_dir / name).rename(elsewhere)
    else:
        elsewhere.mkdir()
        (elsewhere / "mine.txt").write_text("mine")
    (run_dir / name).symlink_to(elsewhere)
    before = snapshot(elsewhere)
    for args in (["--resume", "auto"], ["--resume", elsewhere / "step-000000005.npz"] if name == "checkpoints"
                 else ["--resume", run_dir / "checkpoints" / "step-000000005.npz"]):
        result = train("--epochs", "4", "--run-dir", run_dir, *args)
        assert result.exit_code == 2 and "is a symbolic link" in result.output, result.output
    assert snapshot(elsewhere) == before  # nothing pruned, written or moved there


def test_restore_best_makes_the_final_model_the_best_one(tmp_path):
    run_dir = tmp_path / "run"
    result = train("--epochs", "8", "--lr", "0.05", "--run-dir", run_dir, "--set", "checkpoint.restore_best=true")
    assert result.exit_code == 0, result.output
    arrays, meta = ckpt.load_checkpoint(run_dir / "checkpoints" / "best.npz")
    history = json.loads("[" + ",".join((run_dir / "metrics.jsonl").read_text().splitlines()) + "]")
    best_epoch = min(history, key=lambda r: r["val_loss"])
    assert best_epoch["epoch"] != history[-1]["epoch"], "pick a run whose last epoch is not its best"
    assert f"restored the best model: epoch {best_epoch['epoch']}" in result.output
    model_meta = ckpt.read_meta(run_dir / "model.npz", "model")
    assert model_meta["run"]["restored_best"] == meta["run"]["seq"]
    assert model_meta["run"]["step"] == meta["state"]["global_step"] < model_meta["run"]["final_step"]
    assert model_meta["final"]["val_loss"] == pytest.approx(best_epoch["val_loss"], rel=1e-12)
    assert invoke("train", *SMALL, "--set", "checkpoint.restore_best=true", "--set",
                  "checkpoint.keep_best=false", "--run-dir", tmp_path / "x").exit_code == 2


def test_sigterm_during_set_up_exits_75_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dpbp.cli", "train", "--set", "data.train=highdim:n=1500000",
                             "--set", "model.layers=[100,8,10]", "--run-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(1.5)  # generating 1,500,000 x 100 points takes about 4 s (more under load)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, out + err
    assert err.count("stopped by SIGTERM before training started") == 1 and "error" not in err
    assert not run_dir.exists()


def test_resume_refuses_changed_validation_data(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 2)), rng.integers(0, 3, 200)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "val.npz", x=x[:40], y=y[:40])
    args = ["--set", f"data.train={tmp_path / 'train.npz'}", "--set", f"data.val={tmp_path / 'val.npz'}",
            "--set", "model.layers=[2,4,3]", "--run-dir", tmp_path / "run"]
    assert invoke("train", *args, "--epochs", "1").exit_code == 0
    np.savez(tmp_path / "val.npz", x=x[:40] + 1.0, y=y[:40])  # the same file name, other rows
    before = snapshot(tmp_path / "run")
    result = invoke("train", *args, "--epochs", "2", "--resume", "auto")
    assert result.exit_code == 2 and "the validation data differs" in result.output, result.output
    assert snapshot(tmp_path / "run") == before


def test_a_signal_after_the_last_write_is_absorbed(tmp_path):
    """The dpbp process keeps its stop handlers until it exits: a SIGTERM right after `done:` is not a kill."""
    script = tmp_path / "late_signal.py"
    script.write_text(
        "import os, signal, sys\n"
        "from dpbp.cli import entry\n"
        "try:\n"
        "    entry(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's signal arrives just after the run ended\n"
        "    print('exit code', exc.code, flush=True)\n"
        "    raise\n")
    proc = subprocess.run([sys.executable, str(script), "train", *SMALL, "--epochs", "1", "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 0 and "exit code 0" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "run" / "model.npz").is_file()
