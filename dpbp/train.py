"""The training loop: the only place where model, optimizer, exchange and data meet.

One step (every rank) is the seed's four parts: (1) zero and (2) forward + backprop this
rank's contiguous shard of the global batch into the gradient SUM, (3) combine the sums
(gradient, loss, row count, correct count, stop vote) across ranks, (4) divide once by
the global row count and apply the same eta update. N ranks then train the same model as
1 rank up to float rounding, uneven shards included. How (3) and (4) travel between ranks
(one Allreduce, node-shared memory, hierarchical across nodes) is ``dpbp.exchange``'s
business; what to do with the sums (the NaN/Inf rule, the stop vote, the diagnostics,
the learning rate) is decided here, once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
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
from dpbp import exchange as exchange_mod
from dpbp import memory, ops, runstate
from dpbp import metrics as metrics_mod
from dpbp import rundir as rundir_mod
from dpbp.checkpoint import save_model
from dpbp.comm import all_or_nothing, check_data_agrees, check_in_sync
from dpbp.config import Config
from dpbp.errors import AgreedError, ConfigError, DataError, DpbpError, SaveError, TrainingError
from dpbp.model import MLP, StepContext
from dpbp.optim import LRSchedule, Optimizer, Plateau, all_finite, make_optimizer
from dpbp.progress import Progress
from dpbp.runstate import FROZEN_ON_RESUME, TrainState, frozen_changes
from dpbp.signals import PREEMPTED_EXIT_CODE
from dpbp.targets import Targets
from dpbp.threads import configure_blas_threads

__all__ = [  # the agreement helpers and run-state names live in comm.py and runstate.py; imported from here too
    "FROZEN_ON_RESUME", "AgreedError", "PreparedData", "Preempted", "TrainResult", "TrainState", "Trainer",
    "TrainingError", "all_or_nothing", "append_metrics", "build_model", "build_optimizer", "build_schedule",
    "check_data_agrees", "check_in_sync", "check_memory", "evaluate", "frozen_changes", "model_sizes",
    "prepare_data",
]


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

    def digests(self) -> dict[str, dict | None]:
        """``{role: dpbp.data.dataset_digest}`` for train, validation and test (see ``comm.check_data_agrees``).

        The statistics fitted on the training data go into its digest: normalising hides an offset of the raw data.
        """
        fitted = [*self.normalizer.to_arrays().values(), *self.targets.to_arrays().values()]
        return {"train": data_mod.dataset_digest(self.train, *fitted),
                "validation": data_mod.dataset_digest(self.val), "test": data_mod.dataset_digest(self.test)}


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
                          label_column=d.label_column, label_name=raw.label_name, header=d.header)
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
        lonely = int(np.count_nonzero(counts == 1))
        if targets.outputs > 10 and lonely > targets.outputs // 2 and not isinstance(targets.classes[0], str):
            notes.append(f"warning: {lonely} of the {targets.outputs} classes have a single training row: if the "
                         "labels are numbers to predict, this is a regression (set model.loss = \"mse\" and "
                         "model.output = \"identity\"), or data.label_column names the wrong column")
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
               init=m.init, dtype=m.dtype, seed=cfg.train.seed, dropout=m.dropout, batch_norm=m.batch_norm,
               precision=m.precision, products=m.products)


def build_optimizer(cfg: Config, model: MLP) -> Optimizer:
    """The configured optimizer for ``model``'s flat parameters (weight decay: L2, or decoupled for adam)."""
    t = cfg.train
    hyper = {
        "sgd": {},
        "momentum": {"momentum": t.momentum, "nesterov": t.nesterov},
        "rmsprop": {"rho": t.rho, "eps": t.eps},
        "adam": {"beta1": t.beta1, "beta2": t.beta2, "eps": t.eps},
    }[t.optimizer]
    return make_optimizer(t.optimizer, model.n_params, model.dtype, weight_decay=t.weight_decay, **hyper)


def build_schedule(cfg: Config, steps_per_epoch: int) -> LRSchedule:
    """The configured learning-rate schedule (``plateau``: its state starts fresh; a resume loads it)."""
    t = cfg.train
    return LRSchedule(
        t.lr, t.schedule, total_steps=t.epochs * steps_per_epoch,
        warmup_steps=round(t.warmup_epochs * steps_per_epoch),
        step_size=t.step_epochs * steps_per_epoch, gamma=t.gamma, min_lr=t.min_lr,
        patience=t.plateau_patience, cooldown=t.plateau_cooldown, threshold=t.min_delta,
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


@dataclass
class TrainResult:
    model: MLP
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    stopped: str = "epochs"
    state: TrainState = field(default_factory=TrainState)
    reports: dict = field(default_factory=dict)  # "val"/"test": the final evaluate() report of each


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
        if cfg.run.tensorboard and run_dir is None:
            raise ConfigError("run.tensorboard", "true needs a run directory to write the events into")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.echo = echo if echo is not None else print
        self.stop_requested = stop_requested or (lambda: False)
        self.stop_reason: Callable[[], str] = lambda: "a stop signal"
        self.data = data if data is not None else all_or_nothing(comm, lambda: prepare_data(cfg), "loading data")
        self.digests = check_data_agrees(comm, self.data.digests())  # DP: before anything depends on the row counts
        if cfg.train.schedule == "plateau" and self.data.val is None:  # the same data, so the same on every rank
            raise ConfigError("train.schedule", "'plateau' is driven by the validation loss, and this run has no "
                              "validation data")
        self.model = all_or_nothing(comm, lambda: build_model(cfg, model_sizes(
            cfg, self.data.train.n_features, self.data.targets.outputs, self.data.train.source)), "building the model")
        check_in_sync(comm, self.model.params, "at start-up")  # DP: same seed must mean same weights
        self.optimizer = build_optimizer(cfg, self.model)
        n = self.data.train.n_samples
        self.batch_size = min(cfg.train.batch_size, n)
        self.steps_per_epoch = data_mod.num_batches(n, self.batch_size)
        if cfg.model.batch_norm and (self.batch_size < 2 or n % self.batch_size == 1):
            raise ConfigError("model.batch_norm", f"needs at least 2 rows in every batch, but {n} training rows in "
                              f"batches of {self.batch_size} leave a batch of 1; change train.batch_size")
        warmup = cfg.train.warmup_epochs
        if warmup > 0 and round(warmup * self.steps_per_epoch) == 0:  # no silent no-op
            raise ConfigError("train.warmup_epochs", f"{warmup:g} epochs of {self.steps_per_epoch} steps round to 0 "
                              f"warm-up steps (no warm-up at all); give 0 or at least "
                              f"{1 / self.steps_per_epoch:.3g} (one step)")
        self.schedule = build_schedule(cfg, self.steps_per_epoch)
        self.state = TrainState()
        self.history: list[dict] = []
        self.rundir: rundir_mod.RunDirectory | None = None  # rank 0, once the run directory is claimed
        self.resumed_from: rundir_mod.Resume | None = None
        self.parent: dict | None = None  # lineage entry of the checkpoint the next save descends from
        self.last_saved: tuple[int, Path] | None = None  # (global step, file) of the newest save
        self.model_lineage: dict = {}  # rank 0: the lineage entry model.npz is made from
        self._claimed = False
        self.best_copy: tuple[dict, dict] | None = None  # without a run directory: the best params (+ running stats)
        # Called on every rank with each epoch's record (after metrics.jsonl); side effects belong to rank 0.
        self.on_epoch_end: Callable[[dict], None] | None = None
        self._events = None  # the TensorBoard log opened for run.tensorboard (dpbp.tensorboard.TensorBoardLog)
        self.stop_votes = 0.0
        self.diag_every = max(1, self.steps_per_epoch // 10)  # gradient norms ~10 times an epoch
        self.exchange = exchange_mod.choose(cfg, comm, self.model, self.optimizer)
        shard_rows = -(-self.batch_size // comm.size)
        x, y = self.data.train.x, self.data.train.y
        self.x_shard = np.empty((shard_rows,) + x.shape[1:], x.dtype)  # DP: my rows of each batch, gathered here
        self.y_shard = np.empty((shard_rows,) + y.shape[1:], y.dtype)
        self.threads = configure_blas_threads(cfg.train.threads, comm.local_size, self.model.products.name)

    # -------------------------------------------------------------- one step

    def step(self, order: np.ndarray, step_in_epoch: int) -> tuple[float, float, float]:
        """One global step over batch ``step_in_epoch`` of the epoch's ``order``; returns (loss sum, correct, count).

        The seed's four parts. Collective: every rank calls it with the same arguments and
        returns the same global sums. Updates the parameters (unless the batch is skipped).
        """
        ex = self.exchange
        lo, hi = data_mod.batch_bounds(order.shape[0], self.batch_size, step_in_epoch)
        r0, r1 = data_mod.shard_bounds(hi - lo, self.comm.size, self.comm.rank)  # DP: my contiguous shard
        xs = data_mod.gather_rows(self.data.train.x, order[lo + r0 : lo + r1], self.x_shard)
        ys = data_mod.gather_rows(self.data.train.y, order[lo + r0 : lo + r1], self.y_shard)
        # DP: dropout masks follow each row's place in the global batch; batch norm sums over every rank
        context = StepContext(self.state.epoch, step_in_epoch, r0, self.comm.sum_in_rank_order_,
                              update_running=False)
        # (1) zero and (2) forward + backprop: this rank's gradient SUM, written over ex.grad
        stats = self.model.loss_and_grad_sum(xs, ys, ex.grad, check=False, context=context)
        # (3) combine across ranks: global sums and counts, the stop vote, per-layer squared norms
        sums = ex.combine(stats, self.stop_requested())  # DP: the stop vote rides in the same reduction
        self.stop_votes = sums.votes
        if self._skip_nonfinite(sums):
            return sums.loss_sum, sums.correct, sums.count
        self.model.update_running_stats()  # batch norm: only a step that is kept moves the running statistics
        if self.state.global_step % self.diag_every == 0:
            self._add_grad_norms(sums.squares, 1.0 / sums.count)  # before clipping, as clip_grad_norm_ returns
        scale = 1.0 / sums.count
        if self.cfg.train.clip_grad_norm > 0:
            scale *= self._clip_factor(sums)
        # (4) the same update everywhere, the gradient divided ONCE by the GLOBAL row count (and clipped)
        ex.update(self.model.params, self.optimizer, self.schedule(self.state.global_step), scale)
        self._updated_at = self.state.global_step + 1
        return sums.loss_sum, sums.correct, sums.count

    def _skip_nonfinite(self, sums: exchange_mod.Sums) -> bool:
        """The NaN/Inf rule, from numbers every rank shares: False to update; True to skip; or TrainingError.

        A non-finite squared norm is NaN/Inf in that layer, or finite entries so large that their
        squares overflow (trained on: the optimizer has a wider path for them); only then are the
        ranks' exact answers gathered (collective then, on every rank alike).
        """
        layer = None
        if not all(math.isfinite(q) for q in sums.squares):
            found = [i for i in self.comm.allgather_obj(self.exchange.bad_layer(sums.squares)) if i is not None]
            layer = min(found) if found else None
        if math.isfinite(sums.loss_sum) and layer is None:
            return False
        self._nonfinite(sums.loss_sum, layer)  # raises, or returns: this update is left out everywhere
        return True

    def _clip_factor(self, sums: exchange_mod.Sums) -> float:
        """``train.clip_grad_norm``: the factor of the batch-mean gradient, ``min(1, max_norm / (norm + 1e-6))``.

        As ``torch.nn.utils.clip_grad_norm_``, with ``norm`` the L2 norm over every layer, taken from
        the reduced per-layer squared norms (no second pass, no second reduction), so identical on
        every rank. Only where those overflowed the model dtype while every entry is finite is the
        norm computed again, in float64 (``Exchange.exact_norm``, collective on every rank alike).
        Counts the clipped steps and the smallest factor of the epoch in ``state``.
        """
        st = self.state
        total = sum(sums.squares)
        norm = (math.sqrt(total) if math.isfinite(total) else self.exchange.exact_norm()) / sums.count
        factor = min(1.0, self.cfg.train.clip_grad_norm / (norm + 1e-6))
        if factor < 1.0:
            st.epoch_clipped_steps += 1
            st.epoch_clip_factor_min = min(st.epoch_clip_factor_min, factor)
        return factor

    def _add_grad_norms(self, squares: list[float], scale: float) -> None:
        """Add this step's per-layer gradient norms (sqrt of the squared sums, times ``scale``) to the epoch's sums.

        The vanishing-gradient signal: in a deep sigmoid/tanh net the early layers'
        norms fall by orders of magnitude. Computed from the reduced gradient, so
        identical on every rank. A step whose squares overflowed is not sampled.
        """
        if not all(math.isfinite(q) for q in squares):
            return
        norms = [scale * math.sqrt(q) for q in squares]
        st = self.state
        st.grad_norm_sums = [a + b for a, b in zip(st.grad_norm_sums, norms)] if st.grad_norm_sums else norms
        st.grad_norm_count += 1

    _updated_at = 0  # the (1-based) step whose update was applied last; 0: none in this process

    def _nonfinite(self, loss_sum: float, layer: int | None) -> None:
        """Handle a NaN/Inf batch (identical on all ranks after the combine): skip, or raise TrainingError.

        Collective. First the parameters: NaN/Inf there end the run in either mode, as
        skipping could never recover. Then ``stop`` raises; ``skip`` counts the step in
        ``state.skipped_steps`` and raises once that exceeds ``train.max_skipped_steps``.
        """
        st, t = self.state, self.cfg.train
        step = st.global_step + 1
        self.require_finite_params(f"found at step {step}")  # a NaN/Inf parameter makes the loss non-finite
        what = f"loss is {loss_sum}" if not math.isfinite(loss_sum) else f"gradient of layer {layer + 1} is not finite"
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
            return
        raise TrainingError(
            f"step {step} (epoch {st.epoch + 1}): {what}; lower train.lr, check the data, "
            "or set train.on_nonfinite=\"skip\""
        )

    def require_finite_params(self, when: str) -> None:
        """Raise TrainingError on every rank if any parameter is NaN or Inf (collective).

        ``when`` says where the check ran ("before writing a checkpoint"). One pass over
        the parameters, so it runs before every save and on the NaN/Inf path, not every
        step: no checkpoint or model.npz ever holds NaN/Inf, and the previous one stays.
        The step named is the last applied update; a saturating activation (tanh,
        sigmoid) can hide an Inf weight from the loss for a while, so it may be later
        than the update that produced it, never earlier.
        """
        params = self.model.params
        bad = next((i for i, (start, stop) in enumerate(self.model.layer_blocks())
                    if not all_finite(params[start:stop])), None)
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
                # DP: ranks that read one copy of the weights (one node) cannot drift apart
                if t.check_sync_every and self.exchange.nodes > 1 and st.global_step % t.check_sync_every == 0:
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
            self._update_plateau(record)
            if improved and ck.keep_best and record["val_loss"] is not None:
                self.save_checkpoint(best=True)
            if (self.stop_votes > 0 or (ck.every_steps and st.global_step % ck.every_steps == 0)
                    or (ck.every_epochs and st.epoch % ck.every_epochs == 0)):
                self.save_checkpoint()
            if self.stop_votes > 0:
                self._preempt(progress)
        self.save_checkpoint()  # a finished run resumes as a no-op (requeue-safe)
        if ck.restore_best:
            runstate.restore_best(self)
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
            **({"clipped_steps": st.epoch_clipped_steps, "clip_factor_min": st.epoch_clip_factor_min}
               if self.cfg.train.clip_grad_norm > 0 else {}),
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
        st.epoch_clipped_steps, st.epoch_clip_factor_min = 0, 1.0
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

    @property
    def plateau(self) -> Plateau | None:
        """The plateau schedule's state (checkpointed); None for the other schedules, or a ``schedule``
        replaced by a plain function of the step."""
        return getattr(self.schedule, "plateau", None)

    def _update_plateau(self, record: dict) -> None:
        """``train.schedule = plateau``: give the schedule this epoch's validation loss (reduced: the same
        on every rank, so every rank reduces alike); rank 0 says when the rate goes down."""
        if self.plateau is None or self.state.stopped:
            return
        if self.schedule.observe(record["val_loss"]) and self.comm.is_root:
            self.echo(f"plateau: validation loss {record['val_loss']:.4g} has not improved on "
                      f"{self.plateau.best:.4g} for {self.cfg.train.plateau_patience + 1} epochs; "
                      f"learning rate now {self.schedule.plateau_lr():.4g}")

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
            self.require_finite_params("before writing model.npz")
            # DP: the lineage entry of the state this model was made from (a branch moves it aside)
            extra = {"final": final, "run": self.model_lineage}
            record = {"final": final, "run": self.model_lineage, "targets": self.data.targets.to_meta(), **reports}

            def write() -> None:
                if self.comm.is_root:
                    save_model(self.run_dir / rundir_mod.MODEL_FILE, self.model, self.data.normalizer,
                               self.data.targets, extra=extra)
                    rundir_mod.write_json(self.run_dir / rundir_mod.FINAL_METRICS_FILE, record)

            all_or_nothing(self.comm, write, "saving the model")
        return TrainResult(self.model, self.history, final, stopped, self.state, reports)

    # -------------------------------------------------------------- checkpoints (dpbp/runstate.py)

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.run_dir / ckpt.CHECKPOINT_DIR if self.run_dir is not None else None

    @property
    def data_digest(self) -> str:
        """sha256 of the (normalised) training arrays: a resume must see the same data."""
        return self.digests["train"]["sha256"]

    def save_checkpoint(self, best: bool = False) -> Path | None:
        """Rank 0 writes a checkpoint (collective); see ``runstate.save``."""
        return runstate.save(self, best)

    def restore(self, path: str | Path) -> None:
        """Continue from checkpoint ``path`` (collective); see ``runstate.restore``."""
        runstate.restore(self, path)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Copies of the parameters (``params``), batch norm's running statistics (``bn_mean``, ``bn_var``,
        see ``MLP.running_arrays``) and the optimizer state (``optim_<name>``, ``optim_t``).

        Identical on every rank (the exchange keeps one whole copy of both on every rank or node).
        """
        return {"params": self.model.params.copy(), **self.model.running_arrays(),
                **{f"optim_{name}": value for name, value in self.optimizer.state_dict().items()}}

    def load_state(self, arrays) -> None:
        """Continue from parameters and optimizer state as ``state_arrays`` gives them (collective).

        ``arrays``: any mapping holding ``params``, the ``optim_*`` arrays of this optimizer (checked
        by ``Optimizer.load_state_dict``: ValueError on a mismatch) and, with batch norm, ``bn_mean``
        and ``bn_var``.
        """
        prefix = "optim_"
        self.exchange.write_params(self.model, arrays["params"], self.optimizer,
                                   {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        self.model.load_running(arrays)

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
                self.last_saved = (self.state.global_step, resume.path)
            else:  # the state resumed from gets a checkpoint of this run: --resume auto finds it
                self.save_checkpoint()
        if self.cfg.run.tensorboard and self.on_epoch_end is None:
            from dpbp.tensorboard import EVENTS_DIR, TensorBoardLog

            first = self.state.epoch + 1  # a resumed run writes from here: earlier files' later epochs are purged
            self._events = all_or_nothing(self.comm,
                                          lambda: TensorBoardLog(self.run_dir / EVENTS_DIR, self.comm, first),
                                          f"opening the TensorBoard log in {self.run_dir / EVENTS_DIR}",
                                          root_only=True)
            self.on_epoch_end = self._events
            messages.append(f"TensorBoard events in {self.run_dir / EVENTS_DIR} "
                            f"(tensorboard --logdir {self.run_dir.parent})")
        return messages

    def release_run_dir(self) -> None:
        """Close the TensorBoard log this run opened and give up the run directory's lock (rank 0);
        the directory keeps everything written."""
        if self._events is not None:
            self._events.close()
            self.on_epoch_end = self._events = None
        if self.rundir is not None:
            self.rundir.release()


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
