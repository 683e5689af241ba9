"""A whole functional train step compiles with fullgraph=True and equals eager."""

from __future__ import annotations

import optree
import torch
from torch import nn

import gradnorm_func as gf


def make_train_step(model: nn.Module, shared: list[str], lr: float):
    def train_step(state, params, x, y):
        def task_losses(p):
            out = torch.func.functional_call(model, p, (x,))
            return ((out - y) ** 2).mean(0)

        def weighted(p):
            return (state.weights * task_losses(p)).sum()

        grads = torch.func.grad(weighted)(params)
        new_params = {k: v - lr * grads[k] for k, v in params.items()}
        new_state, aux = gf.step(state, {k: params[k] for k in shared},
                                 lambda p: task_losses({**params, **p}))
        return new_state, new_params, aux

    return train_step


def test_compiled_train_step_equals_eager():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(32, 5)
    y = torch.randn(32, 3) * torch.tensor([1.0, 10.0, 100.0])
    step_fn = make_train_step(model, ["2.weight", "2.bias"], lr=1e-4)
    compiled = torch.compile(step_fn, fullgraph=True)
    eager_state = compiled_state = gf.init_state(3, alpha=0.12, lr=0.05)
    eager_params, compiled_params = params, params
    for _ in range(5):
        eager_state, eager_params, eager_aux = step_fn(eager_state, eager_params, x, y)
        compiled_state, compiled_params, compiled_aux = compiled(compiled_state, compiled_params, x, y)
    close = dict(rtol=1e-5, atol=1e-6, equal_nan=True)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, **close), compiled_state, eager_state)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, **close), compiled_aux, eager_aux)
    for k in params:
        torch.testing.assert_close(compiled_params[k], eager_params[k], **close)
    assert not torch.allclose(eager_state.weights, torch.ones(3))
    # A new learning rate is a new tensor value, not a new graph.
    faster = eager_state._replace(hyper=eager_state.hyper._replace(lr=torch.tensor(0.5)))
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(faster, compiled_params, x, y)
