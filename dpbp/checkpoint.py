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
import zipfile
from pathlib import Path

import numpy as np

from dpbp import __version__
from dpbp.errors import CheckpointError
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
    """Write ``arrays`` plus JSON ``meta`` (with a payload sha256) to ``path`` atomically."""
    path = Path(path)
    meta = dict(meta, sha256=payload_digest(arrays))
    blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, meta=blob, **arrays)
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
    truncated, tampered with (sha256 mismatch) or of another ``kind``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} file not found: {path}")
    try:
        data = path.read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable {kind} file ({exc})") from None
    except Exception as exc:  # zlib/zipfile raise assorted errors on corrupt members
        raise CheckpointError(f"{path} is not a readable {kind} file ({type(exc).__name__}: {exc})") from None
    blob = arrays.pop("meta", None)
    if blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
        raise CheckpointError(f"{path} is not a dpbp {kind} file (no metadata)")
    try:
        meta = json.loads(blob.tobytes().decode())
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt metadata ({exc})") from None
    if meta.get("sha256") != payload_digest(arrays):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt or was modified")
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
    atomic_write_npz(path, {"params": params}, meta)


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
