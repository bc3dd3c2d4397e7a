"""Tests for the ``dpbp`` command line: help, train, config and data errors, config show, evaluate,
predict, running without mpi4py, info, and both dtypes.

Most tests call the click group in-process with ``CliRunner``; the ones where a real process matters
(exit codes, stderr, tracebacks, the environment) run ``python -m dpbp.cli`` in a subprocess. Every
run is tiny (300 spirals points, a 2-8-3 network, 2 epochs) except one run of the real default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import invoke

import dpbp
from dpbp import load_model
from dpbp.config import Config, config_hash, default_config, load_config
from dpbp.data import load_source
from dpbp.signals import STOP_SIGNALS

# The checkout under test; subprocesses must import this dpbp, not an older installed copy.
REPO = Path(dpbp.__file__).resolve().parent.parent

SMALL_SETS = ["data.train=spirals:n=300", "model.layers=[2,8,3]"]
SMALL = [arg for item in SMALL_SETS for arg in ("--set", item)]
SMALL_TRAIN = ["train", *SMALL, "--epochs", "2"]
SMALL_ROWS = 300  # spirals:n=300 -> 270 train + 30 validation rows
METRIC_KEYS = {"epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
               "samples_per_s", "seconds"}
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MV2_")

# ----------------------------------------------------------------------------- helpers



def clean_env(pythonpath_first: Path | None = None, **extra: str) -> dict[str, str]:
    """os.environ without MPI launcher variables, with this checkout first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k != "DPBP_COMM"}
    paths = [str(p) for p in (pythonpath_first, REPO) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def dpbp_proc(*args, env=None, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """Run ``python -m dpbp.cli ARGS`` as a real process."""
    return subprocess.run([sys.executable, "-m", "dpbp.cli", *map(str, args)], capture_output=True, text=True,
                          env=env if env is not None else clean_env(), cwd=cwd, timeout=timeout)


def one_error_line(returncode: int, stderr: str, *needles: str, code: int = 2) -> str:
    """Assert the documented error contract: exit ``code``, one 'error:' line on stderr, no traceback."""
    assert returncode == code, f"exit {returncode}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got:\n{stderr}"
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def train_small(run_dir: Path, *extra: str):
    result = invoke(*SMALL_TRAIN, *extra, "--run-dir", run_dir)
    assert result.exit_code == 0 and result.exception is None, result.output
    return result


def write_datasets(folder: Path) -> dict[str, Path]:
    """Small 2-feature data sets: valid (labels 0..2), NaN in x, labels 0..4."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 2)).astype(np.float32)
    y3, y5 = np.arange(50) % 3, np.arange(50) % 5
    x_nan = x.copy()
    x_nan[7, 1] = np.nan
    files = {"ok": folder / "ok.npz", "nan": folder / "nan.npz", "labels5": folder / "labels5.npz"}
    np.savez(files["ok"], x=x, y=y3)
    np.savez(files["nan"], x=x_nan, y=y3)
    np.savez(files["labels5"], x=x, y=y5)
    return files


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """model.npz of one small float32 run, shared by the evaluate and predict tests."""
    run_dir = tmp_path_factory.mktemp("trained")
    train_small(run_dir)
    return run_dir / "model.npz"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    return write_datasets(tmp_path_factory.mktemp("data"))


# ----------------------------------------------------------------------------- 1. help and version


def test_group_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in ("train", "evaluate", "predict", "config", "info"):
        assert re.search(rf"^\s+{command}\s", result.output, re.MULTILINE), result.output
    assert "dpbp train" in result.output and "mpirun" in result.output  # the usage examples
    assert invoke("-h").output == result.output


def test_version_prints_package_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"dpbp, version {dpbp.__version__}"


@pytest.mark.parametrize("command", [["train"], ["evaluate"], ["predict"], ["config", "show"], ["info"]],
                         ids=lambda c: " ".join(c))
def test_command_help_has_examples(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "Example" in result.output, result.output
    assert f"dpbp {' '.join(command)}" in result.output.split("Example", 1)[1]


def test_train_help_names_every_option():
    text = invoke("train", "--help").output
    for option in ("--config", "--set", "--epochs", "--batch-size", "--lr", "--seed", "--run-dir"):
        assert option in text


# ----------------------------------------------------------------------------- 2. train


def test_train_small_run_writes_config_metrics_model_and_reports(tmp_path):
    run_dir = tmp_path / "run"
    result = train_small(run_dir, "--set", "train.log_every=1")
    out = result.stdout.splitlines()

    # config.toml reads back to the config the run used
    saved = load_config(str(run_dir / "config.toml"))
    expected = load_config(None, [*SMALL_SETS, "train.log_every=1", "train.epochs=2", f"run.dir={run_dir}"])
    assert config_hash(saved) == config_hash(expected)
    assert (saved.train.epochs, saved.model.layers, saved.run.dir) == (2, [2, 8, 3], str(run_dir))

    # metrics.jsonl: one object per epoch, every documented key, steps increase
    steps_per_epoch = int(re.search(r"(\d+) steps/epoch", result.stdout).group(1))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert METRIC_KEYS <= r.keys(), sorted(r)
        assert 0.0 <= r["val_accuracy"] <= 1.0 and np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"])
        assert r["seconds"] >= 0
    assert [r["step"] for r in records] == [steps_per_epoch, 2 * steps_per_epoch]

    # model.npz loads and predicts class probabilities on raw features
    model = load_model(run_dir / "model.npz")
    assert list(model.sizes) == [2, 8, 3]
    probs = model.predict(load_source("spirals:n=300").x)
    assert probs.shape == (SMALL_ROWS, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    # stdout: progress lines, one summary per epoch, exactly one final line
    progress = [line for line in out if re.fullmatch(
        r"epoch [12]/2 step \d+/\d+ loss \d+\.\d+ \S+ samples/s ETA \d+:\d\d(:\d\d)?", line)]
    assert progress, result.stdout
    summaries = [line for line in out if re.match(r"epoch \d+/2: train loss", line)]
    assert [s.split(":")[0] for s in summaries] == ["epoch 1/2", "epoch 2/2"], result.stdout
    done = [line for line in out if line.startswith("done:")]
    assert len(done) == 1 and out[-1] == done[0], result.stdout
    assert f"2 epochs, {2 * steps_per_epoch} steps" in done[0]
    assert "val loss" in done[0] and str(run_dir / "model.npz") in done[0]


@pytest.mark.parametrize("outcome", ["success", "config-error"])
def test_train_leaves_signal_handlers_as_it_found_them(tmp_path, outcome):
    """train catches SIGTERM/SIGINT/SIGUSR1 while it runs; a caller's handlers must be back afterwards."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    args = [*SMALL_TRAIN] if outcome == "success" else ["train", *SMALL, "--lr", "0"]
    result = invoke(*args, "--run-dir", tmp_path / "run", restore_signals=False)
    try:
        assert result.exit_code == (0 if outcome == "success" else 2), result.output
        after = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        assert after == before, f"handlers left installed: {after}"
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_default_training_reaches_95_percent(tmp_path):
    """The embedded default (spirals 6000 x 5 classes, 2-128-128-5, 40 epochs), as a real process."""
    proc = dpbp_proc("train", "--run-dir", tmp_path / "default", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done:"), proc.stdout[-2000:]
    assert proc.stdout.count("done:") == 1
    accuracy = float(re.search(r"val loss [\d.]+ accuracy ([\d.]+)%", last).group(1))
    assert accuracy >= 95.0, last
    assert (tmp_path / "default" / "model.npz").is_file()


def test_config_show_output_trains_with_c(tmp_path):
    """`dpbp config show > run.toml` then `dpbp train -c run.toml` reproduces the config."""
    shown = invoke("config", "show", *SMALL, "--set", "train.epochs=1")
    assert shown.exit_code == 0
    (tmp_path / "run.toml").write_text(shown.stdout)
    run_dir = tmp_path / "from_file"
    result = invoke("train", "-c", tmp_path / "run.toml", "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    saved = load_config(str(run_dir / "config.toml"))
    assert saved == load_config(str(tmp_path / "run.toml"), [f"run.dir={run_dir}"])
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


# ----------------------------------------------------------------------------- 3. config errors


@pytest.mark.parametrize(("args", "key"), [
    (["--set", "train.learning_rate=0.1"], "train.learning_rate"),
    (["--set", "train.epochs=abc"], "train.epochs"),
    (["--lr", "0"], "train.lr"),
    (["--batch-size", "0"], "train.batch_size"),
    (["--set", "model.layers=[3,8,3]"], "model.layers"),
    (["--set", "model.dtype=float16"], "model.dtype"),
], ids=["unknown-key", "wrong-type", "lr-zero", "batch-zero", "layers-vs-data", "bad-choice"])
def test_config_error_is_one_line_exit_2_and_no_model(tmp_path, args, key):
    run_dir = tmp_path / "run"
    proc = dpbp_proc("train", *SMALL, *args, "--run-dir", run_dir)
    one_error_line(proc.returncode, proc.stderr, key)
    assert "done:" not in proc.stdout
    assert not (run_dir / "model.npz").exists()


def test_config_file_with_unknown_section_is_refused(tmp_path):
    (tmp_path / "bad.toml").write_text("[trian]\nlr = 0.1\n")
    proc = dpbp_proc("train", "-c", tmp_path / "bad.toml", "--run-dir", tmp_path / "run")
    one_error_line(proc.returncode, proc.stderr, "trian")
    assert not (tmp_path / "run" / "model.npz").exists()


# ----------------------------------------------------------------------------- 4. bad data


@pytest.mark.parametrize(("name", "needle"), [
    ("missing", "missing.npz"), ("nan", "nan.npz"), ("labels5", "labels5.npz"),
])
def test_bad_training_data_is_one_message_exit_2(tmp_path, datasets, name, needle):
    source = datasets.get(name, tmp_path / "missing.npz")
    run_dir = tmp_path / "run"
    proc = dpbp_proc("train", "--set", f"data.train={source}", "--set", "model.layers=[2,8,3]",
                     "--epochs", "1", "--run-dir", run_dir)
    line = one_error_line(proc.returncode, proc.stderr, needle)
    if name == "nan":
        assert "NaN" in line
    assert not (run_dir / "model.npz").exists()


def test_validation_labels_out_of_range_are_refused(tmp_path, datasets):
    run_dir = tmp_path / "run"
    proc = dpbp_proc("train", "--set", f"data.train={datasets['ok']}", "--set", f"data.val={datasets['labels5']}",
                     "--set", "model.layers=[2,8,3]", "--epochs", "1", "--run-dir", run_dir)
    one_error_line(proc.returncode, proc.stderr, "labels5.npz")
    assert not (run_dir / "model.npz").exists()


# ----------------------------------------------------------------------------- 5. config show


def test_config_show_round_trips(tmp_path):
    result = invoke("config", "show")
    assert result.exit_code == 0
    (tmp_path / "shown.toml").write_text(result.stdout)
    loaded = load_config(str(tmp_path / "shown.toml"))
    assert loaded == default_config()
    assert config_hash(loaded) == config_hash(default_config())


def test_config_show_reflects_set(tmp_path):
    result = invoke("config", "show", "--set", "train.lr=0.5")
    assert result.exit_code == 0
    assert re.search(r"^lr = 0\.5$", result.stdout, re.MULTILINE)
    (tmp_path / "shown.toml").write_text(result.stdout)
    loaded = load_config(str(tmp_path / "shown.toml"))
    assert loaded.train.lr == 0.5
    assert loaded == load_config(None, ["train.lr=0.5"])


def test_config_show_doc_covers_every_section_and_key():
    result = invoke("config", "show", "--doc")
    assert result.exit_code == 0
    doc = result.stdout
    assert doc.startswith("# ")
    for section in dataclasses.fields(Config):
        assert f"[{section.name}]" in doc
        for f in dataclasses.fields(section.default_factory()):
            assert f"`{f.name}`" in doc, f"{section.name}.{f.name} missing from --doc"


def test_config_show_missing_file_is_one_error(tmp_path):
    missing = tmp_path / "missing.toml"
    result = invoke("config", "show", "-c", missing)
    one_error_line(result.exit_code, result.stderr, "missing.toml")
    assert result.stdout == ""


def test_config_show_bad_override_is_one_error():
    result = invoke("config", "show", "--set", "train.lr=-1")
    one_error_line(result.exit_code, result.stderr, "train.lr")


# ----------------------------------------------------------------------------- 6. evaluate


def _local_metrics(model_path: Path, source: str) -> tuple[float, float, int]:
    """Loss and accuracy computed here, without the CLI: the reference for evaluate."""
    model = load_model(model_path)
    ds = load_source(source, dtype=model.dtype.name)
    probs = model.predict(ds.x).astype(np.float64)
    loss = float(-np.mean(np.log(probs[np.arange(len(ds.y)), ds.y])))
    return loss, float(np.mean(np.argmax(probs, axis=1) == ds.y)), len(ds.y)


def test_evaluate_text(trained):
    result = invoke("evaluate", "--model", trained, "--data", "spirals:n=300")
    assert result.exit_code == 0, result.output
    _, accuracy, _ = _local_metrics(trained, "spirals:n=300")
    assert f"{SMALL_ROWS} samples" in result.stdout
    assert f"accuracy {100 * accuracy:.2f}%" in result.stdout


@pytest.mark.parametrize("which", ["builtin", "npz"])
def test_evaluate_json_matches_local_computation(trained, datasets, which):
    source = "spirals:n=300" if which == "builtin" else str(datasets["ok"])
    result = invoke("evaluate", "--model", trained, "--data", source, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    loss, accuracy, n = _local_metrics(trained, source)
    assert report["n"] == n == (SMALL_ROWS if which == "builtin" else 50)
    assert report["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert report["loss"] == pytest.approx(loss, rel=1e-4)


def test_evaluate_labels_out_of_range_for_model(trained, datasets):
    proc = dpbp_proc("evaluate", "--model", trained, "--data", datasets["labels5"])
    one_error_line(proc.returncode, proc.stderr, "labels5.npz")


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated", "foreign-npz"])
def test_evaluate_bad_model_file(tmp_path, trained, kind):
    bad = tmp_path / f"{kind}.npz"
    if kind == "garbage":
        bad.write_bytes(b"\x00not a model\xff" * 64)
    elif kind == "truncated":
        data = trained.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "foreign-npz":
        np.savez(bad, params=np.zeros(10, np.float32))
    proc = dpbp_proc("evaluate", "--model", bad, "--data", "spirals:n=300")
    one_error_line(proc.returncode, proc.stderr, bad.name)
    assert proc.stdout == ""


# ----------------------------------------------------------------------------- 7. predict


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> tuple[Path, np.ndarray]:
    x = load_source("spirals:n=300").x[:37]
    path = tmp_path_factory.mktemp("features") / "x.npy"
    np.save(path, x)
    return path, x


def test_predict_npy(tmp_path, trained, features):
    x_path, x = features
    out = tmp_path / "p.npy"
    result = invoke("predict", "--model", trained, "--input", x_path, "--output", out)
    assert result.exit_code == 0, result.output
    assert f"{len(x)} predictions" in result.stdout
    got = np.load(out)
    assert got.shape == (len(x), 3)
    np.testing.assert_allclose(got, load_model(trained).predict(x), rtol=1e-6)


@pytest.mark.parametrize("input_kind", ["npy", "csv"])
def test_predict_csv(tmp_path, trained, features, input_kind):
    x_path, x = features
    if input_kind == "csv":  # a feature table with a header
        x_path = tmp_path / "x.csv"
        np.savetxt(x_path, x, delimiter=",", header="a,b", comments="", fmt="%.9g")
    out = tmp_path / "p.csv"
    result = invoke("predict", "--model", trained, "--input", x_path, "--output", out)
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "prediction,prob_0,prob_1,prob_2"  # the class labels of the training data: 0, 1, 2
    assert len(lines) == 1 + len(x)
    table = np.loadtxt(out, delimiter=",", skiprows=1, ndmin=2)
    assert table.shape == (len(x), 4)
    np.testing.assert_array_equal(table[:, 0], np.argmax(table[:, 1:], axis=1))
    np.testing.assert_allclose(table[:, 1:], load_model(trained).predict(x), rtol=1e-5, atol=1e-7)


def test_predict_wrong_feature_count(tmp_path, trained):
    np.save(tmp_path / "x3.npy", np.zeros((4, 3)))
    proc = dpbp_proc("predict", "--model", trained, "--input", tmp_path / "x3.npy", "--output", tmp_path / "p.npy")
    line = one_error_line(proc.returncode, proc.stderr, "x3.npy")
    assert re.search(r"expects 2\b", line), line
    assert not (tmp_path / "p.npy").exists()


@pytest.mark.parametrize("target", ["p.txt", "no_such_folder/p.csv"])
def test_predict_unwritable_output(tmp_path, trained, features, target):
    result = invoke("predict", "--model", trained, "--input", features[0], "--output", tmp_path / target)
    one_error_line(result.exit_code, result.stderr, "p.")
    assert not (tmp_path / target).exists()


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    """Run directory of a small float32 run with a checkpoint every 3 steps (5 steps per epoch)."""
    run_dir = tmp_path_factory.mktemp("checkpointed")
    train_small(run_dir, "--set", "checkpoint.every_steps=3", "--set", "checkpoint.keep=100")
    return run_dir


def checkpoint_reference(run_dir: Path, path: Path):
    """The checkpoint's network built here from its parameters, and the normaliser the run fitted."""
    from dpbp import MLP
    from dpbp import checkpoint as ckpt
    from dpbp.train import prepare_data

    arrays, meta = ckpt.load_checkpoint(path)
    net = MLP(**meta["model"])
    net.params[...] = arrays["params"]
    return net, prepare_data(load_config(str(run_dir / "config.toml"))).normalizer


@pytest.mark.parametrize("name", ["best.npz", "step-000000003.npz"])  # best, and mid-epoch 1 of 2
def test_evaluate_and_predict_accept_any_checkpoint(tmp_path, checkpointed, features, name):
    from dpbp.comm import SerialComm
    from dpbp.train import evaluate

    path = checkpointed / "checkpoints" / name
    net, fitted = checkpoint_reference(checkpointed, path)
    result = invoke("evaluate", "--model", path, "--data", "spirals:n=300", "--json")
    assert result.exit_code == 0, result.output
    ds = load_source("spirals:n=300", dtype=None)
    ds.x = fitted.apply(ds.x, np.float32)  # in float64 from the data as generated, then the model dtype
    expected = evaluate(net, ds, SerialComm())
    report = json.loads(result.stdout)
    assert (report["loss"], report["accuracy"], report["n"]) == (expected["loss"], expected["accuracy"], SMALL_ROWS)

    x_path, x = features
    result = invoke("predict", "--model", path, "--input", x_path, "--output", tmp_path / "p.npy")
    assert result.exit_code == 0, result.output
    got = np.load(tmp_path / "p.npy")
    np.testing.assert_array_equal(got, net.predict(fitted.apply(x, np.float32)))
    assert not np.allclose(got, net.predict(x), atol=1e-3)  # without the normaliser the numbers differ


def test_format_1_checkpoint_is_one_error_as_a_model(tmp_path, checkpointed):
    from helpers import as_format_1

    old = as_format_1(checkpointed / "checkpoints" / "best.npz", tmp_path / "old.npz")
    proc = dpbp_proc("evaluate", "--model", old, "--data", "spirals:n=300")
    one_error_line(proc.returncode, proc.stderr, "old.npz", "format-1 checkpoint", "normaliser ('standard')")
    assert proc.stdout == ""


# ----------------------------------------------------------------------------- 8. without mpi4py


@pytest.fixture
def no_mpi4py(tmp_path) -> Path:
    """A folder whose mpi4py package fails to import; put it first on PYTHONPATH."""
    fake = tmp_path / "fake_site" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("mpi4py hidden for this test")\n')
    return fake.parent


def test_train_works_without_mpi4py(tmp_path, no_mpi4py):
    run_dir = tmp_path / "run"
    proc = dpbp_proc(*SMALL_TRAIN, "--run-dir", run_dir, env=clean_env(no_mpi4py))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done:") == 1
    assert (run_dir / "model.npz").is_file()


def test_info_works_without_mpi4py(no_mpi4py):
    proc = dpbp_proc("info", env=clean_env(no_mpi4py))
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("mpi4py"))
    assert "not installed" in line


def test_launcher_without_mpi4py_is_one_error(tmp_path, no_mpi4py):
    run_dir = tmp_path / "run"
    proc = dpbp_proc(*SMALL_TRAIN, "--run-dir", run_dir, env=clean_env(no_mpi4py, PMI_SIZE="2", PMI_RANK="0"))
    one_error_line(proc.returncode, proc.stderr, "mpi4py", "cannot be imported")
    assert not (run_dir / "model.npz").exists()


def test_bad_dpbp_comm_is_one_error():
    proc = dpbp_proc("info", env=clean_env(DPBP_COMM="bogus"))
    one_error_line(proc.returncode, proc.stderr, "DPBP_COMM")


# ----------------------------------------------------------------------------- 9. info


def test_info_lines():
    result = invoke("info")
    assert result.exit_code == 0, result.output
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    for label in ("dpbp", "numpy", "MPI library", "ranks", "BLAS threads"):
        assert label in lines, result.stdout
    assert dpbp.__version__ in lines["dpbp"]
    assert np.__version__ in lines["numpy"]
    assert re.search(r"ranks\s+1\b", lines["ranks"])
    assert re.search(r"BLAS threads\s+\d+ per rank", lines["BLAS threads"])


# ----------------------------------------------------------------------------- 10. dtypes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_of_saved_params_matches_config(tmp_path, dtype):
    run_dir = tmp_path / "run"
    extra = [] if dtype == "float32" else ["--set", f"model.dtype={dtype}"]  # float32 is the default
    result = train_small(run_dir, *extra)
    assert f" {dtype} on " in result.stdout.splitlines()[0]
    assert load_config(str(run_dir / "config.toml")).model.dtype == dtype
    with np.load(run_dir / "model.npz") as npz:
        assert npz["params"].dtype == np.dtype(dtype)
    model = load_model(run_dir / "model.npz")
    assert model.dtype == np.dtype(dtype) and model.params.dtype == np.dtype(dtype)
    assert model.predict(np.zeros((2, 2), dtype)).dtype == np.dtype(dtype)


def test_a_retired_environment_variable_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpbp.cli", "train", *SMALL, "--epochs", "1", "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DPBP_WAIT": "yield", "DPBP_COMM": "serial"})
    assert proc.returncode == 2 and proc.stderr.count("DPBP_WAIT no longer exists") == 1, proc.stderr
    assert not (tmp_path / "run").exists()
