"""What a model's outputs mean: the task, the class labels and the target scaling, recorded once.

The task follows the model, never the values of the data (see ``ops.task_of``):

* **classification** (``cross_entropy``, or ``mse`` over a softmax) takes class labels: strings or
  numbers of any kind, in a 1-D ``y`` or an ``(n, 1)`` column. They map to class ids by one rule,
  scikit-learn's ``LabelEncoder``: the sorted unique values of the TRAINING labels (numbers sort
  numerically, strings by code point) get ids 0, 1, ... A label column whose every value is a number
  is numeric (``"1"`` and ``1.0`` are the label ``1``); otherwise every label is its text. A 2-D
  ``y`` with several columns holds target rows instead (one-hot or soft labels), one per output.
* **regression** (``mse`` over an identity or sigmoid output) takes numeric targets, whatever
  their values look like; a 1-D ``y`` is one column. With ``normalize = "standard"`` the model
  trains on ``(y - shift) * scale`` (mean 0, std 1 per column, fitted in float64 on the training
  split) and every reported output and metric is in the original units.
* **binary** (``binary_cross_entropy``) takes numeric targets in [0, 1] (0/1 or soft), one column
  per output.

:class:`Targets` is built from the training data when a run is created (``Targets.fit``), saved
with every checkpoint and model file (``to_meta``/``to_arrays``), and from then on only used
(``encode`` for any later data, ``decode`` for predictions): never re-derived from another file.
Every problem a user can fix raises :class:`~dpbp.errors.DataError` naming the line (tables) or
row of the first bad value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dpbp.data import is_number as _is_number
from dpbp.errors import CheckpointError, DataError

TASKS = ("classification", "regression", "binary")
TARGET_NORMALIZERS = ("none", "standard")
_EXACT_INT = 2.0 ** 53  # integer-valued floats below this convert to int64 exactly

Where = Callable[[int], str]  # data row index -> "line 12" (tables) or "row 12"


def _row(i: int) -> str:
    return f"row {i}"


@dataclass
class Targets:
    """The meaning of a model's outputs (see the module docstring).

    ``task``: one of ``TASKS``. ``outputs``: the model's output width. ``classes``: for
    classification from labels, the original labels in class-id order (``str``, ``int`` or
    ``float`` values, JSON-able); ``None`` when the outputs are target columns (regression, binary,
    classification from target rows) or for a model saved before labels were recorded (class ids
    are then the labels). ``normalize``/``shift``/``scale``: regression target scaling
    (``(outputs,)`` float64; the model is trained on ``(y - shift) * scale``). ``label_column``
    and ``label_name``: the training data's label column as configured and its header name, if any;
    ``header``: the training data's ``data.header`` setting (evaluate and predict read tables alike).
    """

    task: str
    outputs: int
    classes: list | None = None
    normalize: str = "none"
    shift: np.ndarray | None = field(default=None, repr=False)
    scale: np.ndarray | None = field(default=None, repr=False)
    label_column: str | None = None
    label_name: str | None = None
    header: str | None = None

    # ------------------------------------------------------------------ building

    @classmethod
    def fit(cls, task: str, y: np.ndarray, *, normalize: str = "none", rows: np.ndarray | None = None,
            where: Where | None = None, pre: str = "", label_column: str | None = None,
            label_name: str | None = None, header: str | None = None) -> Targets:
        """Record what the training labels/targets ``y`` (raw, as loaded) mean.

        Classes come from every row of ``y`` (the training file); the target scaling from
        ``y[rows]`` only (the training split; ``None``: every row). ``where(i)`` names data row i
        in messages, ``pre`` prefixes them. Reads only. Raises DataError for labels or targets the
        task cannot take (empty, NaN, text for a regression, ...) and ValueError for an unknown
        ``task`` or ``normalize``.
        """
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if normalize not in TARGET_NORMALIZERS:
            raise ValueError(f"target normalizer must be one of {TARGET_NORMALIZERS}, got {normalize!r}")
        where = where or _row
        kw = {"label_column": label_column, "label_name": label_name, "header": header}
        if task == "classification" and not _is_rows(y):
            classes = np.unique(_label_values(y.reshape(-1), where, pre))  # sorted: LabelEncoder's order
            return cls(task, len(classes), [_json_value(c) for c in classes], **kw)
        table = _numeric_rows(y, where, pre, task)
        if normalize == "standard":
            if task != "regression":
                raise ValueError("target normalisation applies to regression targets only")
            part = table if rows is None else table[rows]
            shift = part.mean(axis=0)
            spread = part.std(axis=0)
            const = ~(spread > np.finfo(np.float64).eps * np.abs(part).max(axis=0, initial=0.0))
            scale = np.where(const, 1.0, 1.0 / np.where(const, 1.0, spread))
            return cls(task, table.shape[1], None, "standard", shift, scale, **kw)
        return cls(task, table.shape[1], None, **kw)

    @classmethod
    def legacy(cls, task: str, outputs: int) -> Targets:
        """Targets of a file written before labels were recorded: class ids are the labels."""
        return cls(task, outputs)

    # ------------------------------------------------------------------ reading data

    def encode(self, y: np.ndarray, *, dtype="float64", where: Where | None = None, pre: str = "") -> np.ndarray:
        """``y`` (raw labels or targets of any later data) as the model's training form.

        Classification from labels: ``(n,)`` int64 class ids by the recorded mapping (labels not
        seen in training are a DataError naming them); otherwise ``(n, outputs)`` targets of
        ``dtype`` (regression targets scaled as recorded). Returns a new array; raises DataError.
        """
        where = where or _row
        if self.task == "classification" and not _is_rows(y):
            return self._ids(y.reshape(-1), where, pre)
        table = _numeric_rows(y, where, pre, self.task)
        if table.shape[1] != self.outputs:
            raise DataError(f"{pre}has {table.shape[1]} target column{'s' if table.shape[1] != 1 else ''}; "
                            f"the model has {self.outputs} output{'s' if self.outputs != 1 else ''}")
        if self.task == "binary":
            outside = (table < 0) | (table > 1)
            if outside.any():
                i = int(np.flatnonzero(outside.any(axis=1))[0])
                raise DataError(f"{pre}binary_cross_entropy takes targets in [0, 1], found {table[i].max():g} "
                                f"at {where(i)} (for class labels use loss = cross_entropy)")
        elif self.task == "classification":
            sums = table.sum(axis=1)
            off = np.flatnonzero((np.abs(sums - 1) > 1e-3) | (table < 0).any(axis=1))
            if off.size:
                i = int(off[0])
                raise DataError(f"{pre}cross_entropy target rows must be non-negative and sum to 1 "
                                f"(tolerance 1e-3), found {off.size} rows that are not, first at {where(i)} "
                                f"with sum {sums[i]:g}")
        if self.normalize == "standard":
            table -= self.shift
            table *= self.scale
        return table.astype(dtype, copy=False)

    def _ids(self, labels: np.ndarray, where: Where, pre: str) -> np.ndarray:
        values = _label_values(labels, where, pre)
        if self.classes is None:  # recorded before labels were: ids are the labels
            if values.dtype.kind != "i" or (values.size and (values.min() < 0 or values.max() >= self.outputs)):
                raise DataError(f"{pre}class ids must be integers in [0, {self.outputs - 1}] for this model "
                                "(saved without a label mapping)")
            return values.astype(np.int64, copy=False)
        text = isinstance(self.classes[0], str)
        if text == (values.dtype.kind == "U"):
            known = np.array(self.classes) if text else np.array(self.classes, dtype=np.float64)
            ids = np.searchsorted(known, values)  # the classes are sorted: one binary search per label
            np.minimum(ids, len(known) - 1, out=ids)
            unseen = known[ids] != values
        else:  # numbers against text classes or text against numbers: match each distinct value by its key
            uniq, inverse = np.unique(values, return_inverse=True)
            lookup = {_key(c, text=text): i for i, c in enumerate(self.classes)}
            mapped = np.array([lookup.get(_key(u, text=text), -1) for u in uniq.tolist()])[inverse.reshape(-1)]
            unseen = mapped < 0
            ids = np.where(unseen, 0, mapped)
        if unseen.any():
            bad = np.flatnonzero(unseen)
            first = {}
            for i in bad.tolist():
                first.setdefault(values[i].item(), i)
                if len(first) > 5:
                    break
            shown = ", ".join(f"{v!r} (first at {where(i)})" for v, i in list(first.items())[:5])
            count = len(np.unique(values[bad]))
            more = f" and {count - 5} more" if count > 5 else ""
            raise DataError(f"{pre}label{'s' if count > 1 else ''} not seen in training: {shown}{more}; "
                            f"the model knows {self.describe_classes()}")
        return ids.astype(np.int64, copy=False)

    # ------------------------------------------------------------------ writing outputs

    def decode(self, ids: np.ndarray) -> list:
        """Original labels (``str``, ``int`` or ``float``) of class ids ``(n,)``; the ids if none were recorded."""
        if self.classes is None:
            return [int(i) for i in ids]
        return [self.classes[int(i)] for i in ids]

    def output_values(self, a: np.ndarray) -> np.ndarray:
        """Model outputs ``a`` ``(n, outputs)`` in the targets' own units: unscaled (float64) for scaled
        regression targets, else ``a`` itself."""
        if self.normalize == "standard":
            return a.astype(np.float64) / self.scale + self.shift
        return a

    def column_names(self) -> list[str]:
        """Names for the output columns: ``prob_<label>`` for classes, else ``output_j``."""
        if self.task == "classification":
            labels = self.classes if self.classes is not None else range(self.outputs)
            return [f"prob_{label}" for label in labels]
        return [f"output_{j}" for j in range(self.outputs)]

    def describe_classes(self, limit: int = 10) -> str:
        labels = self.classes if self.classes is not None else list(range(self.outputs))
        shown = ", ".join(repr(c) for c in labels[:limit])
        return f"{len(labels)} class{'es' if len(labels) != 1 else ''}: {shown}{', ...' if len(labels) > limit else ''}"

    def describe(self) -> str:
        """One line for the start-up header."""
        column = f" (label column {self.label_name!r})" if self.label_name else ""
        if self.task == "classification":
            if self.classes is None:
                return f"classification into {self.outputs} classes from target rows{column}"
            return f"classification, {self.describe_classes()}{column}"
        what = f"{self.outputs} target column{'s' if self.outputs > 1 else ''}{column}"
        if self.task == "binary":
            return f"binary targets in [0, 1], {what}"
        scaled = "; targets standardised for training, reported in their own units" \
            if self.normalize == "standard" else ""
        return f"regression, {what}{scaled}"

    # ------------------------------------------------------------------ files

    def to_meta(self) -> dict:
        """JSON-able record (the arrays go separately, see ``to_arrays``)."""
        return {"task": self.task, "outputs": int(self.outputs), "classes": self.classes,
                "normalize": self.normalize, "label_column": self.label_column, "label_name": self.label_name,
                "header": self.header}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"target_shift", "target_scale"}`` float64 copies; empty without target scaling."""
        if self.normalize == "none":
            return {}
        return {"target_shift": self.shift.copy(), "target_scale": self.scale.copy()}

    @staticmethod
    def array_names(meta: dict) -> tuple[str, ...]:
        """Names of the arrays a record's file must hold (each ``(outputs,)`` float64)."""
        return ("target_shift", "target_scale") if meta["normalize"] != "none" else ()

    @classmethod
    def check_meta(cls, meta) -> None:
        """Raise ValueError unless ``meta`` is a well-formed record (before any array is read)."""
        if not isinstance(meta, dict):
            raise ValueError("targets must be an object")
        task, outputs, classes = meta.get("task"), meta.get("outputs"), meta.get("classes")
        if task not in TASKS:
            raise ValueError(f"unknown task {str(task)[:40]!r}")
        if type(outputs) is not int or outputs < 1:
            raise ValueError(f"outputs must be a positive integer, got {str(outputs)[:40]}")
        if meta.get("normalize") not in TARGET_NORMALIZERS:
            raise ValueError(f"unknown target normalizer {str(meta.get('normalize'))[:40]!r}")
        if classes is not None:
            kinds = {str if isinstance(c, str) else float if isinstance(c, (int, float)) and
                     not isinstance(c, bool) else None for c in classes} if isinstance(classes, list) else {None}
            if task != "classification" or len(classes) != outputs or None in kinds or len(kinds) != 1:
                raise ValueError("classes must be a list of strings or of numbers, one per output")
        for key in ("label_column", "label_name", "header"):
            if meta.get(key) is not None and not isinstance(meta[key], str):
                raise ValueError(f"{key} must be a string")

    @classmethod
    def from_meta(cls, meta: dict, arrays=None) -> Targets:
        """Rebuild from ``to_meta`` (checked, see ``check_meta``) and the arrays a file holds (None: a record
        to describe only, without its scaling arrays)."""
        try:
            cls.check_meta(meta)
        except ValueError as exc:
            raise CheckpointError(f"malformed targets record: {exc}") from None
        shift = scale = None
        if meta["normalize"] != "none" and arrays is not None:
            shift = np.array(arrays["target_shift"], np.float64)
            scale = np.array(arrays["target_scale"], np.float64)
        return cls(meta["task"], meta["outputs"], meta["classes"], meta["normalize"], shift, scale,
                   meta.get("label_column"), meta.get("label_name"), meta.get("header"))


# ----------------------------------------------------------------------------- value rules


# Texts that spreadsheets, R and pandas write for a missing value (pandas' default na_values, lower case):
# as a label they are refused, naming the line, instead of becoming a class of their own.
MISSING_LABELS = ("nan", "-nan", "+nan", "na", "n/a", "#n/a", "#n/a n/a", "#na", "<na>", "null", "none", "?",
                  "-1.#ind", "1.#ind", "-1.#qnan", "1.#qnan")


def _is_rows(y: np.ndarray) -> bool:
    """A 2-D y with several columns holds target rows; (n,) and (n, 1) hold one label per row."""
    return y.ndim == 2 and y.shape[1] > 1


def _label_values(labels: np.ndarray, where: Where, pre: str) -> np.ndarray:
    """1-D labels in canonical form: int64 (whole numbers), float64 (other numbers) or str.

    Text that is a number everywhere is that number; text with any non-number stays text
    (stripped). Empty and NaN/Inf labels, and text that marks a missing value (``MISSING_LABELS``:
    NA, N/A, #N/A, ?, null, ...), are a DataError naming the first one.
    """
    if labels.dtype.kind in "SU":
        text = np.char.strip(labels.astype(str))
        empty = np.flatnonzero(text == "")
        if empty.size:
            raise DataError(f"{pre}the label is empty at {where(int(empty[0]))}")
        try:
            numbers = text.astype(np.float64)
        except ValueError:
            missing = np.flatnonzero(np.isin(np.char.lower(text), MISSING_LABELS))  # NaN, NA, ? among text
            if missing.size:
                raise DataError(f"{pre}the label is {str(text[missing[0]])!r} at {where(int(missing[0]))}, a missing "
                                "value (labels read as missing: NA, N/A, #N/A, ?, null, None, NaN, ...)") from None
            return text
        labels = numbers
    if labels.dtype.kind == "b":
        return labels.astype(np.int64)
    if labels.dtype.kind in "iu":
        if labels.dtype.kind == "u" and labels.size and labels.max() > np.iinfo(np.int64).max:
            raise DataError(f"{pre}labels must fit int64, found {labels.max()}")
        return labels.astype(np.int64, copy=False)
    if labels.dtype.kind != "f":
        raise DataError(f"{pre}expected labels of numbers or text, found dtype {labels.dtype}")
    bad = np.flatnonzero(~np.isfinite(labels))
    if bad.size:
        raise DataError(f"{pre}the label is {labels[bad[0]]} at {where(int(bad[0]))}")
    if labels.size and bool(np.all(labels == np.round(labels))) and np.abs(labels).max() < _EXACT_INT:
        return labels.astype(np.int64)
    return labels.astype(np.float64, copy=False)


def _numeric_rows(y: np.ndarray, where: Where, pre: str, task: str) -> np.ndarray:
    """Targets as a new finite ``(n, k)`` float64 array; 1-D y is one column."""
    if y.dtype.kind in "SU":
        text = np.char.strip(y.astype(str))
        try:
            y = text.astype(np.float64)
        except ValueError:
            bad = next(i for i, t in enumerate(text.reshape(len(text), -1)) if not all(_is_number(c) for c in t))
            loss = "mse" if task == "regression" else "binary_cross_entropy"
            raise DataError(f"{pre}{task} targets must be numbers, found text at {where(bad)} "
                            f"(loss {loss} takes numeric targets; for class labels use loss = cross_entropy)") from None
    if y.dtype.kind not in "biuf":
        raise DataError(f"{pre}expected numeric targets, found dtype {y.dtype}")
    table = np.array(y, dtype=np.float64).reshape(y.shape[0], -1)
    bad = ~np.isfinite(table)
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DataError(f"{pre}the target is {table[i][bad[i]][0]} at {where(i)} "
                        f"({int(bad.sum())} NaN/Inf targets in all)")
    return table


def _json_value(value):
    """A numpy scalar as the Python value JSON writes: str, int or float."""
    value = value.item() if hasattr(value, "item") else value
    return value


def _key(value, *, text: bool):
    """Lookup key of a label: its text when the classes are text, else its number (text that is no number
    never equals a number)."""
    if text:
        if isinstance(value, str):
            return value
        number = float(value)
        return str(int(number)) if number.is_integer() and abs(number) < _EXACT_INT else repr(number)
    if isinstance(value, str):
        return float(value) if _is_number(value) else ("text", value)
    return float(value)
