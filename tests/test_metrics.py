"""Tests for dpbp.metrics and train.evaluate's reports: a model whose every prediction is known."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from dpbp import MLP
from dpbp.comm import SerialComm
from dpbp.data import Dataset
from dpbp.metrics import classification_report, regression_report
from dpbp.targets import Targets
from dpbp.train import evaluate


def argmax_model() -> MLP:
    """A 3-3 softmax layer with W = I, b = 0: it predicts the class of the largest input."""
    model = MLP([3, 3], output="softmax", loss="cross_entropy", dtype="float64")
    model.weights[0][...] = np.eye(3)
    model.biases[0][...] = 0.0
    return model


def crafted():
    """Rows whose true classes and predictions give a confusion matrix that is not symmetric."""
    pairs = [(0, 0)] * 4 + [(0, 1)] * 2 + [(1, 1)] * 3 + [(2, 0)] * 1 + [(2, 2)] * 5 + [(1, 2)] * 1
    truth = np.array([t for t, _ in pairs])
    x = np.eye(3)[[p for _, p in pairs]] * 2.0
    expected = np.zeros((3, 3), int)
    for t, p in pairs:
        expected[t, p] += 1
    return x, truth, expected


def test_evaluate_reports_the_confusion_matrix_rows_true_columns_predicted():
    x, truth, expected = crafted()
    targets = Targets.fit("classification", np.array(["a", "b", "c"]))
    report = evaluate(argmax_model(), Dataset(x, truth, "crafted"), SerialComm(), targets)
    assert report["confusion_matrix"] == expected.tolist()
    assert report["classes"] == ["a", "b", "c"] and report["n"] == len(truth)
    for k in range(3):
        precision = expected[k, k] / expected[:, k].sum()
        recall = expected[k, k] / expected[k, :].sum()
        assert report["precision"][k] == pytest.approx(precision, rel=1e-15)
        assert report["recall"][k] == pytest.approx(recall, rel=1e-15)
        assert report["f1"][k] == pytest.approx(2 * precision * recall / (precision + recall), rel=1e-15)
    assert report["accuracy"] == np.trace(expected) / len(truth)
    support = expected.sum(axis=1)
    assert report["weighted_f1"] == pytest.approx(np.dot(report["f1"], support) / support.sum(), rel=1e-15)
    assert report["macro_recall"] == pytest.approx(np.mean(report["recall"]), rel=1e-15)


def test_scores_with_nothing_to_divide_are_zero():
    report = classification_report(np.array([[2, 0], [3, 0]]))  # class 1 never predicted
    assert report["precision"] == [0.4, 0.0] and report["recall"] == [1.0, 0.0] and report["f1"][1] == 0.0


def test_binary_outputs_get_a_two_class_report():
    model = MLP([1, 1], output="sigmoid", loss="binary_cross_entropy", dtype="float64")
    model.weights[0][...] = 10.0
    model.biases[0][...] = 0.0  # predicts 1 for x > 0
    x = np.array([[1.0], [2.0], [-1.0], [-3.0], [0.5]])
    y = np.array([[1.0], [0.0], [0.0], [1.0], [0.9]])  # soft targets count as their side of 0.5
    report = evaluate(model, Dataset(x, y, "b"), SerialComm())
    assert report["classes"] == [0, 1] and report["confusion_matrix"] == [[1, 1], [1, 2]]
    assert report["accuracy"] == 3 / 5


def test_regression_report_against_numpy():
    rng = np.random.default_rng(0)
    y = rng.normal(5.0, 3.0, size=(50, 2))
    p = y + rng.normal(size=(50, 2))
    e = p - y
    sst = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    report = regression_report(50, (e**2).sum(axis=0), np.abs(e).sum(axis=0), sst)
    assert report["mse"] == pytest.approx(np.mean(e**2), rel=1e-14)
    assert report["rmse"] == pytest.approx(math.sqrt(np.mean(e**2)), rel=1e-14)
    assert report["mae"] == pytest.approx(np.mean(np.abs(e)), rel=1e-14)
    r2 = 1 - (e**2).sum(axis=0) / sst
    assert report["r2"] == pytest.approx(r2.mean(), rel=1e-14) and report["r2_columns"] == pytest.approx(r2)
    constant = regression_report(3, np.array([0.0]), np.array([0.0]), np.array([0.0]))
    assert constant["r2"] == 1.0  # a constant target predicted exactly


def test_evaluate_regression_in_the_targets_units_with_a_far_mean():
    """R^2 about the global mean in float64: targets near 1e9 with a spread of 1 lose nothing."""
    rng = np.random.default_rng(1)
    raw = 1e9 + rng.normal(size=200)
    x = rng.normal(size=(200, 1))
    targets = Targets.fit("regression", raw + 3.0, normalize="standard")  # fitted on other data: not centred here
    model = MLP([1, 1], output="identity", loss="mse", dtype="float64")
    model.weights[0][...] = 0.5
    model.biases[0][...] = 0.1
    report = evaluate(model, Dataset(x, targets.encode(raw), "far"), SerialComm(), targets)
    # The reference unscales exactly (fractions): in float64, 1e9 + e keeps only about 1e-7 of e.
    scale, shift = Fraction(float(targets.scale[0])), Fraction(float(targets.shift[0]))
    e = np.array([float(Fraction(p) / scale + shift - Fraction(t)) for p, t in zip(model.predict(x)[:, 0], raw)])
    assert report["mse"] == pytest.approx(np.mean(e**2), rel=1e-9)
    assert report["mae"] == pytest.approx(np.mean(np.abs(e)), rel=1e-9)
    assert report["r2"] == pytest.approx(1 - np.sum(e**2) / np.sum((raw - raw.mean()) ** 2), rel=1e-9)
    assert report["loss"] == pytest.approx(0.5 * np.mean((model.predict(x)[:, 0] - targets.encode(raw)[:, 0]) ** 2),
                                           rel=1e-12)  # the training loss: half the squared error, scaled targets


def test_macro_averages_leave_out_classes_absent_from_data_and_predictions():
    """scikit-learn's rule: a class that neither occurs nor is predicted does not pull the macro average down."""
    report = classification_report(np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0]]))  # one row of class 0, right
    assert report["macro_precision"] == report["macro_recall"] == report["macro_f1"] == 1.0
    report = classification_report(np.array([[1, 1, 0], [0, 0, 0], [0, 0, 0]]))  # class 1 predicted, never true
    assert report["macro_recall"] == 0.25 and report["macro_precision"] == 0.5  # as scikit-learn, zero_division=0
