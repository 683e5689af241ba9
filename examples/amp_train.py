"""GradNorm under mixed precision: ``torch.autocast`` in bfloat16 and a ``GradScaler``.

The task losses arrive in bfloat16; GradNorm computes the norms in float32 and keeps its state
in float32. It differentiates the *unscaled* task losses, so the loss scale never reaches the
weights.

Run: python examples/amp_train.py [--steps 30] [--scale 65536]
"""

from __future__ import annotations

import argparse
import sys

import torch
from toy_problem import ToyMultiTask, toy_dataset

from gradnorm_func import GradNorm


def main(argv: list[str] | None = None) -> GradNorm:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--scale", type=float, default=2.0**16, help="GradScaler's initial scale")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = ToyMultiTask(args.tasks)
    x, y = toy_dataset(args.tasks, samples=64).tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=args.scale, growth_interval=10**9)
    gradnorm = GradNorm(model.last_shared_layer, alpha=0.12, number_of_tasks=args.tasks,
                        lr=1e-2, optimizer="adam")
    for _ in range(args.steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            L_i = ((model(x) - y.to(torch.bfloat16)) ** 2).mean(dim=(0, 2))
        loss = (gradnorm.w_i * L_i).sum()
        gradnorm.step(L_i)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    print(f"loss dtype {L_i.dtype}, weights dtype {gradnorm.w_i.dtype}, "
          f"weights {[round(v, 4) for v in gradnorm.w_i.tolist()]}")
    return gradnorm


if __name__ == "__main__":
    main(sys.argv[1:])
