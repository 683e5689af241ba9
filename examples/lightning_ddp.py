"""GradNorm in a LightningModule trained with Lightning's DDP strategy (2 CPU processes).

Run: python examples/lightning_ddp.py [--steps 50] [--out DIR]

``strategy="ddp"`` re-launches this script once per extra rank, so keep the
``if __name__ == "__main__"`` guard. The ``GradNorm`` object synchronises by itself because
Lightning initialises the process group; nothing else changes in the training step. With
``--out``, every rank saves its task-weight history to ``DIR/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradnorm_func as gf


class MultiTask(L.LightningModule):
    """trunk -> shared layer W -> one head per task, squared loss per task."""

    def __init__(self, sigmas: torch.Tensor, out: Path | None) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.shared = nn.Linear(32, 32)
        self.heads = nn.Linear(32, len(sigmas))
        self.num_tasks, self.out = len(sigmas), out
        self.gradnorm: gf.GradNorm | None = None
        self.history: list[torch.Tensor] = []

    def on_fit_start(self) -> None:
        # The parameters are on their final device now; GradNorm's state follows them.
        self.gradnorm = gf.GradNorm(self.shared, alpha=0.12, number_of_tasks=self.num_tasks,
                                    lr=0.05, optimizer="adam")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        L_i = ((self.heads(torch.relu(self.shared(self.trunk(x)))) - y) ** 2).mean(0)
        loss = (self.gradnorm.w_i * L_i).sum()  # the weights before this step's update
        self.gradnorm.local_batch_size = x.shape[0]
        self.gradnorm.step(L_i)  # all-reduces over Lightning's process group
        self.history.append(self.gradnorm.w_i)
        return loss  # Lightning runs backward; DDP averages the model's gradients

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

    torch.manual_seed(0)
    sigmas = torch.tensor([1.0, 100.0])
    x = torch.randn(512, 8)
    y = sigmas * torch.tanh(x @ torch.randn(8, len(sigmas)))
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=args.steps,
                        enable_progress_bar=False, logger=False, enable_checkpointing=False,
                        enable_model_summary=False)
    model = MultiTask(sigmas, args.out)
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        print(f"weights after {args.steps} steps: {model.gradnorm.w_i.tolist()}")


if __name__ == "__main__":
    main()
