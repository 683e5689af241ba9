"""The integrations in ``examples/`` really run, and each gives what it promises, checked against
an independent computation: ``gn.step`` for ``loss = gn(L_i)``, the unscaled loss for a scaled
one, the full batch for accumulation, an uninterrupted run for a resumed one."""

from __future__ import annotations

import copy
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import amp_train  # noqa: E402
import functional_step  # noqa: E402
import plain_loop  # noqa: E402

from versions import (  # noqa: E402
    needs_cpu_grad_scaler,
    needs_fullgraph_compile,
    needs_transformers_torch,
)

from gradnorm_func import GradNorm  # noqa: E402
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on 2 shared cores a second OpenMP
    thread spin-waiting for a busy core makes each step 10-30x slower. Results do not
    depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_plain_loop_flows_agree_and_move_the_weights():
    """The one-line flow (fast path, heads=) equals gn.step and the seed's flow."""
    one_line = plain_loop.main(["--epochs", "2"])
    step = plain_loop.main(["--epochs", "2", "--flow", "step"])
    seed = plain_loop.main(["--epochs", "2", "--flow", "seed"])
    assert int(one_line.update_count) == int(step.update_count) == int(seed.update_count) == 16
    # The one-line flow divides the cotangents of sum_i w_i L_i by w_i: float32 rounding.
    torch.testing.assert_close(one_line.w_i, step.w_i, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seed.w_i, step.w_i, rtol=1e-5, atol=1e-6)
    assert (step.w_i - 1).abs().max() > 0.05
    assert step.w_i[-1] < step.w_i[0]  # the largest-scale task is damped


def test_examples_run_as_scripts_from_the_repository_root():
    """``python examples/<name>.py`` from the root needs no PYTHONPATH: the toy model is the
    installed package's (``pip install -e .``, as CI does)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "examples/plain_loop.py", "--epochs", "1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("epoch 0  losses")


def test_seed_readme_snippet_runs_unchanged():
    """The seed library's README loop, verbatim but for the device."""
    epochs, device = 2, "cpu"
    x, y = toy_regression(torch.logspace(0, 2, 10), 128, input_dim=32, output_dim=8, seed=0)
    torch.manual_seed(0)
    model = ToyMultiTaskNet(10, input_dim=32, hidden=64, depth=2, output_dim=8)
    dataloader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
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
def test_compiled_functional_fork_example_equals_eager():
    eager = functional_step.main(["--steps", "6", "--no-compile"])
    compiled = functional_step.main(["--steps", "6"])
    torch.testing.assert_close(compiled.weights, eager.weights, rtol=1e-5, atol=1e-6)
    assert int(compiled.update_count) == 6
    assert (eager.weights - 1).abs().max() > 0.05


@needs_cpu_grad_scaler
def test_mixed_precision_weights_equal_those_of_the_unscaled_loss(capsys):
    small = amp_train.main(["--steps", "15", "--scale", "8"])
    large = amp_train.main(["--steps", "15", "--scale", "65536"])
    unscaled = amp_train.main(["--steps", "15", "--no-scaler"])
    assert capsys.readouterr().out.count("loss dtype torch.bfloat16") == 3
    assert small.w_i.dtype == torch.float32 and small.aux.grad_norms.dtype == torch.float32
    # Powers of two scale every cotangent exactly, so the weights are bit-identical.
    assert torch.equal(small.w_i, unscaled.w_i)
    assert torch.equal(large.w_i, unscaled.w_i)
    assert int(unscaled.update_count) == 15 and int(unscaled.skipped_count) == 0
    assert (unscaled.w_i - 1).abs().max() > 0.05


@pytest.fixture(scope="module")
def lightning_train():
    pytest.importorskip("lightning")
    return importlib.import_module("lightning_train")


def test_lightning_bf16_accumulation_resumes_bit_identically(lightning_train, tmp_path):
    """accumulate_grad_batches=2, bf16-mixed, no checkpoint hooks: the GradNorm buffers
    travel in Lightning's checkpoint, and resuming after epoch 2 of 4 gives the weights of
    the uninterrupted run bit for bit."""
    full = lightning_train.main(["--epochs", "4"])
    first = lightning_train.main(["--epochs", "2", "--ckpt-dir", str(tmp_path)])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.equal(checkpoint["state_dict"]["gradnorm.weights"], first.gradnorm.w_i)
    resumed = lightning_train.main(["--epochs", "4", "--resume", str(tmp_path / "last.ckpt")])
    # 512 samples in batches of 32, two per optimizer step: 8 GradNorm updates per epoch.
    assert int(resumed.gradnorm.update_count) == int(full.gradnorm.update_count) == 32
    assert resumed.trainer.global_step == 32
    assert torch.equal(resumed.gradnorm.w_i, full.gradnorm.w_i)
    assert torch.equal(resumed.gradnorm.exp_avg_sq, full.gradnorm.exp_avg_sq)
    assert (full.gradnorm.w_i - 1).abs().max() > 0.05
    logged = resumed.trainer.callback_metrics  # logged in the last training_step, before its update
    assert {"gradnorm/w_0", "gradnorm/grad_norm_2", "gradnorm/loss_ratio_1",
            "gradnorm/loss_grad", "gradnorm/skipped_updates"} <= set(logged)
    assert float(logged["gradnorm/updates"]) == 31


def test_lightning_accumulate_grad_batches_equals_the_full_batch(lightning_train):
    """accumulate_grad_batches=2 with accumulation_steps=2 (Lightning calls backward on each
    half, scaled by 1/2) equals a plain loop on the concatenated batches with gn.step and
    accumulation_steps=1, in float64."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    module = lightning_train.GradNormModule(3, accumulation_steps=2, dtype=torch.float64)
    model = copy.deepcopy(module.model)
    loader = lightning_train.make_loader(3, dtype=torch.float64, batch_size=16, samples=256)
    trainer = lightning_train.fit(module, loader, epochs=2, accumulate=2, precision="64-true")

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gn = GradNorm(model.last_shared_layer, 0.12, 3, lr=1e-2, optimizer="adam",
                  dtype=torch.float64)  # the general path, not heads=: independent as well
    full_batches = torch.utils.data.DataLoader(loader.dataset, batch_size=32)
    for _ in range(2):
        for x, y in full_batches:
            L_i = per_task_mse(model(x), y)
            loss = (gn.w_i * L_i).sum()
            gn.step(L_i)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert trainer.global_step == int(module.gradnorm.update_count) == int(gn.update_count) == 16
    torch.testing.assert_close(module.gradnorm.w_i, gn.w_i, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.gradnorm.initial_losses, gn.initial_losses,
                               rtol=1e-12, atol=1e-12)
    assert (gn.w_i - 1).abs().max() > 0.05


@needs_transformers_torch
def test_hf_trainer_checkpoints_and_resumes_bit_identically(tmp_path, monkeypatch):
    """A randomly initialised BERT with three task heads, GradNorm in compute_loss, gradient
    accumulation 2: resuming from checkpoint-4 of 8 gives the uninterrupted run's model and
    GradNorm state bit for bit; the safetensors checkpoint holds every GradNorm buffer, its
    bool and int64 ones included."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file

    hf_trainer = importlib.import_module("hf_trainer")
    full = hf_trainer.train(str(tmp_path), steps=8, save_steps=4, accumulation=2)
    saved = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    own = {k: v for k, v in full.state_dict().items() if k.startswith("gradnorm.")}
    assert set(own) <= set(saved)
    assert all(saved[k].dtype == v.dtype for k, v in own.items())
    assert saved["gradnorm.skipped"].dtype == torch.bool
    assert int(saved["gradnorm.update_count"]) == 4 and saved["gradnorm.steps"].dtype == torch.int64

    resumed = hf_trainer.train(str(tmp_path / "resumed"), steps=8, save_steps=4, accumulation=2,
                               resume=str(tmp_path / "checkpoint-4"))
    assert int(resumed.gradnorm.update_count) == int(full.gradnorm.update_count) == 8
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    weights = full.gradnorm.w_i
    assert (weights - 1).abs().max() > 0.01
    initial = full.gradnorm.initial_losses  # the first cross-entropies are about log C
    assert abs(float(initial[0]) - math.log(hf_trainer.NUM_TAGS)) < 0.3


@needs_transformers_torch
def test_hf_model_reloads_with_from_pretrained(tmp_path, monkeypatch):
    """``save_pretrained`` / ``from_pretrained``, the usual way to load a trained Hugging Face
    model, keeps the GradNorm state. ``from_pretrained`` builds the model under
    ``torch.device("meta")`` before loading the checkpoint into it."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_trainer = importlib.import_module("hf_trainer")
    model = hf_trainer.train(str(tmp_path), steps=2, save_steps=2)
    model.save_pretrained(tmp_path / "final")
    loaded = hf_trainer.MultiTaskEncoder.from_pretrained(tmp_path / "final")
    assert int(loaded.gradnorm.update_count) == 2
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_partial_checkpoint_loads_with_strict_false():
    """Warm-starting a model that holds a GradNorm from a checkpoint without one (a single-task
    model's trunk) with ``load_state_dict(..., strict=False)``, the usual PyTorch idiom,
    reports the GradNorm entries as missing and keeps the GradNorm state, as for any other
    module."""
    torch.manual_seed(0)
    pretrained = ToyMultiTaskNet(3, input_dim=32, hidden=64, depth=2, output_dim=8)
    model = ToyMultiTaskNet(3, input_dim=32, hidden=64, depth=2, output_dim=8)
    model.gradnorm = GradNorm(model.last_shared_layer, alpha=0.12, number_of_tasks=3)
    result = model.load_state_dict(pretrained.state_dict(), strict=False)
    assert "gradnorm.weights" in result.missing_keys
    assert torch.equal(model.gradnorm.w_i, torch.ones(3))
    assert torch.equal(model.last_shared_layer.weight, pretrained.last_shared_layer.weight)
