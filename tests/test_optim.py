"""Optimizers (in place on flat buffers, exact state round-trips) and learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import small_config

from dpbp.optim import OPTIMIZERS, LRSchedule, make_optimizer

HYPER = {
    "sgd": {},
    "momentum": {"momentum": 0.9, "nesterov": False},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "rmsprop": {"rho": 0.9, "eps": 1e-8},
    "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01},
}
NAMES = {"nesterov": "momentum", "adamw": "adam"}


def build(key, n=5, dtype="float64"):
    return make_optimizer(NAMES.get(key, key), n, dtype, **HYPER[key])


def quadratic_grad(params, target):
    return params - target  # gradient of 1/2 |p - target|^2


@pytest.mark.parametrize("key", list(HYPER))
def test_each_optimizer_minimises_a_quadratic(key):
    target = np.array([1.0, -2.0, 0.5, 3.0, 0.0])
    params = np.zeros(5)
    opt = build(key)
    lr = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "rmsprop": 0.01, "adam": 0.05, "adamw": 0.05}[key]
    for _ in range(2000):
        opt.step(params, quadratic_grad(params, target), lr)
    tol = 0.05 if key == "adamw" else 1e-3  # decoupled decay pulls the optimum slightly toward 0
    np.testing.assert_allclose(params, target, atol=tol)


def test_update_rules_match_their_formulas_for_two_steps():
    g1, g2 = np.array([0.5, -1.0]), np.array([0.25, 2.0])
    lr = 0.1
    # momentum
    p = np.array([1.0, 1.0])
    opt = make_optimizer("momentum", 2, "float64", momentum=0.9)
    opt.step(p, g1.copy(), lr)
    opt.step(p, g2.copy(), lr)
    v1 = g1
    v2 = 0.9 * v1 + g2
    np.testing.assert_allclose(p, 1.0 - lr * v1 - lr * v2, rtol=1e-15)
    # nesterov
    p = np.array([1.0, 1.0])
    opt = make_optimizer("momentum", 2, "float64", momentum=0.9, nesterov=True)
    opt.step(p, g1.copy(), lr)
    opt.step(p, g2.copy(), lr)
    np.testing.assert_allclose(p, 1.0 - lr * (g1 + 0.9 * v1) - lr * (g2 + 0.9 * v2), rtol=1e-15)
    # rmsprop
    p = np.array([1.0, 1.0])
    opt = make_optimizer("rmsprop", 2, "float64", rho=0.9, eps=1e-8)
    opt.step(p, g1.copy(), lr)
    opt.step(p, g2.copy(), lr)
    s1 = 0.1 * g1**2
    s2 = 0.9 * s1 + 0.1 * g2**2
    np.testing.assert_allclose(p, 1.0 - lr * g1 / (np.sqrt(s1) + 1e-8) - lr * g2 / (np.sqrt(s2) + 1e-8), rtol=1e-13)
    # adam with decoupled weight decay
    p = np.array([1.0, 1.0])
    ref = p.copy()
    opt = make_optimizer("adam", 2, "float64", beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    m = v = np.zeros(2)
    for t, g in enumerate([g1, g2], start=1):
        opt.step(p, g.copy(), lr)
        ref = ref * (1 - lr * 0.1)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    # sgd
    p = np.array([1.0, 1.0])
    make_optimizer("sgd", 2, "float64").step(p, g1.copy(), lr)
    np.testing.assert_array_equal(p, 1.0 - lr * g1)


@pytest.mark.parametrize("key", list(HYPER))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_state_round_trip_continues_bit_identically(key, dtype):
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=7).astype(dtype) for _ in range(10)]
    a_params = rng.normal(size=7).astype(dtype)
    a = build(key, 7, dtype)
    for g in grads[:5]:
        a.step(a_params, g.copy(), 0.01)
    saved_state, saved_params = a.state_dict(), a_params.copy()
    for g in grads[5:]:
        a.step(a_params, g.copy(), 0.01)

    b = build(key, 7, dtype)
    b.load_state_dict({k: v.copy() for k, v in saved_state.items()})
    b_params = saved_params
    for g in grads[5:]:
        b.step(b_params, g.copy(), 0.01)
    np.testing.assert_array_equal(a_params, b_params)
    assert b.t == 10
    assert all(v.dtype == np.dtype(dtype) for k, v in b.state_dict().items() if k != "t")


def test_float32_update_stays_float32_with_float64_scalars():
    p = np.ones(4, np.float32)
    for name in OPTIMIZERS:
        opt = make_optimizer(name, 4, "float32")
        opt.step(p, np.ones(4, np.float32), np.float64(0.1))
        assert p.dtype == np.float32


def test_bad_state_and_names_are_rejected():
    opt = make_optimizer("adam", 3)
    with pytest.raises(ValueError, match="needs"):
        opt.load_state_dict({"m": np.zeros(3, np.float32), "t": np.array(1)})
    with pytest.raises(ValueError, match="must be"):
        opt.load_state_dict({"m": np.zeros(4, np.float32), "v": np.zeros(3, np.float32), "t": np.array(1)})
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        make_optimizer("lbfgs", 3)
    with pytest.raises(ValueError, match="shape"):
        opt.step(np.zeros(4, np.float32), np.zeros(4, np.float32), 0.1)


def test_schedules():
    const = LRSchedule(0.1)
    assert const(0) == const(1000) == 0.1
    step = LRSchedule(0.1, "step", step_size=10, gamma=0.5)
    assert [step(0), step(9), step(10), step(25)] == [0.1, 0.1, 0.05, 0.025]
    cos = LRSchedule(1.0, "cosine", total_steps=100, min_lr=0.1)
    assert cos(0) == 1.0 and math.isclose(cos(50), 0.55) and math.isclose(cos(100), 0.1)
    assert all(cos(i) >= cos(i + 1) for i in range(100))
    warm = LRSchedule(1.0, "cosine", total_steps=110, warmup_steps=10)
    assert [warm(0), warm(4), warm(9)] == [0.1, 0.5, 1.0] and warm(10) == 1.0
    assert math.isclose(warm(60), 0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        LRSchedule(0.1, "exp")
    with pytest.raises(ValueError, match="> 0"):
        LRSchedule(0.0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_gradient_scaling_over_chunks_equals_scaling_first(name):
    from dpbp.optim import CHUNK_ELEMENTS

    n = 3 * CHUNK_ELEMENTS + 123  # several chunks and a ragged last one
    rng = np.random.default_rng(1)
    sums = [rng.normal(size=n).astype(np.float32) * 40 for _ in range(3)]
    first, fused = make_optimizer(name, n, "float32"), make_optimizer(name, n, "float32")
    p1 = rng.normal(size=n).astype(np.float32)
    p2 = p1.copy()
    for g in sums:
        first.step(p1, g * (1 / 40), 0.01)
        fused.step(p2, g.copy(), 0.01, grad_scale=1 / 40)
    np.testing.assert_array_equal(p1, p2)


@pytest.mark.parametrize("key", list(HYPER))
def test_a_known_squared_norm_changes_nothing_but_the_dots(key):
    """``squares`` (the trainer's per-layer norms) may skip the per-chunk dots only when no chunk could overflow."""
    from dpbp.optim import CHUNK_ELEMENTS

    n = 2 * CHUNK_ELEMENTS + 9
    rng = np.random.default_rng(4)
    params = rng.normal(size=n).astype(np.float32)
    grads = [rng.normal(size=n).astype(np.float32) for _ in range(3)]
    grads[1][CHUNK_ELEMENTS + 3] = 1e25  # squares beyond float32: this step needs the wide path
    plain, hinted = build(key, n, "float32"), build(key, n, "float32")
    p1, p2 = params.copy(), params.copy()
    for g in grads:
        plain.step(p1, g * np.float32(2), 0.01, grad_scale=0.5)
        squares = float(np.dot(g.astype(np.float64), g.astype(np.float64)))  # of grads * grad_scale
        with np.errstate(over="raise"):
            hinted.step(p2, g * np.float32(2), 0.01, grad_scale=0.5, squares=squares)
        np.testing.assert_array_equal(p1, p2)
    assert np.all(np.isfinite(p2))


def test_moved_state_continues_the_same_updates():
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=5) for _ in range(3)]
    plain, moved = build("adam"), build("adam")
    p1, p2 = np.zeros(5), np.zeros(5)
    plain.step(p1, grads[0].copy(), 0.1)
    moved.step(p2, grads[0].copy(), 0.1)
    homes = {k: np.empty(5) for k in moved.state_names}
    moved.move_state(homes)  # copies m and v over, then updates them there
    for g in grads[1:]:
        plain.step(p1, g.copy(), 0.1)
        moved.step(p2, g.copy(), 0.1)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(homes["m"], plain.state["m"])
    with pytest.raises(ValueError, match="needs buffers"):
        moved.move_state({"m": np.zeros(5)})


def test_all_finite_is_exact_also_when_squares_overflow():
    from dpbp.optim import all_finite

    x = np.ones(1000, np.float32)
    assert all_finite(x)
    x[10] = 3e38  # finite, but its square overflows float32: the exact check decides
    assert all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[999] = bad
        assert not all_finite(y)


def reference_run(key, params, grads, lr, dtype):
    """The textbook update formulas, evaluated in a wider dtype than ``dtype`` step by step.

    Between steps the parameters and state are stored in ``dtype`` like the optimizer
    stores them, the state saturated at ``finfo(dtype).max`` as documented in dpbp.optim.
    """
    wide = np.float64 if np.dtype(dtype) == np.float32 else np.longdouble
    limit = np.finfo(dtype).max
    h, name = HYPER[key], NAMES.get(key, key)
    p = params.astype(wide)
    state: dict[str, np.ndarray] = {}
    for t, g in enumerate(grads, start=1):
        g = g.astype(wide)
        if name == "sgd":
            p = p - lr * g
        elif name == "momentum":
            v = h["momentum"] * state.get("velocity", 0.0) + g
            p = p - lr * (g + h["momentum"] * v if h["nesterov"] else v)
            state["velocity"] = v
        elif name == "rmsprop":
            s = h["rho"] * state.get("square_avg", 0.0) + (1 - h["rho"]) * g * g
            p = p - lr * g / (np.sqrt(s) + h["eps"])
            state["square_avg"] = s
        else:
            m = h["beta1"] * state.get("m", 0.0) + (1 - h["beta1"]) * g
            v = h["beta2"] * state.get("v", 0.0) + (1 - h["beta2"]) * g * g
            p = p * (1 - lr * h["weight_decay"])
            p = p - lr * (m / (1 - h["beta1"] ** t)) / (np.sqrt(v / (1 - h["beta2"] ** t)) + h["eps"])
            state.update(m=m, v=v)
        state = {k: np.clip(s, -limit, limit).astype(dtype).astype(wide) for k, s in state.items()}
        p = p.astype(dtype).astype(wide)
    return p.astype(dtype), {k: s.astype(dtype) for k, s in state.items()}


@pytest.mark.parametrize("big", [1e20, 1e30, 3e38])  # g^2 overflows float32 above 1.8e19
@pytest.mark.parametrize("key", list(HYPER))
def test_huge_finite_float32_gradients_give_the_float64_update(key, big):
    from dpbp.optim import CHUNK_ELEMENTS

    n = 2 * CHUNK_ELEMENTS + 77  # chunk 0: ordinary gradients; chunk 1: some huge ones too; a ragged tail
    rng = np.random.default_rng(5)
    params = rng.normal(size=n).astype(np.float32)
    grads = [rng.normal(size=n).astype(np.float32) for _ in range(4)]
    huge = np.arange(CHUNK_ELEMENTS, 2 * CHUNK_ELEMENTS, 997)
    grads[0][huge], grads[1][huge], grads[2][huge] = big, big, -big / 3  # then an ordinary step on that state
    opt, p = build(key, n, "float32"), params.copy()
    saturated = set()
    for steps, g in enumerate(grads, start=1):
        with np.errstate(all="raise"):  # no overflow anywhere, not even a hidden one
            opt.step(p, g.copy(), 0.01)
        ref_p, ref_state = reference_run(key, params, grads[:steps], 0.01, np.float32)
        assert np.all(np.isfinite(p)) and all(np.all(np.isfinite(s)) for s in opt.state.values())
        np.testing.assert_allclose(p, ref_p, rtol=2e-6, atol=1e-6)
        for k, s in opt.state.items():
            np.testing.assert_allclose(s, ref_state[k], rtol=2e-6, atol=1e-6)
            if np.any(s == np.finfo(np.float32).max):
                saturated.add(k)
    expect = {1e20: {"square_avg"}, 1e30: {"square_avg", "v"}, 3e38: {"square_avg", "v", "velocity"}}[big]
    assert saturated == expect & set(opt.state_names)  # the documented saturation happens, and only there


@pytest.mark.parametrize("key", ["rmsprop", "adam"])
def test_huge_finite_float64_gradients_are_exact_in_long_double(key):
    if np.finfo(np.longdouble).max <= np.finfo(np.float64).max:  # documented: float64 state saturates there
        pytest.fail("this platform's long double is no wider than float64; extend the reference first")
    n, rng = 1000, np.random.default_rng(6)
    params = rng.normal(size=n)
    grads = [rng.normal(size=n) for _ in range(3)]
    grads[0][::7], grads[1][::7] = 1e160, -1e300
    opt, p = build(key, n, "float64"), params.copy()
    for g in grads:
        opt.step(p, g.copy(), 0.01)
    ref_p, ref_state = reference_run(key, params, grads, 0.01, np.float64)
    np.testing.assert_allclose(p, ref_p, rtol=1e-14, atol=1e-14)
    for k, s in opt.state.items():
        np.testing.assert_allclose(s, ref_state[k], rtol=1e-14, atol=1e-15)


def test_a_warmup_shorter_than_half_a_step_is_refused_not_ignored():
    from dpbp.comm import SerialComm
    from dpbp.errors import ConfigError
    from dpbp.train import Trainer

    cfg = small_config("train.warmup_epochs=0.01")  # a fraction of one step: would round to no warm-up
    with pytest.raises(ConfigError, match=r"train.warmup_epochs: 0.01 epochs of \d+ steps round to 0 warm-up steps"):
        Trainer(cfg, SerialComm(), echo=lambda text: None)
    trainer = Trainer(small_config("train.warmup_epochs=0.5"), SerialComm(), echo=lambda text: None)
    assert trainer.schedule.warmup_steps >= 1
