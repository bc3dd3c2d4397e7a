"""One weight-decay rule: L2 for sgd, momentum and rmsprop; decoupled for adam (PyTorch's SGD/RMSprop, AdamW).

The reference here is written from the update equations in PyTorch's documentation (the
pseudocode of ``torch.optim.SGD``, ``torch.optim.RMSprop`` and ``torch.optim.AdamW``), in
float64, independently of dpbp's fused chunked code. It was checked once against torch 2.13.0
itself with ``scripts/check_weight_decay_torch.py`` (figures in scripts/bench/README.md), so the
suite needs no PyTorch.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import small_config

from dpbp.comm import SerialComm
from dpbp.optim import make_optimizer
from dpbp.train import Trainer

# dpbp key -> (dpbp optimizer, its keywords, the PyTorch algorithm and its hyper-parameters)
CASES = {
    "sgd": ("sgd", {}, {"momentum": 0.0, "nesterov": False}),
    "momentum": ("momentum", {"momentum": 0.9}, {"momentum": 0.9, "nesterov": False}),
    "nesterov": ("momentum", {"momentum": 0.8, "nesterov": True}, {"momentum": 0.8, "nesterov": True}),
    "rmsprop": ("rmsprop", {"rho": 0.95, "eps": 1e-6}, {"alpha": 0.95, "eps": 1e-6}),
    "adam": ("adam", {"beta1": 0.8, "beta2": 0.99, "eps": 1e-7}, {"betas": (0.8, 0.99), "eps": 1e-7}),
}


def torch_reference(name: str, h: dict, params: np.ndarray, grads: list[np.ndarray], lrs: list[float],
                    wd: float) -> np.ndarray:
    """theta after len(grads) steps of PyTorch's documented algorithm (float64, no in-place tricks)."""
    theta = params.astype(np.float64).copy()
    b = m = v = None
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        if name == "adam":  # AdamW: theta <- theta - lr wd theta, then Adam with bias correction
            theta = theta - lr * wd * theta
            m = (1 - h["betas"][0]) * g if m is None else h["betas"][0] * m + (1 - h["betas"][0]) * g
            v = (1 - h["betas"][1]) * g * g if v is None else h["betas"][1] * v + (1 - h["betas"][1]) * g * g
            m_hat, v_hat = m / (1 - h["betas"][0] ** t), v / (1 - h["betas"][1] ** t)
            theta = theta - lr * m_hat / (np.sqrt(v_hat) + h["eps"])
            continue
        g = g + wd * theta  # L2: weight_decay != 0
        if name == "rmsprop":  # v <- alpha v + (1 - alpha) g^2; theta <- theta - lr g / (sqrt(v) + eps)
            v = (1 - h["alpha"]) * g * g if v is None else h["alpha"] * v + (1 - h["alpha"]) * g * g
            theta = theta - lr * g / (np.sqrt(v) + h["eps"])
            continue
        if h["momentum"]:  # b_1 = g_1; b_t = mu b_{t-1} + g_t (dampening 0)
            b = g if b is None else h["momentum"] * b + g
            g = g + h["momentum"] * b if h["nesterov"] else b
        theta = theta - lr * g
    return theta


@pytest.mark.parametrize("wd", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("key", list(CASES))
def test_weight_decay_follows_pytorch(key, wd):
    name, mine, theirs = CASES[key]
    rng = np.random.default_rng(11)
    n, count = 300, 7  # gradient SUMS over 7 rows, divided by the optimizer (grad_scale)
    params = rng.normal(size=n)
    sums = [rng.normal(size=n) * count for _ in range(5)]
    lrs = [0.1, 0.05, 0.05, 0.02, 0.01]
    opt, p = make_optimizer(name, n, "float64", weight_decay=wd, **mine), params.copy()
    for g, lr in zip(sums, lrs):
        opt.step(p, g.copy(), lr, grad_scale=1 / count)
    ref = torch_reference("adam" if name == "adam" else name, theirs, params, [g / count for g in sums], lrs, wd)
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "rmsprop", "adam"])
def test_train_weight_decay_changes_the_weights_of_every_optimizer(optimizer):
    """Once silently ignored by sgd, momentum and rmsprop (bit-identical weights with 0.5)."""
    def final(wd):
        cfg = small_config(f"train.optimizer={optimizer}", f"train.weight_decay={wd}", "train.epochs=1")
        return Trainer(cfg, SerialComm(), echo=lambda s: None).run().model.params

    plain, decayed = final(0.0), final(0.5)
    assert np.linalg.norm(decayed) < np.linalg.norm(plain)  # decay pulls the weights toward 0
