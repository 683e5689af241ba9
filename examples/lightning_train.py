"""GradNorm in PyTorch Lightning with automatic optimisation: Lightning calls ``backward``.

The GradNorm state is saved in, and restored from, Lightning's checkpoints.

Run: python examples/lightning_train.py [--epochs 5] [--ckpt-dir DIR] [--resume PATH]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import lightning as L
import torch
from toy_problem import ToyMultiTask, toy_dataset

from gradnorm_func import GradNorm


class GradNormModule(L.LightningModule):
    def __init__(self, num_tasks: int = 3, alpha: float = 0.12) -> None:
        super().__init__()
        self.model = ToyMultiTask(num_tasks)
        self.gradnorm = GradNorm(self.model.last_shared_layer, alpha, num_tasks, lr=1e-2,
                                 optimizer="adam")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        L_i = ((self.model(x) - y) ** 2).mean(dim=(0, 2))
        loss = (self.gradnorm.w_i * L_i).sum()  # w_i(t), before this step's update
        self.gradnorm.step(L_i)  # Lightning then calls loss.backward() itself
        self.log_dict({f"w_{i}": w for i, w in enumerate(self.gradnorm.w_i)})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gradnorm"] = self.gradnorm.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.gradnorm.load_state_dict(checkpoint["gradnorm"])


def main(argv: list[str] | None = None) -> GradNormModule:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--ckpt-dir", default=None, help="save last.ckpt here after every epoch")
    parser.add_argument("--resume", default=None, help="a checkpoint to resume from")
    args = parser.parse_args(argv)

    L.seed_everything(0, verbose=False)
    module = GradNormModule(args.tasks)
    loader = torch.utils.data.DataLoader(toy_dataset(args.tasks), batch_size=64)
    checkpoints = [] if args.ckpt_dir is None else [
        L.pytorch.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True, save_top_k=0)]
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        callbacks=checkpoints, enable_checkpointing=bool(checkpoints),
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader, ckpt_path=args.resume)
    print(f"step {trainer.global_step}  weights {[round(v, 4) for v in module.gradnorm.w_i.tolist()]}"
          f"  logged {({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})}")
    return module


if __name__ == "__main__":
    main(sys.argv[1:])
