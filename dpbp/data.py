"""Data sets, their validation against a model, and the data-parallel batch plan.

This module owns everything between a source string and the rows one rank trains on:

* loading (:func:`load_source`) into a :class:`Dataset`, as the source holds it (raw);
* checking that prepared data fit a model (:func:`validate`);
* the train/validation split (:func:`split_rows`, :func:`split_validation`) and feature scaling
  (:class:`Normalizer`, fitted and applied in float64 before the cast to the model dtype);
* the batch plan shared by all ranks: the seeded global shuffle (:func:`epoch_permutation`),
  the global batches (:func:`num_batches`, :func:`batch_bounds`), each rank's contiguous
  shard of a batch (:func:`shard_bounds`) and the copy of those rows into a preallocated
  buffer (:func:`gather_rows`).

What the labels mean (class labels, regression or binary targets) is not decided here but by
the model's task, in :mod:`dpbp.targets`.

Source strings understood by :func:`load_source`:

1. A built-in, optionally with parameters: ``spirals`` or ``spirals:n=3000,classes=5,noise=0.2``.
   Built-ins are generated from ``seed``; nothing is downloaded. See :func:`builtin_names`.
   A built-in name wins over a file of the same name; write ``./spirals`` for the file.
2. ``path.npz`` holding arrays ``x`` and ``y`` (``y`` may hold numbers or text).
3. ``x.npy,y.npy``: two ``.npy`` files.
4. ``path.csv`` / ``.tsv`` / ``.txt``: a table of numbers whose label column may hold text; the
   delimiter (comma, tab, semicolon or whitespace) is sniffed, ``#`` starts a comment, cells may
   be quoted (``"``). ``header``: ``"true"``, ``"false"`` or ``"auto"`` (the first row is a header
   when a column holds text there and numbers in the rows below). ``label_column`` picks the
   label: ``"last"``, ``"first"``, an index (negative allowed, int or digit string) or a header
   name. Read by NumPy's C ``loadtxt``; messages name the line and column of a bad cell.
5. ``images,labels``: an MNIST-style IDX pair (magic 0x00000803 uint8 ``(n, rows, cols)`` and
   0x00000801 uint8 ``(n,)``), gzipped or raw. Pixels are scaled to [0, 1].

``x`` with more than two dimensions is flattened to ``(n, d)``. ``y`` is kept as the source holds
it: ``(n,)`` or ``(n, k)``, numbers (integers as int64) or text. Every problem a user can fix
raises :class:`~dpbp.errors.DataError`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
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
    "HEADER_MODES",
    "NORMALIZERS",
    "Dataset",
    "Normalizer",
    "batch_bounds",
    "builtin_bytes",
    "builtin_names",
    "check_memory",
    "dataset_digest",
    "epoch_permutation",
    "gather_rows",
    "load_features",
    "load_source",
    "num_batches",
    "shard_bounds",
    "split_rows",
    "split_validation",
    "validate",
]

NORMALIZERS = ("none", "standard", "minmax")
HEADER_MODES = ("auto", "true", "false")

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

    As loaded (:func:`load_source`): ``x`` ``(n, d)`` C-contiguous numbers (float32/float64 unless a
    ``dtype`` was asked for, which it then has), ``y`` ``(n,)`` or ``(n, k)`` numbers or text.
    Prepared for a model (``dpbp.train.prepare_data``): ``x`` normalised in the model dtype and ``y``
    ``(n,)`` int64 class ids or ``(n, k)`` float targets in the model dtype (see dpbp.targets).
    ``source``: human-readable origin, used as the prefix of every message about this data.
    ``where(i)``: where data row ``i`` came from (``"line 12"`` of a table), for messages; None:
    ``"row i"``. ``label_name``: the header name of a table's label column.
    """

    x: np.ndarray
    y: np.ndarray
    source: str
    where: Callable[[int], str] | None = None
    label_name: str | None = None

    @property
    def n_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])

    def row_name(self, i: int) -> str:
        """Where data row ``i`` came from, for a message: ``"line 12"`` of a table or ``"row 11"``."""
        return self.where(i) if self.where is not None else f"row {i}"

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


def _xor_bytes(repeat: int) -> int:
    """Peak bytes of ``_make_xor``: the float64 tiles of x and y."""
    return 4 * repeat * 3 * 8


def _spirals_bytes(n: int, classes: int, noise: float, turns: float) -> int:
    """Peak bytes of ``_make_spirals``: labels, radius, angle, two coordinates and the stacked pair."""
    return n * 8 * 8


def _highdim_bytes(n: int, d: int, classes: int) -> int:
    """Peak bytes of ``_make_highdim``.

    The centres (with their broadcast product), cluster ids and labels, the float32
    features and one block of noise.
    """
    rank, centres = min(_HD_RANK, d), classes * _HD_SUB
    setup = 8 * d * (rank + centres * rank + centres)
    return setup + n * d * 4 + 16 * n + min(n, 4096) * d * 4


@dataclass(frozen=True)
class _Builtin:
    make: Callable[..., tuple[np.ndarray, np.ndarray]]
    params: dict[str, tuple[int | float, int | float]]  # name -> (default, inclusive minimum)
    summary: str
    peak_bytes: Callable[..., int]  # (**params) -> bytes its generation peaks at
    shape: Callable[..., tuple[int, int, bool]]  # (**params) -> rows, features, float targets?
    itemsize: int  # bytes per feature value as generated (float64 8, float32 4)


_BUILTINS: dict[str, _Builtin] = {
    "xor": _Builtin(_make_xor, {"repeat": (1, 1)},
                    "the 4 XOR points, float targets (4*repeat, 1)",
                    _xor_bytes, lambda repeat: (4 * repeat, 2, True), 8),
    "spirals": _Builtin(_make_spirals,
                        {"n": (3000, 1), "classes": (3, 2), "noise": (0.2, 0.0),
                         "turns": (1.0, 0.0)},
                        "2-D interleaved spiral arms, int class ids",
                        _spirals_bytes, lambda n, **_: (n, 2, False), 8),
    "highdim": _Builtin(_make_highdim, {"n": (60000, 1), "d": (100, 1), "classes": (10, 2)},
                        "Gaussian sub-clusters in a low-rank subspace of d-D, int class ids",
                        _highdim_bytes, lambda n, d, classes: (n, d, False), 4),
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
    """Bytes of memory preparing built-in ``source`` for a ``dtype`` model takes on one rank, or None for other sources.

    The larger of the generator's peak (x, y and its float64 temporaries; see the
    ``*_bytes`` functions) and the data as generated plus the prepared x and y in ``dtype``
    (normalised straight from the generated rows, split included), the encoded targets
    and the masks and row indices of the checks and the split. Raises DataError for bad parameters.
    """
    name, _, params = source.strip().partition(":")
    if name not in _BUILTINS:
        return None
    return _builtin_need(_BUILTINS[name], _builtin_values(name, params), _float_dtype(dtype).itemsize)


def _builtin_need(spec: _Builtin, values: dict, itemsize: int) -> int:
    rows, features, float_targets = spec.shape(**values)
    raw = rows * (features * spec.itemsize + 8)  # as generated: x, and y as float64 targets or int64 labels
    final = rows * (features * itemsize + (itemsize if float_targets else 8))  # x, and y as targets or int64 ids
    # The finite check's mask (a byte per value) or the encoded targets (float64), the split's mask and row indices.
    work = rows * (max(features, 8 if float_targets else 0) + 17)
    return max(spec.peak_bytes(**values), raw + final + work)


_BUILTIN_COUNTS = "generating it, then x and y prepared for the model"


def check_memory(source: str, *, dtype="float32", key: str = "") -> None:
    """Raise DataError if built-in ``source`` cannot be generated in the memory available (see dpbp.memory).

    Other sources are not checked here. ``key`` (``data.train``) names the config key in the message.
    """
    need = builtin_bytes(source, dtype)
    if need is not None:
        memory.check_data(f"{key}: {source!r}" if key else repr(source), need, _BUILTIN_COUNTS)


def _load_builtin(name: str, text: str, seed: int, dtype: np.dtype | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Parse ``k=v,...`` against the built-in's parameter table and generate it.

    Refuses (DataError) before generating a data set that cannot fit in memory (prepared for a
    ``dtype`` model; None: the dtype it is generated in).
    """
    spec = _BUILTINS[name]
    values = _builtin_values(name, text)
    label = f"{name}:" + ",".join(f"{k}={v}" for k, v in values.items()) + f" (seed {seed})"
    itemsize = spec.itemsize if dtype is None else dtype.itemsize
    memory.check_data(f"built-in {label}", _builtin_need(spec, values, itemsize), _BUILTIN_COUNTS)
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


def _assemble(x, y, source: str, dtype: np.dtype | None, where=None, label_name=None) -> Dataset:
    """Shape rules of the module docstring for raw arrays; ``x`` cast to ``dtype`` unless it is None.

    With ``dtype`` None, float x keeps its dtype and integer or bool x becomes float64 (exact
    below 2**53). ``y`` stays as given (numbers, integers as int64, or text).
    """
    x, y = np.asarray(x), np.asarray(y)
    _check_numeric(x, "x", source)
    if y.dtype.kind == "S":
        try:
            y = y.astype(str)
        except UnicodeDecodeError:
            raise DataError(f"{source}: y holds bytes that are not text") from None
    if y.dtype.kind not in "biufU":
        raise DataError(f"{source}: expected y of numbers or text, found dtype {y.dtype}")
    if x.ndim < 2:
        raise DataError(f"{source}: expected x of shape (n, d), found shape {x.shape} "
                        "(reshape a single feature to (n, 1))")
    if x.ndim > 2:
        x = x.reshape(x.shape[0], -1)  # images (n, h, w) -> (n, h*w)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{source}: expected a non-empty data set, found x of shape {x.shape}")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0] or 0 in y.shape:
        raise DataError(f"{source}: expected y of shape ({x.shape[0]},) or ({x.shape[0]}, k) "
                        f"to match x {x.shape}, found y of shape {y.shape}")
    if dtype is None:
        dtype = x.dtype if x.dtype.kind == "f" else np.float64
    x = np.ascontiguousarray(x, dtype=dtype)
    if y.dtype.kind in "biu":
        if y.dtype.kind == "u" and y.max() > np.iinfo(np.int64).max:
            raise DataError(f"{source}: integer labels must fit int64, found max {y.max()}")
        y = y.astype(np.int64, copy=False)
    return Dataset(x, np.ascontiguousarray(y), source, where, label_name)


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
    """The line without surrounding space; "" for a comment line (first non-space character ``#``).

    Only whole lines are comments: a ``#`` inside a cell (a label such as ``C#`` or Excel's ``#N/A``)
    is data, never the start of a comment that would silently drop the rest of the row.
    """
    text = line.strip()
    return "" if text.startswith("#") else text


def _split_cells(line: str, delimiter: str | None) -> list[str]:
    if delimiter is None:
        return line.split()
    return [c.strip() for c in next(csv.reader([line], delimiter=delimiter))]


def is_number(cell: str) -> bool:
    """True when the text ``cell`` reads as a float (``float(cell)`` succeeds: also 'nan', '1e3')."""
    try:
        float(cell)
    except ValueError:
        return False
    return True


@dataclass
class _Table:
    """What the sniffing pass learned about a table: how to read it and what to call its rows."""

    path: Path
    delimiter: str | None  # None: runs of whitespace
    names: list[str] | None  # the header row, or None
    skip: int  # physical lines before the first data row (the header and what precedes it)
    n_cols: int

    def where(self, row: int) -> str:
        """``"line L"`` (1-based, physical) of data row ``row`` (0-based); scans the file, for messages only."""
        count = -1
        try:
            with open(self.path, encoding="utf-8-sig", newline=None) as f:
                for i, raw in enumerate(f):
                    if i >= self.skip and raw.strip():  # after the header every non-blank line is a row
                        count += 1
                        if count == row:
                            return f"line {i + 1}"
        except (OSError, UnicodeDecodeError):
            pass
        return f"data row {row + 1}"

    def column(self, j: int) -> str:
        """``"column 3 ('species')"`` (1-based) for messages."""
        return f"column {j + 1}" + (f" ({self.names[j]!r})" if self.names else "")


def _header_row(rows: list[list[str]], header: str) -> bool:
    """Is the first row a header? ``header``: "true", "false" or "auto".

    auto: yes when some column holds text in the first row and numbers in every other row read,
    so text labels never pass for a header, and a header of numbers needs ``header = true``.
    """
    if header != "auto":
        return header == "true"
    first, rest = rows[0], rows[1:]
    if not rest:
        return not all(is_number(c) for c in first)
    numbers = [c for c in first if is_number(c)]
    if len(numbers) < len(first) and len(numbers) > 1 and _counts_up(numbers):
        return True  # pandas' default column names: 0,1,2,...,label (text in the label column everywhere)
    return any(not is_number(cell) and all(j < len(r) and is_number(r[j]) for r in rest)
               for j, cell in enumerate(first))


def _counts_up(cells: list[str]) -> bool:
    """True for consecutive whole numbers from 0 or 1 (the names pandas gives unnamed columns)."""
    try:
        values = [float(c) for c in cells]
    except ValueError:
        return False
    return values[0] in (0.0, 1.0) and values == [values[0] + i for i in range(len(values))]


def _sniff_table(path: Path, header: str = "auto", sample: int = 20) -> _Table:
    """Delimiter, header and width of the table at ``path`` from its first ``sample`` rows."""
    if header not in HEADER_MODES:
        raise ValueError(f"header must be one of {HEADER_MODES}, got {header!r}")
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
        raise DataError(f"{path}: expected a table, found no rows")
    options = [*candidates, None]
    consistent = [c for c in options
                  if len(counts := {len(_split_cells(t, c)) for _, t in lines}) == 1
                  and counts.pop() > 1]
    # No option splits every row alike: take the one that splits the first row most, so the
    # row that disagrees is the one reported.
    delimiter = consistent[0] if consistent else max(
        options, key=lambda c: len(_split_cells(lines[0][1], c)))
    rows = [_split_cells(t, delimiter) for _, t in lines]
    names = rows[0] if _header_row(rows, header) else None
    skip = lines[0][0] + 1 if names else 0
    if names and len(lines) == 1:
        raise DataError(f"{path}: expected data rows after the header, found none"
                        + (" (data.header = auto took the first row for a header: set it to false if it is "
                           "data)" if header == "auto" else ""))
    return _Table(path, delimiter, names, skip, len(rows[0]))


def _table_error(table: _Table, reason: str, text_column: int | None = None,
                 target_column: int | None = None) -> DataError:
    """Find the first malformed row the fast reader choked on and say where it is.

    ``text_column``: the column that may hold text (class labels), not checked for numbers.
    ``target_column``: the label column when it must hold numbers (targets): text there gets a hint.
    """
    try:
        with open(table.path, encoding="utf-8-sig", newline=None) as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError) as e:
        return DataError(f"cannot read {table.path} as a text table: {e}")
    row = 0
    for i, raw in enumerate(lines):
        text = raw.strip()
        if i < table.skip or not text:
            continue
        row += 1
        if text.startswith("#"):
            return DataError(f"{table.path}: line {i + 1} (data row {row}) is a comment among the data rows; only "
                             "lines before the first row may be comments")
        cells = _split_cells(text, table.delimiter)
        if len(cells) != table.n_cols:
            return DataError(f"{table.path}: line {i + 1} (data row {row}): expected {table.n_cols} "
                             f"cells, found {len(cells)}")
        for j, cell in enumerate(cells):
            if j != text_column and not is_number(cell):
                hint = (" (this model's loss takes numeric targets; for class labels use model.loss = "
                        "\"cross_entropy\")" if j == target_column and cell else "")
                return DataError(f"{table.path}: line {i + 1} (data row {row}), {table.column(j)}: "
                                 f"expected a number, found {cell!r}{hint}")
    return DataError(f"cannot read {table.path}: {reason}")


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
                            "no header row; use 'first', 'last' or a column index (or, if its first row is the "
                            "header: data.header = true in training, --header true for evaluate and predict)")
        if header.count(lc) != 1:
            found = "several columns" if lc in header else "no column"
            raise DataError(f"{path}: label_column {lc!r} matches {found}; header: {header}")
        return header.index(lc)
    if isinstance(lc, (int, np.integer)) and not isinstance(lc, bool) \
            and -n_cols <= lc < n_cols:
        return int(lc) % n_cols
    raise DataError(f"{path}: label_column must be 'first', 'last', a header name or an index "
                    f"in [{-n_cols}, {n_cols - 1}], found {label_column!r}")


def _read_table(path: Path, header: str = "auto", label_column=None, text_labels: bool = False):
    """Read a table with NumPy's C reader: (x, y, table).

    ``x``: every column but the label column, float64 ``(n, d)``. ``y``: the label column (None
    without ``label_column``): float64, or with ``text_labels`` the labels as numbers when every
    one is a number and as stripped text otherwise. Text in the label column costs one Python call
    per row (a converter that numbers each distinct text), not a second pass.
    """
    table = _sniff_table(path, header)
    label = None if label_column is None else _label_index(label_column, table.names, table.n_cols, path)
    codes: dict[str, float] = {}  # label text -> number, in order of first appearance

    def code(text: str) -> float:
        found = codes.get(text)
        if found is None:
            found = codes[text] = float(len(codes))
        return found

    converters = {label: code} if label is not None and text_labels else None
    try:
        # Fast C parser first; the Python scan only runs to explain a failure.
        values = np.loadtxt(path, delimiter=table.delimiter, skiprows=table.skip, comments=None,
                            dtype=np.float64, ndmin=2, encoding="utf-8-sig",
                            quotechar='"' if table.delimiter else None, converters=converters)
    except ValueError as e:
        raise _table_error(table, str(e), label if converters else None, label) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if values.shape[1] != table.n_cols:
        raise _table_error(table, "column count changed", label if converters else None, label)
    if values.shape[0] == 0:
        raise DataError(f"{path}: expected data rows, found none")
    if label is None:
        return values, None, table
    x = np.delete(values, label, axis=1)  # a contiguous copy
    if converters is None:
        return x, values[:, label].copy(), table
    ids = values[:, label].astype(np.int64)
    del values
    texts = [t.strip() for t in codes]
    if all(t and is_number(t) for t in texts):
        return x, np.array([float(t) for t in texts])[ids], table
    return x, np.array(texts)[ids], table


def _check_table_features(x: np.ndarray, table: _Table, label: int | None) -> None:
    """Name the line and column of the first NaN/Inf feature of a table."""
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        column = j + (label is not None and j >= label)  # the file's own column
        raise DataError(f"{table.path}: {table.where(i)}, {table.column(column)}: the feature is {x[i, j]} "
                        f"({int(bad.sum())} NaN/Inf values in all)")


def _load_table(path: Path, label_column, header: str, text_labels: bool) -> Dataset:
    x, y, table = _read_table(path, header, label_column, text_labels)
    if table.n_cols < 2:
        raise DataError(f"{path}: expected at least 2 columns (features and a label), "
                        f"found {table.n_cols}")
    label = _label_index(label_column, table.names, table.n_cols, path)
    _check_table_features(x, table, label)
    name = table.names[label] if table.names else None
    return Dataset(x, y, str(path), table.where, name)


def load_features(path: str, *, dtype="float32", header: str = "auto", drop_column=None) -> np.ndarray:
    """Features only, for prediction: ``.npy`` (n, d), ``.npz`` array ``x``, or a table.

    ``dtype``: float32, float64, or None to keep the file's own floats (tables: float64; integers
    become float64). ``header``: as for tables in ``load_source``. ``drop_column``: a table column
    to leave out (its label column, which may hold text), named as ``label_column`` is.
    Returns a C-contiguous (n, d) array; raises DataError for anything else, including NaN/Inf
    (naming the first bad row, for tables its line and column).
    """
    dt = None if dtype is None else _float_dtype(dtype)
    p = _existing_file(path, path)
    if p.suffix.lower() in _TABLE_SUFFIXES:
        x, _, table = _read_table(p, header, drop_column, text_labels=True)
        label = None if drop_column is None else _label_index(drop_column, table.names, table.n_cols, p)
        _check_table_features(x, table, label)
    else:
        if drop_column is not None:
            raise DataError(f"{p}: a column to leave out applies to tables (.csv, .tsv, .txt) only")
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
    if dt is None:
        dt = x.dtype if x.dtype.kind == "f" else np.float64
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

def load_source(source: str, *, dtype="float32", label_column="last", header: str = "auto",
                text_labels: bool = True, seed=0) -> Dataset:
    """Load a data set from a source string (forms listed in the module docstring).

    ``dtype``: float32 or float64, the dtype of ``x``; None keeps the source's own precision
    (float x as stored, tables float64, integers as float64), for normalising in float64 before
    the cast. ``y`` is returned as the source holds it (see the module docstring).
    ``label_column``, ``header``: only used for tables; ``text_labels``: a table's label column may
    hold text (class labels; False: it must hold numbers, as targets do). ``seed``: only used by
    built-ins. Raises DataError for a missing, unreadable, malformed or empty source, ValueError
    for a bad ``dtype``.
    """
    dt = None if dtype is None else _float_dtype(dtype)
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
            x, y = _load_idx(first, second, dt or np.dtype(np.float32))
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
        ds = _load_table(path, label_column, header, text_labels)
        return _assemble(ds.x, ds.y, text, dt, ds.where, ds.label_name)
    elif suffix == ".npy":
        raise DataError(f"{path}: a single .npy holds only x; expected 'x.npy,y.npy'")
    else:
        raise DataError(f"{path}: unrecognised file type {suffix or '(no suffix)'!r}; "
                        f"{_forms_hint()}")
    return _assemble(x, y, text, dt)


# --------------------------------------------------------------------------- validation

def check_features(ds: Dataset, role: str = "train") -> None:
    """Raise DataError prefixed ``"{role} data ({source}): "`` unless ``ds.x`` is a finite, non-empty (n, d) array.

    Names where the first NaN/Inf came from (a table's line, or the row). Reads only.
    """
    pre = f"{role} data ({ds.source}): "
    x = ds.x
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{pre}expected a non-empty (n, d) x, found shape {x.shape}")
    if x.dtype.kind != "f":
        return
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DataError(f"{pre}x has {int(bad.sum())} NaN/Inf values, first at {ds.row_name(row)}")


def validate(ds: Dataset, *, n_in: int, n_out: int, role: str = "train") -> None:
    """Check that a prepared data set ``ds`` can feed a model with ``n_in`` inputs and ``n_out`` outputs.

    ``ds.y``: ``(n,)`` int64 class ids in ``[0, n_out)`` or ``(n, n_out)`` finite float targets (as
    dpbp.targets encodes them). Raises DataError prefixed ``"{role} data ({source}): "`` for
    non-finite values, a width mismatch or ids out of range. Reads only; mutates nothing.
    """
    pre = f"{role} data ({ds.source}): "
    check_features(ds, role)
    x, y = ds.x, ds.y
    if ds.n_features != n_in:
        raise DataError(f"{pre}has {ds.n_features} features but the model takes {n_in}")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{pre}expected {x.shape[0]} targets (one per row), found {y.shape[0]}")
    if y.ndim == 1:
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{pre}expected 1-D y to hold integer class ids, found {y.dtype}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_out:
            raise DataError(f"{pre}class ids must lie in [0, {n_out - 1}] for {n_out} outputs, "
                            f"found min {lo} and max {hi}")
    elif y.ndim == 2:
        if y.shape[1] != n_out:
            raise DataError(f"{pre}has {y.shape[1]} target columns but the model has {n_out} outputs")
        bad = ~np.isfinite(y)
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise DataError(f"{pre}y has {int(bad.sum())} NaN/Inf values, first at {ds.row_name(row)}")
    else:
        raise DataError(f"{pre}expected y of shape (n,) or (n, k), found {y.shape}")


def dataset_digest(ds: Dataset | None, *extra: np.ndarray) -> dict | None:
    """Row count, shapes and sha256 (32 hex digits) of a data set's arrays (and of ``extra`` arrays).

    None for no data set. Equal digests mean equal arrays; the bytes are hashed in place (no copy
    for contiguous arrays). For ``dpbp.comm.check_data_agrees``.
    """
    if ds is None:
        return None
    h = hashlib.sha256()
    for a in (ds.x, ds.y, *extra):
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return {"rows": ds.n_samples, "shape": [list(ds.x.shape), list(ds.y.shape)], "sha256": h.hexdigest()[:32]}


# --------------------------------------------------------------------------- split, scaling

def split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Row indices (int64, increasing) of the training and validation parts of ``n`` rows.

    ``fraction`` 0 gives ``(arange(n), None)``. The validation part gets ``round(fraction * n)``
    rows (half rounds up), at least 1, and train keeps at least 1. Rows are chosen by
    ``default_rng(seed)``, so the split depends only on ``(n, fraction, seed)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must lie in [0, 1), got {fraction}")
    if fraction == 0:
        return np.arange(n, dtype=np.int64), None
    if n < 2:
        raise DataError(f"a validation split needs at least 2 rows, found {n}")
    n_val = min(max(math.floor(fraction * n + 0.5), 1), n - 1)
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return np.flatnonzero(~chosen), np.flatnonzero(chosen)


def _subset(ds: Dataset, idx: np.ndarray, part: str) -> Dataset:
    return Dataset(ds.x[idx], ds.y[idx], f"{ds.source} [{part}]", None, ds.label_name)


def split_validation(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Split ``ds`` into (train, validation) by :func:`split_rows`; ``fraction`` 0 gives ``(ds, None)``.

    Rows keep their original order within each part. Both parts are copies.
    """
    if fraction == 0:
        split_rows(ds.n_samples, fraction, seed)  # the same checks
        return ds, None
    try:
        train, val = split_rows(ds.n_samples, fraction, seed)
    except DataError as exc:
        raise DataError(f"{ds.source}: {exc}") from None
    return _subset(ds, train, "train split"), _subset(ds, val, "validation split")


def _block_rows(width: int) -> int:
    """Rows of a ``width``-wide float64 block of about a MiB (the normaliser's working unit)."""
    return max(1, (1 << 17) // max(width, 1))


class Normalizer:
    """Per-feature affine scaling ``(x - shift) * scale``, computed in float64.

    ``kind``: ``"none"``, ``"standard"`` (mean 0, std 1) or ``"minmax"`` (range [0, 1]).
    ``shift``, ``scale``: ``(d,)`` arrays (float64 when fitted here), required unless kind is ``"none"``.
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
    def fit(cls, kind: str, x: np.ndarray, rows: np.ndarray | None = None) -> Normalizer:
        """Fit on ``x[rows]`` (``x`` ``(n, d)`` of any real dtype; ``rows`` None: every row).

        Statistics are computed in float64 from the values as given (no cast to a model dtype
        first, which would lose the digits a large offset leaves) and stored in float64.
        Columns that are constant up to the rounding of ``x``'s dtype get scale 1, so they map to
        0 instead of dividing by zero. Works in row blocks of about a MiB, so no float64 copy of
        the whole array is made.
        """
        if kind not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {kind!r}")
        if kind == "none":
            return cls("none")
        if x.dtype.kind not in "biuf" or x.ndim != 2:
            raise ValueError(f"normalizer expects real (n, d) x, got {x.dtype} {x.shape}")
        n = x.shape[0] if rows is None else len(rows)
        if n == 0:
            raise DataError("cannot fit a normalizer on 0 rows")
        block = _block_rows(x.shape[1])

        def blocks():
            for i in range(0, n, block):
                part = x[i:i + block] if rows is None else x[rows[i:i + block]]
                yield part.astype(np.float64, copy=False)

        lo = np.minimum.reduce([b.min(axis=0) for b in blocks()])
        hi = np.maximum.reduce([b.max(axis=0) for b in blocks()])
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise DataError("cannot fit a normalizer: x contains NaN or Inf")
        if kind == "minmax":
            shift, spread = lo, hi - lo
        else:
            shift = sum(b.sum(axis=0) for b in blocks()) / n
            var = sum(np.square(b - shift).sum(axis=0) for b in blocks()) / n
            spread = np.sqrt(var)
        # Variation at the level of x's own rounding is noise, not signal.
        eps = np.finfo(x.dtype if x.dtype.kind == "f" else np.float64).eps
        const = ~(spread > eps * np.maximum(np.abs(lo), np.abs(hi)))
        scale = np.where(const, 1.0, 1.0 / np.where(const, 1.0, spread))
        return cls(kind, shift, scale)

    def apply(self, x: np.ndarray, dtype=None, rows: np.ndarray | None = None) -> np.ndarray:
        """A new array ``(x[rows] - shift) * scale``, computed in float64 and stored as ``dtype``.

        ``dtype`` None: ``x``'s float dtype (float64 for integer x). ``rows`` None: every row.
        Works in row blocks, so the largest temporary is one float64 block of about a MiB.
        """
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise ValueError(f"normalizer expects real x, got {x.dtype}")
        dt = np.dtype(dtype) if dtype is not None else (x.dtype if x.dtype.kind == "f" else np.dtype(np.float64))
        if self.kind == "none":
            return np.array(x if rows is None else x[rows], dtype=dt)
        if x.shape[-1] != self.shift.shape[0]:
            raise DataError(f"normalizer was fitted on {self.shift.shape[0]} features, "
                            f"data has {x.shape[-1]}")
        if x.ndim != 2:
            return ((x.astype(np.float64) - self.shift) * self.scale).astype(dt)
        n = x.shape[0] if rows is None else len(rows)
        out = np.empty((n, x.shape[1]), dt)
        shift, scale = self.shift.astype(np.float64), self.scale.astype(np.float64)
        block = _block_rows(x.shape[1])
        for i in range(0, n, block):
            part = x[i:i + block] if rows is None else x[rows[i:i + block]]
            part = part.astype(np.float64)  # a copy, even of float64 x: worked on in place below
            part -= shift
            part *= scale
            out[i:i + block] = part
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"norm_shift", "norm_scale"}`` float64 copies for a model file; empty for ``"none"``."""
        if self.kind == "none":
            return {}
        return {"norm_shift": self.shift.astype(np.float64), "norm_scale": self.scale.astype(np.float64)}

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
