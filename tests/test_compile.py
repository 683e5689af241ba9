"""A whole functional train step compiles with fullgraph=True and equals eager."""

from __future__ import annotations

import optree
import torch
from torch import nn

import gradnorm_func as gf
from versions import needs_fullgraph_compile

pytestmark = needs_fullgraph_compile


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


def test_compiled_fork_fast_path_equals_eager_and_general_path():
    """The functional fast path (fork, fork_gradients, step_from_gradients) compiles with
    fullgraph, equals eager, and its norms equal the general path's."""
    torch._dynamo.reset()
    num_tasks, hidden = 3, 16
    trunk, shared_layer = nn.Linear(5, hidden), nn.Linear(hidden, hidden)
    params = {"trunk": {k: v.detach() for k, v in trunk.named_parameters()},
              "shared": {k: v.detach() for k, v in shared_layer.named_parameters()},
              "heads": torch.randn(num_tasks, hidden) * 0.3}
    x = torch.randn(32, 5)
    y = torch.randn(32, num_tasks) * torch.tensor([1.0, 10.0, 100.0])

    def segment(p, h):
        return torch.relu(torch.func.functional_call(shared_layer, p, (h,)))

    def task_losses(p, z_t):  # z_t: [T, B, hidden], head i reads z_t[i] only
        out = torch.einsum("tbh,th->bt", z_t, p["heads"])
        return ((out - y) ** 2).mean(0)

    def train_step(state, params, probe):
        def weighted(p, probe):
            h = torch.relu(torch.func.functional_call(trunk, p["trunk"], (x,)))
            L_i = task_losses(p, gf.fork(segment(p["shared"], h), probe))
            return (state.weights * L_i).sum(), (L_i, h)

        (grads, fork_grads), (L_i, h) = torch.func.grad(weighted, argnums=(0, 1), has_aux=True)(
            params, probe)
        task_grads = gf.fork_gradients(segment, params["shared"], h, fork_grads, state.weights)
        new_state, aux = gf.step_from_gradients(state, L_i, task_grads)
        new_params = {"trunk": {k: v - 1e-4 * grads["trunk"][k] for k, v in params["trunk"].items()},
                      "shared": {k: v - 1e-4 * grads["shared"][k]
                                 for k, v in params["shared"].items()},
                      "heads": params["heads"] - 1e-4 * grads["heads"]}
        return new_state, new_params, aux

    probe = gf.fork_probe(num_tasks, (32, hidden))
    compiled = torch.compile(train_step, fullgraph=True)
    eager_state = compiled_state = gf.init_state(num_tasks, alpha=0.12, lr=0.05)
    eager_params = compiled_params = params
    for _ in range(4):
        h = torch.relu(torch.func.functional_call(trunk, eager_params["trunk"], (x,)))
        _, general_grads = gf.task_gradients(
            eager_params["shared"],
            lambda w: task_losses(eager_params, segment(w, h).expand(num_tasks, -1, -1)),
            num_tasks=num_tasks)
        general_norms = torch.cat([g.flatten(1) for g in general_grads.values()], 1) \
            .square().sum(1).sqrt()
        eager_state, eager_params, eager_aux = train_step(eager_state, eager_params, probe)
        compiled_state, compiled_params, _ = compiled(compiled_state, compiled_params, probe)
        torch.testing.assert_close(eager_aux.grad_norms, general_norms, rtol=1e-5, atol=1e-6)
    close = dict(rtol=1e-5, atol=1e-6, equal_nan=True)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, **close), compiled_state, eager_state)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, **close), compiled_params, eager_params)
    assert not torch.allclose(eager_state.weights, torch.ones(num_tasks))
