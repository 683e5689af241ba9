"""GradNorm in a LightningModule trained with Lightning's DDP strategy (2 CPU processes).

Run: python examples/lightning_ddp.py [--steps 50] [--out DIR]

``strategy="ddp"`` re-launches this script once per extra rank, so keep the
``if __name__ == "__main__"`` guard. The training step is the single-process one,
``return self.gradnorm(L_i)``: ``GradNorm`` synchronises by itself because Lightning initialises
the process group, with one all-reduce at the end of each backward. With ``--out``, every
rank saves its task-weight history to ``DIR/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import gradnorm_func as gf
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression


class MultiTask(L.LightningModule):
    def __init__(self, num_tasks: int, out: Path | None) -> None:
        super().__init__()
        self.model = ToyMultiTaskNet(num_tasks, input_dim=8, hidden=32, depth=2, output_dim=4,
                                     separate_heads=True)
        # A submodule: its state follows the model to its device and into checkpoints.
        self.gradnorm = gf.GradNorm(self.model.last_shared_layer, alpha=0.12,
                                    number_of_tasks=num_tasks, lr=0.05, optimizer="adam",
                                    heads=self.model.heads)
        self.out = out
        self.history: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.gradnorm.local_batch_size = x.shape[0]
        return self.gradnorm(per_task_mse(self.model(x), y))  # Lightning runs backward

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.history.append(self.gradnorm.w_i)  # after this step's update

    def on_train_end(self) -> None:
        if self.out is not None:
            torch.save(torch.stack(self.history), self.out / f"rank{self.global_rank}.pt")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    sigmas = torch.tensor([1.0, 100.0])
    x, y = toy_regression(sigmas, 512, input_dim=8, output_dim=4, seed=0)
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=args.steps,
                        enable_progress_bar=False, logger=False, enable_checkpointing=False,
                        enable_model_summary=False)
    model = MultiTask(len(sigmas), args.out)
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        print(f"weights after {args.steps} steps: {model.gradnorm.w_i.tolist()}")


if __name__ == "__main__":
    main()
