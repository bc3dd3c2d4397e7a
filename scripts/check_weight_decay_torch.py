"""Check dpbp's optimizers (weight decay included) against PyTorch's own, once, by hand.

    pip install torch==2.13.0 && python scripts/check_weight_decay_torch.py

dpbp ``sgd``/``momentum``/``rmsprop`` with ``weight_decay`` are L2 (as ``torch.optim.SGD`` and
``torch.optim.RMSprop``), ``adam`` is decoupled (``torch.optim.AdamW``). Runs 5 steps in float64 on
the same parameters, gradients and learning rates and prints the largest relative difference of
the parameters per case; exits 1 if any exceeds 1e-12. The test suite uses an independent
reference written from PyTorch's documented equations instead (tests/test_weight_decay.py), so it
needs no PyTorch; this script is how that reference was checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dpbp.optim import make_optimizer  # noqa: E402

CASES = [  # (label, dpbp name, dpbp keywords, torch class name, torch keywords)
    ("sgd", "sgd", {}, "SGD", {}),
    ("momentum", "momentum", {"momentum": 0.9}, "SGD", {"momentum": 0.9}),
    ("nesterov", "momentum", {"momentum": 0.8, "nesterov": True}, "SGD", {"momentum": 0.8, "nesterov": True}),
    ("rmsprop", "rmsprop", {"rho": 0.95, "eps": 1e-6}, "RMSprop", {"alpha": 0.95, "eps": 1e-6}),
    ("adam", "adam", {"beta1": 0.8, "beta2": 0.99, "eps": 1e-7}, "AdamW", {"betas": (0.8, 0.99), "eps": 1e-7}),
]


def main() -> int:
    try:
        import torch
    except ImportError:
        print("needs PyTorch: pip install torch==2.13.0")
        return 1
    rng = np.random.default_rng(11)
    n, lrs = 300, [0.1, 0.05, 0.05, 0.02, 0.01]
    params = rng.normal(size=n)
    grads = [rng.normal(size=n) for _ in lrs]
    worst = 0.0
    print(f"torch {torch.__version__}; 5 steps, float64, {n} parameters")
    for wd in (0.0, 0.05, 0.5):
        for label, name, mine, cls, theirs in CASES:
            opt, p = make_optimizer(name, n, "float64", weight_decay=wd, **mine), params.copy()
            theta = torch.tensor(params.copy(), dtype=torch.float64, requires_grad=True)
            topt = getattr(torch.optim, cls)([theta], lr=lrs[0], weight_decay=wd, **theirs)
            for g, lr in zip(grads, lrs):
                opt.step(p, g.copy(), lr)
                for group in topt.param_groups:
                    group["lr"] = lr
                theta.grad = torch.tensor(g, dtype=torch.float64)
                topt.step()
            ref = theta.detach().numpy()
            rel = float(np.max(np.abs(p - ref)) / np.max(np.abs(ref)))
            worst = max(worst, rel)
            print(f"weight_decay {wd:<4}  {label:<9} vs torch.optim.{cls:<8} max rel diff {rel:.2e}")
    print(f"SUMMARY worst {worst:.2e} ({'ok' if worst <= 1e-12 else 'FAIL'}: <= 1e-12)")
    return 0 if worst <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
