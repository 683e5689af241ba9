"""GradNorm in PyTorch Lightning: ``loss = self.gradnorm(L_i)`` and nothing else.

``GradNorm`` is an ``nn.Module`` assigned as an attribute of the ``LightningModule``, so its
state is in Lightning's checkpoints and is restored on resume without checkpoint hooks, and it
moves with the model. Lightning keeps ``backward``; the update happens at its end. With
``accumulate_grad_batches=k`` and ``GradNorm(..., accumulation_steps=k)`` the weights stay fixed
over the k micro-batches of each optimizer step, then take one update from their mean per-task
gradients: the update of the full batch. Mixed precision (``bf16-mixed``, autocast on CPU)
changes nothing in the training step.

Run: python examples/lightning_train.py [--epochs 4] [--accumulate 2] [--precision bf16-mixed]
     [--ckpt-dir DIR] [--resume PATH]
"""

from __future__ import annotations

import argparse
import sys

import lightning as L
import torch

from gradnorm_func import GradNorm
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression

INPUT_DIM, OUTPUT_DIM = 32, 8


class GradNormModule(L.LightningModule):
    def __init__(self, num_tasks: int = 3, alpha: float = 0.12, accumulation_steps: int = 2,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = ToyMultiTaskNet(num_tasks, input_dim=INPUT_DIM, hidden=64, depth=2,
                                     output_dim=OUTPUT_DIM, separate_heads=True).to(dtype)
        # The fast path (heads=), and one update per optimizer step of Lightning.
        self.gradnorm = GradNorm(self.model.last_shared_layer, alpha, num_tasks, lr=1e-2,
                                 optimizer="adam", accumulation_steps=accumulation_steps,
                                 heads=self.model.heads, dtype=dtype)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.gradnorm(per_task_mse(self.model(x), y))  # sum_i w_i(t) L_i
        self.log_dict(self.gradnorm.metrics())  # w_i, norms, ratios, L_grad, update counts
        return loss  # Lightning calls backward (scaled by 1/accumulate_grad_batches)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def make_loader(num_tasks: int, *, dtype: torch.dtype = torch.float32, batch_size: int = 32,
                samples: int = 512) -> torch.utils.data.DataLoader:
    x, y = toy_regression(torch.logspace(0, 2, num_tasks), samples, input_dim=INPUT_DIM,
                          output_dim=OUTPUT_DIM, seed=0)
    dataset = torch.utils.data.TensorDataset(x.to(dtype), y.to(dtype))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def fit(module: GradNormModule, loader: torch.utils.data.DataLoader, *, epochs: int,
        accumulate: int, precision: str = "bf16-mixed", ckpt_dir: str | None = None,
        resume: str | None = None) -> L.Trainer:
    checkpoints = [] if ckpt_dir is None else [
        L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)]
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        precision=precision, accumulate_grad_batches=accumulate,
                        callbacks=checkpoints, enable_checkpointing=bool(checkpoints),
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader, ckpt_path=resume)
    return trainer


def main(argv: list[str] | None = None) -> GradNormModule:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=2,
                        help="Lightning's accumulate_grad_batches = GradNorm's accumulation_steps")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--ckpt-dir", default=None, help="save last.ckpt here after every epoch")
    parser.add_argument("--resume", default=None, help="a checkpoint to resume from")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    module = GradNormModule(args.tasks, accumulation_steps=args.accumulate)
    trainer = fit(module, make_loader(args.tasks), epochs=args.epochs, accumulate=args.accumulate,
                  precision=args.precision, ckpt_dir=args.ckpt_dir, resume=args.resume)
    print(f"optimizer steps {trainer.global_step}  GradNorm updates "
          f"{int(module.gradnorm.update_count)}  weights "
          f"{[round(v, 4) for v in module.gradnorm.w_i.tolist()]}")
    return module


if __name__ == "__main__":
    main(sys.argv[1:])
