"""Atomic, pickle-free files: trained models (and, later, training checkpoints).

Every file is an ``.npz`` read with ``allow_pickle=False``; metadata travels as
JSON text stored in a uint8 array named ``meta``, together with a sha256 of the
array payload, so truncation, bit flips and tampering are detected on load.
Writes go to a temporary file in the same folder, are fsynced, then renamed:
a crash never leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from dpbp import __version__
from dpbp.errors import CheckpointError, SaveError
from dpbp.model import MLP

MODEL_FORMAT = "dpbp-model"
FORMAT_VERSION = 1


def payload_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def atomic_write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``arrays`` plus JSON ``meta`` to ``path`` atomically.

    The file also holds ``sha256``: the digest of the metadata and every array,
    so any change to either is detected by ``read_npz``.
    """
    path = Path(path)
    blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    payload = {"meta": blob, **arrays}
    digest = np.frombuffer(payload_digest(payload).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the model from the user's group
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, sha256=digest, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def read_npz(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a file written by ``atomic_write_npz``: (arrays, meta).

    Raises CheckpointError naming the file for anything missing, unreadable,
    truncated, tampered with (sha256 mismatch) or not a dpbp file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{path} is not a dpbp {kind} file (not an .npz archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as exc:  # zipfile/zlib/numpy raise assorted errors on corrupt files
        raise CheckpointError(f"{path} is not a readable {kind} file ({type(exc).__name__}: {exc})") from None
    digest, blob = arrays.pop("sha256", None), arrays.get("meta")
    if digest is None or blob is None or blob.dtype != np.uint8 or blob.ndim != 1 or digest.dtype != np.uint8:
        raise CheckpointError(f"{path} is not a dpbp {kind} file (no metadata or checksum)")
    if digest.tobytes() != payload_digest(arrays).encode():
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt or was modified")
    del arrays["meta"]
    try:
        meta = json.loads(blob.tobytes().decode())
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt metadata ({exc})") from None
    return arrays, meta


def save_model(path: str | os.PathLike, model: MLP, shift: np.ndarray | None = None,
               scale: np.ndarray | None = None, extra: dict | None = None) -> None:
    """Save ``model`` so that it takes RAW inputs.

    If training normalised inputs as ``x' = (x - shift) * scale``, that affine map is
    folded into the first layer (``W' = W * scale``, ``b' = b - W' @ shift``), so the
    saved model needs no normaliser and ``predict`` on raw data just works.
    """
    params = model.params.copy()
    if shift is not None and scale is not None:
        W, b = model.layer_views(params)
        W0, b0 = W[0], b[0]
        W0 *= scale.astype(model.dtype)[None, :]
        b0 -= W0 @ shift.astype(model.dtype)
    meta = {
        "format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "dpbp_version": __version__,
        "model": model.describe(), **(extra or {}),
    }
    try:
        atomic_write_npz(path, {"params": params}, meta)
    except OSError as exc:
        raise SaveError(f"could not write model {path}: {exc.strerror or exc}") from None


def load_model(path: str | os.PathLike) -> MLP:
    """Return the ``MLP`` saved at ``path`` by ``save_model``."""
    arrays, meta = read_npz(path, "model")
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a dpbp model file (format {meta.get('format')!r})")
    spec = meta.get("model")
    try:
        model = MLP(**spec)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model description ({exc})") from None
    params = arrays.get("params")
    if params is None or params.shape != (model.n_params,) or params.dtype != model.dtype:
        raise CheckpointError(f"{path}: parameters do not match the model description {spec}")
    model.params[...] = params
    return model


# ----------------------------------------------------------------------------- training checkpoints

CHECKPOINT_FORMAT = "dpbp-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.npz"


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:09d}.npz"


def save_checkpoint(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Atomically write a training checkpoint (arrays: params and optimizer state; meta: JSON state)."""
    meta = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "dpbp_version": __version__, **meta}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_npz(path, arrays, meta)
    except OSError as exc:
        raise SaveError(f"could not write checkpoint {path}: {exc.strerror or exc}") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a checkpoint; raise CheckpointError (naming the file) for anything wrong."""
    arrays, meta = read_npz(path, "checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a dpbp training checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('format_version')} is not supported "
                              f"by dpbp {__version__} (expects {CHECKPOINT_VERSION})")
    missing = [k for k in ("config", "model", "state", "optimizer", "history") if k not in meta]
    if missing or "params" not in arrays:
        raise CheckpointError(f"{path}: incomplete checkpoint (missing {missing or ['params']})")
    return arrays, meta


def periodic_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The step-N checkpoint files in ``folder``, sorted by name (a listing; which checkpoints belong to
    a run's lineage is recorded in the files, see ``dpbp.rundir``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*.npz") if p.stem[5:].isdigit())
