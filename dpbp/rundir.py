"""The run directory: one run per directory, its record, its lock and the lineage of its checkpoints.

A run directory belongs to one run. What that run is gets written down when the directory is
created, in ``run.json`` (run id, creation time, host, command, origin), never guessed later from
file names. Every checkpoint records its run id, a save sequence number ``seq`` (counting up over
the directory's whole life) and its parent checkpoint.

``checkpoints/`` holds one lineage only. Resuming from an older checkpoint starts a branch: the
checkpoints of the abandoned future (and a model.npz or best.npz made from it, and the old metrics
log) move to ``abandoned/<time>-from-step-<N>/``. So ``--resume auto`` (the highest ``seq`` in
``checkpoints/`` that verifies) and pruning (the newest ``checkpoint.keep`` by ``seq``) only ever
see the current lineage, whatever the files are called.

While a run trains, rank 0 holds an exclusive lock (``flock``) on ``run.lock``, which also says
who holds it. Only rank 0 calls anything here; the trainer and CLI agree on the outcome across
ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dpbp import __version__
from dpbp import checkpoint as ckpt
from dpbp.checkpoint import BEST_NAME, CHECKPOINT_DIR
from dpbp.errors import CheckpointError, DpbpError, SaveError

RUN_RECORD = "run.json"
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.npz"
FINAL_METRICS_FILE = "final_metrics.json"  # the final validation and test reports, written with model.npz
ABANDONED_DIR = "abandoned"
PLOT_FILE = "training.png"  # dpbp plot's default output
RUN_FORMAT = "dpbp-run"
RUN_FORMAT_VERSION = 1
# Where runs go when no run directory is given: runs/run-001, runs/run-002, ...
RUNS_ROOT = Path("runs")
NUMBERED = re.compile(r"run-(\d+)")
# The files dpbp writes at the top of a run directory; a symlink at any of these names is refused.
OUTPUT_FILES = (RUN_RECORD, LOCK_FILE, CONFIG_FILE, METRICS_FILE, MODEL_FILE, FINAL_METRICS_FILE, PLOT_FILE)
# Temporary names of interrupted atomic writes (checkpoint.atomic_replace): "." + the file's name +
# "." + mkstemp's random part + ".tmp", for the files dpbp writes in a run directory.
TEMP_FILE = re.compile(r"\.(step-\d+\.npz|best\.npz|model\.npz|config\.toml|metrics\.jsonl|run\.json|"
                       r"final_metrics\.json)\.[A-Za-z0-9_]+\.tmp")


class RunDirError(DpbpError):
    """The run directory cannot be used as asked (holds another run, is in use, has symlinks)."""


def now_text() -> str:
    """The current time as ISO 8601 UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


# ----------------------------------------------------------------------------- small file helpers


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (``checkpoint.atomic_replace``; never through a link)."""
    ckpt.atomic_replace(path, lambda fh: fh.write(text.encode()))


def write_json(path: Path, record: dict) -> None:
    """Write ``record`` as indented JSON to ``path`` atomically; SaveError (one line) on any OSError."""
    try:
        write_text_atomic(path, json.dumps(record, indent=1) + "\n")
    except OSError as exc:
        raise SaveError(f"could not write {path}: {exc.strerror or exc}") from None


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` (not followed if it is a symlink); ValueError/OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        data = json.loads(fh.read(1 << 20).decode())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def peek_checkpoint_run(path: Path) -> dict | None:
    """The ``run`` entry (run_id, seq, parent) of a checkpoint's or model's metadata, plus its ``step``.

    Reads the metadata only, unverified (the checkpoint resumed from is verified in full).
    Returns None for a file without lineage (written by an older dpbp); raises ValueError for a
    file that cannot be read as a dpbp file.
    """
    try:
        meta = ckpt.read_meta(path)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    run = meta.get("run")
    if run is None:
        return None
    if not (isinstance(run, dict) and isinstance(run.get("run_id"), str) and isinstance(run.get("seq"), int)):
        raise ValueError(f"{path}: malformed run entry in the metadata")
    step = meta.get("state", {}).get("global_step") if isinstance(meta.get("state"), dict) else None
    return {**run, "step": step}


# ----------------------------------------------------------------------------- which directory


def describe_run(path: Path) -> str | None:
    """What run ``path`` holds, in words, or None when it holds none.

    A run is recorded by ``run.json``; a directory with dpbp's outputs but no record was written by
    an older dpbp (or by hand) and counts as holding a run too.
    """
    record = path / RUN_RECORD
    if record.exists() or record.is_symlink():
        try:
            data = read_json(record)
            return f"run {str(data.get('run_id', '?'))[:8]} (created {data.get('created', '?')})"
        except (OSError, ValueError) as exc:
            return f"a run whose {RUN_RECORD} cannot be read ({exc})"
    found = [name for name in (CONFIG_FILE, METRICS_FILE, MODEL_FILE) if (path / name).is_file()]
    if (path / CHECKPOINT_DIR).is_dir():
        found.append(CHECKPOINT_DIR + "/")
    if found:
        return f"an earlier run without a {RUN_RECORD} ({', '.join(found)})"
    return None


def next_numbered_dir(root: Path = RUNS_ROOT) -> Path:
    """The next ``root/run-NNN`` (one past the highest number there); not created."""
    numbers = []
    if root.is_dir():
        numbers = [int(m.group(1)) for p in root.iterdir() if (m := NUMBERED.fullmatch(p.name))]
    return root / f"run-{max(numbers, default=0) + 1:03d}"


def make_numbered_dir(root: Path = RUNS_ROOT) -> Path:
    """Create and return the next free ``root/run-NNN`` (atomically: two runs never get the same one)."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        path = next_numbered_dir(root)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def home_of_checkpoint(path: Path, run: dict | None) -> Path | None:
    """The run directory that recorded checkpoint ``path``: the nearest folder above it whose
    ``run.json`` has the checkpoint's run id (None if there is none, or the checkpoint has no lineage)."""
    if run is None:
        return None
    cwd = Path.cwd()
    for folder in list(Path(os.path.abspath(path)).parents)[:4]:
        try:
            if read_json(folder / RUN_RECORD).get("run_id") == run["run_id"]:
                return folder.relative_to(cwd) if folder.is_relative_to(cwd) and folder != cwd else folder
        except (OSError, ValueError):
            continue
    return None


# ----------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/run.lock`` for the life of a run; the file says who holds it."""

    def __init__(self, fd: int | None, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, folder: Path, command: list[str]) -> RunLock:
        """Lock ``folder`` or raise RunDirError naming the holder. A file system without locks gives a
        warning on stderr and an unlocked run (concurrent runs are then not detected)."""
        path = folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                raise RunDirError(f"run directory {folder} is in use by another dpbp run ({_holder_text(holder)}); "
                                  "wait for it to end, or choose another --run-dir") from None
            os.close(fd)
            print(f"warning: cannot lock {path} ({exc.strerror}): this file system has no locks, so a second "
                  "run started in the same directory would not be noticed", file=sys.stderr)
            return cls(None, path)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_text(), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _holder_text(raw: str) -> str:
    try:
        info = json.loads(raw)
        return (f"pid {info['pid']} on host {info['host']} since {info['since']}: "
                f"{' '.join(info.get('command') or [])}".rstrip(": "))
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def is_locked(folder: Path) -> str | None:
    """Who holds ``folder``'s lock right now (None if nobody); tests the lock without keeping it."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return _holder_text(os.pread(fd, 4096, 0).decode(errors="replace"))
        return None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the run directory


@dataclass
class Entry:
    """A checkpoint of the current lineage: its save number, file, step and kind."""

    seq: int
    path: Path
    step: int | None
    best: bool


@dataclass
class RunDirectory:
    """A claimed run directory (rank 0 only): its record, its lock and the lineage in ``checkpoints/``.

    ``messages``: one-line notes for the user about what claiming did (branching, clean-up).
    """

    path: Path
    record: dict
    lock: RunLock
    entries: list[Entry] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def save_record(self) -> None:
        try:
            write_text_atomic(self.path / RUN_RECORD, json.dumps(self.record, indent=1) + "\n")
        except OSError as exc:
            raise SaveError(f"could not write {self.path / RUN_RECORD}: {exc.strerror or exc}") from None

    def reserve_seq(self) -> int:
        """The next save number, recorded in run.json before the checkpoint is written (never reused)."""
        seq = self.record["next_seq"]
        self.record["next_seq"] = seq + 1
        self.save_record()
        return seq

    def added(self, seq: int, path: Path, step: int, best: bool) -> None:
        """Note a checkpoint just written (a new best.npz replaces the previous one)."""
        self.entries = [e for e in self.entries if e.path != path]
        self.entries.append(Entry(seq, path, step, best))

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` periodic checkpoints of the lineage (by seq; best.npz stays)."""
        periodic = sorted((e for e in self.entries if not e.best), key=lambda e: e.seq)
        for entry in periodic[:-keep] if keep > 0 else []:
            entry.path.unlink(missing_ok=True)
            self.entries.remove(entry)

    def release(self) -> None:
        self.lock.release()


def scan_lineage(folder: Path, run_id: str) -> tuple[list[Entry], list[tuple[Path, str]]]:
    """The checkpoints of run ``run_id`` in ``folder``, and the other ``.npz`` files with why they are not."""
    entries, others = [], []
    if not folder.is_dir():
        return entries, others
    for path in sorted(folder.glob("*.npz")):
        try:
            run = peek_checkpoint_run(path)
        except ValueError as exc:
            others.append((path, f"unreadable ({exc})"))
            continue
        if run is None:
            others.append((path, "written by an older dpbp, without a lineage"))
        elif run["run_id"] != run_id:
            others.append((path, f"belongs to run {run['run_id'][:8]}, not to this run"))
        else:
            entries.append(Entry(run["seq"], path, run.get("step"), path.name == BEST_NAME))
    return entries, others


def symlink_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be used because something dpbp writes, prunes or moves there is a symlink
    (a file, or the checkpoints/ and abandoned/ folders themselves, or a file in checkpoints/)."""
    candidates = [folder / name for name in (*OUTPUT_FILES, CHECKPOINT_DIR, ABANDONED_DIR)]
    if (folder / CHECKPOINT_DIR).is_dir() and not (folder / CHECKPOINT_DIR).is_symlink():
        candidates += list((folder / CHECKPOINT_DIR).iterdir())
    links = [p for p in candidates if p.is_symlink()]
    if links:
        return (f"{links[0]} is a symbolic link (to {os.readlink(links[0])}); dpbp never writes through links "
                "in a run directory: remove it, or choose another --run-dir")
    return None


def remove_temp_files(folder: Path) -> int:
    """Delete the temporary files of interrupted saves in ``folder`` and its checkpoints/; return how many."""
    count = 0
    for where in (folder, folder / CHECKPOINT_DIR):
        if not where.is_dir():
            continue
        for path in where.iterdir():
            if TEMP_FILE.fullmatch(path.name) and (path.is_file() or path.is_symlink()):
                path.unlink(missing_ok=True)
                count += 1
    return count


def remove_outputs(folder: Path) -> list[str]:
    """Delete every output of a previous run in ``folder`` (for --overwrite); return the names removed."""
    removed = []
    for name in (RUN_RECORD, CONFIG_FILE, METRICS_FILE, MODEL_FILE, FINAL_METRICS_FILE, PLOT_FILE, CHECKPOINT_DIR,
                 ABANDONED_DIR):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


@dataclass
class Resume:
    """Where a resumed run comes from: the checkpoint file and its lineage entry (None: no lineage)."""

    path: Path
    run: dict | None


def claim(folder: Path, *, command: list[str], resume: Resume | None, overwrite: bool = False,
          restart: bool = False, numbered: bool = False,
          files: dict[str, str | Callable[[Path], str]] | None = None) -> RunDirectory:
    """Take ``folder`` for a run (rank 0): create it, lock it, check what it holds, record the run.

    ``resume``: the checkpoint the run continues from (None: a new run). The folder must then hold
    that checkpoint's run (continue it; an older checkpoint starts a branch) or nothing (the run
    starts there, its origin recorded). A new run needs a folder that holds no run, unless
    ``overwrite`` (the old run's outputs are deleted, and a message says so) or ``restart`` (the
    run recorded there, which never wrote a checkpoint, starts again). ``numbered``: ``folder``
    is a runs root and a new ``run-NNN`` is made in it. Raises RunDirError (exit 2) when refused,
    SaveError when the folder cannot be written. Temporary files of interrupted saves are removed.
    ``files``: name -> text (or a function of the folder giving it) written atomically once the
    folder is claimed, e.g. the resolved config and the metrics log.
    """
    messages: list[str] = []
    try:
        if numbered:
            folder = make_numbered_dir(folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(folder, command)
    except OSError as exc:
        raise SaveError(f"cannot create the run directory {folder}: {exc.strerror or exc}") from None
    try:
        record = _check_and_record(folder, resume, overwrite, restart, command, messages)
        run = RunDirectory(folder, record, lock, messages=messages)
        removed = remove_temp_files(folder)
        if removed:
            messages.append(f"removed {removed} temporary file{'s' if removed > 1 else ''} of an interrupted save "
                            f"in {folder}")
        run.entries, strays = scan_lineage(run.checkpoint_dir, run.run_id)
        seen = max((e.seq for e in run.entries), default=0)
        record["next_seq"] = max(record["next_seq"], seen + 1)
        if resume is not None and resume.run is not None and resume.run["run_id"] == run.run_id:
            _branch(run, resume, strays)
        elif restart and (folder / METRICS_FILE).is_file() and (folder / METRICS_FILE).stat().st_size:
            _set_aside(run, "restart", strays, [], copies=[folder / METRICS_FILE])  # epochs never checkpointed
        elif strays:
            _set_aside(run, "not-this-run", strays, [])
        run.save_record()
        for name, text in (files or {}).items():
            write_text_atomic(folder / name, text(folder) if callable(text) else text)
        return run
    except OSError as exc:
        lock.release()
        raise SaveError(f"cannot write to the run directory {folder}: {exc.strerror or exc}") from None
    except BaseException:
        lock.release()
        raise


def refusal(folder: Path, resume: Resume | None, overwrite: bool = False, restart: bool = False,
            check_lock: bool = True) -> str | None:
    """Why ``folder`` cannot take the run asked for (None: it can). Reads only.

    ``resume``: the run continues from that checkpoint (``folder`` must hold its run, or no run);
    ``restart``: ``--resume auto`` found no checkpoint, so the run recorded in ``folder`` (if any)
    starts again from the beginning; ``overwrite``: a run held there may be replaced.
    ``check_lock``: also refuse a folder whose lock another process holds.
    """
    if not folder.exists():
        return None
    if not folder.is_dir():
        return f"run directory {folder} exists and is not a directory"
    links = symlink_problem(folder)
    if links is not None:
        return links
    holder = is_locked(folder) if check_lock else None
    if holder is not None:
        return (f"run directory {folder} is in use by another dpbp run ({holder}); wait for it to end, "
                "or choose another --run-dir")
    held, record = describe_run(folder), read_record(folder)
    if held is None:
        return None
    if resume is not None:
        if record is not None and resume.run is not None and resume.run["run_id"] == record["run_id"]:
            return None
        if record is None:
            return _older_run(folder, held)
        whose = f"run {resume.run['run_id'][:8]}" if resume.run else "no recorded run (an older dpbp)"
        return (f"{folder} holds {held}, but {resume.path} belongs to {whose}; continue it in its own run "
                "directory, or start a new one from it with --run-dir NEW_DIR")
    if restart and record is not None:
        return None
    if overwrite:
        return None
    if record is None:
        return _older_run(folder, held) + ", replace it with --overwrite, or choose another --run-dir"
    return (f"{folder} already holds {held}; continue it with --resume auto, replace it with --overwrite, "
            "or choose another --run-dir")


def _older_run(folder: Path, held: str) -> str:
    return (f"{folder} holds {held}: an older dpbp wrote it and recorded no run, so it cannot be continued "
            f"there; start a new run from one of its checkpoints with --resume {folder}/{CHECKPOINT_DIR}/step-N.npz "
            "--run-dir NEW_DIR")


def _check_and_record(folder: Path, resume: Resume | None, overwrite: bool, restart: bool, command: list[str],
                      messages: list[str]) -> dict:
    """Under the lock: refuse what must be refused; return the run record to use (new, or the folder's own)."""
    reason = refusal(folder, resume, overwrite, restart, check_lock=False)  # we hold the lock
    if reason is not None:
        raise RunDirError(reason)
    record = read_record(folder)
    if resume is not None:
        if record is not None and resume.run is not None and resume.run["run_id"] == record["run_id"]:
            return record
        return _new_record(folder, command, origin={"checkpoint": str(resume.path.resolve()), **(resume.run or {})})
    if restart and record is not None:
        return record
    if describe_run(folder) is not None:  # overwrite
        removed = remove_outputs(folder)
        messages.append(f"--overwrite: removed the previous run's {', '.join(removed)} from {folder}")
    return _new_record(folder, command, origin=None)


def _new_record(folder: Path, command: list[str], origin: dict | None) -> dict:
    return {
        "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "run_id": uuid.uuid4().hex,
        "created": now_text(), "directory": str(folder.resolve()), "host": socket.gethostname(),
        "dpbp_version": __version__, "command": command, "origin": origin, "next_seq": 1, "branches": [],
    }


def _branch(run: RunDirectory, resume: Resume, strays: list[tuple[Path, str]]) -> None:
    """Resuming run.run_id from an older checkpoint: move the abandoned future out of the lineage.

    The future is every checkpoint of this run saved after the resume point (``seq`` larger; it was
    saved later, so it is not an ancestor), a model.npz made from that future, and a copy of the
    metrics log that covers it; files in checkpoints/ that are not this run's go with them.
    """
    point = resume.run["seq"]
    future = [e for e in run.entries if e.seq > point]
    model = run.path / MODEL_FILE
    moves = [model] if model.is_file() and _model_seq(model) > point else []
    if moves and (run.path / FINAL_METRICS_FILE).is_file():  # the reports of that model
        moves.append(run.path / FINAL_METRICS_FILE)
    if not (future or moves):  # continuing the head of the lineage: no branch
        if strays:
            _set_aside(run, "not-this-run", strays, [])
        return
    step = resume.run.get("step")
    target = _set_aside(run, f"from-step-{step}", strays, moves, future=future,
                        copies=[run.path / METRICS_FILE])
    run.entries = [e for e in run.entries if e.seq <= point]
    run.record["branches"].append({"time": now_text(), "from_seq": point, "from_step": step,
                                   "from_checkpoint": str(resume.path), "moved_to": str(target)})
    note = run.messages.pop()
    run.messages.append(f"branching from step {step} (checkpoint seq {point}): {note}")
    if any(e.best for e in future):
        run.messages.append(f"note: best.npz belonged to the abandoned future; this branch writes its own when its "
                            f"validation loss improves on the best recorded at step {step}")


def _set_aside(run: RunDirectory, label: str, strays: list[tuple[Path, str]], moves: list[Path], *,
               future: list[Entry] = (), copies: list[Path] = ()) -> Path:
    """Move ``future`` checkpoints, ``strays`` (files in checkpoints/ that are not this run's, with
    why) and ``moves`` (top-level files) to ``abandoned/<UTC time>-<label>/``, copying ``copies``;
    add one line saying what went where. Returns that folder."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = run.path / ABANDONED_DIR / f"{stamp}-{label}"
    (target / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=False)
    moved = []
    for path in [e.path for e in future] + [p for p, _ in strays]:
        path.rename(target / CHECKPOINT_DIR / path.name)
        moved.append(f"{CHECKPOINT_DIR}/{path.name}")
    for path in moves:
        path.rename(target / path.name)
        moved.append(path.name)
    for path in copies:
        if path.is_file():
            shutil.copy2(path, target / path.name)
            moved.append(f"{path.name} (copy)")
    why = "; ".join(f"{p.name}: {reason}" for p, reason in strays)
    what = {"restart": "the log of the epochs that were never checkpointed",
            "not-this-run": "files that are not part of this run's lineage"}.get(label, "the abandoned future")
    run.messages.append(f"moved {what} ({', '.join(moved)}{'; ' + why if why else ''}) to {target}")
    return target


def _model_seq(path: Path) -> float:
    """The save number of the checkpoint a model.npz was made from (infinity when not recorded)."""
    try:
        run = peek_checkpoint_run(path)
    except ValueError:
        return float("inf")
    return run["seq"] if run is not None else float("inf")


def read_record(folder: Path) -> dict | None:
    """The run record of ``folder`` (None when it has none or it is not a dpbp run record)."""
    try:
        record = read_json(folder / RUN_RECORD)
    except (OSError, ValueError):
        return None
    return record if record.get("format") == RUN_FORMAT and isinstance(record.get("run_id"), str) else None


def find_latest(folder: Path, verify) -> tuple[Path | None, list[str]]:
    """The checkpoint ``--resume auto`` continues in ``folder``: the highest seq of its lineage that
    ``verify(path)`` accepts (it raises DpbpError for a file that does not load; such files are
    skipped and their reasons returned). Reads only. A folder without a run record has none.
    """
    record = read_record(folder)
    if record is None:
        return None, []
    entries, _ = scan_lineage(folder / CHECKPOINT_DIR, record["run_id"])  # the others: moved aside when claimed
    skipped = []
    for entry in sorted(entries, key=lambda e: e.seq, reverse=True):
        try:
            verify(entry.path)
        except DpbpError as exc:
            skipped.append(str(exc))
            continue
        return entry.path, skipped
    return None, skipped
