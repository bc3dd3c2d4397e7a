"""Appending to metrics.jsonl: whole lines, never through a symlink, and a full disk is one message and exit 1.

ENOSPC comes from the kernel itself: opening metrics.jsonl is redirected to /dev/full, whose every
write fails with "No space left on device" (the same for root and other users, no tmpfs needed).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import mpirun

import dpbp
from dpbp.cli import main
from dpbp.errors import SaveError
from dpbp.train import append_metrics

REPO = Path(dpbp.__file__).resolve().parent.parent
SMALL_TRAIN = ["train", "--set", "data.train=spirals:n=300", "--set", "model.layers=[2,8,3]", "--epochs", "2"]
# Runs the CLI with metrics.jsonl opened as /dev/full on rank 0 (the only rank that writes it).
FULL_DISK_WRAPPER = """\
import os, sys
real_open = os.open
def open_full(path, flags, mode=0o777, *, dir_fd=None):
    if os.fspath(path).endswith("metrics.jsonl") and os.environ.get("PMI_RANK", "0") == "0":
        return real_open("/dev/full", flags, mode)
    return real_open(path, flags, mode, dir_fd=dir_fd)
os.open = open_full
from dpbp.cli import entry
entry(sys.argv[1:])
"""


def open_full(monkeypatch) -> None:
    real_open = os.open

    def fake(path, flags, mode=0o777, *, dir_fd=None):
        if os.fspath(path).endswith("metrics.jsonl"):
            return real_open("/dev/full", flags, mode)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake)


def test_records_are_appended_as_json_lines(tmp_path):
    append_metrics(tmp_path, {"epoch": 1, "loss": 0.5})
    append_metrics(tmp_path, {"epoch": 2, "loss": 0.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]


def test_short_writes_still_give_whole_lines(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))  # a slow network disk
    append_metrics(tmp_path, {"epoch": 1, "grad_norm": [0.1, 0.2]})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"epoch": 1, "grad_norm": [0.1, 0.2]}


def test_never_writes_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(target)
    with pytest.raises(SaveError, match="metrics.jsonl: it is a symbolic link"):
        append_metrics(tmp_path, {"epoch": 1})
    assert target.read_text() == "precious\n"


def test_full_disk_is_a_save_error(tmp_path, monkeypatch):
    open_full(monkeypatch)
    with pytest.raises(SaveError, match=f"cannot append to {tmp_path / 'metrics.jsonl'}: No space left on device"):
        append_metrics(tmp_path, {"epoch": 1})
    assert os.strerror(errno.ENOSPC) == "No space left on device"


def test_full_disk_while_training_is_one_line_and_exit_1(tmp_path, monkeypatch):
    open_full(monkeypatch)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        result = CliRunner().invoke(main, [*SMALL_TRAIN, "--run-dir", str(tmp_path / "run")],
                                    env={"DPBP_COMM": "serial"})
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: cannot append to {tmp_path / 'run' / 'metrics.jsonl'}: No space left on device"], \
        result.stderr
    assert not (tmp_path / "run" / "model.npz").exists()


def test_full_disk_under_mpirun_ends_every_rank_with_one_message(tmp_path):
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK_WRAPPER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([*mpirun(2), sys.executable, str(wrapper), *SMALL_TRAIN, "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.count("No space left on device") == 1, proc.stderr
    assert "rank 0: cannot append to" in proc.stderr  # only rank 0 failed, and it is named
    assert "Traceback" not in proc.stderr and "error on rank" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "model.npz").exists()


def test_a_disk_that_fills_mid_line_leaves_whole_lines(tmp_path, monkeypatch):
    append_metrics(tmp_path, {"epoch": 1, "loss": 0.5})
    real_write = os.write
    calls = []

    def fills_up(fd, data):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data[:5]))  # the first bytes of the line go down, then the disk is full

    monkeypatch.setattr(os, "write", fills_up)
    with pytest.raises(SaveError, match="No space left on device"):
        append_metrics(tmp_path, {"epoch": 2, "loss": 0.25})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1, "loss": 0.5}\n'


def test_non_finite_numbers_are_written_as_null(tmp_path):
    append_metrics(tmp_path, {"epoch": 1, "val_loss": float("nan"), "grad_norm": [float("inf"), 0.5]})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) == \
        {"epoch": 1, "val_loss": None, "grad_norm": [None, 0.5]}
