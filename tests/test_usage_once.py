"""Command-line mistakes, --help and --version print once under mpirun, and every rank exits with click's code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mpirun

import dpbp
from dpbp.cli import entry
from dpbp.comm import launcher_local_size, launcher_rank

REPO = Path(dpbp.__file__).resolve().parent.parent
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MV2_", "SLURM_", "MPI_LOCAL")


@pytest.mark.parametrize("environ,rank", [
    ({}, None),
    ({"PMI_RANK": "2", "PMI_SIZE": "3"}, 2),
    ({"OMPI_COMM_WORLD_RANK": "1"}, 1),
    ({"PMIX_RANK": "0"}, 0),
    ({"SLURM_PROCID": "5"}, 5),
    ({"PMI_RANK": "", "SLURM_PROCID": "4"}, 4),  # an unusable value falls through to the next launcher
])
def test_launcher_rank_from_the_environment(environ, rank):
    assert launcher_rank(environ) == rank


def test_launcher_local_size_from_the_environment():
    assert launcher_local_size({}) == 1
    assert launcher_local_size({"MPI_LOCALNRANKS": "4"}) == 4
    assert launcher_local_size({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}) == 3
    assert launcher_local_size({"MPI_LOCALNRANKS": "0"}) == 1


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
@pytest.mark.parametrize("args,code,needle", [
    (["train", "--epoch", "3"], 2, "No such option '--epoch'"),
    (["--version"], 0, "version"),
    (["train", "--help"], 0, "Usage: dpbp train"),
])
def test_entry_prints_click_messages_on_rank_0_only(monkeypatch, capsys, rank, printed, args, code, needle):
    for name in list(os.environ):
        if name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PMI_RANK", rank)
    with pytest.raises(SystemExit) as exit_info:
        entry(args)
    out = capsys.readouterr()
    assert exit_info.value.code == code
    assert (needle in out.out + out.err) == printed, out
    if not printed:
        assert out.out == out.err == ""


@pytest.mark.parametrize("args,code,stream,needle", [
    (["train", "--epoch", "3"], 2, "stderr", "No such option '--epoch'"),
    (["train", "--resume"], 2, "stderr", "Option '--resume' requires an argument"),
    (["train", "--epochs", "x"], 2, "stderr", "'x' is not a valid integer"),
    (["trian"], 2, "stderr", "No such command 'trian'"),
    (["--help"], 0, "stdout", "Usage: dpbp [OPTIONS]"),
    (["train", "--help"], 0, "stdout", "Usage: dpbp train [OPTIONS]"),
    (["--version"], 0, "stdout", "dpbp, version"),
], ids=["typo", "resume-without-value", "bad-type", "no-command", "help", "train-help", "version"])
def test_click_messages_print_once_under_mpirun(args, code, stream, needle):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([*mpirun(3), sys.executable, "-m", "dpbp.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)
    text = getattr(proc, stream)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert text.count(needle) == 1, text
    assert text.count("Usage:") <= 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("args,code,needle", [
    (["config", "show"], 0, "[model]"),
    (["config", "show", "--set", "x.y=1"], 2, "unknown section"),
    (["gradcheck", "--set", "model.layers=[2,4,3]"], 2, "error:"),
    (["plot", "nosuchdir"], 2, "error:"),
])
def test_single_process_commands_run_once_under_mpirun(tmp_path, args, code, needle):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([*mpirun(3), sys.executable, "-m", "dpbp.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count(needle) == 1, proc.stdout + proc.stderr
