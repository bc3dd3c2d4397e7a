"""Data sets, their validation against a model, and the data-parallel batch plan.

This module owns everything between a source string and the rows one rank trains on:

* loading (:func:`load_source`) into a :class:`Dataset`;
* checking that a data set fits a model and loss (:func:`validate`);
* the train/validation split (:func:`split_validation`) and feature scaling (:class:`Normalizer`);
* the batch plan shared by all ranks: the seeded global shuffle (:func:`epoch_permutation`),
  the global batches (:func:`num_batches`, :func:`batch_bounds`), each rank's contiguous
  shard of a batch (:func:`shard_bounds`) and the copy of those rows into a preallocated
  buffer (:func:`gather_rows`).

Source strings understood by :func:`load_source`:

1. A built-in, optionally with parameters: ``spirals`` or ``spirals:n=3000,classes=5,noise=0.2``.
   Built-ins are generated from ``seed``; nothing is downloaded. See :func:`builtin_names`.
   A built-in name wins over a file of the same name; write ``./spirals`` for the file.
2. ``path.npz`` holding arrays ``x`` and ``y``.
3. ``x.npy,y.npy``: two ``.npy`` files.
4. ``path.csv`` / ``.tsv`` / ``.txt``: a numeric table; the delimiter (comma, tab, semicolon or
   whitespace) is sniffed, a first row that is not all numeric is a header, ``#`` starts a
   comment. ``label_column`` picks the label: ``"last"``, ``"first"``, an index (negative
   allowed, int or digit string) or a header name.
5. ``images,labels``: an MNIST-style IDX pair (magic 0x00000803 uint8 ``(n, rows, cols)`` and
   0x00000801 uint8 ``(n,)``), gzipped or raw. Pixels are scaled to [0, 1].

Label rules, the same for every source: an integer ``y`` (or a 1-D float ``y`` whose values are
all integers) becomes ``(n,)`` int64 class ids; a 2-D ``y`` becomes float targets in x's dtype;
any other 1-D ``y`` becomes ``(n, 1)`` float targets. ``x`` with more than two dimensions is
flattened to ``(n, d)``. Every problem a user can fix raises :class:`~dpbp.errors.DataError`.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpbp import memory
from dpbp.errors import CheckpointError, DataError

__all__ = [
    "LOSSES",
    "NORMALIZERS",
    "Dataset",
    "Normalizer",
    "batch_bounds",
    "builtin_bytes",
    "builtin_names",
    "check_memory",
    "epoch_permutation",
    "gather_rows",
    "load_features",
    "load_source",
    "num_batches",
    "shard_bounds",
    "split_validation",
    "validate",
]

LOSSES = ("mse", "cross_entropy", "binary_cross_entropy")
NORMALIZERS = ("none", "standard", "minmax")

_SOURCE_FORMS = (
    "a built-in with optional parameters ('spirals', 'spirals:n=3000,classes=5')",
    "an .npz file with arrays 'x' and 'y'",
    "a pair 'x.npy,y.npy'",
    "a .csv/.tsv/.txt table",
    "an MNIST IDX pair 'images,labels' (gzipped or raw)",
)
_TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
_NPY_MAGIC = b"\x93NUMPY"
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_IDX_IMAGES = 0x00000803
_IDX_LABELS = 0x00000801
# Fixed first entropy word for built-ins, so their streams never coincide with the
# (seed, epoch) shuffle streams or the split stream that use the same user seed.
_BUILTIN_STREAM = 0xDA7A


@dataclass(repr=False)
class Dataset:
    """Samples and targets held in memory.

    ``x``: ``(n, d)`` C-contiguous float32 or float64.
    ``y``: ``(n,)`` int64 class ids, or ``(n, k)`` float targets with ``x``'s dtype.
    ``source``: human-readable origin, used as the prefix of every message about this data.
    """

    x: np.ndarray
    y: np.ndarray
    source: str

    @property
    def n_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])

    def __repr__(self) -> str:
        # Shapes, not contents: a data set may be printed inside an error report.
        return (f"Dataset({self.source!r}, x={self.x.shape} {self.x.dtype}, "
                f"y={self.y.shape} {self.y.dtype})")


# --------------------------------------------------------------------------- built-ins

def _make_xor(seed: int, repeat: int) -> tuple[np.ndarray, np.ndarray]:
    """The four XOR points tiled ``repeat`` times; y are (4*repeat, 1) float targets."""
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
    y = np.array([[0], [1], [1], [0]], dtype=np.float64)
    return np.tile(x, (repeat, 1)), np.tile(y, (repeat, 1))


def _make_spirals(seed: int, n: int, classes: int, noise: float,
                  turns: float) -> tuple[np.ndarray, np.ndarray]:
    """``classes`` interleaved spiral arms in the unit disc; int class ids.

    Arm ``j`` starts at angle ``2*pi*j/classes`` and winds ``turns`` times as its radius grows
    from 0 to 1; ``noise`` is the standard deviation of the angle jitter in radians, so the
    radius (and the [-1, 1] box) is kept exactly.
    """
    rng = np.random.default_rng([_BUILTIN_STREAM, seed, 1])
    y = np.arange(n) % classes  # interleaved: balanced, and mixed even without shuffling
    r = rng.uniform(0.0, 1.0, n)
    t = 2 * np.pi * (y / classes + turns * r) + noise * rng.standard_normal(n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1), y


# Each highdim class is a union of _HD_SUB Gaussian clusters whose centres lie in a random
# _HD_RANK-dimensional subspace: too few dimensions for a linear model to separate 3*classes
# centres with arbitrary labels, easy for one hidden layer.
_HD_SUB, _HD_RANK, _HD_SPREAD = 3, 8, 2.5


def _make_highdim(seed: int, n: int, d: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian sub-cluster classification in ``d`` dimensions; unit noise per feature."""
    rng = np.random.default_rng([_BUILTIN_STREAM, seed, 2])
    rank = min(_HD_RANK, d)
    embed = rng.standard_normal((rank, d)) / np.sqrt(d)  # near-isometric for rank << d
    low = rng.standard_normal((classes * _HD_SUB, rank)) * _HD_SPREAD
    # Broadcast-and-sum instead of a BLAS matmul: the same bits on every machine.
    centres = (low[:, :, None] * embed[None, :, :]).sum(axis=1)
    cluster = rng.integers(0, classes * _HD_SUB, n)
    # float32 from the start, noise added in row blocks: the largest temporary is one block,
    # so loading peaks near the data set's own size (a float64 build doubled it twice over).
    x = centres.astype(np.float32)[cluster]
    for start in range(0, n, 4096):
        block = x[start : start + 4096]
        block += rng.standard_normal(block.shape, dtype=np.float32)
    return x, cluster % classes


def _xor_bytes(itemsize: int, repeat: int) -> int:
    """Peak bytes of ``_make_xor`` and its cast: float64 tiles, then x and y in the data's dtype."""
    rows = 4 * repeat
    return rows * 3 * (8 + (itemsize if itemsize != 8 else 0))


def _spirals_bytes(itemsize: int, n: int, classes: int, noise: float, turns: float) -> int:
    """Peak bytes of ``_make_spirals``: labels, radius, angle, two coordinates and the stacked pair."""
    return n * 8 * 8


def _highdim_bytes(itemsize: int, n: int, d: int, classes: int) -> int:
    """Peak bytes of ``_make_highdim`` and its cast.

    The centres (with their broadcast product), cluster ids and labels, the float32
    features and one block of noise, plus the float64 copy of the features if asked for.
    """
    rank, centres = min(_HD_RANK, d), classes * _HD_SUB
    setup = 8 * d * (rank + centres * rank + centres)
    return setup + n * d * (4 + (itemsize if itemsize != 4 else 0)) + 16 * n + min(n, 4096) * d * 4


@dataclass(frozen=True)
class _Builtin:
    make: Callable[..., tuple[np.ndarray, np.ndarray]]
    params: dict[str, tuple[int | float, int | float]]  # name -> (default, inclusive minimum)
    summary: str
    peak_bytes: Callable[..., int]  # (itemsize, **params) -> bytes its generation peaks at
    shape: Callable[..., tuple[int, int, bool]]  # (**params) -> rows, features, float targets?


_BUILTINS: dict[str, _Builtin] = {
    "xor": _Builtin(_make_xor, {"repeat": (1, 1)},
                    "the 4 XOR points, float targets (4*repeat, 1)",
                    _xor_bytes, lambda repeat: (4 * repeat, 2, True)),
    "spirals": _Builtin(_make_spirals,
                        {"n": (3000, 1), "classes": (3, 2), "noise": (0.2, 0.0),
                         "turns": (1.0, 0.0)},
                        "2-D interleaved spiral arms, int class ids",
                        _spirals_bytes, lambda n, **_: (n, 2, False)),
    "highdim": _Builtin(_make_highdim, {"n": (60000, 1), "d": (100, 1), "classes": (10, 2)},
                        "Gaussian sub-clusters in a low-rank subspace of d-D, int class ids",
                        _highdim_bytes, lambda n, d, classes: (n, d, False)),
}


def builtin_names() -> list[str]:
    """Names of the generated data sets, sorted."""
    return sorted(_BUILTINS)


def _builtin_help() -> str:
    return "; ".join(
        f"{name}:" + ",".join(f"{k}={v[0]}" for k, v in b.params.items()) + f" ({b.summary})"
        for name, b in sorted(_BUILTINS.items()))


def _forms_hint() -> str:
    return ("expected one of: " + "; ".join(_SOURCE_FORMS)
            + ". Built-ins: " + ", ".join(builtin_names()))


def _builtin_values(name: str, text: str) -> dict[str, int | float]:
    """Parse ``k=v,...`` against the built-in's parameter table; defaults for the rest."""
    spec = _BUILTINS[name]
    values = {k: v[0] for k, v in spec.params.items()}
    given: set[str] = set()
    valid = ", ".join(f"{k} (default {v[0]})" for k, v in spec.params.items())
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, raw = (s.strip() for s in item.partition("="))
        if key not in spec.params:
            raise DataError(f"built-in {name!r}: unknown parameter {key!r}; valid: {valid}")
        if not eq or key in given:
            raise DataError(f"built-in {name!r}: expected 'name=value' once per parameter, "
                            f"found {item!r}")
        default, minimum = spec.params[key]
        try:
            value = int(raw) if isinstance(default, int) else float(raw)
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise DataError(f"built-in {name!r}: {key} must be {kind}, found {raw!r}") from None
        if not value >= minimum or not math.isfinite(value):
            raise DataError(f"built-in {name!r}: {key} must be >= {minimum}, found {raw!r}")
        values[key] = value
        given.add(key)
    return values


def builtin_bytes(source: str, dtype="float32") -> int | None:
    """Bytes of memory loading built-in ``source`` takes on one rank, or None for other sources.

    The larger of the generator's peak (x, y and its float64 temporaries; see the
    ``*_bytes`` functions) and twice the finished x and y (the train/validation split
    and the normalisation each copy them once) plus the masks of the checks. Raises
    DataError for bad parameters.
    """
    name, _, params = source.strip().partition(":")
    if name not in _BUILTINS:
        return None
    return _builtin_need(_BUILTINS[name], _builtin_values(name, params), _float_dtype(dtype).itemsize)


def _builtin_need(spec: _Builtin, values: dict, itemsize: int) -> int:
    rows, features, float_targets = spec.shape(**values)
    final = rows * (features * itemsize + (itemsize if float_targets else 8))  # x, and y as targets or int64 ids
    # DataError checks and the split's row masks: up to one byte per value and two per row on top of the copy.
    return max(spec.peak_bytes(itemsize, **values), 2 * final + rows * (features + 8))


_BUILTIN_COUNTS = "generating it, then x and y copied once"


def check_memory(source: str, *, dtype="float32", key: str = "") -> None:
    """Raise DataError if built-in ``source`` cannot be generated in the memory available (see dpbp.memory).

    Other sources are not checked here. ``key`` (``data.train``) names the config key in the message.
    """
    need = builtin_bytes(source, dtype)
    if need is not None:
        memory.check_data(f"{key}: {source!r}" if key else repr(source), need, _BUILTIN_COUNTS)


def _load_builtin(name: str, text: str, seed: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, str]:
    """Parse ``k=v,...`` against the built-in's parameter table and generate it.

    Refuses (DataError) before generating a data set that cannot fit in memory.
    """
    spec = _BUILTINS[name]
    values = _builtin_values(name, text)
    label = f"{name}:" + ",".join(f"{k}={v}" for k, v in values.items()) + f" (seed {seed})"
    memory.check_data(f"built-in {label}", _builtin_need(spec, values, dtype.itemsize), _BUILTIN_COUNTS)
    x, y = spec.make(seed, **values)
    return x, y, label


# --------------------------------------------------------------------------- assembling

def _float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _check_numeric(a: np.ndarray, what: str, source: str) -> None:
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
            or a.dtype == np.bool_):
        raise DataError(f"{source}: expected numeric {what}, found dtype {a.dtype}")


def _assemble(x, y, source: str, dtype: np.dtype) -> Dataset:
    """Apply the module's shape and label rules (see the module docstring) to raw arrays."""
    x, y = np.asarray(x), np.asarray(y)
    _check_numeric(x, "x", source)
    _check_numeric(y, "y", source)
    if x.ndim < 2:
        raise DataError(f"{source}: expected x of shape (n, d), found shape {x.shape} "
                        "(reshape a single feature to (n, 1))")
    if x.ndim > 2:
        x = x.reshape(x.shape[0], -1)  # images (n, h, w) -> (n, h*w)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{source}: expected a non-empty data set, found x of shape {x.shape}")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise DataError(f"{source}: expected y of shape ({x.shape[0]},) or ({x.shape[0]}, k) "
                        f"to match x {x.shape}, found y of shape {y.shape}")
    x = np.ascontiguousarray(x, dtype=dtype)
    if y.ndim == 2:
        return Dataset(x, np.ascontiguousarray(y, dtype=dtype), source)
    if np.issubdtype(y.dtype, np.unsignedinteger) and y.max() > np.iinfo(np.int64).max:
        raise DataError(f"{source}: class ids must fit int64, found max {y.max()}")
    if np.issubdtype(y.dtype, np.floating):
        # Integer-valued floats (labels read from a CSV) are class ids; the bound keeps the
        # int64 cast exact.
        whole = np.isfinite(y).all() and bool(np.all(y == np.round(y))) \
            and np.abs(y).max() < 2.0 ** 53
        if not whole:
            return Dataset(x, np.ascontiguousarray(y.reshape(-1, 1), dtype=dtype), source)
    return Dataset(x, np.ascontiguousarray(y, dtype=np.int64), source)


# --------------------------------------------------------------------------- files

def _existing_file(path: str, source: str) -> Path:
    p = Path(path).expanduser()
    where = "" if path == source else f" (in source {source!r})"
    if not p.exists():
        raise DataError(f"file not found: {p}{where}")
    if not p.is_file():
        raise DataError(f"expected a regular file, found a directory or special file: {p}{where}")
    return p


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _np_load(path: Path):
    # Check the magic first: np.load's own complaint about a foreign file talks of pickles.
    head = _head(path, len(_NPY_MAGIC))
    if not (head.startswith(_NPY_MAGIC) or head.startswith(_ZIP_MAGIC)):
        raise DataError(f"{path}: expected a NumPy .npy or .npz file, found leading bytes "
                        f"{head!r}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    npz = _np_load(path)
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: expected an .npz archive with arrays 'x' and 'y', "
                        "found a single .npy array")
    with npz:
        missing = [k for k in ("x", "y") if k not in npz.files]
        if missing:
            raise DataError(f"{path}: expected arrays 'x' and 'y', missing {missing}; "
                            f"keys found: {sorted(npz.files)}")
        try:
            return npz["x"], npz["y"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"cannot read {path}: {e}") from None


def _load_npy(path: Path) -> np.ndarray:
    arr = _np_load(path)
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise DataError(f"{path}: expected a single .npy array, found an .npz archive")
    return arr


# CSV ----------------------------------------------------------------------------------

def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].strip()


def _split_cells(line: str, delimiter: str | None) -> list[str]:
    if delimiter is None:
        return line.split()
    return [c.strip() for c in next(csv.reader([line], delimiter=delimiter))]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _sniff_table(path: Path, sample: int = 20):
    """Delimiter (None = whitespace), header names or None, lines to skip, column count."""
    first = {".tsv": "\t", ".csv": ","}.get(path.suffix.lower(), ",")
    candidates = [first] + [c for c in (",", "\t", ";") if c != first]
    lines: list[tuple[int, str]] = []  # (0-based physical line, text without comment)
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:
            for i, raw in enumerate(f):
                text = _strip_comment(raw)
                if text:
                    lines.append((i, text))
                    if len(lines) >= sample:
                        break
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as a text table: {e}") from None
    if not lines:
        raise DataError(f"{path}: expected a numeric table, found no rows")
    options = [*candidates, None]
    consistent = [c for c in options
                  if len(counts := {len(_split_cells(t, c)) for _, t in lines}) == 1
                  and counts.pop() > 1]
    # No option splits every row alike: take the one that splits the first row most, so the
    # row that disagrees is the one reported.
    delimiter = consistent[0] if consistent else max(
        options, key=lambda c: len(_split_cells(lines[0][1], c)))
    cells = _split_cells(lines[0][1], delimiter)
    header = None if all(_is_number(c) for c in cells) else cells
    skip = lines[0][0] + 1 if header else 0
    if header and len(lines) == 1:
        raise DataError(f"{path}: expected data rows after the header, found none")
    return delimiter, header, skip, len(cells)


def _table_error(path: Path, delimiter, skip: int, header, n_cols: int, reason: str) -> DataError:
    """Find the first malformed row the fast reader choked on and say where it is."""
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError) as e:
        return DataError(f"cannot read {path} as a text table: {e}")
    row = 0
    for i, raw in enumerate(lines):
        text = _strip_comment(raw)
        if i < skip or not text:
            continue
        row += 1
        cells = _split_cells(text, delimiter)
        if len(cells) != n_cols:
            return DataError(f"{path}: line {i + 1} (data row {row}): expected {n_cols} "
                             f"cells, found {len(cells)}")
        for j, cell in enumerate(cells):
            if not _is_number(cell):
                name = f" ({header[j]!r})" if header else ""
                return DataError(f"{path}: line {i + 1} (data row {row}), column {j + 1}"
                                 f"{name}: expected a number, found {cell!r}")
    return DataError(f"cannot read {path}: {reason}")


def _label_index(label_column, header, n_cols: int, path: Path) -> int:
    lc = label_column.strip() if isinstance(label_column, str) else label_column
    if lc == "last":
        return n_cols - 1
    if lc == "first":
        return 0
    if isinstance(lc, str) and re.fullmatch(r"[+-]?\d+", lc):
        lc = int(lc)
    if isinstance(lc, str):
        if header is None:
            raise DataError(f"{path}: label_column {lc!r} names a column, but the table has "
                            "no header row; use 'first', 'last' or a column index")
        if header.count(lc) != 1:
            found = "several columns" if lc in header else "no column"
            raise DataError(f"{path}: label_column {lc!r} matches {found}; header: {header}")
        return header.index(lc)
    if isinstance(lc, (int, np.integer)) and not isinstance(lc, bool) \
            and -n_cols <= lc < n_cols:
        return int(lc) % n_cols
    raise DataError(f"{path}: label_column must be 'first', 'last', a header name or an index "
                    f"in [{-n_cols}, {n_cols - 1}], found {label_column!r}")


def _read_table(path: Path) -> tuple[np.ndarray, list[str] | None, int]:
    """The numeric table at ``path`` as float64 (rows, columns), its header (or None) and width."""
    delimiter, header, skip, n_cols = _sniff_table(path)
    try:
        # Fast C parser first; the Python scan only runs to explain a failure.
        table = np.loadtxt(path, delimiter=delimiter, skiprows=skip, comments="#",
                           dtype=np.float64, ndmin=2, encoding="utf-8-sig",
                           quotechar='"' if delimiter else None)
    except ValueError as e:
        raise _table_error(path, delimiter, skip, header, n_cols, str(e)) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if table.shape[1] != n_cols:
        raise _table_error(path, delimiter, skip, header, n_cols, "column count changed")
    return table, header, n_cols


def _load_table(path: Path, label_column) -> tuple[np.ndarray, np.ndarray]:
    table, header, n_cols = _read_table(path)
    if n_cols < 2:
        raise DataError(f"{path}: expected at least 2 columns (features and a label), "
                        f"found {n_cols}")
    label = _label_index(label_column, header, n_cols, path)
    return np.delete(table, label, axis=1), table[:, label]


def load_features(path: str, *, dtype="float32") -> np.ndarray:
    """Features only (no labels), for prediction: ``.npy`` (n, d), ``.npz`` array ``x``, or a table.

    Returns a C-contiguous (n, d) array of ``dtype``; raises DataError for anything else,
    including NaN/Inf (naming the first bad row).
    """
    dt = _float_dtype(dtype)
    p = _existing_file(path, path)
    if p.suffix.lower() in _TABLE_SUFFIXES:
        x = _read_table(p)[0]
    else:
        arr = _np_load(p)
        if isinstance(arr, np.lib.npyio.NpzFile):
            with arr:
                if "x" not in arr.files:
                    raise DataError(f"{p}: expected an array 'x'; keys found: {sorted(arr.files)}")
                x = arr["x"]
        else:
            x = arr
    _check_numeric(np.asarray(x), "features", str(p))
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"{p}: expected features of shape (n, d) with n >= 1, found shape {x.shape}")
    x = np.ascontiguousarray(x.reshape(x.shape[0], -1), dtype=dt)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(f"{p}: {int(bad.sum())} rows contain NaN or Inf (first: row {int(np.argmax(bad))})")
    return x


# IDX ----------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when it starts with the gzip magic."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == _GZIP_MAGIC
        if not gz:
            return path.read_bytes()
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _parse_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """The uint8 array of an IDX file whose magic must equal ``magic``."""
    data = _read_bytes(path)
    ndim = magic & 0xFF
    head = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        shown = "fewer than 4 bytes" if found is None else f"magic 0x{found:08x}"
        raise DataError(f"{path}: expected an IDX {what} file (magic 0x{magic:08x}), found "
                        f"{shown}; the pair must be given as 'images,labels'")
    if len(data) < head:
        raise DataError(f"{path}: truncated IDX header: expected {head} bytes, "
                        f"found {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    size = math.prod(dims)
    shape = " x ".join(map(str, dims))
    if len(data) - head != size:
        state = "truncated" if len(data) - head < size else "has trailing bytes"
        raise DataError(f"{path}: IDX file {state}: header says {shape} = {size} data bytes, "
                        f"found {len(data) - head}")
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=head).reshape(dims)


def _load_idx(images: Path, labels: Path, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    img = _parse_idx(images, _IDX_IMAGES, "images")
    lab = _parse_idx(labels, _IDX_LABELS, "labels")
    if img.shape[0] != lab.shape[0]:
        raise DataError(f"{images}, {labels}: expected one label per image, found "
                        f"{img.shape[0]} images and {lab.shape[0]} labels")
    x = img.reshape(img.shape[0], -1).astype(dtype)
    x /= 255  # in place, keeps dtype
    return x, lab.astype(np.int64)


# --------------------------------------------------------------------------- load_source

def load_source(source: str, *, dtype="float32", label_column="last", seed=0) -> Dataset:
    """Load a data set from a source string (forms listed in the module docstring).

    ``dtype``: float32 or float64, the dtype of ``x`` and of float targets.
    ``label_column``: only used for tables. ``seed``: only used by built-ins.
    Returns a :class:`Dataset` following the module's label rules; raises DataError for a
    missing, unreadable, malformed or empty source, ValueError for a bad ``dtype``.
    """
    dt = _float_dtype(dtype)
    text = source.strip()
    if not text:
        raise DataError(f"data source is empty; {_forms_hint()}")
    name, colon, params = text.partition(":")
    if name in _BUILTINS:
        x, y, label = _load_builtin(name, params, int(seed), dt)
        return _assemble(x, y, label, dt)
    if colon and re.fullmatch(r"[A-Za-z_][\w-]+", name) and not os.path.exists(text):
        raise DataError(f"unknown built-in {name!r} in source {source!r}; "
                        f"built-ins: {_builtin_help()}")
    if "," in text and not os.path.exists(text):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2 or not all(parts):
            raise DataError(f"data source {source!r}: a pair must be two comma-separated "
                            f"files, found {len(parts)} parts; {_forms_hint()}")
        first, second = (_existing_file(p, text) for p in parts)
        if _head(first, len(_NPY_MAGIC)) == _NPY_MAGIC:
            x, y = _load_npy(first), _load_npy(second)
        else:
            x, y = _load_idx(first, second, dt)
        return _assemble(x, y, text, dt)
    path = Path(text).expanduser()
    if not path.exists() and not path.suffix and os.sep not in text:
        raise DataError(f"unknown data source {source!r}: not a built-in and no such file; "
                        f"{_forms_hint()}")
    path = _existing_file(text, text)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = _load_npz(path)
    elif suffix in _TABLE_SUFFIXES:
        x, y = _load_table(path, label_column)
    elif suffix == ".npy":
        raise DataError(f"{path}: a single .npy holds only x; expected 'x.npy,y.npy'")
    else:
        raise DataError(f"{path}: unrecognised file type {suffix or '(no suffix)'!r}; "
                        f"{_forms_hint()}")
    return _assemble(x, y, text, dt)


# --------------------------------------------------------------------------- validation

def validate(ds: Dataset, *, n_in: int, n_out: int, loss: str, role: str = "train") -> None:
    """Check that ``ds`` can feed a model with ``n_in`` inputs and ``n_out`` outputs.

    Raises DataError prefixed ``"{role} data ({source}): "`` for non-finite values, a width
    mismatch, class ids outside the model's range, or targets the loss cannot take.
    Raises ValueError for a ``loss`` not in :data:`LOSSES`. Reads only; mutates nothing.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    pre = f"{role} data ({ds.source}): "
    x, y = ds.x, ds.y
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{pre}expected a non-empty (n, d) x, found shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DataError(f"{pre}x has {int(bad.sum())} NaN/Inf values, first in row {row}")
    if ds.n_features != n_in:
        raise DataError(f"{pre}has {ds.n_features} features but model.layers[0] is {n_in}")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{pre}expected {x.shape[0]} targets (one per row), found {y.shape[0]}")
    if y.ndim == 1:
        _validate_ids(pre, y, n_out, loss)
    elif y.ndim == 2:
        _validate_targets(pre, y, n_out, loss)
    else:
        raise DataError(f"{pre}expected y of shape (n,) or (n, k), found {y.shape}")


def _validate_ids(pre: str, y: np.ndarray, n_out: int, loss: str) -> None:
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{pre}expected 1-D y to hold integer class ids, found {y.dtype}")
    if loss == "cross_entropy" and n_out < 2:
        raise DataError(f"{pre}cross_entropy with class ids needs model.layers[-1] >= 2, "
                        f"found {n_out} (use binary_cross_entropy for one output)")
    lo, hi = int(y.min()), int(y.max())
    allowed = (0, 1) if n_out == 1 else (0, n_out - 1)  # one output: binary 0/1 labels
    if lo < allowed[0] or hi > allowed[1]:
        raise DataError(f"{pre}class ids must lie in [{allowed[0]}, {allowed[1]}] for "
                        f"model.layers[-1] = {n_out}, found min {lo} and max {hi}")


def _validate_targets(pre: str, y: np.ndarray, n_out: int, loss: str) -> None:
    if y.shape[1] != n_out:
        raise DataError(f"{pre}has {y.shape[1]} target columns but model.layers[-1] is {n_out}")
    bad = ~np.isfinite(y)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DataError(f"{pre}y has {int(bad.sum())} NaN/Inf values, first in row {row}")
    if loss == "binary_cross_entropy" and (y.min() < 0 or y.max() > 1):
        raise DataError(f"{pre}binary_cross_entropy targets must lie in [0, 1], "
                        f"found min {y.min():g} and max {y.max():g}")
    if loss == "cross_entropy":
        sums = y.sum(axis=1, dtype=np.float64)
        off = np.flatnonzero((np.abs(sums - 1) > 1e-3) | (y < 0).any(axis=1))
        if off.size:
            r = int(off[0])
            raise DataError(f"{pre}cross_entropy targets must be non-negative rows summing to "
                            f"1 (tolerance 1e-3), found {off.size} rows that are not, first "
                            f"row {r} with sum {sums[r]:g} and min {y[r].min():g}")


# --------------------------------------------------------------------------- split, scaling

def _subset(ds: Dataset, idx: np.ndarray, part: str) -> Dataset:
    return Dataset(ds.x[idx], ds.y[idx], f"{ds.source} [{part}]")


def split_validation(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Split ``ds`` into (train, validation); ``fraction`` 0 gives ``(ds, None)``.

    The validation part gets ``round(fraction * n)`` rows (half rounds up), at least 1, and
    train keeps at least 1. Rows are chosen by ``default_rng(seed)`` and keep their original
    order within each part, so the result depends only on ``seed``. Both parts are copies.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must lie in [0, 1), got {fraction}")
    if fraction == 0:
        return ds, None
    n = ds.n_samples
    if n < 2:
        raise DataError(f"{ds.source}: a validation split needs at least 2 rows, found {n}")
    n_val = min(max(math.floor(fraction * n + 0.5), 1), n - 1)
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    # Boolean masks keep the original row order in both parts.
    return _subset(ds, ~chosen, "train split"), _subset(ds, chosen, "validation split")


class Normalizer:
    """Per-feature affine scaling ``(x - shift) * scale``.

    ``kind``: ``"none"``, ``"standard"`` (mean 0, std 1) or ``"minmax"`` (range [0, 1]).
    ``shift``, ``scale``: ``(d,)`` arrays, required unless kind is ``"none"``.
    """

    def __init__(self, kind: str, shift: np.ndarray | None = None,
                 scale: np.ndarray | None = None):
        if kind not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {kind!r}")
        if kind != "none":
            if shift is None or scale is None:
                raise ValueError(f"normalizer {kind!r} needs both shift and scale")
            shift, scale = np.asarray(shift), np.asarray(scale)
            if shift.ndim != 1 or shift.shape != scale.shape:
                raise ValueError(f"shift and scale must be equal 1-D shapes, got "
                                 f"{shift.shape} and {scale.shape}")
        self.kind, self.shift, self.scale = kind, shift, scale

    @classmethod
    def fit(cls, kind: str, x: np.ndarray, block: int = 8192) -> Normalizer:
        """Fit on ``x`` ``(n, d)``; statistics in float64, stored in ``x.dtype``.

        Columns that are constant up to ``x.dtype`` rounding get scale 1, so they map to 0
        instead of dividing by zero. Works in row blocks of ``block`` so float32 input never
        needs a float64 copy of the whole array.
        """
        if kind not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {kind!r}")
        if kind == "none":
            return cls("none")
        if not np.issubdtype(x.dtype, np.floating) or x.ndim != 2:
            raise ValueError(f"normalizer expects float (n, d) x, got {x.dtype} {x.shape}")
        n = x.shape[0]
        if n == 0:
            raise DataError("cannot fit a normalizer on 0 rows")
        lo = x.min(axis=0).astype(np.float64)
        hi = x.max(axis=0).astype(np.float64)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise DataError("cannot fit a normalizer: x contains NaN or Inf")
        if kind == "minmax":
            shift, spread = lo, hi - lo
        else:
            shift = sum(x[i:i + block].sum(axis=0, dtype=np.float64)
                        for i in range(0, n, block)) / n
            var = sum(((x[i:i + block] - shift) ** 2).sum(axis=0)
                      for i in range(0, n, block)) / n
            spread = np.sqrt(var)
        # Variation at the level of x's own rounding is noise, not signal.
        tol = np.finfo(x.dtype).eps * np.maximum(np.abs(lo), np.abs(hi))
        const = ~(spread > tol)
        scale = np.where(const, 1.0, 1.0 / np.where(const, 1.0, spread))
        return cls(kind, shift.astype(x.dtype), scale.astype(x.dtype))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Return a new array ``(x - shift) * scale`` with ``x``'s float dtype and shape."""
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"normalizer expects float32/float64 x, got {x.dtype}")
        if self.kind == "none":
            return x.copy()
        if x.shape[-1] != self.shift.shape[0]:
            raise DataError(f"normalizer was fitted on {self.shift.shape[0]} features, "
                            f"data has {x.shape[-1]}")
        # Cast the stats, not x: float64 stats would promote float32 x to float64.
        out = np.subtract(x, self.shift.astype(x.dtype, copy=False))
        out *= self.scale.astype(x.dtype, copy=False)
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"norm_shift", "norm_scale"}`` copies for a model file; empty for ``"none"``."""
        if self.kind == "none":
            return {}
        return {"norm_shift": self.shift.copy(), "norm_scale": self.scale.copy()}

    @classmethod
    def from_arrays(cls, kind: str, arrays) -> Normalizer:
        """Rebuild from :meth:`to_arrays` output (any mapping, e.g. an open NpzFile).

        Raises CheckpointError when a model file lacks the arrays its kind needs.
        """
        if kind not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {kind!r}")
        if kind == "none":
            return cls("none")
        missing = [k for k in ("norm_shift", "norm_scale") if k not in arrays]
        if missing:
            raise CheckpointError(f"normalizer {kind!r} needs arrays norm_shift and "
                                  f"norm_scale; missing {missing}")
        try:
            return cls(kind, np.array(arrays["norm_shift"]), np.array(arrays["norm_scale"]))
        except ValueError as e:
            raise CheckpointError(f"bad normalizer arrays: {e}") from None

    def __repr__(self) -> str:
        d = "" if self.shift is None else f", d={self.shift.shape[0]}"
        return f"Normalizer({self.kind!r}{d})"


# --------------------------------------------------------------------------- batch plan

def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Row order for one epoch: an int64 permutation of ``range(n)``.

    Drawn from ``default_rng([seed, epoch])`` (seed, epoch >= 0), whose output NumPy keeps
    stable across platforms; ``shuffle=False`` gives ``arange(n)``.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    # DP: depends on (seed, epoch) only, so every rank computes the same order unasked.
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def num_batches(n: int, batch_size: int) -> int:
    """Global batches per epoch, ``ceil(n / batch_size)``; the last may be partial."""
    if batch_size < 1 or n < 0:
        raise ValueError(f"need batch_size >= 1 and n >= 0, got {batch_size} and {n}")
    return -(-n // batch_size)


def batch_bounds(n: int, batch_size: int, step_in_epoch: int) -> tuple[int, int]:
    """Global ``[start, stop)`` positions (into the epoch permutation) of one batch."""
    if not 0 <= step_in_epoch < num_batches(n, batch_size):
        raise ValueError(f"step_in_epoch must lie in [0, {num_batches(n, batch_size)}), "
                         f"got {step_in_epoch}")
    start = step_in_epoch * batch_size
    return start, min(start + batch_size, n)


def shard_bounds(n_rows: int, size: int, rank: int) -> tuple[int, int]:
    """This rank's contiguous ``[start, stop)`` slice of ``n_rows`` rows.

    Shard sizes differ by at most one; the first ``n_rows % size`` ranks get the extra row
    and a rank may get none (start == stop). The shards tile ``[0, n_rows)`` exactly.
    """
    if size < 1 or not 0 <= rank < size or n_rows < 0:
        raise ValueError(f"need size >= 1, 0 <= rank < size, n_rows >= 0; "
                         f"got size={size} rank={rank} n_rows={n_rows}")
    # DP: every rank takes a disjoint piece of the same global batch; the gradient
    # allreduce divides by the global count, so uneven pieces stay exact.
    base, extra = divmod(n_rows, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather_rows(src: np.ndarray, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy ``src[idx]`` into ``out[:len(idx)]`` without allocating; return that view.

    ``src``: ``(n,)`` or ``(n, d)``. ``idx``: 1-D integer indices in ``[0, n)``.
    ``out``: C-contiguous, same dtype and trailing shape as ``src``, at least ``len(idx)`` rows.
    Raises IndexError for an index out of range, ValueError for a mismatched ``out``.
    """
    if out.dtype != src.dtype or out.shape[1:] != src.shape[1:] or len(out) < len(idx) \
            or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {src.dtype} with shape (>= {len(idx)}, "
                         f"*{src.shape[1:]}), got {out.dtype} {out.shape}")
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"idx must be 1-D integers, got {idx.dtype} {idx.shape}")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(src)):
        raise IndexError(f"row index out of range [0, {len(src)}): "
                         f"min {idx.min()}, max {idx.max()}")
    view = out[: len(idx)]
    # DP: runs every step into a per-rank buffer. mode='raise' would make np.take buffer
    # through a temporary copy of out; the explicit range check above keeps 'clip' from
    # ever clipping, so it only buys the unbuffered path.
    np.take(src, idx, axis=0, out=view, mode="clip")
    return view
