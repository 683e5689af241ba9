"""GradNorm under mixed precision: ``torch.autocast`` in bfloat16 and a ``GradScaler``, one line.

The task losses arrive in bfloat16; GradNorm computes the norms in float32 and keeps its state
in float32. ``loss = gradnorm(L_i)`` reads the coefficient of each L_i from the backward
itself, so the loss scale (any positive factor: a ``GradScaler``, ``loss * 1024``) never
reaches the weights: every scale gives the same weights as the unscaled loss.

The model's forward gives head i copy i of the shared representation z
(``model.fork = gradnorm.fork``): the fast path.

Run: python examples/amp_train.py [--steps 30] [--scale 65536 | --no-scaler]
"""

from __future__ import annotations

import argparse
import sys

import torch

from gradnorm_func import GradNorm
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression


def main(argv: list[str] | None = None) -> GradNorm:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--scale", type=float, default=2.0**16, help="GradScaler's initial scale")
    parser.add_argument("--no-scaler", action="store_true",
                        help="plain loss.backward() on the unscaled loss")
    args = parser.parse_args(argv)

    sigmas = torch.logspace(0, 2, args.tasks)
    x, y = toy_regression(sigmas, 64, input_dim=32, output_dim=8, seed=0)
    torch.manual_seed(0)
    model = ToyMultiTaskNet(args.tasks, input_dim=32, hidden=64, depth=2, output_dim=8,
                            separate_heads=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=args.scale, growth_interval=10**9,
                                  enabled=not args.no_scaler)
    gradnorm = GradNorm(model.last_shared_layer, alpha=0.12, number_of_tasks=args.tasks,
                        lr=1e-2, optimizer="adam")
    model.fork = gradnorm.fork  # head i reads copy i of z: the fast path

    for _ in range(args.steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            L_i = per_task_mse(model(x), y.to(torch.bfloat16))  # Tensor[T] in bfloat16
        loss = gradnorm(L_i)
        scaler.scale(loss).backward()  # GradNorm updates at the end of this backward
        scaler.step(optimizer)
        scaler.update()
    print(f"loss dtype {L_i.dtype}, weights dtype {gradnorm.w_i.dtype}, "
          f"weights {[round(v, 4) for v in gradnorm.w_i.tolist()]}")
    return gradnorm


if __name__ == "__main__":
    main(sys.argv[1:])
