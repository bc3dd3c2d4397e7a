"""The ``dpbp`` command line: parse, build the config, call the library, map errors to exit codes.

Exit codes: 0 success; 1 unexpected failure (a bug or the environment; the rank
is named); 2 bad config, data, checkpoint or command line; 3 training failed
(non-finite numbers, ranks out of sync). Rank 0 alone prints; an error on any
rank ends every rank.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import sys
import traceback
from importlib import metadata
from pathlib import Path

import click

from dpbp import __version__

EXAMPLES_TRAIN = """\b
Examples:
  dpbp train                                   # embedded default: 5-class spirals, about 2 s
  dpbp train --epochs 5 --set train.optimizer=momentum --set train.lr=0.05
  dpbp train -c mnist.toml --run-dir runs/mnist
  mpirun -n 4 dpbp train -c mnist.toml         # same model, 4 ranks
  dpbp train --run-dir runs/mnist --resume auto                      # continue that run
  dpbp train --resume runs/mnist/checkpoints/step-000001350.npz --lr 0.001   # a branch
"""


def _echo(comm):
    """print() on rank 0 (dropped silently once stdout is closed: ``dpbp train | head``), nothing elsewhere."""
    from dpbp.progress import echo

    return echo if comm.is_root else (lambda text: None)


def collective(fn):
    """Run a command body on every rank and turn failures into one message and an exit code.

    Errors every rank agreed on (``collective = True``) are printed once by rank 0
    and end every rank with the error's exit code. Anything else under several ranks
    is a failure of one rank: it prints its rank and the error, then aborts the
    whole job, so no rank is left waiting in a collective. The watchdog starts as soon
    as the communicator exists (the config's defaults until the command applies its own),
    so a rank that stops answering during set-up ends the job too.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dpbp.comm import CommError, get_comm, launcher_rank
        from dpbp.errors import DpbpError
        from dpbp.signals import PREEMPTED_EXIT_CODE

        try:
            comm = get_comm()
        except CommError as exc:
            # No communicator yet: rank 0 (by the launcher's variables) alone reports it.
            if launcher_rank() in (None, 0):
                click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        from dpbp.config import default_config

        defaults = default_config().train
        try:
            comm.start_watchdog(defaults.heartbeat_timeout, defaults.collective_timeout)  # DP: from the first second
            return fn(comm, *args, **kwargs)
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except DpbpError as exc:
            if comm.size == 1 or getattr(exc, "collective", False):
                if comm.is_root:  # a requested stop (exit 75: checkpointed, resumable) is not an error
                    click.echo(f"{'' if exc.exit_code == PREEMPTED_EXIT_CODE else 'error: '}{exc}", err=True)
                sys.exit(exc.exit_code)
            click.echo(f"error on rank {comm.rank}: {exc}", err=True)
            comm.abort(exc.exit_code)
        except KeyboardInterrupt:
            if comm.is_root:
                click.echo("interrupted", err=True)
            if comm.size > 1:
                comm.abort(130)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - one rank failed: end the whole job, loudly
            if comm.size == 1:
                raise
            click.echo(f"error on rank {comm.rank}: {type(exc).__name__}: {exc}", err=True)
            traceback.print_exc()
            comm.abort(1)

    return wrapper


def one_process(fn):
    """For commands that never use MPI: an expected error is one message and its exit code.

    Started by an MPI launcher (``mpirun -n 3 dpbp config show``), the command runs on the
    launcher's rank 0 alone: the other ranks exit 0 at once, so it prints once and writes its
    file once; the launcher reports rank 0's exit code.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dpbp.errors import DpbpError

        if not _launcher_root():
            sys.exit(0)
        try:
            return fn(*args, **kwargs)
        except DpbpError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _launcher_root() -> bool:
    """True unless an MPI launcher started this process as a rank other than 0 (MPI is not started)."""
    from dpbp.comm import launcher_rank

    return launcher_rank() in (None, 0)


class _RootPrintsParsing:
    """While click parses a command line (where --help and --version print), only the launcher's rank 0 prints."""

    def make_context(self, info_name, args, parent=None, **extra):
        if _launcher_root():
            return super().make_context(info_name, args, parent, **extra)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return super().make_context(info_name, args, parent, **extra)


class _Command(_RootPrintsParsing, click.Command):
    pass


class _Group(_RootPrintsParsing, click.Group):
    command_class = _Command
    group_class = type  # subgroups (dpbp config) are _Group as well


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dpbp")
def main():
    """dpbp: data-parallel backpropagation for multilayer perceptrons.

    \b
    Run one process:        dpbp train
    Run on 8 MPI ranks:     mpirun -n 8 dpbp train
    See the config:         dpbp config show
    """


# ----------------------------------------------------------------------------- train


def _option_overrides(overrides, **options) -> list[str]:
    keys = {"epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
            "seed": "train.seed", "run_dir": "run.dir"}
    out = list(overrides)
    for name, value in options.items():
        if value is not None:
            out.append(f"{keys[name]}={value!r}" if isinstance(value, float) else f"{keys[name]}={value}")
    return out


def _load_config(comm, config_file, overrides, base=None):
    from dpbp.comm import all_or_nothing, differing_ranks
    from dpbp.config import config_hash, load_config
    from dpbp.errors import AgreedError
    from dpbp.train import check_memory

    cfg = all_or_nothing(comm, lambda: load_config(config_file, overrides, base=base), "reading the config")
    differ = differing_ranks(comm, config_hash(cfg))  # DP: every rank must run the same config
    if differ:
        raise AgreedError(f"rank(s) {differ} started with a different config than rank 0 "
                          "(check that every node reads the same config file and options)", 2)
    # Before anything is allocated or written: a model or built-in data set too large for memory.
    all_or_nothing(comm, lambda: check_memory(cfg), "estimating the memory needed")
    return cfg


config_option = click.option("--config", "-c", "config_file", type=click.Path(dir_okay=False),
                             help="TOML config file (start from `dpbp config show > run.toml`).")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override one config key, e.g. --set train.lr=0.05 (repeatable).")


@main.command(epilog=EXAMPLES_TRAIN)
@config_option
@set_option
@click.option("--epochs", type=int, help="Number of epochs (train.epochs), e.g. --epochs 20.")
@click.option("--batch-size", type=int, help="GLOBAL batch size across all ranks (train.batch_size), e.g. 256.")
@click.option("--lr", type=float, help="Learning rate eta (train.lr), e.g. --lr 0.01.")
@click.option("--seed", type=int, help="Seed for init, split and shuffle (train.seed), e.g. --seed 1.")
@click.option("--run-dir", help="The run's directory (run.dir), e.g. runs/a; one run per directory. Default: a new "
                                "runs/run-NNN (when resuming from a checkpoint file: that checkpoint's own).")
@click.option("--resume", metavar="PATH|auto",
              help="Continue from a checkpoint file (an older one starts a branch), or 'auto': the newest state "
                   "of the run in --run-dir (a new run if it has none), e.g. --resume auto.")
@click.option("--overwrite", is_flag=True,
              help="Replace the run that --run-dir holds (its outputs are deleted) instead of refusing.")
def train(config_file, overrides, epochs, batch_size, lr, seed, run_dir, resume, overwrite):
    """Train a model (one process, or every rank under mpirun/srun).

    SIGTERM, SIGINT, SIGUSR1 or SIGHUP make every rank finish its step, write a checkpoint and exit with
    code 75; run the same command with --resume auto to continue exactly.
    """
    from dpbp.signals import StopRequest

    stop = StopRequest.active()  # the dpbp process installed it first thing (entry)
    mine = stop is None
    if mine:  # called as a library (CliRunner, scripts): before MPI starts, and only while it runs
        stop = StopRequest().install()
    try:
        _train(stop, config_file, overrides, epochs, batch_size, lr, seed, run_dir, resume, overwrite)
    finally:
        if mine:
            stop.uninstall()  # leave the caller's handlers as they were


@collective
def _train(comm, stop, config_file, overrides, epochs, batch_size, lr, seed, run_dir, resume, overwrite):
    from dpbp import config as config_mod
    from dpbp import rundir
    from dpbp.errors import AgreedError
    from dpbp.runstate import frozen_changes
    from dpbp.train import Trainer

    echo = _echo(comm)
    if resume and overwrite:
        raise click.UsageError("--overwrite starts a new run; it cannot be combined with --resume")
    overrides = _option_overrides(overrides, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                  run_dir=run_dir)
    cfg = _load_config(comm, config_file, overrides)
    comm.configure_watchdog(cfg.train.heartbeat_timeout, cfg.train.collective_timeout)
    given = Path(cfg.run.dir) if cfg.run.dir else None
    _stop_before_training(comm, stop)
    point, home, meta, notes = _resume_point(comm, resume, given) if resume else (None, given, None, [])
    if meta is not None:
        # The checkpoint's config is the base; the file and options given now apply on top of it.
        base = _agreed(comm, lambda: config_mod.from_dict(meta["config"]), f"the config saved in {point.path}")
        cfg = _load_config(comm, config_file, overrides, base=base)
        comm.configure_watchdog(cfg.train.heartbeat_timeout, cfg.train.collective_timeout)
    restart = resume == "auto" and point is None
    if restart and home is not None:
        # A recorded run that never wrote a checkpoint starts again from the beginning, as it was
        # recorded: its config.toml is the base, and what defines the model or the data stays.
        recorded = _agreed(comm, lambda: _recorded_config(home) if comm.is_root else None,
                           f"reading the config recorded in {home}", root_only=True)
        recorded = comm.bcast_obj(recorded)
        if recorded is not None:
            base = config_mod.from_dict(recorded)
            cfg = _load_config(comm, config_file, overrides, base=base)
            changed = frozen_changes(recorded, config_mod.replace(cfg, **{"run.dir": str(home)}))
            if changed:
                raise AgreedError(f"{home} records a run that starts again from the beginning (it wrote no "
                                  f"checkpoint), so {', '.join(changed)} cannot change (recorded in "
                                  f"{home / rundir.CONFIG_FILE}); start a new run directory instead", 2)
    folder = home if home is not None else rundir.RUNS_ROOT
    # Refuse early, before loading data; claiming the directory checks again, under its lock.
    _agreed(comm, lambda: _refuse(rundir.refusal(folder, point, overwrite, restart)) if home is not None and
            comm.is_root else None, f"checking the run directory {folder}", root_only=True)
    for line in notes:
        echo(line)
    if cfg.run.tensorboard:  # before anything is written: the writer's package is there
        from dpbp.tensorboard import require_writer

        _agreed(comm, lambda: require_writer() and None if comm.is_root else None, "run.tensorboard", root_only=True)
    cfg = config_mod.replace(cfg, **{"run.dir": str(folder)})
    trainer = Trainer(cfg, comm, folder, echo=echo, stop_requested=lambda: stop.requested)
    trainer.stop_reason = lambda: stop.name or "a stop signal on another rank"
    if point is not None:
        trainer.restore(point.path)
    _stop_before_training(comm, stop)
    messages = trainer.claim_run_dir(command=["dpbp", *sys.argv[1:]], overwrite=overwrite, restart=restart,
                                     numbered=home is None)
    path, d, m = trainer.run_dir, trainer.data, cfg.model
    echo(f"dpbp {__version__}: {d.sizes} {m.activation}/{m.output}/{m.loss} {m.dtype} on {cfg.data.train!r} "
         f"({d.train.n_samples} train, {d.val.n_samples if d.val else 0} val"
         f"{f', {d.test.n_samples} test' if d.test else ''})")
    widths = "model.layers" if m.layers else f"{d.sizes[0]} features, model.hidden {list(m.hidden)}, " \
        f"{d.sizes[-1]} output{'s' if d.sizes[-1] > 1 else ''}"
    echo(f"  {d.targets.describe()}; layers from {widths}")
    pool = "BLAS" if trainer.model.products.name == "numpy" else "PyTorch"  # who runs the products' threads
    echo(f"  {comm.size} rank{'s' if comm.size > 1 else ''} x {trainer.threads} {pool} thread"
         f"{'s' if trainer.threads > 1 else ''}, global batch {trainer.batch_size}, "
         f"{trainer.steps_per_epoch} steps/epoch, {cfg.train.optimizer} lr {cfg.train.lr:g}, run dir {path}")
    from dpbp.products import describe_cpu

    echo(f"  matrix products: {trainer.model.products.describe()}, precision {trainer.model.precision}"
         f"{_hidden_layers(trainer.model)}; CPU: {describe_cpu()}")
    if comm.size > 1:
        echo(f"  gradients: {trainer.exchange.name}")
    extras = [f"dropout {', '.join(f'{r:g}' for r in trainer.model.dropout)}" if any(trainer.model.dropout) else "",
              "batch norm over the global batch" if m.batch_norm else ""]
    if any(extras):
        echo(f"  hidden layers: {'; '.join(e for e in extras if e)}")
    for line in [*d.notes, *messages]:
        echo(f"  {line}")
    if point is not None:
        st = trainer.state
        echo(f"  resumed from {point.path}: epoch {st.epoch + 1}, step {st.step_in_epoch}/{trainer.steps_per_epoch} "
             f"(global step {st.global_step})")
    result = trainer.run()
    f = result.final
    parts = [f"{f['epochs']} epochs, {f['steps']} steps in {f['seconds']:.1f}s"]
    for role in ("val", "test"):
        if f"{role}_loss" in f:
            parts.append(f"{role} loss {f[f'{role}_loss']:.4f} " + _metrics_text(f, role))
    if result.state.skipped_steps:
        parts.append(f"{result.state.skipped_steps} of {f['steps']} steps skipped (NaN/Inf)")
    if result.stopped == "early_stopping":
        parts.append("stopped early")
    echo("done: " + " | ".join(parts) + f" | model: {path / 'model.npz'}")


def _hidden_layers(model) -> str:
    """For the header in bf16-mixed: where a training step keeps the hidden activations, and why."""
    if model.precision != "bf16-mixed" or model.n_layers < 2:
        return ""
    if model.fused:
        return f", hidden activations ({model.activation}) in bf16 between the products"
    return f", hidden activations in float32 (NumPy; {', '.join(model.unfused_reasons())})"


def _metrics_text(record: dict, prefix: str) -> str:
    """'accuracy 97.10%' or 'rmse 52.1 mae 41.7 R2 0.412' from ``record[f"{prefix}_..."]``."""
    if f"{prefix}_accuracy" in record:
        return f"accuracy {100 * record[f'{prefix}_accuracy']:.2f}%"
    return f"rmse {record[f'{prefix}_rmse']:.4g} mae {record[f'{prefix}_mae']:.4g} R2 {record[f'{prefix}_r2']:.3f}"


def _agreed(comm, fn, what: str, root_only: bool = False):
    from dpbp.comm import all_or_nothing

    return all_or_nothing(comm, fn, what, root_only=root_only)


def _recorded_config(folder: Path) -> dict | None:
    """The config recorded in run directory ``folder`` (its config.toml), when it holds a recorded run."""
    from dpbp import config as config_mod
    from dpbp import rundir

    if rundir.read_record(folder) is None or not (folder / rundir.CONFIG_FILE).is_file():
        return None
    return config_mod.to_dict(config_mod.load_config(str(folder / rundir.CONFIG_FILE)))


def _refuse(reason: str | None) -> None:
    from dpbp.rundir import RunDirError

    if reason is not None:
        raise RunDirError(reason)


def _stop_before_training(comm, stop) -> None:
    """End every rank with exit 75 when a stop signal reached any rank during set-up (nothing written yet)."""
    from dpbp.train import Preempted

    if comm.any(stop.requested):
        raise Preempted(f"stopped by {stop.name or 'a stop signal on another rank'} before training started; "
                        "nothing was written; run the same command again to start")


def _resume_point(comm, resume: str, given: Path | None):
    """(checkpoint to continue or None, the run directory, its metadata or None, notes for the user),
    agreed by every rank.

    ``auto``: the newest verified state of the run in ``given`` (None when it has none). A file:
    its run directory is ``given``, or else the one that recorded it.
    """
    from dpbp import checkpoint as ckpt
    from dpbp import rundir
    from dpbp.errors import CheckpointError

    def find():
        if not comm.is_root:  # DP: rank 0 picks, everyone follows (ranks must not pick different files)
            return None
        if given is not None and given.is_dir():
            _refuse(rundir.symlink_problem(given))
        if resume == "auto":
            if given is None:
                raise rundir.RunDirError("--resume auto continues the run in --run-dir; give it, e.g. --resume auto "
                                         f"--run-dir {rundir.next_numbered_dir().parent}/run-001")
            path, skipped = rundir.find_latest(given, ckpt.load_checkpoint)
            home = given
        else:
            path, skipped = Path(resume), []
            home = given
        if path is None:
            return None, home, None, skipped
        meta = ckpt.read_meta(path)  # the config only: restoring verifies the whole file
        try:
            run = rundir.peek_checkpoint_run(path)
        except ValueError as exc:
            raise CheckpointError(f"{path}: malformed lineage ({exc})") from None
        if home is None:
            home = rundir.home_of_checkpoint(path, run)
            if home is None and run is None:
                raise rundir.RunDirError(f"{path} was written by an older dpbp, which recorded no run to continue; "
                                         "give --run-dir NEW_DIR to start a new run from it")
            if home is None:
                raise rundir.RunDirError(f"{path} is not inside the run directory that wrote it (run "
                                         f"{run['run_id'][:8]}); give --run-dir: a new or empty directory starts "
                                         "a new run from this checkpoint")
        return rundir.Resume(path, run), home, meta, skipped

    found = _agreed(comm, find, f"looking for the checkpoint to resume ({resume})", root_only=True)
    point, home, meta, skipped = comm.bcast_obj(found)
    notes = [f"warning: skipping checkpoint: {reason}" for reason in skipped]
    if point is None:
        notes.append(f"no checkpoint in {home}: starting the run from the beginning")
    return point, home, meta, notes


# ----------------------------------------------------------------------------- evaluate / predict


HEADER_HELP = ("Does the table's first row name its columns (auto, true, false)? Default: the data.header the model "
               "was trained with (auto: when a column holds text there and numbers below, or pandas' 0,1,2,... names).")


@main.command(epilog="""\b
Examples:
  dpbp evaluate --model runs/run-001/model.npz --data spirals:n=6000,classes=5,turns=1.5 --seed 1
  dpbp evaluate --model runs/iris/model.npz --data iris-test.csv --json
  dpbp evaluate --model runs/run-001/checkpoints/best.npz --data spirals
  mpirun -n 2 dpbp evaluate --model m.npz --data t10k-images-idx3-ubyte.gz,t10k-labels-idx1-ubyte.gz --json
""")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="A model.npz or any checkpoint (checkpoints/step-N.npz, best.npz) written by dpbp train.")
@click.option("--data", "source", required=True,
              help="Data source: built-in name, .npz, x.npy,y.npy, .csv or IDX images,labels.")
@click.option("--label-column", default=None,
              help="Table label column: last, first, an index or a header name. Default: the data.label_column the "
                   "model was trained with.")
@click.option("--header", type=click.Choice(["auto", "true", "false"]), default=None, help=HEADER_HELP)
@click.option("--seed", default=0, show_default=True, help="Seed for built-in data sets.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@collective
def evaluate(comm, model_path, source, label_column, header, seed, as_json):
    """Metrics of a model file or any checkpoint on a data set (each sample counted once across ranks).

    \b
    Labels are read as the model recorded them in training: class labels (text or numbers) map to
    its classes, and labels it never saw are an error. Classification: loss, accuracy, per-class
    precision, recall and F1 and the confusion matrix. Regression: loss (the training loss, half the
    squared error, on scaled targets), MSE, RMSE, MAE and R2 in the targets' own units.
    A checkpoint's saved normaliser is applied to the data first, exactly as in training.
    """
    from dpbp import data as data_mod
    from dpbp.checkpoint import load_network
    from dpbp.comm import all_or_nothing, check_data_agrees
    from dpbp.train import evaluate as evaluate_model

    def load():
        model, inputs, targets = load_network(model_path)
        column = label_column or targets.label_column or "last"
        raw = data_mod.load_source(source, dtype=None, label_column=column, header=header or targets.header or "auto",
                                   text_labels=targets.task == "classification", seed=seed)
        data_mod.check_features(raw, "evaluation")
        pre = f"evaluation data ({raw.source}): "
        if raw.n_features != model.sizes[0]:
            raise data_mod.DataError(f"{pre}has {raw.n_features} features; the model takes {model.sizes[0]}")
        y = targets.encode(raw.y, dtype=model.dtype, where=raw.where, pre=pre)
        ds = data_mod.Dataset(inputs.apply(raw.x, model.dtype), y, raw.source)
        data_mod.validate(ds, n_in=model.sizes[0], n_out=model.sizes[-1], role="evaluation")
        return model, ds, targets

    model, ds, targets = all_or_nothing(comm, load, "loading")
    # DP: node-local copies that differ would mix two data sets
    check_data_agrees(comm, {"evaluation": data_mod.dataset_digest(ds)})
    report = evaluate_model(model, ds, comm, targets)
    echo = _echo(comm)
    if as_json:
        echo(json.dumps({"model": model_path, "data": source, **report}))
    else:
        echo(_report_text(source, report))


def _report_text(source: str, r: dict) -> str:
    """The text form of an evaluate() report: a summary line, then per-class scores and the confusion matrix."""
    if r["task"] == "regression":
        return (f"{source}: {r['n']} samples, loss {r['loss']:.6f}, mse {r['mse']:.6g}, rmse {r['rmse']:.6g}, "
                f"mae {r['mae']:.6g}, R2 {r['r2']:.4f}")
    lines = [f"{source}: {r['n']} samples, loss {r['loss']:.6f}, accuracy {100 * r['accuracy']:.2f}%"]
    if "confusion_matrix" not in r:
        return lines[0]
    names = [str(c) for c in r["classes"]]
    w = max(12, *(len(n) for n in names)) + 2
    lines.append(f"  {'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for i, name in enumerate(names):
        lines.append(f"  {name:<{w}}{r['precision'][i]:>10.3f}{r['recall'][i]:>10.3f}{r['f1'][i]:>10.3f}"
                     f"{r['support'][i]:>10d}")
    for avg in ("macro", "weighted"):
        lines.append(f"  {avg + ' avg':<{w}}{r[f'{avg}_precision']:>10.3f}{r[f'{avg}_recall']:>10.3f}"
                     f"{r[f'{avg}_f1']:>10.3f}{r['n']:>10d}")
    lines.append("  confusion matrix (rows: true class, columns: predicted class)")
    c = max(6, *(len(n) + 1 for n in names), *(len(str(v)) + 1 for row in r["confusion_matrix"] for v in row))
    lines.append("  " + " " * w + "".join(f"{n:>{c}}" for n in names))
    for name, row in zip(names, r["confusion_matrix"]):
        lines.append(f"  {name:<{w}}" + "".join(f"{v:>{c}d}" for v in row))
    return "\n".join(lines)


@main.command(epilog="""\b
Examples:
  dpbp predict --model runs/run-001/model.npz --input points.csv --output predictions.csv
  dpbp predict --model runs/iris/model.npz --input iris-test.csv --label-column species --output labels.csv
  dpbp predict --model runs/run-001/checkpoints/step-000000500.npz --input x.npy --output out.npy
  mpirun -n 4 dpbp predict --model m.npz --input x.npy --output out.npy
""")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="A model.npz or any checkpoint (checkpoints/step-N.npz, best.npz) written by dpbp train.")
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help="Features: .npy, .npz (array x) or a .csv/.tsv/.txt table of numbers.")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help=".npy (the outputs) or .csv (the prediction: the original class label, or the value of a "
                   "regression; then the outputs).")
@click.option("--label-column", "drop_column", default=None,
              help="A column of the input table to leave out (labels, which may be text), as for evaluate, e.g. "
                   "--label-column species. Default: every column is a feature.")
@click.option("--header", type=click.Choice(["auto", "true", "false"]), default=None, help=HEADER_HELP)
@collective
def predict(comm, model_path, input_path, output_path, drop_column, header):
    """Write the predictions of a model file or any checkpoint for every row of a feature file.

    \b
    Classification: the class label as it was in the training data (text or number), then the
    probability of each class. Regression: the predicted values in the targets' own units.
    Inputs are raw: the saved normaliser is applied (in float64) first, exactly as in training.
    """
    import numpy as np

    from dpbp import data as data_mod
    from dpbp.checkpoint import load_network
    from dpbp.comm import all_or_nothing

    def load():
        model, inputs, targets = load_network(model_path)
        x = data_mod.load_features(input_path, dtype=None, header=header or targets.header or "auto",
                                   drop_column=drop_column)
        if x.shape[1] != model.sizes[0]:
            hint = (" (to leave a label column of the table out, give --label-column)"
                    if drop_column is None and x.shape[1] == model.sizes[0] + 1 else "")
            raise data_mod.DataError(f"{input_path}: rows have {x.shape[1]} features; the model expects "
                                     f"{model.sizes[0]}{hint}")
        return model, inputs, targets, x

    model, inputs, targets, x = all_or_nothing(comm, load, "loading")
    lo, hi = data_mod.shard_bounds(x.shape[0], comm.size, comm.rank)  # DP: my rows
    mine = inputs.apply(x[lo:hi], model.dtype)  # float64 arithmetic, then the model dtype, as in training
    local = model.predict(mine) if hi > lo else np.empty((0, model.sizes[-1]), model.dtype)
    out = comm.gather_rows(local)
    all_or_nothing(comm, lambda: _write_predictions(output_path, out, targets) if comm.is_root else None,
                   f"writing {output_path}")
    _echo(comm)(f"wrote {x.shape[0]} predictions to {output_path}")


def _write_predictions(path: str, out, targets) -> None:
    """Rank 0: write model outputs ``out`` ``(n, k)`` as .npy (the outputs in the targets' units) or .csv."""
    import csv

    import numpy as np

    from dpbp.errors import DataError

    target = Path(path)
    if not target.parent.exists():
        raise DataError(f"cannot write {path}: folder {target.parent} does not exist")
    if target.suffix not in (".npy", ".csv"):
        raise DataError(f"cannot write {path}: use a .npy or .csv file name")
    values = targets.output_values(out)
    if target.suffix == ".npy":
        np.save(target, values)
        return
    k = values.shape[1]
    many = "" if k == 1 else "_{}"
    if targets.task == "regression":
        header, first = [("prediction" + many).format(j) for j in range(k)], []
    elif targets.task == "binary":
        header = [("prediction" + many).format(j) for j in range(k)] + targets.column_names()
        first = [(values > 0.5).astype(int).tolist()]
    else:
        ids = (values[:, 0] > 0.5).astype(int) if k == 1 else np.argmax(values, axis=1)
        header, first = ["prediction", *targets.column_names()], [[[label] for label in targets.decode(ids)]]
    number = repr if values.dtype == np.float64 else "{:.9g}".format  # both read back to the same value
    with open(target, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i, row in enumerate(values.tolist()):
            writer.writerow([*(v for part in first for v in part[i]), *map(number, row)])


@main.command(epilog="""\b
Examples:
  dpbp export --model runs/run-001/model.npz --output model.onnx
  dpbp export --model runs/iris/checkpoints/best.npz --output iris.onnx
  python -c "import onnxruntime as rt, numpy as np; s = rt.InferenceSession('model.onnx'); \\
             print(s.run(None, {'input': np.zeros((1, 2), np.float32)}))"
""")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="A model.npz or any checkpoint (checkpoints/step-N.npz, best.npz) written by dpbp train.")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="The .onnx file to write (replaced atomically if it exists).")
@one_process
def export(model_path, output_path):
    """Write a model as a standard ONNX graph (needs pip install 'dpbp[onnx]').

    \b
    The graph takes raw features named 'input' (N, features) in the model's dtype: the input
    normalisation, and a regression's target scaling, are folded into the weights. Outputs:
    'probabilities' and 'label' (the class label as in training) for a classifier,
    'probabilities' for binary targets, 'predictions' (in the targets' own units) for a
    regression. Serve it with onnxruntime or any ONNX runtime (opset 17).
    """
    from dpbp.onnx_export import export_onnx

    path = export_onnx(model_path, output_path)
    click.echo(f"wrote {path}")


# ----------------------------------------------------------------------------- diagnostics


@main.command(epilog="""\b
Examples:
  dpbp plot runs/run-001                   # writes runs/run-001/training.png
  dpbp plot runs/mnist -o mnist.png
""")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="PNG file (default RUN_DIR/training.png).")
@one_process
def plot(run_dir, output):
    """Draw train/val loss, accuracy (regressions: RMSE and R2) and per-layer gradient norms (needs matplotlib)."""
    from dpbp.plot import plot_run

    click.echo(f"wrote {plot_run(run_dir, output)}")


@main.command(epilog="""\b
Examples:
  dpbp gradcheck                                  # the default config's model
  dpbp gradcheck -c run.toml --samples 100
  dpbp gradcheck --set 'model.layers=[2,32,32,32,32,5]' --set model.activation=sigmoid
""")
@config_option
@set_option
@click.option("--rows", default=16, show_default=True, type=click.IntRange(min=1),
              help="Training rows in the checked batch (at least 3 with batch norm).")
@click.option("--samples", default=40, show_default=True,
              help="Entries checked per layer (all if the layer is smaller).")
@click.option("--tolerance", default=1e-6, show_default=True, help="Largest relative error accepted.")
@one_process
def gradcheck(config_file, overrides, rows, samples, tolerance):
    """Verify the configured model's backprop against finite differences, per layer (float64)."""
    from dpbp import config as config_mod
    from dpbp.config import load_config
    from dpbp.gradcheck import as_float64, check_gradients
    from dpbp.train import build_model, prepare_data

    cfg = load_config(config_file, overrides)
    if cfg.model.precision != "full" or cfg.model.products != "auto":
        # The check is of backprop itself, in float64: bf16-mixed products are bounded in tests/test_products.py.
        click.echo(f"note: gradcheck runs in float64 with NumPy's products (model.precision = {cfg.model.precision}, "
                   f"model.products = {cfg.model.products} apply to training)")
        cfg = config_mod.replace(cfg, **{"model.precision": "full", "model.products": "auto"})
    data = prepare_data(cfg)
    model = as_float64(build_model(cfg, data.sizes))
    x, y = data.train.x[:rows], data.train.y[:rows]
    if model.batch_norm and x.shape[0] < 3:
        # One row has no batch variance; over two, each normalised value is +-1 whatever the weights, so
        # the loss hardly depends on them and finite differences measure rounding, not the gradient.
        raise click.UsageError(f"batch norm needs at least 3 rows to check, got {x.shape[0]} (--rows)")
    extras = "".join(f", {e}" for e, on in (("batch norm over these rows", model.batch_norm),
                                             ("one fixed dropout mask", any(model.dropout))) if on)
    click.echo(f"checking {model.sizes} {model.activation}/{model.output}/{model.loss} on {x.shape[0]} rows "
               f"(float64, fourth-order central differences{extras})")
    worst = 0.0
    for check in check_gradients(model, x, y, samples_per_layer=samples):
        worst = max(worst, check.max_rel_error)
        kinks = f" ({check.kinks} skipped: a relu kink inside the stencil)" if check.kinks else ""
        click.echo(f"  layer {check.layer}: {check.checked}/{check.total} entries, "
                   f"worst relative error {check.max_rel_error:.2e}{kinks}")
    verdict = "ok" if worst <= tolerance else "FAILED"
    click.echo(f"{verdict}: worst relative error {worst:.2e} (tolerance {tolerance:g})")
    if worst > tolerance:
        sys.exit(3)


# ----------------------------------------------------------------------------- config / info


@main.group(name="config", epilog="\b\nExamples:\n  dpbp config show > run.toml\n  dpbp config show --doc")
def config_group():
    """Show the resolved config, or the reference of every key."""


@config_group.command(name="show", epilog="""\b
Examples:
  dpbp config show > run.toml                 # start a config from the defaults
  dpbp config show -c run.toml --set train.lr=0.1
  dpbp config show --doc                      # Markdown reference of every key
""")
@config_option
@set_option
@click.option("--doc", is_flag=True, help="Print the Markdown reference of every key instead.")
@one_process
def config_show(config_file, overrides, doc):
    """Print the resolved config as TOML (defaults, then the file, then --set)."""
    from dpbp import config as config_mod

    if doc:
        click.echo(config_mod.doc_markdown(), nl=False)
        return
    click.echo(config_mod.to_toml(config_mod.load_config(config_file, overrides)), nl=False)


@main.command(epilog="\b\nExamples:\n  dpbp info\n  mpirun -n 4 dpbp info")
@collective
def info(comm):
    """Versions, the MPI library, the number of ranks, the BLAS threads per rank and the matrix products' library."""
    import numpy as np

    from dpbp.products import describe_cpu
    from dpbp.threads import blas_info, configure_blas_threads

    threads = configure_blas_threads(0, comm.local_size)
    try:
        import mpi4py

        mpi4py_version = mpi4py.__version__
    except ImportError:
        mpi4py_version = "not installed (pip install 'dpbp[mpi]')"
    echo = _echo(comm)
    echo(f"dpbp          {__version__}")
    echo(f"python        {platform.python_version()} ({sys.executable})")
    echo(f"numpy         {np.__version__}")
    echo(f"click         {metadata.version('click')}")
    echo(f"mpi4py        {mpi4py_version}")
    echo(f"MPI library   {comm.library}")
    echo(f"ranks         {comm.size} ({comm.local_size} on this node)")
    echo(f"BLAS threads  {threads} per rank")
    echo(f"products      {_products_line()}")
    echo(f"CPU bf16      {describe_cpu()}")
    echo(f"watchdog      {comm.watchdog_status}")
    for lib in blas_info():
        echo(f"BLAS          {lib['library']} {lib['version']} ({lib['path']})")


def _products_line() -> str:
    """Which library does the matrix products, and whether PyTorch (model.products = torch, bf16-mixed) is there."""
    from dpbp.products import TORCH_EXTRA, torch_available

    if not torch_available():
        return f"numpy (model.products = auto); PyTorch not installed ({TORCH_EXTRA} for torch and bf16-mixed)"
    return (f"numpy for full precision, torch {metadata.version('torch')} for bf16-mixed (model.products = auto); "
            "torch also on request (model.products = torch)")


def entry(args: list[str] | None = None) -> None:
    """The ``dpbp`` command (console script and ``python -m dpbp.cli``): ``main`` run so that every rank agrees.

    Under mpirun every rank parses the same command line; click's usage errors, help
    and version are printed by the launcher's rank 0 alone (found from the launcher's
    environment, without starting MPI), and every rank exits with click's code: 2 for
    a usage error, 0 for help and version, 1 for an interrupt during parsing.
    Never returns: exits the process.
    """
    words = [a for a in (sys.argv[1:] if args is None else args) if not a.startswith("-")]
    if words[:1] == ["train"]:
        from dpbp.signals import StopRequest

        StopRequest().install()  # kept until the process exits: a signal is a stop request, never a kill
    root = _launcher_root()
    try:
        code = main.main(args, prog_name="dpbp", standalone_mode=False)
    except click.ClickException as exc:
        if root:
            exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        if root:
            click.echo("Aborted!", err=True)
        sys.exit(1)
    except BrokenPipeError:  # a reader went away while click wrote (dpbp --help | head -1), as click does
        from dpbp.progress import drop_stdout

        drop_stdout()
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # an int here is an Exit's code (--help, --version)


if __name__ == "__main__":  # pragma: no cover
    entry()
