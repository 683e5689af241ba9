"""GradNorm in a plain PyTorch loop: the framework keeps its own ``loss.backward()``.

Run: python examples/plain_loop.py [--epochs 5] [--tasks 3] [--seed-flow]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from toy_problem import ToyMultiTask, toy_dataset

from gradnorm_func import GradNorm


def main(argv: list[str] | None = None) -> torch.Tensor:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--seed-flow", action="store_true",
                        help="the seed library's flow: backward(retain_graph=True) before GradNorm")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = ToyMultiTask(args.tasks)
    loader = torch.utils.data.DataLoader(toy_dataset(args.tasks), batch_size=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gradnorm = GradNorm(model.last_shared_layer, alpha=0.12, number_of_tasks=args.tasks, lr=1e-2)

    for epoch in range(args.epochs):
        for x, y_true in loader:
            y_pred = model(x)
            L_i = F.mse_loss(y_pred, y_true, reduction="none").mean(dim=-1).mean(dim=0)
            L = torch.sum(gradnorm.w_i * L_i)  # weights w_i(t) from before this step's update
            optimizer.zero_grad()
            if args.seed_flow:
                L.backward(retain_graph=True)
                gradnorm.apply_grads(gradnorm.gradnorm(L_i))
            else:
                gradnorm.step(L_i)  # no retain_graph anywhere in user code
                L.backward()
            optimizer.step()
        print(f"epoch {epoch}  losses {[round(v, 4) for v in L_i.tolist()]}  "
              f"weights {[round(v, 4) for v in gradnorm.w_i.tolist()]}")
    return gradnorm.w_i


if __name__ == "__main__":
    main(sys.argv[1:])
