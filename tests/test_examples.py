"""The integrations in ``examples/`` really run, and give what they promise."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import amp_train  # noqa: E402
import functional_step  # noqa: E402
import lightning_train  # noqa: E402
import plain_loop  # noqa: E402
from toy_problem import ToyMultiTask, toy_dataset  # noqa: E402

from versions import needs_cpu_grad_scaler, needs_fullgraph_compile  # noqa: E402

from gradnorm_func import GradNorm  # noqa: E402


def test_plain_loop_flows_agree_and_move_the_weights():
    recommended = plain_loop.main(["--epochs", "2"])
    seed_flow = plain_loop.main(["--epochs", "2", "--seed-flow"])
    assert torch.equal(recommended, seed_flow)
    assert (recommended - 1).abs().max() > 0.05
    assert recommended[-1] < recommended[0]  # the largest-scale task is damped


def test_seed_readme_snippet_runs_unchanged():
    """The seed library's README loop, verbatim but for the device."""
    torch.manual_seed(0)
    epochs, device = 2, "cpu"
    model = ToyMultiTask(10)
    dataloader = torch.utils.data.DataLoader(toy_dataset(10, samples=128), batch_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gradnorm = GradNorm(model.last_shared_layer, alpha=0.12, number_of_tasks=10,
                        lr=1e-3, lr_warmup=1000, device=device)
    for epoch in range(epochs):
        for x, y_true in dataloader:
            x, y_true = x.to(device), y_true.to(device)

            y_pred = model(x)

            # Your training loop's loss calculation for each task
            task_losses = F.mse_loss(y_pred, y_true, reduction='none').mean(dim=-1)
            L_i = task_losses.mean(dim=0)

            L = torch.sum(gradnorm.w_i * L_i)  # <--- Use gradnorm weights w_i here

            # Your training loop's backward call
            optimizer.zero_grad()
            L.backward(retain_graph=True)  # retain_graph=True is currently required

            # Compute the GradNorm loss
            L_grad = gradnorm.gradnorm(L_i)  # <--- Line 1
            gradnorm.apply_grads(L_grad)  # <--- Line 2

            optimizer.step()
    assert int(gradnorm.state.update_count) == epochs * len(dataloader)
    torch.testing.assert_close(gradnorm.w_i.sum(), torch.tensor(10.0))
    assert not torch.equal(gradnorm.w_i, torch.ones(10))


@needs_fullgraph_compile
def test_compiled_functional_example_equals_eager():
    eager = functional_step.main(["--steps", "6", "--no-compile"])
    compiled = functional_step.main(["--steps", "6"])
    torch.testing.assert_close(compiled.weights, eager.weights, rtol=1e-5, atol=1e-6)
    assert int(compiled.update_count) == 6


@needs_cpu_grad_scaler
def test_mixed_precision_weights_do_not_depend_on_loss_scale(capsys):
    small = amp_train.main(["--steps", "15", "--scale", "8"])
    large = amp_train.main(["--steps", "15", "--scale", "65536"])
    assert "loss dtype torch.bfloat16" in capsys.readouterr().out
    assert small.w_i.dtype == torch.float32 and small.aux.grad_norms.dtype == torch.float32
    assert torch.equal(small.w_i, large.w_i)
    assert not torch.equal(small.w_i, torch.ones(3))


def test_lightning_logs_weights_and_resumes_bit_identically(tmp_path):
    full = lightning_train.main(["--epochs", "4"])
    first = lightning_train.main(["--epochs", "2", "--ckpt-dir", str(tmp_path)])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.equal(checkpoint["gradnorm"]["weights"], first.gradnorm.w_i)
    resumed = lightning_train.main(["--epochs", "4", "--resume", str(tmp_path / "last.ckpt")])
    assert int(resumed.gradnorm.state.update_count) == int(full.gradnorm.state.update_count) == 32
    assert torch.equal(resumed.gradnorm.w_i, full.gradnorm.w_i)
    logged = resumed.trainer.callback_metrics
    assert [float(logged[f"w_{i}"]) for i in range(3)] == resumed.gradnorm.w_i.tolist()
