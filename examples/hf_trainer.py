"""GradNorm in a Hugging Face ``transformers.Trainer``: ``loss = model.gradnorm(L_i)`` in
``compute_loss``, checkpoints and resume through the Trainer.

A small BERT encoder, randomly initialised from a config (nothing is downloaded), shared by
three tasks on synthetic token sequences:

- tagging: a tag per token (cross-entropy over ``NUM_TAGS`` classes),
- classification: a class per sequence, read from the first token (cross-entropy),
- regression: a number per sequence, on a large scale (squared error).

GradNorm's W is the last shared projection, ``z = gelu(projection(h))`` over the encoder's
output h; the three heads are separate modules given to GradNorm (``heads=``), the fast path.
``GradNorm`` is a submodule of the ``PreTrainedModel``, so its buffers are saved in the
Trainer's ``model.safetensors`` checkpoints and loaded again by
``trainer.train(resume_from_checkpoint=...)``; no callback is needed. The Trainer keeps
``backward``, gradient accumulation and clipping; with ``gradient_accumulation_steps=k`` and
``GradNorm(..., accumulation_steps=k)``, GradNorm updates once per optimizer step, from the
mean per-task gradients of its k micro-batches.

Run: python examples/hf_trainer.py [--steps 12] [--save-steps 6] [--accumulate 2] [--out DIR]
     [--resume CKPT]

Needs ``pip install transformers accelerate``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from a config, never fetched

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import BertConfig, BertModel, BertPreTrainedModel, Trainer, TrainingArguments  # noqa: E402

from gradnorm_func import GradNorm  # noqa: E402

VOCAB, SEQ_LEN, NUM_TAGS, NUM_CLASSES = 100, 16, 5, 3
TARGET_SCALE = 30.0  # the regression target's scale: a task far larger than the others


class TokenTagger(nn.Module):
    """Task 0: one tag per token."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.out = nn.Linear(hidden, NUM_TAGS)

    def forward(self, z: Tensor, tags: Tensor) -> Tensor:
        return nn.functional.cross_entropy(self.out(z).flatten(0, 1), tags.flatten())


class SequenceClassifier(nn.Module):
    """Task 1: one class per sequence, from its first token."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.out = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, z: Tensor, category: Tensor) -> Tensor:
        return nn.functional.cross_entropy(self.out(z[:, 0]), category)


class SequenceRegressor(nn.Module):
    """Task 2: one number per sequence, from the mean over its tokens."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.out = nn.Linear(hidden, 1)

    def forward(self, z: Tensor, target: Tensor) -> Tensor:
        return nn.functional.mse_loss(self.out(z.mean(1)).squeeze(-1), target)


class MultiTaskEncoder(BertPreTrainedModel):
    """A BERT encoder, a shared projection W, three task heads and their GradNorm."""

    def __init__(self, config: BertConfig, alpha: float = 1.5, accumulation_steps: int = 1) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.bert = BertModel(config, add_pooling_layer=False)
        self.projection = nn.Linear(hidden, hidden)  # W, the last layer every task shares
        self.heads = nn.ModuleList([TokenTagger(hidden), SequenceClassifier(hidden),
                                    SequenceRegressor(hidden)])
        # L_i(0) are the first update's losses (each cross-entropy starts near log C).
        self.gradnorm = GradNorm(self.projection, alpha=alpha, number_of_tasks=len(self.heads),
                                 lr=0.025, heads=self.heads,
                                 accumulation_steps=accumulation_steps)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, tags: Tensor, category: Tensor,
                target: Tensor) -> dict[str, Tensor]:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        z = nn.functional.gelu(self.projection(h))  # [B, S, hidden]: where the tasks fork
        task_losses = torch.stack([head(z, y) for head, y in zip(self.heads, (tags, category, target))])
        return {"task_losses": task_losses}


class GradNormTrainer(Trainer):
    def compute_loss(self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        outputs = model(**inputs)
        loss = self.accelerator.unwrap_model(model).gradnorm(outputs["task_losses"])
        return (loss, outputs) if return_outputs else loss


class SyntheticTasks(torch.utils.data.Dataset):
    """Random token sequences; the tag of a token, the class and the target of a sequence are
    fixed functions of its tokens."""

    def __init__(self, size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (size, SEQ_LEN), generator=gen)
        self.tags = self.input_ids % NUM_TAGS
        self.category = self.input_ids[:, 0] % NUM_CLASSES
        self.target = TARGET_SCALE * torch.cos(self.input_ids.float() / 7).mean(1)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
                "tags": self.tags[i], "category": self.category[i], "target": self.target[i]}


def make_model(accumulation: int = 2) -> MultiTaskEncoder:
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=SEQ_LEN)
    torch.manual_seed(0)
    return MultiTaskEncoder(config, accumulation_steps=accumulation)


def train(out: str, *, steps: int, save_steps: int, accumulation: int = 2,
          resume: str | None = None) -> MultiTaskEncoder:
    """Trains a fresh model for ``steps`` optimizer steps, saving a checkpoint every
    ``save_steps`` under ``out``; with ``resume``, continues from that checkpoint."""
    model = make_model(accumulation)
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
        gradient_accumulation_steps=accumulation, save_strategy="steps", save_steps=save_steps,
        logging_steps=max(1, steps // 4), report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    trainer = GradNormTrainer(model=model, args=args, train_dataset=SyntheticTasks(256))
    trainer.train(resume_from_checkpoint=resume)
    return model


def main(argv: list[str] | None = None) -> MultiTaskEncoder:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=6)
    parser.add_argument("--accumulate", type=int, default=2,
                        help="the Trainer's gradient_accumulation_steps = GradNorm's accumulation_steps")
    parser.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    parser.add_argument("--resume", default=None, help="a checkpoint-N folder to resume from")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        model = train(args.out or scratch, steps=args.steps, save_steps=args.save_steps,
                      accumulation=args.accumulate, resume=args.resume)
    gradnorm = model.gradnorm
    print(f"GradNorm updates {int(gradnorm.update_count)}  L_i(0) "
          f"{[round(v, 4) for v in gradnorm.initial_losses.tolist()]} (log C = "
          f"{math.log(NUM_TAGS):.4f}, {math.log(NUM_CLASSES):.4f})  "
          f"weights {[round(v, 4) for v in gradnorm.w_i.tolist()]}")
    return model


if __name__ == "__main__":
    main(sys.argv[1:])
