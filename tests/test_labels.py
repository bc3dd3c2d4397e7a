"""Targets and labels as users have them, through the command line: class names, labels that do not start at
0, regression from whole-number targets, metrics per task, the recorded mapping and float64 normalisation.

Every data set here is a small CSV or .npz written by the test (no downloads, no scikit-learn); the
reference numbers are computed locally with NumPy from the files and from ``dpbp predict``'s output.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import invoke

import dpbp
from dpbp import load_model
from dpbp.checkpoint import load_network

REPO = Path(dpbp.__file__).resolve().parent.parent
NAMES = ["setosa", "versicolor", "virginica"]
QUICK = ["--set", "model.hidden=[16]", "--batch-size", "16", "--epochs", "30", "--set", "train.lr=0.01"]



def dpbp_proc(*args) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "DPBP_COMM": "serial", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "dpbp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def one_error(proc, *needles) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_table(path: Path, header: list[str] | None, rows) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def flowers(n: int, seed: int):
    """Three well separated 4-D clusters named like the iris species; the label column sits second."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n) % 3
    x = rng.normal(size=(n, 4)) * 0.4 + np.array([[0, 0, 0, 0], [3, 0, 3, 0], [0, 3, 0, 3]])[ids]
    return x, ids


@pytest.fixture(scope="module")
def iris(tmp_path_factory):
    """(train csv, test csv, test labels as text, run directory) of a classifier trained on class names."""
    folder = tmp_path_factory.mktemp("iris")
    header = ["sepal_length", "species", "sepal_width", "petal_length", "petal_width"]
    files = {}
    for name, n, seed in (("train", 150, 0), ("test", 60, 1)):
        x, ids = flowers(n, seed)
        rows = [[f"{r[0]:.3f}", NAMES[i], *(f"{v:.3f}" for v in r[1:])] for r, i in zip(x, ids)]
        files[name] = write_table(folder / f"{name}.csv", header, rows)
        files[name + "_labels"] = [NAMES[i] for i in ids]
    run = folder / "run"
    result = invoke("train", "--set", f"data.train={files['train']}", "--set", f"data.test={files['test']}",
                    "--set", "data.label_column=species", *QUICK, "--run-dir", run)
    assert result.exit_code == 0, result.output
    return files["train"], files["test"], files["test_labels"], run, result.output


def test_class_names_train_and_are_recorded(iris):
    _, _, _, run, output = iris
    assert "classification, 3 classes: 'setosa', 'versicolor', 'virginica' (label column 'species'); " \
           "layers from 4 features, model.hidden [16], 3 outputs" in output
    assert output.splitlines()[0].startswith("dpbp ") and "[4, 16, 3]" in output.splitlines()[0]
    targets = load_network(run / "model.npz").targets
    assert (targets.task, targets.classes, targets.label_column) == ("classification", NAMES, "species")
    final = re_search(r"test loss [\d.]+ accuracy ([\d.]+)%", output)
    assert float(final) >= 95.0, output


def re_search(pattern: str, text: str) -> str:
    import re

    found = re.search(pattern, text)
    assert found, text
    return found.group(1)


def test_predict_writes_the_original_labels(iris, tmp_path):
    _, test, labels, run, _ = iris
    out = tmp_path / "pred.csv"
    result = invoke("predict", "--model", run / "model.npz", "--input", test, "--label-column", "species",
                    "--output", out)
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["prediction", "prob_setosa", "prob_versicolor", "prob_virginica"]
    predicted = [r[0] for r in rows[1:]]
    probs = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    assert predicted == [NAMES[i] for i in np.argmax(probs, axis=1)]
    assert np.mean(np.array(predicted) == np.array(labels)) >= 0.95
    model, inputs, _ = load_network(run / "model.npz")
    x = np.loadtxt(test, delimiter=",", skiprows=1, usecols=(0, 2, 3, 4))
    np.testing.assert_array_equal(probs.astype(np.float32), model.predict(inputs.apply(x, np.float32)))


def test_evaluate_reports_per_class_scores_and_the_confusion_matrix(iris, tmp_path):
    _, test, labels, run, _ = iris
    out = tmp_path / "pred.csv"
    assert invoke("predict", "--model", run / "model.npz", "--input", test, "--label-column", "species",
                  "--output", out).exit_code == 0
    with open(out, newline="") as fh:
        predicted = [r[0] for r in list(csv.reader(fh))[1:]]
    truth, guess = (np.array([NAMES.index(v) for v in seq]) for seq in (labels, predicted))
    confusion = np.zeros((3, 3), int)
    np.add.at(confusion, (truth, guess), 1)
    result = invoke("evaluate", "--model", run / "model.npz", "--data", test, "--json")  # label column: recorded
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == "classification" and report["classes"] == NAMES and report["n"] == 60
    assert report["confusion_matrix"] == confusion.tolist()
    hits = np.diag(confusion)
    np.testing.assert_allclose(report["precision"], hits / np.maximum(confusion.sum(axis=0), 1))
    np.testing.assert_allclose(report["recall"], hits / confusion.sum(axis=1))
    assert report["support"] == confusion.sum(axis=1).tolist() and report["accuracy"] == hits.sum() / 60
    text = invoke("evaluate", "--model", run / "model.npz", "--data", test).stdout.splitlines()
    assert text[1].split() == ["class", "precision", "recall", "f1", "support"]
    assert text[2].split()[0] == "setosa" and int(text[2].split()[-1]) == confusion[0].sum()
    assert text[5].split()[:2] == ["macro", "avg"] and text[6].split()[:2] == ["weighted", "avg"]
    assert "confusion matrix (rows: true class, columns: predicted class)" in text[7]
    assert text[8].split() == NAMES and [int(v) for v in text[9].split()[1:]] == confusion[0].tolist()


def test_final_metrics_are_written_into_the_run_directory(iris):
    _, _, _, run, _ = iris
    record = json.loads((run / "final_metrics.json").read_text())
    assert set(record) >= {"final", "targets", "val", "test"}
    assert record["test"]["classes"] == NAMES and len(record["test"]["confusion_matrix"]) == 3
    assert record["final"]["test_accuracy"] == record["test"]["accuracy"]
    evaluated = json.loads(invoke("evaluate", "--model", run / "model.npz", "--data", iris[1], "--json").stdout)
    assert evaluated["confusion_matrix"] == record["test"]["confusion_matrix"]


def test_labels_not_seen_in_training_are_one_error(iris, tmp_path):
    _, test, _, run, _ = iris
    lines = test.read_text().splitlines()
    assert "virginica" in lines[6]  # test row 5: ids cycle 0, 1, 2
    lines[6] = lines[6].replace("virginica", "rosa")
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    one_error(dpbp_proc("evaluate", "--model", run / "model.npz", "--data", bad),
              "label not seen in training: 'rosa' (first at line 7)", "the model knows 3 classes")


def test_integer_labels_that_do_not_start_at_0(tmp_path):
    x, ids = flowers(90, 2)
    rows = [[*(f"{v:.3f}" for v in r), 10 * (i + 1)] for r, i in zip(x, ids)]  # labels 10, 20, 30
    data = write_table(tmp_path / "t.csv", None, rows)
    run = tmp_path / "run"
    result = invoke("train", "--set", f"data.train={data}", *QUICK, "--run-dir", run)
    assert result.exit_code == 0, result.output
    assert "3 classes: 10, 20, 30" in result.output and "[4, 16, 3]" in result.output  # no dead classes
    out = tmp_path / "p.csv"
    assert invoke("predict", "--model", run / "model.npz", "--input", data, "--label-column", "last",
                  "--output", out).exit_code == 0
    predicted = np.loadtxt(out, delimiter=",", skiprows=1, usecols=0)
    assert set(predicted.tolist()) <= {10, 20, 30} and np.mean(predicted == 10 * (ids + 1)) >= 0.95


def test_an_n_by_1_integer_label_column_is_class_labels(tmp_path):
    x, ids = flowers(90, 3)
    np.savez(tmp_path / "d.npz", x=x, y=(ids + 1)[:, None])  # (n, 1) labels 1..3
    result = invoke("train", "--set", f"data.train={tmp_path / 'd.npz'}", *QUICK, "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "3 classes: 1, 2, 3" in result.output


def regression_csv(path: Path, n: int, seed: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """Whole-number targets from 25 to 346, like the diabetes data: a smooth function of 3 features."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 3))
    y = np.clip(np.round(180 + 90 * x[:, 0] - 50 * x[:, 1] ** 2 + 40 * x[:, 2]), 25, 346).astype(int)
    x = np.round(x, 4)  # as written
    write_table(path, ["age", "bmi", "bp", "progression"], [[*(f"{v:.4f}" for v in r), t] for r, t in zip(x, y)])
    return path, x, y


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    folder = tmp_path_factory.mktemp("regression")
    train, _, _ = regression_csv(folder / "train.csv", 400, 0)
    test, x, y = regression_csv(folder / "test.csv", 100, 1)
    run = folder / "run"
    result = invoke("train", "--set", f"data.train={train}", "--set", f"data.test={test}", "--set", "model.loss=mse",
                    "--set", "model.output=identity", "--set", "model.hidden=[32]", "--batch-size", "32",
                    "--epochs", "40", "--run-dir", run)
    assert result.exit_code == 0, result.output
    return test, x, y, run, result.output


def test_regression_reports_regression_metrics_and_no_accuracy(regression):
    _, _, _, run, output = regression
    assert "regression, 1 target column (label column 'progression'); targets standardised" in output
    assert "acc" not in output and "classes" not in output
    done = next(line for line in output.splitlines() if line.startswith("done:"))
    assert float(re_search(r"test loss [\d.]+ rmse [\d.]+ mae [\d.]+ R2 ([-\d.]+)", done)) > 0.9, done
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any("accuracy" in key for r in records for key in r)
    last = records[-1]
    for key in ("train_loss", "train_mse", "train_rmse", "val_loss", "val_mse", "val_rmse", "val_mae", "val_r2"):
        assert isinstance(last[key], float), key
    assert last["train_rmse"] == pytest.approx(np.sqrt(last["train_mse"]), rel=1e-12)


def test_regression_metrics_match_the_predictions_in_the_targets_units(regression, tmp_path):
    test, x, y, run, _ = regression
    out = tmp_path / "p.csv"
    result = invoke("predict", "--model", run / "model.npz", "--input", test, "--label-column", "progression",
                    "--output", out)
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines()[0] == "prediction"
    p = np.loadtxt(out, skiprows=1)
    model, inputs, targets = load_network(run / "model.npz")
    exact = targets.output_values(model.predict(inputs.apply(x, np.float32)))[:, 0]  # float64, the targets' units
    np.testing.assert_array_equal(p, exact)
    folded = load_model(run / "model.npz").predict(x)[:, 0]  # both maps folded in: float32 sums of ~100s
    np.testing.assert_allclose(folded, exact, rtol=1e-4)
    report = json.loads(invoke("evaluate", "--model", run / "model.npz", "--data", test, "--json").stdout)
    err = p - y
    assert report["task"] == "regression" and report["n"] == 100 and "accuracy" not in report
    assert report["mse"] == pytest.approx(np.mean(err**2), rel=1e-5)
    assert report["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-5)
    assert report["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-5)
    assert report["r2"] == pytest.approx(1 - np.sum(err**2) / np.sum((y - y.mean()) ** 2), rel=1e-5)
    record = json.loads((run / "final_metrics.json").read_text())
    assert record["test"]["r2"] == pytest.approx(report["r2"], rel=1e-12)


def test_a_regression_model_evaluates_float_npz_targets_and_whole_numbers(regression, tmp_path):
    test, x, y, run, _ = regression
    for name, target in (("whole", y), ("float", y + 0.25)):
        np.savez(tmp_path / f"{name}.npz", x=x, y=target)  # 1-D targets: one column
        result = invoke("evaluate", "--model", run / "model.npz", "--data", tmp_path / f"{name}.npz", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["task"] == "regression"


def test_plot_of_a_regression_draws_rmse(regression, tmp_path):
    pytest.importorskip("matplotlib")
    from dpbp.plot import plot_run

    assert plot_run(regression[3], tmp_path / "r.png").stat().st_size > 10_000


def test_float32_training_keeps_the_digits_of_a_large_offset(tmp_path):
    """A Unix-time feature: cast to float32 before normalising it would keep 2 distinct values."""
    rng = np.random.default_rng(0)
    seconds = rng.uniform(0, 100, 400)
    t = 1.7e9 + seconds
    label = np.where(seconds > 50, "late", "early")
    data = write_table(tmp_path / "t.csv", ["time", "noise", "when"],
                       [[f"{a:.3f}", f"{b:.3f}", c] for a, b, c in zip(t, rng.normal(size=400), label)])
    run = tmp_path / "run"
    result = invoke("train", "--set", f"data.train={data}", "--set", "model.hidden=[16]", "--epochs", "40",
                    "--batch-size", "32", "--set", "train.lr=0.02", "--run-dir", run)
    assert result.exit_code == 0, result.output
    assert float(re_search(r"val loss [\d.]+ accuracy ([\d.]+)%", result.output.splitlines()[-1])) == 100.0
    raw = tmp_path / "raw.csv"  # predict on raw inputs: the saved float64 normaliser maps them first
    write_table(raw, None, [[f"{1.7e9 + s:.3f}", "0"] for s in (10.0, 45.0, 55.0, 90.0)])
    out = tmp_path / "p.csv"
    assert invoke("predict", "--model", run / "model.npz", "--input", raw, "--output", out).exit_code == 0
    assert [line.split(",")[0] for line in out.read_text().splitlines()[1:]] == ["early", "early", "late", "late"]


def test_a_single_class_is_refused_and_a_class_missing_from_the_split_warned_once(tmp_path):
    x, _ = flowers(60, 4)
    one = write_table(tmp_path / "one.csv", None, [[*r, "setosa"] for r in x])
    one_error(dpbp_proc("train", "--set", f"data.train={one}", "--run-dir", tmp_path / "r1"),
              "the labels hold a single class (1 class: 'setosa')")
    assert not (tmp_path / "r1").exists()
    rare = [[*r, "setosa" if i else "rosa"] for i, r in enumerate(x)]  # one row of 'rosa'
    data = write_table(tmp_path / "rare.csv", None, rare)
    seeds = [s for s in range(40) if 0 in np.random.default_rng(s).permutation(60)[:6]]  # 'rosa' in validation
    result = invoke("train", "--set", f"data.train={data}", *QUICK, "--epochs", "1", "--seed", seeds[0],
                    "--run-dir", tmp_path / "r2")
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: class 'rosa' of data.train has no rows in the training split") == 1
    assert result.output.count("the training split holds a single class") == 1


def test_hidden_takes_the_widths_from_the_data_and_conflicts_with_layers(tmp_path):
    x, ids = flowers(60, 5)
    np.savez(tmp_path / "d.npz", x=x, y=ids)
    result = invoke("train", "--set", f"data.train={tmp_path / 'd.npz'}", "--set", "model.hidden=[7, 5]",
                    "--epochs", "1", "--run-dir", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "[4, 7, 5, 3]" in result.output.splitlines()[0]
    assert list(load_model(tmp_path / "r" / "model.npz").sizes) == [4, 7, 5, 3]
    one_error(dpbp_proc("train", "--set", f"data.train={tmp_path / 'd.npz'}", "--set", "model.hidden=[7]",
                        "--set", "model.layers=[4,8,3]", "--run-dir", tmp_path / "r2"),
              "config model.hidden: [7] disagrees with model.layers = [4, 8, 3]")
    one_error(dpbp_proc("train", "--set", f"data.train={tmp_path / 'd.npz'}", "--set", "model.layers=[4,8,4]",
                        "--run-dir", tmp_path / "r3"),
              "(4 features, 3 outputs)", "model.layers=[4, 8, 3]")


def test_a_sigmoid_regression_of_targets_outside_0_1_is_warned_about(tmp_path):
    train, _, _ = regression_csv(tmp_path / "t.csv", 60, 2)
    result = invoke("train", "--set", f"data.train={train}", "--set", "model.loss=mse", "--set", "model.output=sigmoid",
                    "--epochs", "1", "--run-dir", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: a sigmoid output predicts values in (0, 1), but the training targets") == 1


def test_evaluate_and_predict_read_tables_with_the_models_header_setting(tmp_path):
    """A header of numbers needs data.header = true; evaluate and predict then read the same way."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4))
    y = (x[:, 0] > 0).astype(int) + 1  # labels 1 and 2
    path = write_table(tmp_path / "numhdr.csv", ["1", "2", "3", "4", "5"], np.c_[x, y])
    run = tmp_path / "run"
    assert invoke("train", "--set", f"data.train={path}", "--set", "data.header=true", "--epochs", "2",
                  "--run-dir", run).exit_code == 0
    ev = invoke("evaluate", "--model", run / "model.npz", "--data", path, "--json")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["n"] == 120
    out = tmp_path / "p.csv"
    pr = invoke("predict", "--model", run / "model.npz", "--input", path, "--label-column", "last", "--output", out)
    assert pr.exit_code == 0, pr.output
    assert len(out.read_text().splitlines()) == 1 + 120  # its header row, then one line per data row


def test_numeric_labels_that_are_mostly_one_row_each_get_a_regression_hint(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = np.round(150 + 80 * x[:, 0] + 5 * rng.normal(size=200))  # whole-number targets read as class labels
    path = write_table(tmp_path / "counts.csv", ["a", "b", "c", "progression"], np.c_[x, y])
    result = invoke("train", "--set", f"data.train={path}", "--epochs", "1", "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert result.output.count("classes have a single training row: if the labels are numbers to predict, "
                               "this is a regression") == 1, result.output
