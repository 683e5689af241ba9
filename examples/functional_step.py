"""A functional multi-task train step with GradNorm's fork fast path, compiled with
``torch.compile(fullgraph=True)``.

One ``torch.func.grad`` of sum_i w_i L_i gives both the model's gradient and, through the zero
``probe`` of ``gf.fork``, the cotangent each head sends back to the shared representation z.
``gf.fork_gradients`` turns those T cotangents into grad_W L_i at the last shared layer W (one
vmapped vjp of the segment z = relu(W h + b)), and ``gf.step_from_gradients`` updates the
weights. No per-task backward through the heads.

Run: python examples/functional_step.py [--steps 200] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor
from torch.func import functional_call

import gradnorm_func as gf
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression

BATCH, HIDDEN, LR = 64, 32, 1e-3


def sub(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``params`` under ``prefix``, without it (a submodule's parameters)."""
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def main(argv: list[str] | None = None) -> gf.GradNormState:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)

    sigmas = torch.tensor([1.0, 10.0, 100.0])
    num_tasks = len(sigmas)
    torch.manual_seed(0)
    model = ToyMultiTaskNet(num_tasks, input_dim=16, hidden=HIDDEN, depth=3, output_dim=4)
    params = {k: v.detach() for k, v in model.named_parameters()}
    state = gf.init_state(num_tasks, alpha=0.12, lr=0.025)

    def segment(shared: dict[str, Tensor], h: Tensor) -> Tensor:
        """z = relu(W h + b): the last shared layer W and what lies between it and the fork."""
        return torch.relu(functional_call(model.last_shared_layer, shared, (h,)))

    def weighted_loss(params, probe, weights, x, y):
        h = functional_call(model.trunk, sub(params, "trunk."), (x,))
        z_t = gf.fork(segment(sub(params, "last_shared_layer."), h), probe)  # [T, B, hidden]
        prediction = (torch.einsum("tbk,tok->bto", z_t, params["heads_weight"])
                      + params["heads_bias"])  # head i reads z_t[i] only
        L_i = per_task_mse(prediction, y)
        return (weights * L_i).sum(), (L_i, h)

    def train_step(state, params, x, y):
        probe = gf.fork_probe(num_tasks, (x.shape[0], HIDDEN))
        (grads, cotangents), (L_i, h) = torch.func.grad(
            weighted_loss, argnums=(0, 1), has_aux=True)(params, probe, state.weights, x, y)
        task_grads = gf.fork_gradients(segment, sub(params, "last_shared_layer."), h,
                                       cotangents, state.weights)
        new_state, aux = gf.step_from_gradients(state, L_i, task_grads)
        new_params = {k: v - LR * grads[k] for k, v in params.items()}  # with w_i(t)
        return new_state, new_params, aux

    step_fn = train_step if args.no_compile else torch.compile(train_step, fullgraph=True)
    for t in range(args.steps):
        x, y = toy_regression(sigmas, BATCH, input_dim=16, output_dim=4, seed=t)
        state, params, aux = step_fn(state, params, x, y)
        if t % max(1, args.steps // 10) == 0 or t == args.steps - 1:
            print(f"step {t:4d}  losses {[round(v, 4) for v in aux.task_losses.tolist()]}  "
                  f"weights {[round(v, 4) for v in state.weights.tolist()]}")
    return state


if __name__ == "__main__":
    main(sys.argv[1:])
