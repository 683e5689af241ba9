"""GradNorm in a plain PyTorch loop: ``loss = gradnorm(L_i)``, then your own ``loss.backward()``.

The model's task heads are separate modules and GradNorm is given them (``heads=model.heads``):
the fast path, where the per-task gradients at the shared layer W come from the cotangents that
the ordinary backward sends into each head, with no extra backward per task.

``--flow`` switches among the three flows of ``GradNorm``; they give the same weights (to float
rounding: the one-line flow divides the cotangents of sum_i w_i L_i by w_i):

- ``one-line`` (default): ``loss = gradnorm(L_i); loss.backward()``; the update runs at the end
  of that backward;
- ``step``: ``loss = (gradnorm.w_i * L_i).sum(); gradnorm.step(L_i); loss.backward()``;
- ``seed``: the seed library's ``loss.backward(retain_graph=True)``, then
  ``gradnorm.apply_grads(gradnorm.gradnorm(L_i))``.

Run: python examples/plain_loop.py [--epochs 5] [--tasks 3] [--flow one-line|step|seed]
"""

from __future__ import annotations

import argparse
import sys

import torch

from gradnorm_func import GradNorm
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression

FLOWS = ("one-line", "step", "seed")


def main(argv: list[str] | None = None) -> GradNorm:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--flow", choices=FLOWS, default="one-line")
    args = parser.parse_args(argv)

    sigmas = torch.logspace(0, 2, args.tasks)  # task scales 1 ... 100
    x, y = toy_regression(sigmas, 512, input_dim=32, output_dim=8, seed=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    torch.manual_seed(0)
    model = ToyMultiTaskNet(args.tasks, input_dim=32, hidden=64, depth=2, output_dim=8,
                            separate_heads=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gradnorm = GradNorm(model.last_shared_layer, alpha=0.12, number_of_tasks=args.tasks,
                        lr=1e-2, heads=model.heads)

    for epoch in range(args.epochs):
        for x, y_true in loader:
            L_i = per_task_mse(model(x), y_true)  # Tensor[T]
            optimizer.zero_grad()
            if args.flow == "one-line":
                loss = gradnorm(L_i)  # sum_i w_i(t) L_i; the update runs after its backward
                loss.backward()
            elif args.flow == "step":
                loss = (gradnorm.w_i * L_i).sum()  # w_i(t), from before this step's update
                gradnorm.step(L_i)
                loss.backward()
            else:
                loss = torch.sum(gradnorm.w_i * L_i)
                loss.backward(retain_graph=True)
                gradnorm.apply_grads(gradnorm.gradnorm(L_i))
            optimizer.step()
        print(f"epoch {epoch}  losses {[round(v, 4) for v in L_i.tolist()]}  "
              f"weights {[round(v, 4) for v in gradnorm.w_i.tolist()]}")
    return gradnorm


if __name__ == "__main__":
    main(sys.argv[1:])
