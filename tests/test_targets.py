"""Tests for dpbp.targets: the task follows the model, labels of any kind, the recorded mapping, target scaling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpbp.errors import CheckpointError, DataError
from dpbp.ops import task_of
from dpbp.targets import Targets


@pytest.mark.parametrize("loss, output, task", [
    ("cross_entropy", "softmax", "classification"),
    ("mse", "softmax", "classification"),  # the textbook MSE classifier takes class labels
    ("mse", "identity", "regression"),
    ("mse", "sigmoid", "regression"),
    ("binary_cross_entropy", "sigmoid", "binary"),
])
def test_task_of_the_model(loss, output, task):
    assert task_of(loss, output) == task


def test_the_same_whole_numbers_are_targets_or_labels_as_the_model_says():
    y = np.array([25, 137, 346, 25, 137])  # the diabetes targets look like class ids
    reg = Targets.fit("regression", y)
    assert (reg.outputs, reg.classes) == (1, None)
    np.testing.assert_array_equal(reg.encode(y), [[25.0], [137.0], [346.0], [25.0], [137.0]])
    cls = Targets.fit("classification", y)
    assert cls.classes == [25, 137, 346] and cls.outputs == 3
    np.testing.assert_array_equal(cls.encode(y), [0, 1, 2, 0, 1])
    floats = np.array([0.5, 2.0, 1.25])  # a 1-D float target is one column
    assert Targets.fit("regression", floats).encode(floats).shape == (3, 1)


@pytest.mark.parametrize("labels, classes, ids", [
    (["b", "a", "c", "a"], ["a", "b", "c"], [1, 0, 2, 0]),
    ([3, 1, 2, 3], [1, 2, 3], [2, 0, 1, 2]),  # 1..3 without a dead class 0
    ([10, 2, 7], [2, 7, 10], [2, 0, 1]),  # not contiguous; sorted as numbers
    ([" 10", "9", "1.0"], [1, 9, 10], [2, 1, 0]),  # text that is all numbers is numbers: 9 < 10
    (["10", "9", "x"], ["10", "9", "x"], [0, 1, 2]),  # any text: all text, sorted by code point
    ([1.0, 2.0, 1.0], [1, 2], [0, 1, 0]),  # whole-number floats are the integer labels
    ([0.5, 1.5, 0.5], [0.5, 1.5], [0, 1, 0]),
    ([True, False], [0, 1], [1, 0]),
])
def test_labels_map_by_their_sorted_unique_values(labels, classes, ids):
    y = np.array(labels)
    targets = Targets.fit("classification", y)
    assert targets.classes == classes
    assert all(type(a) is type(b) for a, b in zip(targets.classes, classes))
    np.testing.assert_array_equal(targets.encode(y), ids)
    assert targets.decode(np.array(ids)) == [classes[i] for i in ids]


def test_an_n_by_1_integer_column_holds_labels_and_wider_rows_are_targets():
    column = np.array([[2], [0], [2], [1]])
    targets = Targets.fit("classification", column)
    assert targets.classes == [0, 1, 2]
    assert targets.encode(column).tolist() == [2, 0, 2, 1]
    rows = np.array([[0.2, 0.8], [1.0, 0.0]])  # soft labels: one target row per sample
    soft = Targets.fit("classification", rows)
    assert (soft.classes, soft.outputs) == (None, 2)
    np.testing.assert_array_equal(soft.encode(rows, dtype=np.float32), rows.astype(np.float32))
    with pytest.raises(DataError, match=r"sum to 1 .* first at row 1 with sum 1.1"):
        soft.encode(np.array([[0.5, 0.5], [0.5, 0.6]]))


def lines(i: int) -> str:
    return f"line {i + 2}"


def test_labels_not_seen_in_training_are_named_with_their_line():
    targets = Targets.fit("classification", np.array(["setosa", "virginica"]))
    with pytest.raises(DataError, match=r"^test: labels not seen in training: 'iris' \(first at line 3\), 'rose' "
                                        r"\(first at line 4\); the model knows 2 classes: 'setosa', 'virginica'$"):
        targets.encode(np.array(["setosa", "iris", "rose", "iris"]), where=lines, pre="test: ")
    numbers = Targets.fit("classification", np.array([1, 2, 3]))
    with pytest.raises(DataError, match=r"label not seen in training: 4 \(first at line 2\)"):
        numbers.encode(np.array([4, 1]), where=lines)
    with pytest.raises(DataError, match=r"label not seen in training: 'x' \(first at row 1\);"):
        numbers.encode(np.array(["1", "x"]))  # text that is a number matches the numbers


def test_numbers_match_text_labels_by_their_text():
    targets = Targets.fit("classification", np.array(["1", "2", "b"]))  # one text label: all are text
    np.testing.assert_array_equal(targets.encode(np.array([2, 1, 2])), [1, 0, 1])
    np.testing.assert_array_equal(targets.encode(np.array([2.0, 1.0])), [1, 0])


@pytest.mark.parametrize("labels, message", [
    (np.array(["a", " ", "b"]), "the label is empty at line 3"),
    (np.array([1.0, np.nan, 2.0]), "the label is nan at line 3"),
    (np.array(["1", "nan"]), "the label is nan at line 3"),
    (np.array(["a", "b", "NaN"]), "the label is 'NaN' at line 4, a missing value"),  # among text labels too
    (np.array(["a", "NA", "b"]), "the label is 'NA' at line 3, a missing value"),
    (np.array(["a", "b", "#N/A"]), "the label is '#N/A' at line 4, a missing value"),
    (np.array(["?", "a"]), "the label is '\\?' at line 2, a missing value"),
])
def test_empty_and_nan_labels_are_named(labels, message):
    with pytest.raises(DataError, match=message):
        Targets.fit("classification", labels, where=lines)


@pytest.mark.parametrize("task, y, message", [
    ("regression", np.array(["1.5", "abc"]), "regression targets must be numbers, found text at line 3 .*entropy"),
    ("regression", np.array([1.0, np.inf]), "the target is inf at line 3"),
    ("binary", np.array(["yes", "no"]), "binary targets must be numbers, found text at line 2 .*= cross_entropy"),
])
def test_targets_must_be_numbers(task, y, message):
    with pytest.raises(DataError, match=message):
        Targets.fit(task, y, where=lines)


def test_binary_targets_lie_in_0_1():
    targets = Targets.fit("binary", np.array([0, 1, 1]))
    np.testing.assert_array_equal(targets.encode(np.array([0.25, 1.0])), [[0.25], [1.0]])
    with pytest.raises(DataError, match=r"targets in \[0, 1\], found 2 at line 3"):
        targets.encode(np.array([1, 2]), where=lines)


def test_regression_targets_are_scaled_from_the_training_rows_and_reported_unscaled():
    y = np.array([1.7e9 + 1, 1.7e9 + 3, 1.7e9 + 5, 0.0])  # the last row is not training data
    targets = Targets.fit("regression", y, normalize="standard", rows=np.array([0, 1, 2]))
    assert targets.shift[0] == 1.7e9 + 3 and targets.scale[0] == pytest.approx(1 / np.sqrt(8 / 3), rel=1e-12)
    scaled = targets.encode(y[:3], dtype=np.float32)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled[:, 0], [-1.2247449, 0.0, 1.2247449], rtol=1e-6)  # digits kept: fitted in float64
    np.testing.assert_allclose(targets.output_values(scaled)[:, 0], y[:3], rtol=0, atol=1e-6 * 1.7e9 * 1e-6)
    constant = Targets.fit("regression", np.array([5.0, 5.0]), normalize="standard")
    assert constant.scale[0] == 1.0  # not a division by zero
    with pytest.raises(ValueError, match="regression"):
        Targets.fit("binary", np.array([0, 1]), normalize="standard")


def test_the_record_round_trips_through_json_and_refuses_malformed_ones():
    y = np.array(["b", "a"])
    for targets in (Targets.fit("classification", y, label_column="species", label_name="species"),
                    Targets.fit("regression", np.array([1.0, 3.0]), normalize="standard"),
                    Targets.fit("classification", np.array([0.5, 1.5]))):
        meta = json.loads(json.dumps(targets.to_meta()))
        back = Targets.from_meta(meta, targets.to_arrays())
        assert back.to_meta() == targets.to_meta()
        for name, value in targets.to_arrays().items():
            np.testing.assert_array_equal(value, back.to_arrays()[name])
    good = Targets.fit("classification", y).to_meta()
    for bad in ({**good, "classes": [True, False]}, {**good, "outputs": 3}, {**good, "task": "ranking"},
                {**good, "classes": ["a", 1]}, {**good, "normalize": "log"}, [1, 2]):
        with pytest.raises(CheckpointError, match="malformed targets record"):
            Targets.from_meta(bad, {})
