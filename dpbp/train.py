"""The training loop: the only place where model, optimizer, communicator and data meet.

One step (every rank): take this rank's contiguous shard of the global batch,
forward + backprop it into the gradient SUM, append (loss sum, row count, correct
count), one in-place ``Allreduce`` over that single buffer, divide by the global
row count, apply the same update. Every rank then holds the same parameters, and
N ranks train the same model as 1 rank up to float rounding, uneven shards
included (each rank contributes sums; the division happens once, globally).

On one node (``train.node_shared``) the same sums are combined through shared
memory instead: each rank writes its gradient sum into its own slot of one
node-shared window, every rank adds up all slots over its own span of the
parameter vector and updates that span of the single shared copy of the
parameters and optimizer state; node barriers separate the phases.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpbp import checkpoint as ckpt
from dpbp import config as config_mod
from dpbp import data as data_mod
from dpbp import memory, ops
from dpbp import metrics as metrics_mod
from dpbp import rundir as rundir_mod
from dpbp.checkpoint import save_model
from dpbp.config import Config
from dpbp.errors import CheckpointError, ConfigError, DataError, DpbpError, SaveError
from dpbp.model import MLP
from dpbp.optim import CHUNK_ELEMENTS, LRSchedule, NonFiniteGradient, Optimizer, all_finite, make_optimizer
from dpbp.progress import Progress
from dpbp.signals import PREEMPTED_EXIT_CODE
from dpbp.targets import Targets
from dpbp.threads import configure_blas_threads


class TrainingError(DpbpError):
    """Training cannot continue (non-finite numbers, ranks out of sync).

    Raised only from values every rank shares (reduced sums, gathered digests),
    so all ranks raise it together.
    """

    exit_code = 3
    collective = True


# ----------------------------------------------------------------------------- agreement


class AgreedError(DpbpError):
    """An error raised on one or more ranks and agreed on by all (see ``all_or_nothing``)."""

    collective = True

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def all_or_nothing(comm, fn: Callable[[], object], what: str = "", *, root_only: bool = False):
    """Run ``fn`` on every rank; if it fails on any rank, raise the same AgreedError on all.

    Lets set-up work (reading config, data, files) fail on one node without
    leaving the other ranks waiting in a collective. Expected errors (DpbpError)
    keep their message and exit code; anything else is reported with its type.
    A failure on some ranks only is prefixed with the first failing rank, unless
    ``root_only`` (``fn`` does its work on rank 0 alone, so naming rank 0 says nothing).
    ``what`` also names the rank's phase while ``fn`` runs (see ``comm.phase``).
    """
    result, failure = None, None
    try:
        with comm.phase(what) if what else contextlib.nullcontext():
            result = fn()
    except DpbpError as exc:
        failure = (str(exc), exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - reported collectively below
        failure = (f"{what}{': ' if what else ''}{type(exc).__name__}: {exc}", 1)
    failures = comm.allgather_obj(failure)
    bad = [(rank, f) for rank, f in enumerate(failures) if f is not None]
    if bad:
        rank, (message, code) = bad[0]
        same_everywhere = len(bad) == comm.size and all(f == bad[0][1] for _, f in bad)
        if comm.size > 1 and not same_everywhere and not (root_only and rank == 0):
            message = f"rank {rank}: {message}"
        raise AgreedError(message, code)
    return result


def params_digest(params: np.ndarray) -> str:
    """Short sha256 of the parameter bytes: equal on all ranks iff the weights are identical."""
    return hashlib.sha256(params.tobytes()).hexdigest()[:16]


def check_in_sync(comm, params: np.ndarray, when: str) -> None:
    """Raise TrainingError on every rank if any rank's parameters differ from rank 0's."""
    digests = comm.allgather_obj(params_digest(params))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise TrainingError(
            f"ranks out of sync {when}: parameters on rank(s) {differ} differ from rank 0; "
            "check that every rank runs the same dpbp, numpy and config"
        )


def dataset_digest(ds: data_mod.Dataset | None, *extra: np.ndarray) -> dict | None:
    """Shape and sha256 (32 hex digits) of a data set's arrays (and of ``extra`` arrays); None for no data set."""
    if ds is None:
        return None
    h = hashlib.sha256()
    for a in (ds.x, ds.y, *extra):
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))  # the bytes themselves: no copy
    return {"rows": ds.n_samples, "shape": [list(ds.x.shape), list(ds.y.shape)], "sha256": h.hexdigest()[:32]}


def check_data_agrees(comm, data: PreparedData | dict[str, data_mod.Dataset | None]) -> dict[str, dict | None]:
    """Every rank must train on the same data: compare each rank's digests with rank 0's (collective).

    Ranks that read node-local copies of a file that differ would otherwise train silently as
    one (same length) or wait for each other forever (different lengths). Raises AgreedError
    (exit 2) naming the ranks and what differs; returns this rank's digests. ``data``: the
    prepared training data, or ``{role: data set}`` (e.g. what ``dpbp evaluate`` reads).
    """
    if isinstance(data, PreparedData):
        # The statistics fitted on the training data go into its digest: normalising hides an offset of the raw data.
        fitted = [*data.normalizer.to_arrays().values(), *data.targets.to_arrays().values()]
        roles = {"train": (data.train, fitted), "validation": (data.val, ()), "test": (data.test, ())}
    else:
        roles = {role: (ds, ()) for role, ds in data.items()}
    mine = {role: dataset_digest(ds, *extra) for role, (ds, extra) in roles.items()}
    everyone = comm.allgather_obj(mine)
    for role, ref in everyone[0].items():
        differ = [r for r, d in enumerate(everyone) if d[role] != ref]
        if not differ:
            continue
        other = everyone[differ[0]][role]
        if ref is None or other is None or other["shape"] != ref["shape"]:
            def size(d):
                return "none" if d is None else f"{d['rows']} rows, arrays {d['shape'][0]} and {d['shape'][1]}"

            what = f"rank {differ[0]} has {size(other)}, rank 0 has {size(ref)}"
        else:
            what = f"same {ref['rows']} rows, different content (sha256 {other['sha256'][:12]} vs {ref['sha256'][:12]})"
        raise AgreedError(f"ranks do not have the same {role} data: rank(s) {differ} differ from rank 0 ({what}); "
                          "check that every node reads the same files", 2)
    return mine


def in_phase(name: str):
    """Method decorator: the call runs inside ``comm.phase(name)`` (heartbeats say what a rank does).

    ``comm`` is ``self.comm``, or the method's ``comm`` argument (``__init__``).
    """

    def decorate(method):
        signature = inspect.signature(method)

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            comm = self.comm if hasattr(self, "comm") else signature.bind(self, *args, **kwargs).arguments["comm"]
            with comm.phase(name):
                return method(self, *args, **kwargs)

        return wrapper

    return decorate


# ----------------------------------------------------------------------------- set-up


@dataclass
class PreparedData:
    """Data sets ready for the model (every rank holds the same full arrays), the input map and the targets.

    ``train``, ``val``, ``test``: normalised x in the model dtype, y encoded by ``targets`` (see
    dpbp.targets). ``sizes``: the model's layer sizes (``model.layers``, or ``model.hidden`` between
    the data's widths). ``notes``: warnings about the data, for rank 0 to print once.
    """

    train: data_mod.Dataset
    val: data_mod.Dataset | None
    test: data_mod.Dataset | None
    normalizer: data_mod.Normalizer
    targets: Targets
    sizes: list[int]
    notes: list[str] = field(default_factory=list)


def target_normalizer(cfg: Config) -> str:
    """``data.normalize_targets`` resolved: ``auto`` is ``standard`` for a regression with an identity output."""
    kind = cfg.data.normalize_targets
    if kind == "auto":
        return "standard" if (cfg.model.loss, cfg.model.output) == ("mse", "identity") else "none"
    return kind


def prepare_data(cfg: Config, train: data_mod.Dataset | None = None) -> PreparedData:
    """Load, check, split, encode and normalise the configured data sets.

    ``train``: the raw training data held in memory (as ``load_source`` returns it: float ``x``,
    labels or targets ``y``), used instead of reading ``data.train`` (the scikit-learn estimators).

    The labels' meaning is recorded from the training data (``Targets.fit``: classes from every
    row of ``data.train``, target scaling from the training split); later data is encoded by that
    record. Features are normalised in float64 from the values as loaded and only then cast to
    ``model.dtype``. Deterministic given the config, so every rank builds identical arrays.
    Raises DataError / ConfigError with messages that name the source (and line) or key.
    """
    m, d, t = cfg.model, cfg.data, cfg.train
    task = ops.task_of(m.loss, m.output)
    dtype = np.dtype(m.dtype)

    def load(source: str, role: str) -> data_mod.Dataset:
        ds = data_mod.load_source(source, dtype=None, label_column=d.label_column, header=d.header,
                                  text_labels=task == "classification", seed=t.seed)
        data_mod.check_features(ds, role)
        return ds

    if train is None:
        raw = load(d.train, "train")
    else:
        data_mod.check_features(train, "train")
        raw = train
    rows, val_rows = data_mod.split_rows(raw.n_samples, 0.0 if d.val else d.val_fraction, t.seed)
    pre = f"train data ({raw.source}): "
    targets = Targets.fit(task, raw.y, normalize=target_normalizer(cfg), rows=rows, where=raw.where, pre=pre,
                          label_column=d.label_column, label_name=raw.label_name)
    if task == "classification" and targets.outputs < 2:
        raise DataError(f"{pre}the labels hold a single class ({targets.describe_classes()}): a classifier needs "
                        "at least 2; check data.train and data.label_column")
    sizes = model_sizes(cfg, raw.n_features, targets.outputs, raw.source)
    y_all = targets.encode(raw.y, dtype=dtype, where=raw.where, pre=pre)
    split = val_rows is not None
    normalizer = data_mod.Normalizer.fit(d.normalize, raw.x, rows if split else None)

    def part(ds, y, idx, name):
        source = f"{ds.source} [{name}]" if idx is not None else ds.source
        return data_mod.Dataset(normalizer.apply(ds.x, dtype, idx), y if idx is None else y[idx], source,
                                ds.where if idx is None else None, ds.label_name)

    train = part(raw, y_all, rows if split else None, "train split")
    val = part(raw, y_all, val_rows, "validation split") if split else None
    del raw, y_all
    loaded = {}
    for role, source in (("validation", d.val), ("test", d.test)):
        if source:
            other = load(source, role)
            y = targets.encode(other.y, dtype=dtype, where=other.where, pre=f"{role} data ({other.source}): ")
            loaded[role] = part(other, y, None, "")
    val = loaded.get("validation", val)
    test = loaded.get("test")
    for role, ds in (("train", train), ("validation", val), ("test", test)):
        if ds is not None:
            data_mod.validate(ds, n_in=sizes[0], n_out=sizes[-1], role=role)
    notes = _data_notes(targets, train, split)
    if task == "regression" and m.output == "sigmoid" and (train.y.min() < 0 or train.y.max() > 1):
        notes.append(f"warning: a sigmoid output predicts values in (0, 1), but the training targets span "
                     f"[{train.y.min():g}, {train.y.max():g}]: set model.output = \"identity\"")
    return PreparedData(train, val, test, normalizer, targets, sizes, notes)


def _data_notes(targets: Targets, train: data_mod.Dataset, split: bool) -> list[str]:
    """Warnings about training data a model cannot learn much from (printed once, by rank 0)."""
    notes = []
    y = train.y
    if targets.task == "classification" and y.ndim == 1 and split:
        counts = np.bincount(y, minlength=targets.outputs)
        missing = [targets.decode([i])[0] for i in np.flatnonzero(counts == 0)]
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
            notes.append(f"warning: class{'es' if len(missing) > 1 else ''} {shown} of data.train "
                         f"{'have' if len(missing) > 1 else 'has'} no rows in the training split (data.val_fraction "
                         "put them all in validation): the model cannot learn to predict "
                         f"{'them' if len(missing) > 1 else 'it'}")
        if np.count_nonzero(counts) == 1:
            notes.append("warning: the training split holds a single class: the model will learn to predict it "
                         "for every input")
    elif targets.task == "binary":
        hard = y > 0.5
        one_sided = [j for j in range(y.shape[1]) if hard[:, j].all() or not hard[:, j].any()]
        if one_sided:
            notes.append(f"warning: the binary targets of output{'s' if len(one_sided) > 1 else ''} "
                         f"{', '.join(map(str, one_sided))} hold a single class in the training data: the model "
                         "will learn to predict it for every input")
    elif targets.task == "regression" and y.shape[0] > 1 and bool(np.all(y == y[0])):
        notes.append("warning: the training targets are constant: the model will learn to predict that value "
                     "(R^2 means nothing here)")
    return notes


def model_sizes(cfg: Config, n_features: int, n_outputs: int, source: str = "") -> list[int]:
    """The model's layer sizes: ``model.layers`` checked against the data, or ``model.hidden`` between its widths.

    Raises ConfigError on model.layers when its ends do not match ``n_features`` and ``n_outputs``.
    """
    m = cfg.model
    if not m.layers:
        return [n_features, *m.hidden, n_outputs]
    layers = list(m.layers)
    if layers[0] != n_features or layers[-1] != n_outputs:
        fix = [n_features, *layers[1:-1], n_outputs]
        raise ConfigError(
            "model.layers",
            f"{layers} does not fit the training data {source!r} ({n_features} features, {n_outputs} outputs); "
            f"for example --set 'model.layers={fix}', or give model.hidden = {layers[1:-1]} alone and the widths "
            "follow the data",
        )
    return layers


def check_memory(cfg: Config) -> None:
    """Refuse, before anything is allocated, a config whose built-in data sets or model cannot fit in memory.

    Raises DataError naming the data key, or ConfigError on model.layers (estimates
    and sources of the available figure: see dpbp.memory). Run it on every rank before
    the run directory is written; files are not checked here.
    """
    d, m = cfg.data, cfg.model
    for key, source in (("data.train", d.train), ("data.val", d.val), ("data.test", d.test)):
        if source:
            data_mod.check_memory(source, dtype=m.dtype, key=key)
    memory.check_model(cfg)


def build_model(cfg: Config, sizes: list[int]) -> MLP:
    """The configured MLP of ``sizes`` (see ``model_sizes``) with its initial weights.

    Raises ConfigError (model.layers) if it cannot fit in memory.
    """
    m = cfg.model
    memory.check_model(cfg, sizes)  # before allocating: a MemoryError or the OOM killer tells the user nothing
    return MLP(sizes, activation=m.activation, output=m.output, loss=m.loss,
               init=m.init, dtype=m.dtype, seed=cfg.train.seed)


def build_optimizer(cfg: Config, model: MLP) -> Optimizer:
    t = cfg.train
    hyper = {
        "sgd": {},
        "momentum": {"momentum": t.momentum, "nesterov": t.nesterov},
        "rmsprop": {"rho": t.rho, "eps": t.eps},
        "adam": {"beta1": t.beta1, "beta2": t.beta2, "eps": t.eps, "weight_decay": t.weight_decay},
    }[t.optimizer]
    return make_optimizer(t.optimizer, model.n_params, model.dtype, **hyper)


def build_schedule(cfg: Config, steps_per_epoch: int) -> LRSchedule:
    t = cfg.train
    return LRSchedule(
        t.lr, t.schedule, total_steps=t.epochs * steps_per_epoch,
        warmup_steps=round(t.warmup_epochs * steps_per_epoch),
        step_size=t.step_epochs * steps_per_epoch, gamma=t.gamma, min_lr=t.min_lr,
    )


# ----------------------------------------------------------------------------- evaluation


def evaluate(model: MLP, ds: data_mod.Dataset, comm, targets: Targets | None = None) -> dict:
    """Exact metrics of ``model`` over prepared data ``ds``: each rank takes one contiguous shard, sums are reduced.

    Every sample is counted exactly once across ranks (no padding, no duplicates); the
    reductions are float64. Returns ``task``, ``n`` and the mean ``loss`` (the training loss) and:

    * classification and binary: ``accuracy``; with class ids or one output also the report of
      ``dpbp.metrics.classification_report`` (per-class precision, recall, F1, support, averages,
      confusion matrix) and ``classes`` (the original labels, from ``targets``);
    * regression: ``mse``, ``rmse``, ``mae`` and ``r2`` in the targets' own units (``targets``
      undoes their scaling); R^2 is taken about the global mean, found by a first reduction.

    ``targets`` defaults to ``Targets.legacy`` (class ids are the labels, no scaling).
    Collective: call on every rank.
    """
    task, k = model.task, model.sizes[-1]
    targets = targets if targets is not None else Targets.legacy(task, k)
    lo, hi = data_mod.shard_bounds(ds.n_samples, comm.size, comm.rank)  # DP: my rows only
    x, y = ds.x[lo:hi], ds.y[lo:hi]
    with comm.phase("evaluating"), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if task == "regression":
            report = _evaluate_regression(model, x, y, comm, targets)
        else:
            report = _evaluate_classes(model, x, y, comm, targets)
    return {"task": task, **report}


def _evaluate_classes(model: MLP, x: np.ndarray, y: np.ndarray, comm, targets: Targets) -> dict:
    k = model.sizes[-1]
    kinds = 2 if k == 1 else k  # one output: the classes 0 and 1 (output > 0.5)
    report = model.task == "classification" or k == 1  # several binary outputs: accuracy only
    conf = np.zeros(kinds * kinds)

    def on_outputs(start: int, a: np.ndarray) -> None:
        if not report:
            return
        rows = y[start : start + a.shape[0]]
        if k == 1:
            truth, pred = rows.reshape(-1) > 0.5, a[:, 0] > 0.5
        else:
            truth, pred = (rows if rows.ndim == 1 else np.argmax(rows, axis=1)), np.argmax(a, axis=1)
        conf[...] += metrics_mod.confusion_counts(truth, pred, kinds)

    stats = model.evaluate_sum(x, y, check=False, on_outputs=on_outputs)
    sums = np.concatenate([[stats.loss_sum, stats.n_correct, stats.n], conf])
    comm.allreduce_(sums)  # DP: global sums, counts and confusion matrix
    n = int(sums[2])
    out = {"n": n, "loss": sums[0] / n if n else math.nan, "accuracy": sums[1] / n if n else math.nan}
    if report:
        out.update(metrics_mod.classification_report(sums[3:].reshape(kinds, kinds)))
        if model.task == "classification":
            out["classes"] = targets.decode(np.arange(k))
        else:
            out["classes"] = [0, 1]
    return out


def _evaluate_regression(model: MLP, x: np.ndarray, y: np.ndarray, comm, targets: Targets) -> dict:
    k = model.sizes[-1]
    first = np.concatenate([[x.shape[0]], y.sum(axis=0, dtype=np.float64)])
    comm.allreduce_(first)  # DP: the global mean of the targets, for R^2 without cancellation
    mean = first[1:] / max(first[0], 1.0)
    sums = np.zeros(3 * k)  # squared errors, absolute errors, squared deviations of the targets; per column
    sse, sae, sst = sums[:k], sums[k : 2 * k], sums[2 * k :]

    def on_outputs(start: int, a: np.ndarray) -> None:
        t = y[start : start + a.shape[0]].astype(np.float64)
        e = a - t  # float64, as t is
        sse[...] += np.einsum("ij,ij->j", e, e)
        sae[...] += np.abs(e).sum(axis=0)
        dev = t - mean
        sst[...] += np.einsum("ij,ij->j", dev, dev)

    stats = model.evaluate_sum(x, y, check=False, on_outputs=on_outputs)
    total = np.concatenate([[stats.loss_sum, stats.n], sums])
    comm.allreduce_(total)  # DP: global sums
    n = int(total[1])
    sse, sae, sst = total[2 : 2 + k], total[2 + k : 2 + 2 * k], total[2 + 2 * k :]
    if targets.normalize == "standard":  # back to the targets' own units (R^2 does not change)
        sse, sae, sst = sse / targets.scale**2, sae / targets.scale, sst / targets.scale**2
    return {"n": n, "loss": total[0] / n if n else math.nan, **metrics_mod.regression_report(n, sse, sae, sst)}


def train_metrics(task: str, loss_mean: float, targets: Targets) -> dict:
    """The training metrics derived from the epoch's mean loss: for a regression, ``mse`` and ``rmse``.

    Exact: the mse loss is half the squared error summed over outputs, so the plain MSE is
    ``2 * loss / outputs`` (divided by the squared target scale when targets were scaled, which
    needs a single column; several scaled columns give None).
    """
    if task != "regression":
        return {}
    k = targets.outputs
    if targets.normalize == "standard":
        if k > 1:
            return {"mse": None, "rmse": None}
        mse = 2.0 * loss_mean / float(targets.scale[0]) ** 2
    else:
        mse = 2.0 * loss_mean / k
    return {"mse": mse, "rmse": math.sqrt(mse) if mse >= 0 else math.nan}


REGRESSION_KEYS = ("mse", "rmse", "mae", "r2")  # per-epoch validation metrics of a regression


# ----------------------------------------------------------------------------- the loop


class Preempted(DpbpError):
    """A stop signal reached some rank; all ranks checkpointed and stop (requeue and resume)."""

    exit_code = PREEMPTED_EXIT_CODE
    collective = True


# Changing these between a checkpoint and its resume would change the data order or the model.
FROZEN_ON_RESUME = ("model.", "data.train", "data.val", "data.val_fraction", "data.normalize",
                    "data.label_column", "data.header", "train.batch_size", "train.seed", "train.shuffle",
                    "train.optimizer")


@dataclass
class TrainState:
    """Everything global needed to continue a run exactly (no per-rank iterators).

    The shuffle is a pure function of (seed, epoch) and the learning rate of the
    global step, so this plus parameters and optimizer state is the whole run.
    """

    epoch: int = 0  # 0-based epoch in progress
    step_in_epoch: int = 0  # next step inside that epoch
    global_step: int = 0  # updates applied so far
    best_val_loss: float = math.inf
    epochs_since_best: int = 0
    epoch_loss_sum: float = 0.0  # running train sums of the epoch in progress
    epoch_correct: float = 0.0
    epoch_count: float = 0.0
    stopped: str = ""  # "early_stopping" once early stopping fired
    grad_norm_sums: list = field(default_factory=list)  # per-layer ||dL/dW|| summed over sampled steps
    grad_norm_count: int = 0
    skipped_steps: int = 0  # updates left out by train.on_nonfinite = "skip", over the whole run (resumes too)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainState:
        d = dict(d)
        d["best_val_loss"] = math.inf if d.get("best_val_loss") is None else d["best_val_loss"]
        return cls(**d)


@dataclass
class TrainResult:
    model: MLP
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    stopped: str = "epochs"
    state: TrainState = field(default_factory=TrainState)
    reports: dict = field(default_factory=dict)  # "val"/"test": the final evaluate() report of each


def _use_sharding(cfg: Config, comm) -> bool:
    """Shard the optimizer when asked, or (``auto``) when it measurably pays.

    Measured on 2 cores (scripts/bench): reduce-scatter + all-gather costs about 1.5x
    one Allreduce of the same bytes, while the sharded update saves (ranks - 1)/ranks
    of the optimizer's element-wise work: a win for the stateful optimizers (Adam:
    +30 % at 8 ranks on 2 cores, 0-10 % at 2), none for plain SGD. ``auto`` therefore
    shards stateful optimizers when ranks outnumber the cores; ``on`` may also pay off
    for Adam at 2+ ranks (see the README's Performance).
    """
    mode = cfg.train.shard_optimizer
    if comm.size == 1 or mode == "off":
        return False
    if mode == "on":
        return True
    return cfg.train.optimizer != "sgd" and comm.local_size > (os.cpu_count() or 1)


SHM_DIR = "/dev/shm"  # where MPICH and Open MPI place shared-memory windows on Linux
SHM_RESERVE = 64 * 2**20  # room left there for MPI's own shared-memory transport


def _shm_free_bytes() -> int | None:
    """Free bytes in ``SHM_DIR`` (None where it does not exist)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _use_node_shared(cfg: Config, comm, window_bytes: int = 0) -> bool:
    """Combine gradients through node-shared memory (see ``train.node_shared``)?

    Measured on 2 cores (scripts/bench): 2 ranks train 3-17 % faster than with one
    Allreduce per step plus an update repeated on every rank (more with Adam than SGD),
    and 8 ranks (more ranks than cores) about 1.5x as fast. It needs every rank on one
    node, and room for the window in /dev/shm (Docker gives 64 MiB unless ``--shm-size``
    says more): touching a window larger than that would crash the job, so ``auto``
    then keeps the Allreduce.
    """
    t = cfg.train
    if comm.size == 1 or t.node_shared == "off":
        return False
    one_node = comm.local_size == comm.size  # the same answer on every rank
    free = _shm_free_bytes()
    room = free is None or window_bytes + SHM_RESERVE <= free
    if t.node_shared == "on":
        if not one_node:
            raise ConfigError("train.node_shared", f"'on' needs every rank on one node; {comm.size} ranks run "
                              f"on several nodes ({comm.local_size} on this one); use auto or off")
        if not room:
            raise ConfigError("train.node_shared", f"'on' needs {(window_bytes + SHM_RESERVE) / 2**20:.0f} MiB "
                              f"of shared memory in {SHM_DIR}, {free / 2**20:.0f} MiB are free (in Docker: docker "
                              "run --shm-size=1g ...); or set train.node_shared=off")
        return True
    return one_node and room and t.shard_optimizer != "on" and not t.overlap_allreduce


class _NodeShared:
    """Everything the node-shared step keeps in one shared-memory window, as views.

    params: the parameters (one copy per node); state: the optimizer's vectors;
    slots: (ranks, n_params + 4) rows, rank r's gradient sum then its loss sum, row
    count, correct count and stop vote; squares: (ranks, layers) squared gradient norms
    of each rank's span. span: [lo, hi) of the parameters this rank sums and updates;
    grad: the summed gradient of that span (private).
    """

    @staticmethod
    def window_elements(model: MLP, optimizer: Optimizer, ranks: int) -> int:
        """Elements of the window: params, optimizer state, one slot per rank, per-rank squared norms."""
        n = model.n_params
        return n * (1 + len(optimizer.state_names)) + ranks * (n + 4) + ranks * model.n_layers

    def __init__(self, model: MLP, optimizer: Optimizer, comm):
        n, k, layers = model.n_params, comm.size, model.n_layers
        names = optimizer.state_names
        window = comm.node_shared_array(self.window_elements(model, optimizer, k), model.dtype)
        first = comm.local_rank == 0  # DP: one rank fills the shared copies, the barrier publishes them
        model.move_params(window[:n], copy=first)
        optimizer.move_state({name: window[n * (1 + i) : n * (2 + i)] for i, name in enumerate(names)}, copy=first)
        start = n * (1 + len(names))
        self.slots = window[start : start + k * (n + 4)].reshape(k, n + 4)
        self.squares = window[start + k * (n + 4) :].reshape(k, layers)
        comm.node_barrier()
        self.span = data_mod.shard_bounds(n, k, comm.rank)
        lo, hi = self.span
        self.grad = np.empty(hi - lo, model.dtype)
        self.layer_ranges = [(w.start, b.stop) for w, b in model.layer_slices()]  # flat [start, stop) of each layer
        self.rank = comm.rank

    def sum_span(self) -> None:
        """grad <- my span of the summed slots (rank order); ``squares[rank]`` <- its per-layer squared norms.

        Chunk by chunk, so each chunk is summed and squared while it is in cache.
        """
        lo, hi = self.span
        mine = self.squares[self.rank]
        mine[...] = 0.0
        for start in range(lo, hi, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, hi)
            out = self.grad[start - lo : stop - lo]
            np.copyto(out, self.slots[0, start:stop])
            for row in self.slots[1:]:
                out += row[start:stop]
            for layer, (w, b) in enumerate(self.layer_ranges):
                first, last = max(w, start), min(b, stop)
                if last > first:
                    part = out[first - start : last - start]
                    mine[layer] += np.dot(part, part)


class _Shard:
    """This rank's span of the flat parameter vector for the sharded optimizer.

    span: [lo, hi) of the parameters this rank updates (contiguous, sizes differ by at
    most one); counts: every rank's span length; grad: my span of the reduced gradient;
    layer_parts: per layer, the [a, b) part of ``grad`` holding that layer's weights and biases;
    tail: loss sum, rows, correct, stop votes, then one squared norm per layer.
    """

    def __init__(self, model: MLP, comm, dtype):
        bounds = [data_mod.shard_bounds(model.n_params, comm.size, r) for r in range(comm.size)]
        self.counts = [hi - lo for lo, hi in bounds]
        self.span = bounds[comm.rank]
        lo, hi = self.span
        self.grad = np.empty(hi - lo, dtype)
        self.layer_parts = [(max(w.start, lo) - lo, max(min(b.stop, hi), lo) - lo) for w, b in model.layer_slices()]
        self.tail = np.zeros(4 + model.n_layers, dtype)


class Trainer:
    """Data-parallel training of ``cfg`` over ``comm``; rank 0 alone does the side effects.

    ``stop_requested()`` (default: never) is polled every step; when it is true on
    any rank, all ranks finish the step, checkpoint and raise Preempted.
    """

    @in_phase("setting up")
    def __init__(self, cfg: Config, comm, run_dir: str | Path | None = None, *,
                 echo: Callable[[str], None] | None = None, data: PreparedData | None = None,
                 stop_requested: Callable[[], bool] | None = None):
        self.cfg, self.comm = cfg, comm
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.echo = echo if echo is not None else print
        self.stop_requested = stop_requested or (lambda: False)
        self.stop_reason: Callable[[], str] = lambda: "a stop signal"
        self.data = data if data is not None else all_or_nothing(comm, lambda: prepare_data(cfg), "loading data")
        self._digests = check_data_agrees(comm, self.data)  # DP: before anything depends on the row counts
        self.model = all_or_nothing(comm, lambda: build_model(cfg, model_sizes(
            cfg, self.data.train.n_features, self.data.targets.outputs, self.data.train.source)), "building the model")
        check_in_sync(comm, self.model.params, "at start-up")  # DP: same seed must mean same weights
        self.optimizer = build_optimizer(cfg, self.model)
        n = self.data.train.n_samples
        self.batch_size = min(cfg.train.batch_size, n)
        self.steps_per_epoch = data_mod.num_batches(n, self.batch_size)
        self.schedule = build_schedule(cfg, self.steps_per_epoch)
        self.state = TrainState()
        self.history: list[dict] = []
        self.rundir: rundir_mod.RunDirectory | None = None  # rank 0, once the run directory is claimed
        self.resumed_from: rundir_mod.Resume | None = None
        self._parent: dict | None = None  # lineage entry of the checkpoint the next save descends from
        self._last_saved: tuple[int, Path] | None = None  # (global step, file) of the newest save
        self._model_lineage: dict = {}  # rank 0: the lineage entry model.npz is made from
        self._claimed = False
        self._best: tuple[np.ndarray, dict] | None = None  # without a run directory: the best parameters, kept here
        # Called on every rank with each epoch's record (after metrics.jsonl); side effects belong to rank 0.
        self.on_epoch_end: Callable[[dict], None] | None = None
        self.stop_votes = 0.0
        self.diag_every = max(1, self.steps_per_epoch // 10)  # gradient norms ~10 times an epoch
        self.node = None
        window_bytes = _NodeShared.window_elements(self.model, self.optimizer, comm.size) * self.model.dtype.itemsize
        use_node = all_or_nothing(comm, lambda: _use_node_shared(cfg, comm, window_bytes),
                                  "choosing the gradient exchange")
        if comm.size > 1 and not comm.any(not use_node):  # DP: shared only if every rank agrees
            self.node = _NodeShared(self.model, self.optimizer, comm)
        # DP: one contiguous buffer = gradient sum | loss sum | row count | correct count | stop votes;
        # node-shared: my slot of the window, so my gradient sum goes straight where the others read it.
        self.reduce_buf = (self.node.slots[comm.rank] if self.node is not None
                           else np.zeros(self.model.n_params + 4, self.model.dtype))
        self.grad = self.reduce_buf[: self.model.n_params]
        self.shard = (_Shard(self.model, comm, self.model.dtype)
                      if self.node is None and _use_sharding(cfg, comm) else None)
        self.buckets = (self._plan_buckets()
                        if cfg.train.overlap_allreduce and comm.size > 1 and self.shard is None and self.node is None
                        else {})
        shard_rows = -(-self.batch_size // comm.size)
        x, y = self.data.train.x, self.data.train.y
        self.x_shard = np.empty((shard_rows,) + x.shape[1:], x.dtype)
        self.y_shard = np.empty((shard_rows,) + y.shape[1:], y.dtype)
        self.threads = configure_blas_threads(cfg.train.threads, comm.local_size)

    @property
    def exchange(self) -> str:
        """How this run combines the ranks' gradients, in words (for the start-up header)."""
        if self.comm.size == 1:
            return "single process"
        if self.node is not None:
            return "node-shared memory (each rank sums and updates its span)"
        if self.shard is not None:
            return "Reduce_scatter + sharded update + Allgather"
        return "bucketed Iallreduce during backprop" if self.buckets else "one Allreduce per step"

    # -------------------------------------------------------------- one step

    def step(self, order: np.ndarray, step_in_epoch: int) -> tuple[float, float, float]:
        """One global step; returns the global (loss sum, correct, count) of the batch."""
        comm, model, n_params = self.comm, self.model, self.model.n_params
        lo, hi = data_mod.batch_bounds(order.shape[0], self.batch_size, step_in_epoch)
        r0, r1 = data_mod.shard_bounds(hi - lo, comm.size, comm.rank)  # DP: my contiguous shard
        idx = order[lo + r0 : lo + r1]
        xs = data_mod.gather_rows(self.data.train.x, idx, self.x_shard)
        ys = data_mod.gather_rows(self.data.train.y, idx, self.y_shard)
        if self.shard is not None:
            return self._step_sharded(xs, ys)
        if self.node is not None:
            return self._step_node_shared(xs, ys)
        tail = self.reduce_buf[n_params:]
        fill_tail = functools.partial(self._fill_tail, tail)
        if self.buckets:
            requests = []

            def start_bucket(layer: int) -> None:
                if layer in self.buckets:  # DP: this bucket's layers are final: start reducing it
                    requests.append(comm.iallreduce_(self.buckets[layer]))
                for req in requests:
                    req.Test()  # let MPI progress between layers

            model.loss_and_grad_sum(xs, ys, self.grad, check=False, on_forward_done=fill_tail,
                                    on_layer_ready=start_bucket)
            comm.waitall(requests)
        else:
            fill_tail(model.loss_and_grad_sum(xs, ys, self.grad, check=False))
            comm.allreduce_(self.reduce_buf)  # DP: the one collective of the step
        loss_sum, count, correct = (float(v) for v in tail[:3])
        self.stop_votes = float(tail[3])
        # DP: the gradient is a SUM over the global batch; the optimizer divides once by the
        # GLOBAL row count, fused into its cache-sized passes. Every rank holds the same sums
        # here, so every decision below is the same on every rank.
        inv_count = 1.0 / count
        if self.state.global_step % self.diag_every == 0 and math.isfinite(loss_sum):
            squares = [float(np.vdot(g, g)) for g in (self.grad[w.start : b.stop] for w, b in model.layer_slices())]
            if all(math.isfinite(q) for q in squares):  # Inf also from a huge finite gradient: no sample then
                self._add_grad_norms(squares, inv_count)
        skip = self.cfg.train.on_nonfinite == "skip"
        if not math.isfinite(loss_sum) or (skip and not all_finite(self.grad)):
            self._nonfinite(loss_sum)  # raises, or returns to skip this update
            return loss_sum, correct, count
        lr = self.schedule(self.state.global_step)
        try:
            self.optimizer.step(model.params, self.grad, lr, grad_scale=inv_count, check_finite=not skip)
        except NonFiniteGradient:
            # on_nonfinite = "stop": raises TrainingError naming the layer (some chunks are applied already)
            self._nonfinite(loss_sum, check_params=False)
        self._updated_at = self.state.global_step + 1
        return loss_sum, correct, count

    def _fill_tail(self, tail: np.ndarray, stats) -> np.ndarray:
        """Write this rank's loss sum, row count, correct count and stop vote into ``tail[:4]``; return it."""
        tail[0], tail[1], tail[2] = stats.loss_sum, stats.n, stats.n_correct
        tail[3] = 1.0 if self.stop_requested() else 0.0  # DP: the stop vote rides in the same reduction
        return tail

    def _step_sharded(self, xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float]:
        """The step with a sharded optimizer: reduce-scatter, update my span, all-gather parameters.

        Each rank receives the summed gradient of its own span of the parameter vector,
        updates only that span (so the optimizer's element-wise work is divided by the
        rank count instead of repeated on every rank), then all ranks exchange their
        spans. Same update, same parameters on every rank; the gradient sums may round
        differently from an Allreduce.
        """
        comm, model, sh = self.comm, self.model, self.shard
        stats = model.loss_and_grad_sum(xs, ys, self.grad, check=False)
        comm.reduce_scatter_(self.grad, sh.grad, sh.counts)  # DP: my span of the global gradient sum
        # DP: one small Allreduce: loss sum, rows, correct, stop votes, per-layer squared norms
        # (their sum is NaN/Inf when any gradient entry is, which every rank must learn; or when
        # finite entries are huge: then the ranks' exact answers, ``mine``, decide).
        tail = self._fill_tail(sh.tail, stats)
        for layer, (a, b) in enumerate(sh.layer_parts):
            part = sh.grad[a:b]
            tail[4 + layer] = np.vdot(part, part) if b > a else 0.0
        mine = self._span_bad_layer(sh.grad, sh.layer_parts, tail[4:])
        comm.allreduce_(tail)
        loss_sum, count, correct = (float(v) for v in tail[:3])
        self.stop_votes = float(tail[3])
        squares = [float(v) for v in tail[4:]]
        inv_count = 1.0 / count
        bad_layer = self._agreed_bad_layer(squares, mine)
        if not math.isfinite(loss_sum) or bad_layer is not None:
            self._nonfinite(loss_sum, bad_layer)  # raises, or returns to skip this update everywhere
            return loss_sum, correct, count
        if self.state.global_step % self.diag_every == 0 and all(math.isfinite(q) for q in squares):
            self._add_grad_norms(squares, inv_count)
        lr = self.schedule(self.state.global_step)
        self.optimizer.step(model.params, sh.grad, lr, grad_scale=inv_count, span=sh.span)
        comm.allgather_(model.params, sh.counts)  # DP: every rank gets every span
        self._updated_at = self.state.global_step + 1
        return loss_sum, correct, count

    def _step_node_shared(self, xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float]:
        """The step on one node: gradient sums meet in shared memory, each rank updates its span.

        Node barriers: (1) every slot is written; every rank then sums its span and
        posts that span's squared norms; (2) every span of the shared parameters is
        updated, so the next forward may read them, and every rank takes the same
        NaN/Inf and diagnostics decisions from the same posted numbers. With
        ``on_nonfinite = "skip"`` one more barrier comes before the update, so that a
        bad gradient changes no span; with ``stop`` the run ends anyway, so the check
        after the update is enough (the last checkpoint stays intact).
        """
        comm, model, node, n_params = self.comm, self.model, self.node, self.model.n_params
        stats = model.loss_and_grad_sum(xs, ys, self.grad, check=False)
        self._fill_tail(self.reduce_buf[n_params:], stats)
        comm.node_barrier()  # DP: (1) every rank's sums are in its slot
        loss_sum, count, correct, votes = (float(v) for v in node.slots[:, n_params:].sum(axis=0))
        self.stop_votes = votes
        if not math.isfinite(loss_sum):
            comm.node_barrier()  # DP: nobody reuses the slots before all have read them
            self._nonfinite(loss_sum)  # raises, or returns to skip this update everywhere
            return loss_sum, correct, count
        node.sum_span()
        lo, hi = node.span
        mine = self._span_bad_layer(node.grad, [(max(w, lo) - lo, max(min(b, hi), lo) - lo)
                                                for w, b in node.layer_ranges], node.squares[node.rank])
        squares, bad_layer = None, None
        if self.cfg.train.on_nonfinite == "skip":
            comm.node_barrier()  # DP: every span's norms are posted before any span changes
            squares = [float(v) for v in node.squares.sum(axis=0)]
            bad_layer = self._agreed_bad_layer(squares, mine)
        updated = bad_layer is None
        if updated:
            lr = self.schedule(self.state.global_step)
            with np.errstate(invalid="ignore", over="ignore"):  # stop mode: NaN/Inf are reported below
                self.optimizer.step(model.params, node.grad, lr, grad_scale=1.0 / count, span=node.span)
            self._updated_at = self.state.global_step + 1
        comm.node_barrier()  # DP: (2) the shared parameters are complete; every span's norms are posted
        if squares is None:
            squares = [float(v) for v in node.squares.sum(axis=0)]
            bad_layer = self._agreed_bad_layer(squares, mine)
        if bad_layer is not None:  # raises, or (skip) this update was left out everywhere
            self._nonfinite(loss_sum, bad_layer, check_params=not updated)
        elif self.state.global_step % self.diag_every == 0 and all(math.isfinite(q) for q in squares):
            self._add_grad_norms(squares, 1.0 / count)
        return loss_sum, correct, count

    def _plan_buckets(self) -> dict[int, np.ndarray]:
        """Split reduce_buf into contiguous buckets of whole layers, last layer (+ the tail) first.

        Returns {lowest layer in the bucket: view of its slice}; backprop finishes
        layers from last to first, so a bucket is complete when its lowest layer is.
        """
        limit = int(self.cfg.train.bucket_mb * 2**20) // self.model.dtype.itemsize
        slices = self.model.layer_slices()
        buckets, stop = {}, self.reduce_buf.shape[0]
        for layer in range(self.model.n_layers - 1, -1, -1):
            start = slices[layer][0].start
            if stop - start >= limit or layer == 0:
                buckets[layer] = self.reduce_buf[start:stop]
                stop = start
        return buckets

    def _add_grad_norms(self, squares: list[float], scale: float) -> None:
        """Add this step's per-layer gradient norms (sqrt of the squared sums, times ``scale``) to the epoch's sums.

        The vanishing-gradient signal: in a deep sigmoid/tanh net the early layers'
        norms fall by orders of magnitude. Computed from the reduced gradient, so
        identical on every rank.
        """
        norms = [scale * math.sqrt(q) for q in squares]
        st = self.state
        st.grad_norm_sums = [a + b for a, b in zip(st.grad_norm_sums, norms)] if st.grad_norm_sums else norms
        st.grad_norm_count += 1

    @staticmethod
    def _span_bad_layer(grad: np.ndarray, parts, squares) -> int | None:
        """The first layer whose part ``grad[a:b]`` (``parts``: one (a, b) per layer) holds NaN/Inf.

        Looks only at layers whose squared norm in ``squares`` is not finite (NaN/Inf entries
        make it so, but so do finite ones beyond ~1.8e19 in float32), so normally costs nothing.
        """
        return next((layer for layer, ((a, b), q) in enumerate(zip(parts, squares))
                     if not math.isfinite(q) and not bool(np.isfinite(grad[a:b]).all())), None)

    def _agreed_bad_layer(self, squares: list[float], mine: int | None) -> int | None:
        """The first layer whose summed gradient holds NaN/Inf, the same on every rank.

        ``squares``: reduced per-layer squared norms (equal on all ranks); ``mine``: this
        rank's ``_span_bad_layer`` over its span. Only when a square is not finite are the
        ranks' exact answers gathered (collective then, on every rank alike): a finite but
        huge gradient is trained on (the optimizer has a float64 path for it), not skipped.
        """
        if all(math.isfinite(q) for q in squares):
            return None
        found = [i for i in self.comm.allgather_obj(mine) if i is not None]  # DP: rare: NaN/Inf or a huge norm
        return min(found) if found else None

    _updated_at = 0  # the (1-based) step whose update was applied last; 0: none in this process

    def _nonfinite(self, loss_sum: float, layer: int | None = None, *, check_params: bool = True) -> bool:
        """Handle a NaN/Inf batch (identical on all ranks after the reduce): skip or raise TrainingError.

        Collective. First the parameters (``check_params``: unless this step's update
        already ran): NaN/Inf there end the run in either mode, as skipping could never
        recover. Then ``stop`` raises; ``skip`` counts the step in ``state.skipped_steps``
        and raises once that exceeds ``train.max_skipped_steps``. Returns True (skip).
        """
        st, t = self.state, self.cfg.train
        step = st.global_step + 1
        if check_params:  # a NaN/Inf parameter makes the loss non-finite: the usual way to find one
            self._require_finite_params(f"found at step {step}")
        if not math.isfinite(loss_sum):
            what = f"loss is {loss_sum}"
        elif layer is not None:
            what = f"gradient of layer {layer + 1} is not finite"
        else:
            gW, gb = self.model.layer_views(self.grad)
            layer = next((i for i in range(self.model.n_layers)
                          if not (np.all(np.isfinite(gW[i])) and np.all(np.isfinite(gb[i])))), None)
            what = "gradient is not finite" if layer is None else f"gradient of layer {layer + 1} is not finite"
        if t.on_nonfinite == "skip":
            st.skipped_steps += 1
            if st.skipped_steps > t.max_skipped_steps:
                raise TrainingError(
                    f"step {step} (epoch {st.epoch + 1}): {what}; {st.skipped_steps} of {step} steps skipped, "
                    f"more than train.max_skipped_steps = {t.max_skipped_steps}; lower train.lr or check the data"
                )
            if self.comm.is_root:
                self.echo(f"warning: step {step}: {what}; skipping this update on all ranks "
                          f"({st.skipped_steps} skipped, at most {t.max_skipped_steps})")
            return True
        raise TrainingError(
            f"step {step} (epoch {st.epoch + 1}): {what}; lower train.lr, check the data, "
            "or set train.on_nonfinite=\"skip\""
        )

    def _require_finite_params(self, when: str) -> None:
        """Raise TrainingError on every rank if any parameter is NaN or Inf (collective).

        ``when`` says where the check ran ("before writing a checkpoint"). One pass over
        the parameters, so it runs before every save and on the NaN/Inf path, not every
        step: no checkpoint or model.npz ever holds NaN/Inf, and the previous one stays.
        The step named is the last applied update; a saturating activation (tanh,
        sigmoid) can hide an Inf weight from the loss for a while, so it may be later
        than the update that produced it, never earlier.
        """
        params = self.model.params
        bad = next((i for i, (w, b) in enumerate(self.model.layer_slices())
                    if not all_finite(params[w.start : b.stop])), None)
        found = [i for i in self.comm.allgather_obj(bad) if i is not None]  # DP: agreed, even by a rank out of sync
        if found:
            after = f"the update of step {self._updated_at} left" if self._updated_at else "an earlier update left"
            raise TrainingError(
                f"{after} the parameters of layer {min(found) + 1} non-finite ({when}); lower train.lr or check "
                "the data; nothing with these parameters is saved (the previous checkpoint stays)"
            )

    # -------------------------------------------------------------- epochs

    @in_phase("training")
    def run(self, on_step_end: Callable[[Trainer], bool] | None = None) -> TrainResult:
        """Train until the epoch budget ends or early stopping fires (resuming from ``state``).

        ``on_step_end(trainer)`` runs on every rank after every step; returning True
        stops the run without saving (it must return the same on every rank).
        Raises Preempted after checkpointing when a stop was requested. A run directory that was not
        claimed yet is claimed first (``claim_run_dir``); its lock is released when this returns.
        """
        if self.run_dir is not None and not self._claimed:
            self.claim_run_dir()
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # NaN/Inf: reported by the checks
                return self._run(on_step_end)
        finally:
            self.release_run_dir()

    def _run(self, on_step_end: Callable[[Trainer], bool] | None) -> TrainResult:
        cfg, st = self.cfg, self.state
        t, ck = cfg.train, cfg.checkpoint
        n = self.data.train.n_samples
        progress = Progress(self.echo, enabled=self.comm.is_root, total_steps=t.epochs * self.steps_per_epoch,
                            steps_per_epoch=self.steps_per_epoch, epochs=t.epochs, log_every=t.log_every,
                            start_step=st.global_step)
        run_start = time.perf_counter()
        self.comm.configure_watchdog(t.heartbeat_timeout, t.collective_timeout)  # DP: a lost host ends the job
        while st.epoch < t.epochs and not st.stopped:
            order = data_mod.epoch_permutation(n, t.seed, st.epoch, t.shuffle)  # DP: same on every rank
            epoch_start = time.perf_counter()
            epoch_samples = 0
            while st.step_in_epoch < self.steps_per_epoch:
                loss_sum, correct, count = self.step(order, st.step_in_epoch)
                if math.isfinite(loss_sum):  # a skipped NaN/Inf batch (on_nonfinite=skip) is left out
                    st.epoch_loss_sum += loss_sum
                    st.epoch_correct += correct
                    st.epoch_count += count
                st.global_step += 1
                st.step_in_epoch += 1
                epoch_samples += int(count)
                # DP: node-shared ranks read one copy of the weights: nothing can drift apart
                if t.check_sync_every and self.node is None and st.global_step % t.check_sync_every == 0:
                    check_in_sync(self.comm, self.model.params, f"at step {st.global_step}")
                progress.step(st.epoch, st.step_in_epoch, st.global_step, loss_sum / max(count, 1.0),
                              epoch_samples, time.perf_counter() - epoch_start)
                if st.step_in_epoch < self.steps_per_epoch:  # the epoch's last step saves below
                    if self.stop_votes > 0:
                        self._preempt(progress)
                    if ck.every_steps and st.global_step % ck.every_steps == 0:
                        self.save_checkpoint()
                if on_step_end is not None and on_step_end(self):
                    return self._finish("interrupted", run_start)
            seconds = time.perf_counter() - epoch_start
            record = self._end_of_epoch(seconds, epoch_samples)
            progress.epoch_summary(record)
            improved = self._update_early_stopping(record)
            if improved and ck.keep_best and record["val_loss"] is not None:
                self.save_checkpoint(best=True)
            if (self.stop_votes > 0 or (ck.every_steps and st.global_step % ck.every_steps == 0)
                    or (ck.every_epochs and st.epoch % ck.every_epochs == 0)):
                self.save_checkpoint()
            if self.stop_votes > 0:
                self._preempt(progress)
        self.save_checkpoint()  # a finished run resumes as a no-op (requeue-safe)
        if ck.restore_best:
            self._restore_best()
        return self._finish(st.stopped or "epochs", run_start)

    def _preempt(self, progress: Progress) -> None:
        path = self.save_checkpoint()
        progress.clear()
        where = f"; checkpoint {path}" if path else " (no run directory: nothing saved)"
        raise Preempted(f"stopped by {self.stop_reason()} at step {self.state.global_step}{where}; "
                        f"continue with: dpbp train --resume auto (same options)")

    def _end_of_epoch(self, seconds: float, samples: int) -> dict:
        st, task = self.state, self.model.task
        train_loss = st.epoch_loss_sum / max(st.epoch_count, 1.0)
        record = {"epoch": st.epoch + 1, "step": st.global_step, "train_loss": train_loss}
        if task == "regression":
            record.update({f"train_{k}": v for k, v in train_metrics(task, train_loss, self.data.targets).items()})
            record.update({"val_loss": None, **{f"val_{k}": None for k in REGRESSION_KEYS}})
        else:
            record.update(train_accuracy=st.epoch_correct / max(st.epoch_count, 1.0), val_loss=None, val_accuracy=None)
        record.update({
            "lr": self.schedule(max(st.global_step - 1, 0)),
            "samples_per_s": samples / seconds if seconds > 0 else None,
            "seconds": seconds,
            "grad_norm": [g / st.grad_norm_count for g in st.grad_norm_sums] if st.grad_norm_count else None,
            "weight_norm": [float(np.sqrt(np.vdot(W, W))) for W in self.model.weights],
        })
        if self.data.val is not None:
            val = evaluate(self.model, self.data.val, self.comm, self.data.targets)
            for key in ("loss", *(REGRESSION_KEYS if task == "regression" else ("accuracy",))):
                record[f"val_{key}"] = val[key]
        self.history.append(record)
        if self.run_dir is not None:  # DP: a full disk on rank 0 ends every rank with one message
            all_or_nothing(self.comm, lambda: append_metrics(self.run_dir, record) if self.comm.is_root else None,
                           "appending to metrics.jsonl")
        if self.on_epoch_end is not None:  # e.g. TensorBoard events; a failure on rank 0 ends every rank
            all_or_nothing(self.comm, lambda: self.on_epoch_end(record), "writing the epoch's record")
        st.epoch += 1
        st.step_in_epoch = 0
        st.epoch_loss_sum = st.epoch_correct = st.epoch_count = 0.0
        st.grad_norm_sums, st.grad_norm_count = [], 0
        return record

    def _update_early_stopping(self, record: dict) -> bool:
        """Track the best validation loss (train loss without a validation set); True if it improved.

        Uses reduced, identical-on-every-rank numbers, so every rank decides the same.
        """
        st, t = self.state, self.cfg.train
        metric = record["val_loss"] if record["val_loss"] is not None else record["train_loss"]
        improved = metric < st.best_val_loss - t.min_delta
        if improved:
            st.best_val_loss, st.epochs_since_best = metric, 0
        else:
            st.epochs_since_best += 1
        if t.early_stopping_patience and st.epochs_since_best >= t.early_stopping_patience:
            st.stopped = "early_stopping"
        return improved

    def _finish(self, stopped: str, run_start: float) -> TrainResult:
        final: dict = {"epochs": self.state.epoch, "steps": self.state.global_step,
                       "seconds": time.perf_counter() - run_start}
        reports = {}
        for role, ds in (("val", self.data.val), ("test", self.data.test)):
            if ds is not None:
                reports[role] = evaluate(self.model, ds, self.comm, self.data.targets)
                keys = REGRESSION_KEYS if self.model.task == "regression" else ("accuracy",)
                final.update({f"{role}_{key}": reports[role][key] for key in ("loss", *keys)})
        if self.run_dir is not None and stopped != "interrupted":
            self._require_finite_params("before writing model.npz")
            # DP: the lineage entry of the state this model was made from (a branch moves it aside)
            extra = {"final": final, "run": self._model_lineage}
            record = {"final": final, "run": self._model_lineage, "targets": self.data.targets.to_meta(), **reports}

            def write() -> None:
                if self.comm.is_root:
                    save_model(self.run_dir / rundir_mod.MODEL_FILE, self.model, self.data.normalizer,
                               self.data.targets, extra=extra)
                    rundir_mod.write_json(self.run_dir / rundir_mod.FINAL_METRICS_FILE, record)

            all_or_nothing(self.comm, write, "saving the model")
        return TrainResult(self.model, self.history, final, stopped, self.state, reports)

    def _restore_best(self) -> None:
        """``checkpoint.restore_best``: put the best-validation parameters back before the final model is saved.

        Rank 0 reads ``best.npz`` of this run's lineage and every rank receives its parameters
        (collective); without a run directory, the copy kept in memory at the best epoch. Without a
        best checkpoint (no validation data, no improvement) the last parameters stay and rank 0 says so.
        """
        if self.checkpoint_dir is None:
            if self._best is None:
                self.echo("warning: checkpoint.restore_best: no best model in this run; the final model is the last "
                          "one")
                return
            params, info = self._best
            self._set_params(params)  # the same copy on every rank
            self.echo(f"restored the best model: epoch {info['epoch']}, val loss {info['val_loss']:.4f} "
                      "(checkpoint.restore_best)")
            return

        def read():
            if not self.comm.is_root:
                return None
            best = [e for e in self.rundir.entries if e.best]
            if not best:
                return None
            arrays, meta = ckpt.load_checkpoint(best[0].path)
            st = meta["state"]  # saved at the end of the best epoch: ``epoch`` counts it as done
            return arrays["params"], {**meta["run"], "epoch": st["epoch"], "val_loss": st["best_val_loss"],
                                      "step": st["global_step"]}

        found = all_or_nothing(self.comm, read, "reading the best checkpoint")
        info = self.comm.bcast_obj(found[1] if found is not None else None)
        if info is None:
            self.echo("warning: checkpoint.restore_best: no best checkpoint in this run; the final model is "
                      "the last one")
            return
        params = found[0] if self.comm.is_root else np.empty_like(self.model.params)
        self.comm.bcast_(params)  # DP: every rank continues with rank 0's best parameters
        self._set_params(params)
        self._model_lineage = {**self._model_lineage, "restored_best": info["seq"], "step": info["step"],
                               "final_step": self.state.global_step}
        self.echo(f"restored the best model: epoch {info['epoch']}, val loss {info['val_loss']:.4f} "
                  "(checkpoint.restore_best)")

    def _set_params(self, params: np.ndarray) -> None:
        """Every rank: the parameters become ``params`` (node-shared: one rank per node writes them)."""
        if self.node is None or self.comm.local_rank == 0:
            self.model.params[...] = params
        self.comm.node_barrier()

    # -------------------------------------------------------------- checkpoints

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / ckpt.CHECKPOINT_DIR if self.run_dir is not None else None

    def checkpoint_payload(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, metadata) describing the run at this step boundary: global state only.

        The parameters live in the normalised input space, so the normaliser goes with them
        (``norm_shift``/``norm_scale`` in float64, meta ``normalize``), and so does what the
        outputs mean (meta ``targets``, arrays ``target_shift``/``target_scale`` for scaled
        regression targets): any checkpoint can then be evaluated or used as a model.
        """
        arrays = {"params": self.model.params}
        for name, value in self.optimizer.state_dict().items():
            arrays[f"optim_{name}"] = value
        norm = self.data.normalizer
        arrays.update(norm.to_arrays())  # float64, as training applied it
        arrays.update(self.data.targets.to_arrays())
        meta = {
            "config": config_mod.to_dict(self.cfg),
            "model": self.model.describe(),
            "optimizer": {"name": self.optimizer.name, "t": self.optimizer.t},
            "schedule": {"kind": self.cfg.train.schedule, "lr_next": self.schedule(self.state.global_step)},
            "state": self.state.to_json(),
            "rng": {"shuffle": "numpy default_rng([train.seed, epoch])", "seed": self.cfg.train.seed},
            "history": self.history,
            "world_size": self.comm.size,  # informational: resuming on another rank count is fine
            "data_digest": self.data_digest,
            "validation_digest": (self._digests["validation"] or {}).get("sha256"),
            "normalize": norm.kind,
            "targets": self.data.targets.to_meta(),
        }
        return arrays, meta

    @property
    def data_digest(self) -> str:
        """sha256 of the (normalised) training arrays: a resume must see the same data."""
        return self._digests["train"]["sha256"]

    def save_checkpoint(self, best: bool = False) -> Path | None:
        """Rank 0 writes a checkpoint (collective: call on every rank). Returns its path, which exists.

        It records its lineage (run id, save number ``seq``, parent); periodic checkpoints beyond
        ``checkpoint.keep`` are pruned by ``seq`` within the lineage. A periodic save at the step of
        the newest save (for example right after resuming) writes nothing and returns that file.
        Parameters that are not finite are never written (TrainingError, exit 3).
        """
        self._require_finite_params("before writing a checkpoint")
        folder = self.checkpoint_dir
        if folder is None:
            if best:  # checkpoint.restore_best without a run directory: the best parameters stay in memory
                self._best = (self.model.params.copy(), {"epoch": self.state.epoch, "step": self.state.global_step,
                                                         "val_loss": self.state.best_val_loss})
            return None
        st = self.state
        if best:
            path = folder / ckpt.BEST_NAME
        else:
            path = folder / ckpt.checkpoint_name(st.global_step)
            if self._last_saved is not None and self._last_saved[0] == st.global_step:
                return self._last_saved[1]
        if self.shard is not None:  # DP: each rank's optimizer state is current on its span only
            for state in self.optimizer.state.values():
                self.comm.allgather_(state, self.shard.counts)
        arrays, meta = self.checkpoint_payload() if self.comm.is_root else (None, None)

        def write():
            if self.comm.is_root:
                seq = self.rundir.reserve_seq()
                meta["run"] = {"run_id": self.rundir.run_id, "seq": seq, "parent": self._parent}
                ckpt.save_checkpoint(path, arrays, meta)
                self.rundir.added(seq, path, st.global_step, best)
                if not best:
                    self.rundir.prune(self.cfg.checkpoint.keep)
                return {"run_id": self.rundir.run_id, "seq": seq}
            return None

        entry = all_or_nothing(self.comm, write, f"writing checkpoint {path}")  # DP: a full disk ends every rank
        if self.comm.is_root:
            self._parent = entry
            self._model_lineage = {**entry, "step": st.global_step}
        if not best:
            self._last_saved = (st.global_step, path)
        return path

    def restore(self, path: str | Path) -> None:
        """Continue from checkpoint ``path`` (collective). Refuses one of another model or data.

        Reads only: the run directory is written when it is claimed (``claim_run_dir``), which
        also decides whether this starts a branch of the run's lineage.
        """
        path = Path(path)

        def load():
            # The model, optimizer and data are checked from the metadata, before any array is read.
            arrays, meta = ckpt.load_checkpoint(path, check=lambda meta: self._check_compatible(path, meta))
            try:
                state = TrainState.from_json(meta["state"])
                history = [dict(r) for r in meta["history"]]
                if not (0 <= state.epoch and 0 <= state.step_in_epoch < self.steps_per_epoch
                        and 0 <= state.global_step):
                    raise ValueError(f"position epoch {state.epoch}, step {state.step_in_epoch} is out of range")
                run = meta.get("run")
                if run is not None and not (isinstance(run.get("run_id"), str) and isinstance(run.get("seq"), int)):
                    raise ValueError("malformed lineage entry")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # Only a hand-made file gets here: the checksum matched, the content does not make sense.
                raise CheckpointError(f"{path}: malformed checkpoint metadata ({type(exc).__name__}: {exc})") from None
            return arrays, state, history, run

        arrays, state, history, run = all_or_nothing(self.comm, load, f"reading checkpoint {path}")
        self.load_state(arrays)
        self.state = state
        self.history = history
        self.resumed_from = rundir_mod.Resume(path, {**run, "step": state.global_step} if run else None)
        self._parent = {"run_id": run["run_id"], "seq": run["seq"]} if run else None
        self._model_lineage = {**(self._parent or {}), "step": state.global_step}
        self._last_saved = None
        check_in_sync(self.comm, self.model.params, "after loading the checkpoint")

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Copies of the parameters (``params``) and the optimizer state (``optim_<name>``, ``optim_t``).

        Collective: identical on every rank (a sharded optimizer's spans are gathered first).
        """
        if self.shard is not None:  # DP: each rank's optimizer state is current on its span only
            for state in self.optimizer.state.values():
                self.comm.allgather_(state, self.shard.counts)
        return {"params": self.model.params.copy(),
                **{f"optim_{name}": value for name, value in self.optimizer.state_dict().items()}}

    def load_state(self, arrays) -> None:
        """Continue from parameters and optimizer state as ``state_arrays`` gives them (collective).

        ``arrays``: any mapping holding ``params`` and the ``optim_*`` arrays of this optimizer,
        checked by ``Optimizer.load_state_dict`` (ValueError on a mismatch).
        """
        if self.node is None or self.comm.local_rank == 0:  # DP: node-shared arrays: one rank writes them
            self.model.params[...] = arrays["params"]
            prefix = "optim_"
            self.optimizer.load_state_dict({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        else:
            self.optimizer.t = int(arrays["optim_t"])
        self.comm.node_barrier()

    # -------------------------------------------------------------- the run directory

    def claim_run_dir(self, *, command: list[str] | None = None, overwrite: bool = False, restart: bool = False,
                      numbered: bool = False) -> list[str]:
        """Take ``run_dir`` for this run (collective; rank 0 touches the disk, every rank agrees).

        Locks it, refuses a directory that holds another run (``overwrite`` deletes that run's
        outputs instead), records the run (``run.json``), starts a branch when resuming from an older
        checkpoint, removes temporary files of interrupted saves and writes the resolved config and
        the metrics log. ``restart``: the run recorded in ``run_dir`` (which wrote no checkpoint)
        starts again. ``numbered``: ``run_dir`` is a root in which a new ``run-NNN`` is made.
        Returns the lines to tell the user. Raises AgreedError (exit 2 for a refusal).
        """
        command = command if command is not None else ["python", *sys.argv]
        resume = self.resumed_from

        def claim():
            if not self.comm.is_root:
                return None
            def config(path: Path) -> str:  # names the directory, which a numbered run learns when it is made
                return config_mod.to_toml(config_mod.replace(self.cfg, **{"run.dir": str(path)}))

            metrics = "".join(json.dumps(_strict_json(r)) + "\n" for r in self.history)
            run = rundir_mod.claim(self.run_dir, command=command, resume=resume, overwrite=overwrite,
                                   restart=restart, numbered=numbered,
                                   files={rundir_mod.CONFIG_FILE: config, rundir_mod.METRICS_FILE: metrics})
            self.rundir = run
            return str(run.path), run.messages

        claimed = all_or_nothing(self.comm, claim, f"claiming the run directory {self.run_dir}", root_only=True)
        path, messages = self.comm.bcast_obj(claimed)
        self.run_dir = Path(path)
        self.cfg = config_mod.replace(self.cfg, **{"run.dir": path})
        self._claimed = True
        if resume is not None:
            inside = self.comm.bcast_obj(
                self.comm.is_root and any(e.path.resolve() == resume.path.resolve() and not e.best
                                          for e in self.rundir.entries))
            if inside:  # DP: decided on rank 0, followed everywhere
                self._last_saved = (self.state.global_step, resume.path)
            else:  # the state resumed from gets a checkpoint of this run: --resume auto finds it
                self.save_checkpoint()
        return messages

    def release_run_dir(self) -> None:
        """Give up the run directory's lock (rank 0); the directory keeps everything written."""
        if self.rundir is not None:
            self.rundir.release()

    def _check_compatible(self, path, meta: dict) -> None:
        """Raise CheckpointError unless checkpoint metadata ``meta`` fits this run's model, optimizer and data.

        Needs the metadata only; the arrays' shapes and dtypes follow from it and are
        checked by ``ckpt.load_checkpoint`` before they are read.
        """
        mine, theirs = self.model.describe(), meta["model"]
        keys = ("sizes", "activation", "output", "loss", "dtype")
        differ = [f"{k}: checkpoint {theirs.get(k)!r}, config {mine[k]!r}" for k in keys if theirs.get(k) != mine[k]]
        if differ:
            raise CheckpointError(f"{path} holds a different model ({'; '.join(differ)})")
        if meta["optimizer"].get("name") != self.optimizer.name:
            raise CheckpointError(f"{path} was trained with optimizer {meta['optimizer'].get('name')!r}; "
                                  f"the config asks for {self.optimizer.name!r}")
        frozen = frozen_changes(meta["config"], self.cfg)
        if frozen:
            raise CheckpointError(f"{path}: cannot resume with changed {', '.join(frozen)} "
                                  "(they define the model or the data order); start a new run directory instead")
        recorded = meta.get("targets")
        if recorded is not None and recorded != self.data.targets.to_meta():
            raise CheckpointError(f"{path}: its labels ({Targets.from_meta(recorded, None).describe()}) differ from "
                                  f"the training data's ({self.data.targets.describe()})")
        if meta.get("data_digest") != self.data_digest:
            older = ("; it was written by an earlier dpbp, which prepared the data differently (float32 models: "
                     "normalised after the cast, not before), so resume it with that dpbp or start a new run"
                     if meta.get("format_version", 0) < 3 else "")
            raise CheckpointError(f"{path}: the training data differs from the data this checkpoint was trained on"
                                  f"{older}")
        mine = (self._digests["validation"] or {}).get("sha256")
        if "validation_digest" in meta and meta["validation_digest"] != mine:  # early stopping and best.npz use it
            raise CheckpointError(f"{path}: the validation data differs from the data this run validated on")


def _flatten(d: dict) -> dict:
    return {f"{section}.{key}": value for section, table in d.items() for key, value in table.items()}


def frozen_changes(saved: dict, cfg: Config) -> list[str]:
    """The keys of ``FROZEN_ON_RESUME`` whose value in ``cfg`` differs from the ``saved`` config (a dict)."""
    before = _flatten(saved)
    return [k for k, v in _flatten(config_mod.to_dict(cfg)).items()
            if k.startswith(FROZEN_ON_RESUME) and before.get(k) != v]


def _strict_json(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def append_metrics(run_dir: Path, record: dict) -> None:
    """Rank 0: append ``record`` as one JSON line to ``run_dir/metrics.jsonl`` (created if missing).

    Writes with O_APPEND; when the disk fills mid-line the file is cut back to its last whole
    line, so it always stays readable JSON lines. NaN/Inf values are written as null (strict
    JSON). Never writes through a symlink (O_NOFOLLOW). Raises SaveError with one line naming
    the file on any OSError (full disk, quota, I/O error, read-only or vanished folder).
    """
    path = Path(run_dir) / rundir_mod.METRICS_FILE
    data = (json.dumps(_strict_json(record), allow_nan=False) + "\n").encode()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
        try:
            start = os.fstat(fd).st_size
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)  # no half line left behind
                raise
        finally:
            os.close(fd)
    except OSError as exc:
        reason = ("it is a symbolic link (dpbp never writes through one)"
                  if exc.errno == errno.ELOOP else exc.strerror or str(exc))
        raise SaveError(f"cannot append to {path}: {reason}") from None
