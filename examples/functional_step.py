"""A functional multi-task train step with GradNorm, compiled with torch.compile(fullgraph=True).

Run: python examples/functional_step.py [--steps 200] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import gradnorm_func as gf


def main(argv: list[str] | None = None) -> gf.GradNormState:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    sigmas = torch.tensor([1.0, 10.0, 100.0])
    num_tasks = len(sigmas)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, num_tasks))
    shared = ["2.weight", "2.bias"]  # the last shared layer
    params = {k: v.detach() for k, v in model.named_parameters()}
    projection = torch.randn(10, num_tasks)
    state = gf.init_state(num_tasks, alpha=0.12, lr=0.025)

    def train_step(state, params, x, y):
        def task_losses(p):
            return ((torch.func.functional_call(model, p, (x,)) - y) ** 2).mean(0)

        weighted = lambda p: (state.weights * task_losses(p)).sum()  # noqa: E731
        grads = torch.func.grad(weighted)(params)
        new_params = {k: v - 1e-4 * grads[k] for k, v in params.items()}
        new_state, aux = gf.step(state, {k: params[k] for k in shared},
                                 lambda p: task_losses({**params, **p}))
        return new_state, new_params, aux

    step_fn = train_step if args.no_compile else torch.compile(train_step, fullgraph=True)
    for t in range(args.steps):
        x = torch.randn(64, 10)
        y = sigmas * torch.tanh(x @ projection)
        state, params, aux = step_fn(state, params, x, y)
        if t % max(1, args.steps // 10) == 0 or t == args.steps - 1:
            print(f"step {t:4d}  losses {[round(v, 4) for v in aux.losses.tolist()]}  "
                  f"weights {[round(v, 4) for v in state.weights.tolist()]}")
    return state


if __name__ == "__main__":
    main(sys.argv[1:])
