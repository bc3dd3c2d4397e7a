"""One rank: what drawing the dropout masks costs, against the whole training step.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/dropout.py [--rounds 30]

Timed interleaved, one iteration each per round, so machine noise hits them alike:

* step: ``Trainer.step`` over ``SerialComm`` of the reference model (784-1024-1024-10, float32,
  batch 512, relu, adam) with ``model.dropout`` on every hidden layer (``--rate``);
* masks: ``MLP.dropout_mask`` for every hidden layer of the same step's rows (Philox draws,
  comparison, cast to the multipliers), which is the part of the step dropout adds besides
  two element-wise products.

Reported: medians over the rounds and, in the SUMMARY line, masks/step (target <= 0.10).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import REFERENCE_MODEL, default_rows, header, load_dpbp_config, median, parse_model, train_step
from threadpoolctl import threadpool_limits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=REFERENCE_MODEL, help="layer sizes (default %(default)s)")
    p.add_argument("--batch", type=int, default=512, help="global batch (default %(default)s)")
    p.add_argument("--rate", type=float, default=0.5, help="dropout rate of every hidden layer (default 0.5)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1: one rank per core)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (default %(default)s)")
    args = p.parse_args()

    from dpbp.comm import SerialComm
    from dpbp.model import StepContext
    from dpbp.train import Trainer

    layers = parse_model(args.model)
    header(f"dropout masks vs the training step: {layers}, batch {args.batch}, rate {args.rate}, "
           f"{args.threads} BLAS thread(s)")
    cfg = load_dpbp_config(layers, args.batch, "adam", args.threads, default_rows(args.batch),
                           extra=[f"model.dropout={args.rate}"])
    trainer = Trainer(cfg, SerialComm(), echo=lambda text: None)
    model = trainer.model
    order = np.arange(trainer.data.train.n_samples)
    outs = [np.empty((args.batch, w), model.dtype) for w in layers[1:-1]]
    hits = [np.empty((args.batch, w), bool) for w in layers[1:-1]]
    steps, masks = [], []
    with threadpool_limits(args.threads):
        for i in range(args.rounds + 3):  # the first 3 rounds warm caches and allocators up
            t0 = time.perf_counter()
            train_step(trainer, order, i)
            t1 = time.perf_counter()
            context = StepContext(0, i, 0)
            for h, (out, hit) in enumerate(zip(outs, hits)):
                model.dropout_mask(h, context, args.batch, out=out, hits=hit)
            t2 = time.perf_counter()
            if i >= 3:
                steps.append(t1 - t0)
                masks.append(t2 - t1)
    step, mask = median(steps), median(masks)
    print(f"   step (with dropout): {step * 1e3:8.2f} ms median of {len(steps)}")
    print(f"   masks of the step:   {mask * 1e3:8.2f} ms median of {len(masks)}")
    print(f"SUMMARY dropout masks/step {mask / step:.3f} (target <= 0.10)")


if __name__ == "__main__":
    main()
