"""Atomic, pickle-free files: trained models and training checkpoints.

Every file is an uncompressed ``.npz`` read with ``allow_pickle=False``; metadata
travels as JSON text stored in a uint8 array named ``meta``, together with a sha256 of
the array payload, so truncation, bit flips and tampering are detected on load. Reading
checks every member against what the metadata implies before reading array data, so a
crafted file cannot make a reader allocate more than the file holds.
Writes go to a temporary file in the same folder, are fsynced, then renamed:
a crash never leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from dpbp import __version__
from dpbp.data import NORMALIZERS, Normalizer
from dpbp.errors import CheckpointError, DpbpError, SaveError
from dpbp.model import MLP, RUNNING_ARRAYS, n_params
from dpbp.ops import task_of
from dpbp.optim import make_optimizer
from dpbp.targets import Targets

MODEL_FORMAT = "dpbp-model"
# 3: the model description may set dropout and batch_norm (gamma and beta in params, the running statistics
# as bn_mean/bn_var); 2: parameters for normalised inputs, with the normaliser (float64) and the targets
# record (task, class labels, target scaling); 1: the normaliser folded into the first layer, no labels record.
FORMAT_VERSION = 3
READ_MODEL_VERSIONS = (1, 2, 3)


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
    blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    payload = {"meta": blob, **arrays}
    digest = np.frombuffer(payload_digest(payload).encode(), np.uint8)
    atomic_replace(path, lambda fh: np.savez(fh, sha256=digest, **payload))


def atomic_replace(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Make ``path`` hold what ``write(fh)`` writes, all or nothing.

    ``write`` fills a temporary file ``.<name>.XXXX.tmp`` in the same folder, which is fsynced
    and renamed over ``path`` (replacing a symlink there, never writing through it); the
    rename is fsynced too. A crash leaves either the old file or the new one, plus at most
    the temporary file (removed at the next start of a run in that folder). Raises OSError.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from the user's group
        with os.fdopen(fd, "wb") as fh:
            write(fh)
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


# Largest ``meta`` member read (its uncompressed size, from the zip directory); real metadata is
# kilobytes (the config and the metrics history), so anything near this is not a dpbp file.
META_MAX_BYTES = 64 << 20
NPY_VERSIONS = ((1, 0), (2, 0))  # the .npy header versions np.savez writes for plain dtypes
DIGEST_MEMBER = ((64,), np.dtype(np.uint8))  # sha256 hex digest

# member name -> (shape, dtype) that a file's metadata implies; the file must hold exactly these
Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


def read_meta(path: str | os.PathLike, kind: str = "checkpoint") -> dict:
    """The metadata of a dpbp file, reading nothing else (the zip directory and ``meta`` only).

    Not verified: the sha256 also covers the arrays, which are not read. For listing and
    choosing files; whatever is then used is read with ``read_npz``. Raises CheckpointError.
    """
    return read_npz(path, kind, layout=None)[1]


def read_npz(path: str | os.PathLike, kind: str,
             layout: Callable[[dict], Layout] | None) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a file written by ``atomic_write_npz``: (arrays, meta).

    Two phases, so a crafted file cannot make this allocate more than it honestly holds.
    First only the zip directory and the ``meta`` member (at most ``META_MAX_BYTES``) are
    read; ``layout(meta)`` then names every array the metadata implies, with its shape and
    dtype (it raises CheckpointError for metadata it refuses). Every member's declared
    size and .npy header are checked against that before any array data is read; last,
    the arrays are read (``allow_pickle=False``) and the sha256 is verified.

    Raises CheckpointError naming the file for anything missing, unreadable, truncated,
    compressed (dpbp writes stored members), larger than the file, not what the metadata
    implies (unknown or missing members, other shapes or dtypes, object arrays),
    tampered with (sha256 mismatch) or not a dpbp file. ``layout=None``: stop after the
    metadata and return no arrays (``read_meta``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} file not found: {path}")
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                raise CheckpointError(f"{path} is not a dpbp {kind} file (not an .npz archive)")
            length = os.fstat(fh.fileno()).st_size
            with zipfile.ZipFile(fh) as zf:
                members = _members(zf, path, kind, length)
                blob, meta = _read_meta(zf, members["meta"], path)
                if layout is None:
                    return {}, meta
                expected = {**_call_layout(layout, meta, path), "meta": (blob.shape, blob.dtype),
                            "sha256": DIGEST_MEMBER}
                _check_members(zf, members, expected, path, length)
                arrays = _read_arrays(zf, {name: members[name] for name in expected if name != "meta"})
    except (DpbpError, MemoryError):  # refusals (also from ``layout``) keep their message
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # zipfile/numpy raise assorted errors on corrupt files
        raise CheckpointError(f"{path} is not a readable {kind} file ({type(exc).__name__}: {exc})") from None
    digest = arrays.pop("sha256")
    if digest.tobytes() != payload_digest({"meta": blob, **arrays}).encode():
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt or was modified")
    return arrays, meta


def _members(zf: zipfile.ZipFile, path: Path, kind: str, length: int) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by array name, from the zip directory alone (nothing is decompressed).

    Refuses names that are not ``NAME.npy`` or appear twice, compressed members, declared
    sizes that add up to more than the file's ``length``, and an oversized ``meta``.
    """
    infos = zf.infolist()
    counts = Counter(info.filename for info in infos)
    odd = sorted(n for n, k in counts.items() if k > 1 or not n.endswith(".npy"))
    if odd:
        raise CheckpointError(f"{path}: unexpected member(s) {odd} in a dpbp {kind} file")
    members = {info.filename[: -len(".npy")]: info for info in infos}
    if "meta" not in members or "sha256" not in members:
        raise CheckpointError(f"{path} is not a dpbp {kind} file (no metadata or checksum)")
    packed = sorted(n for n, info in members.items() if info.compress_type != zipfile.ZIP_STORED)
    if packed:
        raise CheckpointError(f"{path}: member(s) {packed} are compressed; dpbp writes and reads only "
                              "uncompressed files")
    declared = sum(info.file_size for info in infos)
    if declared > length:
        raise CheckpointError(f"{path}: the zip directory declares {declared} bytes of members in a "
                              f"{length}-byte file")
    mismatched = sorted(n for n, info in members.items() if info.compress_size != info.file_size)
    if mismatched:
        raise CheckpointError(f"{path}: the zip directory gives stored member(s) {mismatched} two different sizes")
    if members["meta"].file_size > META_MAX_BYTES:
        raise CheckpointError(f"{path}: metadata of {members['meta'].file_size} bytes is over the "
                              f"{META_MAX_BYTES}-byte limit; not a dpbp {kind} file")
    return members


def _read_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes of data that shape needs) from a member's .npy header, reading nothing else.

    Raises CheckpointError for a header numpy does not write for plain arrays (other
    versions, Fortran order) or one whose shape and dtype disagree with the member's size.
    """
    with zf.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version not in NPY_VERSIONS:
            raise CheckpointError(f"array {info.filename!r} has .npy format {version}")
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = reader(fp)  # a literal dict: never unpickles
        data_start = fp.tell()
    if fortran_order:
        raise CheckpointError(f"array {info.filename!r} is stored in Fortran order")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow for any declared shape
    if info.file_size != data_start + nbytes:
        raise CheckpointError(f"array {info.filename!r} declares shape {shape} {dtype} ({nbytes} bytes) but "
                              f"holds {info.file_size - data_start} bytes")
    return shape, dtype, nbytes


def _read_meta(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> tuple[np.ndarray, dict]:
    """The ``meta`` member: its uint8 bytes and the JSON object they hold."""
    try:
        shape, dtype, _ = _read_header(zf, info)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if dtype != np.uint8 or len(shape) != 1:
        raise CheckpointError(f"{path}: metadata is a {shape} {dtype} array, not UTF-8 text")
    blob = _read_arrays(zf, {"meta": info})["meta"]
    try:
        meta = json.loads(blob.tobytes().decode())
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt metadata ({exc})") from None
    return blob, meta


def _call_layout(layout: Callable[[dict], Layout], meta: dict, path: Path) -> Layout:
    """``layout(meta)``, with metadata of the wrong types refused as one CheckpointError."""
    try:
        return layout(meta)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # Only a hand-made file gets here: well-formed JSON whose content does not make sense.
        raise CheckpointError(f"{path}: malformed checkpoint metadata ({type(exc).__name__}: {exc})") from None


def _check_members(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], expected: Layout,
                   path: Path, length: int) -> None:
    """Refuse unless the members are exactly ``expected``, by name, header shape, dtype and size.

    Reads only the .npy headers. A description needing more bytes than the whole file
    (``length``) is refused first, before any header is opened.
    """
    need = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in expected.values())
    if need > length:
        raise CheckpointError(f"{path}: its metadata describes arrays of {need} bytes, more than the whole "
                              f"{length}-byte file holds")
    unknown, missing = sorted(set(members) - set(expected)), sorted(set(expected) - set(members))
    if unknown or missing:
        what = "; ".join(f"{word} {names}" for word, names in (("unexpected member(s)", unknown),
                                                               ("missing array(s)", missing)) if names)
        raise CheckpointError(f"{path}: {what} for the model its metadata describes")
    for name, (shape, dtype) in expected.items():
        try:
            got_shape, got_dtype, _ = _read_header(zf, members[name])
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if got_shape != tuple(shape) or got_dtype != dtype:
            raise CheckpointError(f"{path}: array {name!r} is {got_shape} {got_dtype}; its metadata implies "
                                  f"{tuple(shape)} {np.dtype(dtype)}")


def _read_arrays(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> dict[str, np.ndarray]:
    """Read the named members' arrays (headers already checked; zipfile verifies each CRC)."""
    out = {}
    for name, info in members.items():
        with zf.open(info) as fp:
            out[name] = np.lib.format.read_array(fp, allow_pickle=False)
    return out


def model_size(spec: dict) -> tuple[int, int, np.dtype]:
    """(inputs, parameter count, dtype) that a model description implies, without building the model.

    Raises ValueError for sizes that are not at least two positive integers, a dtype
    other than float32/float64 or a ``batch_norm`` other than true/false (so an absurd
    description costs nothing to refuse).
    """
    sizes, dtype = spec["sizes"], spec["dtype"]
    if not (isinstance(sizes, list) and len(sizes) >= 2 and all(type(s) is int and s >= 1 for s in sizes)):
        raise ValueError(f"model sizes must be at least two positive integers, got {str(sizes)[:80]}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"model dtype must be float32 or float64, got {str(dtype)[:80]}")
    if type(spec.get("batch_norm", False)) is not bool:
        raise ValueError(f"model batch_norm must be true or false, got {str(spec['batch_norm'])[:40]}")
    return sizes[0], n_params(sizes, spec.get("batch_norm", False)), np.dtype(dtype)


def _norm_layout(spec: dict, writes_them: bool) -> Layout:
    """The running statistics arrays of a batch-norm model (``writes_them``: the file's format stores them)."""
    rates, batch_norm = spec.get("dropout", 0.0), spec.get("batch_norm", False)
    if not writes_them and (batch_norm or (any(rates) if isinstance(rates, list) else rates)):
        raise ValueError("dropout and batch_norm in a model description need a newer format version")
    return {name: ((sum(spec["sizes"][1:-1]),), np.dtype(np.float64)) for name in RUNNING_ARRAYS} if batch_norm else {}


class Network(NamedTuple):
    """A saved network as trained, with what it needs around it (see ``load_network``)."""

    model: MLP  # parameters as trained: for inputs mapped by ``inputs``, outputs in the training form
    inputs: Normalizer  # the input map the parameters expect (``"none"``: raw inputs)
    targets: Targets  # what the outputs mean: task, class labels, target scaling


def fold_input_map(model: MLP, params: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> None:
    """Fold ``x' = (x - shift) * scale`` into the first layer of ``params``, in place.

    ``params``: a flat ``(n_params,)`` vector in ``model``'s layout and dtype; ``shift``,
    ``scale``: ``(n_in,)``. Computed in float64, stored in the model dtype. Afterwards
    ``W' = W * scale`` and ``b' = b - W' @ shift``: the network takes raw ``x`` (equal up to
    rounding; a float32 network loses the digits of inputs with a large offset, which the
    unfolded pair keeps).
    """
    W, b = model.layer_views(params)
    w0 = W[0].astype(np.float64) * np.asarray(scale, np.float64)[None, :]
    b[0][...] = b[0].astype(np.float64) - w0 @ np.asarray(shift, np.float64)
    W[0][...] = w0


def fold_output_map(model: MLP, params: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> None:
    """Fold the inverse of target scaling ``y' = (y - shift) * scale`` into the last (identity) layer, in place.

    Afterwards ``W' = W / scale`` (per output row) and ``b' = b / scale + shift``: the network's
    outputs are in the targets' own units. Computed in float64, stored in the model dtype.
    """
    W, b = model.layer_views(params)
    scale, shift = np.asarray(scale, np.float64), np.asarray(shift, np.float64)
    W[-1][...] = W[-1].astype(np.float64) / scale[:, None]
    b[-1][...] = b[-1].astype(np.float64) / scale + shift


def fold_maps(network: Network, params: np.ndarray) -> None:
    """Fold ``network``'s input normaliser and target scaling (where it has them) into ``params``, in place.

    ``params``: a flat ``(n_params,)`` vector in the network's model layout and dtype (the model's own
    ``params``, or a copy of them); afterwards it maps raw inputs to outputs in the targets' units.
    """
    model, inputs, targets = network
    if inputs.kind != "none":
        fold_input_map(model, params, inputs.shift, inputs.scale)
    if targets.normalize != "none":
        fold_output_map(model, params, targets.shift, targets.scale)


def save_model(path: str | os.PathLike, model: MLP, inputs: Normalizer | None = None,
               targets: Targets | None = None, extra: dict | None = None) -> None:
    """Save ``model`` with the input map its parameters expect and what its outputs mean (format 2).

    ``inputs``: the normaliser training applied (default none); stored in float64 beside the
    parameters, so ``dpbp predict`` maps raw inputs in float64 before the cast to the model dtype.
    ``targets``: the record of the labels (default: ``Targets.legacy``). ``extra``: more JSON
    metadata. Raises SaveError when the file cannot be written.
    """
    inputs = inputs if inputs is not None else Normalizer("none")
    targets = targets if targets is not None else Targets.legacy(model.task, model.sizes[-1])
    meta = {
        "format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "dpbp_version": __version__,
        "model": model.describe(), "normalize": inputs.kind, "targets": targets.to_meta(), **(extra or {}),
    }
    arrays = {"params": model.params.copy(), **model.running_arrays(), **inputs.to_arrays(), **targets.to_arrays()}
    try:
        atomic_write_npz(path, arrays, meta)
    except OSError as exc:
        raise SaveError(f"could not write model {path}: {exc.strerror or exc}") from None


def load_network(path: str | os.PathLike) -> Network:
    """The network stored at ``path`` as trained: ``Network(model, inputs, targets)``.

    ``path`` is a model file or any training checkpoint (``step-N.npz``, ``best.npz``). Feeding
    ``inputs.apply(x, model.dtype)`` to the network reproduces training's numbers exactly;
    ``targets`` says what the outputs mean (``targets.decode``, ``targets.output_values``). Files
    written before labels were recorded give ``Targets.legacy`` (class ids are the labels); a
    format-1 model file has its normaliser folded in (inputs ``"none"``).
    Raises CheckpointError naming the file for anything ``read_npz`` refuses, and for a
    format-1 checkpoint trained on normalised data (it does not store its normaliser).
    """
    def layout(meta: dict) -> Layout:
        fmt = meta.get("format")
        if fmt == MODEL_FORMAT:
            return _model_layout(meta, path)
        if fmt == CHECKPOINT_FORMAT:
            _check_checkpoint_meta(meta, path)
            _checkpoint_inputs(meta, path)  # refuse a file that cannot be used before reading its arrays
            return _checkpoint_layout(meta, path)
        raise CheckpointError(f"{path} is neither a dpbp model file nor a training checkpoint (format {fmt!r})")

    arrays, meta = read_npz(path, "model", layout)
    if meta["format"] == MODEL_FORMAT:
        kind = meta["normalize"] if meta["format_version"] >= 2 else "none"
    else:
        kind = _checkpoint_inputs(meta, path)
    model = _build_model(meta["model"], arrays, path)
    return Network(model, Normalizer.from_arrays(kind, arrays), _targets(meta, arrays, model))


def load_model(path: str | os.PathLike) -> MLP:
    """Return the network saved at ``path``, taking RAW inputs and giving outputs in the targets' own units.

    ``path`` is a model file written by ``save_model`` (``model.npz``) or any training
    checkpoint (``step-N.npz``, ``best.npz``). The saved normaliser is folded into the first
    layer (``fold_input_map``) and a regression's target scaling into the last
    (``fold_output_map``), so ``predict`` on raw data works either way (equal to
    ``load_network``'s exact pair up to rounding; in float32, features with a large offset, such as
    Unix times, lose their differences in the folded layer: use ``load_network`` for them).
    Parameters are ``(n_params,)`` of the saved dtype.
    Raises CheckpointError naming the file when it is missing, corrupt, not a dpbp file, or
    a format-1 checkpoint trained on normalised data (it does not store its normaliser).
    """
    network = load_network(path)
    fold_maps(network, network.model.params)
    return network.model


def _targets(meta: dict, arrays: dict, model: MLP) -> Targets:
    """The targets record of a file (already checked by its layout); legacy for files without one."""
    if "targets" not in meta:
        return Targets.legacy(model.task, model.sizes[-1])
    return Targets.from_meta(meta["targets"], arrays)


def _targets_layout(meta: dict, path) -> Layout:
    """The arrays a file's targets record implies; refuses a record that does not fit its model."""
    record = meta["targets"]
    try:
        Targets.check_meta(record)
    except ValueError as exc:
        raise CheckpointError(f"{path}: malformed targets record ({exc})") from None
    spec = meta["model"]
    task = task_of(spec["loss"], spec["output"])
    if record["task"] != task or record["outputs"] != spec["sizes"][-1] or \
            (record["normalize"] != "none" and spec["output"] != "identity"):
        raise CheckpointError(f"{path}: its targets record ({record['task']}, {record['outputs']} outputs) does not "
                              f"fit its model ({task}, {spec['sizes'][-1]} outputs)")
    return {name: ((record["outputs"],), np.dtype(np.float64)) for name in Targets.array_names(record)}


def _model_layout(meta: dict, path) -> Layout:
    """A model file holds ``params`` ``(n_params,)`` of the model dtype; format 2 also the float64
    normaliser (``(n_in,)``) and target scaling (``(n_out,)``) arrays its metadata names; format 3 with batch
    norm also ``bn_mean``/``bn_var``."""
    version = meta.get("format_version")
    if type(version) is not int or version not in READ_MODEL_VERSIONS:
        raise CheckpointError(f"{path}: model format version {version!r} is not supported by "
                              f"dpbp {__version__} (reads {', '.join(map(str, READ_MODEL_VERSIONS))})")
    n_in, count, dtype = model_size(meta["model"])
    layout = {"params": ((count,), dtype), **_norm_layout(meta["model"], version >= 3)}
    if version >= 2:
        if meta.get("normalize") not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {str(meta.get('normalize'))[:40]!r}")
        if meta["normalize"] != "none":
            layout.update(norm_shift=((n_in,), np.dtype(np.float64)), norm_scale=((n_in,), np.dtype(np.float64)))
        if "targets" not in meta:
            raise CheckpointError(f"{path}: incomplete model file (no targets record)")
        layout.update(_targets_layout(meta, path))
    return layout


def _build_model(spec: dict, arrays: dict, path) -> MLP:
    """An ``MLP`` from its saved description, holding ``arrays["params"]`` and, with batch norm, the running
    statistics ``bn_mean``/``bn_var`` (shapes and dtypes already checked)."""
    try:
        return MLP.from_arrays(spec, arrays)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model description ({exc})") from None


# ----------------------------------------------------------------------------- training checkpoints

CHECKPOINT_FORMAT = "dpbp-checkpoint"
# 2 added the input normaliser (meta "normalize", arrays norm_shift and norm_scale in the model dtype);
# 3 keeps it in float64 and adds the targets record (meta "targets", arrays target_shift and target_scale);
# 4 lets the model description set dropout and batch_norm (running statistics: arrays bn_mean and bn_var).
CHECKPOINT_VERSION = 4
READ_CHECKPOINT_VERSIONS = (1, 2, 3, 4)  # format 1 still resumes; it cannot be used as a model (no normaliser)
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


def load_checkpoint(path: str | os.PathLike,
                    check: Callable[[dict], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a training checkpoint: (arrays, meta).

    ``arrays``: ``params`` and ``optim_<state>`` (``(n_params,)``, model dtype),
    ``optim_t`` (0-d int64), from format 2 unless the run did not normalise
    ``norm_shift``/``norm_scale`` (``(n_in,)``; model dtype in format 2, float64 from 3) and, from
    format 3 for scaled regression targets, ``target_shift``/``target_scale`` (``(n_out,)`` float64) and,
    from format 4 for batch norm, its running statistics ``bn_mean``/``bn_var`` (``(hidden units,)`` float64).
    ``check(meta)``, when given, runs once the metadata is read and before any array data is: raising CheckpointError
    there refuses the file unread (resume uses it to refuse another model's checkpoint).
    Raises CheckpointError naming the file for anything wrong.
    """
    def layout(meta: dict) -> Layout:
        _check_checkpoint_meta(meta, path)
        if check is not None:
            check(meta)
        return _checkpoint_layout(meta, path)

    return read_npz(path, "checkpoint", layout)


def _check_checkpoint_meta(meta: dict, path) -> None:
    """Refuse metadata that is not a training checkpoint's of a readable format version."""
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a dpbp training checkpoint (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if type(version) is not int or version not in READ_CHECKPOINT_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported "
                              f"by dpbp {__version__} (reads {', '.join(map(str, READ_CHECKPOINT_VERSIONS))})")
    required = ("config", "model", "state", "optimizer", "history") + (("normalize",) if version >= 2 else ()) \
        + (("targets",) if version >= 3 else ())
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint (missing {missing})")


def _checkpoint_layout(meta: dict, path="checkpoint") -> Layout:
    """The arrays a checkpoint's metadata implies (see ``load_checkpoint``)."""
    n_in, count, dtype = model_size(meta["model"])
    vector = ((count,), dtype)
    state_names = make_optimizer(meta["optimizer"]["name"], 0, dtype).state_names
    layout = {"params": vector, **{f"optim_{k}": vector for k in state_names}, "optim_t": ((), np.dtype(np.int64)),
              **_norm_layout(meta["model"], meta["format_version"] >= 4)}
    if meta["format_version"] >= 2:
        if meta["normalize"] not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {str(meta['normalize'])[:40]!r}")
        if meta["normalize"] != "none":
            stats = dtype if meta["format_version"] == 2 else np.dtype(np.float64)
            layout.update(norm_shift=((n_in,), stats), norm_scale=((n_in,), stats))
    if meta["format_version"] >= 3:
        layout.update(_targets_layout(meta, path))
    return layout


def _checkpoint_inputs(meta: dict, path) -> str:
    """The normaliser kind a checkpoint's parameters expect; refuses a format-1 file that cannot say."""
    if meta["format_version"] >= 2:
        return meta["normalize"]
    kind = meta["config"]["data"]["normalize"]
    if kind != "none":
        raise CheckpointError(
            f"{path} is a format-1 checkpoint: it does not store the input normaliser ({kind!r}) its parameters "
            "expect, so it cannot be used as a model; use the run's model.npz, or a checkpoint written by this "
            f"dpbp (format {CHECKPOINT_VERSION})")
    return "none"


def periodic_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The step-N checkpoint files in ``folder``, sorted by name (a listing; which checkpoints belong to
    a run's lineage is recorded in the files, see ``dpbp.rundir``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*.npz") if p.stem[5:].isdigit())
