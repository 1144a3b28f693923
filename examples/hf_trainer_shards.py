"""`transformers.Trainer` distilling a student from kdfast shards with the fused linear KD loss.

    python examples/hf_trainer_shards.py [--out DIR]

A tiny teacher (examples/tiny.py) is run once by ``kdfast.capture`` into top-k shards (its 16 most
likely tokens' log-probs and the log of the mass outside them). The student then trains on those shards
with a ``Trainer`` whose ``compute_loss`` calls ``kdfast.fused_linear_kd_loss`` on the student's last
hidden state and LM head: hard CE + forward KL with the tail bucket, the logits computed chunk by chunk
and never held whole. One process (see docs/recipes.md for DDP / FSDP).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import kdfast
import tiny
from kdfast.capture import capture
from kdfast.hf import hidden_and_head
from kdfast.shards import ShardDataset
from kdfast.train.data import collate


class ShardKDTrainer(Trainer):
    """A ``Trainer`` whose loss is kdfast's: ``hard_weight * CE + soft_weight * KL(teacher || student)``
    against the shards' top-k log-probs plus the tail bucket, from the hidden states (no [B, L, V] logits)."""

    def __init__(self, *args, hard_weight: float = 0.2, soft_weight: float = 0.8, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_options = dict(teacher_kind="logprobs", tail=True, temperature=1.0, hard_weight=hard_weight,
                                 soft_weight=soft_weight)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.accelerator.autocast():  # bf16 / fp16 runs: the autocast accelerate gives model.forward
            hidden, weight, bias = hidden_and_head(model, inputs["input_ids"])  # [B, L, H], [V, H], None
            loss = kdfast.fused_linear_kd_loss(
                hidden, weight, inputs["labels"], bias=bias, teacher_indices=inputs["teacher_indices"],
                teacher_values=inputs["teacher_values"], teacher_tail=inputs["teacher_tail"],
                num_items=num_items_in_batch,  # learned tokens of the accumulated batch (None: this batch's mean)
                **self.loss_options)
        return (loss, {"loss": loss}) if return_outputs else loss


def shard_batch(samples: list[dict]) -> dict:
    """kdfast's padding collate, with the labels also as ``shift_labels``. ShardDataset's labels are
    already aligned with the logits (row i predicts token i + 1); Trainer counts ``num_items_in_batch``
    only for batches with ``labels``, over ``shift_labels`` as they are when present (over
    ``labels[:, 1:]`` otherwise, which would drop position 0 of every row)."""
    batch = collate(samples)
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], "shift_labels": batch["labels"],
            "teacher_indices": batch["teacher_indices"], "teacher_values": batch["teacher_values"],
            "teacher_tail": batch["teacher_tail"]}


def capture_shards(out: Path) -> tuple[ShardDataset, ShardDataset]:
    """A tiny trained teacher's top-16 targets of 256 train and 32 held-out pattern sequences."""
    teacher = tiny.train_teacher(tiny.llama(tiny.TEACHER, seed=0), tiny.pattern_tokens(512, seed=1))
    teacher.save_pretrained(out / "teacher")
    for split, tokens in (("train", tiny.pattern_tokens(256, seed=2)), ("heldout", tiny.pattern_tokens(32, seed=3))):
        capture(out / "teacher", tokens.numpy(), out / "shards" / split, k=16, device="cpu", progress=False)
    return ShardDataset(out / "shards" / "train"), ShardDataset(out / "shards" / "heldout", shuffle=False)


def build_trainer(out: Path, steps: int = 40) -> ShardKDTrainer:
    train, heldout = capture_shards(out)
    args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        per_device_eval_batch_size=16, learning_rate=3e-3, warmup_steps=4, lr_scheduler_type="cosine",
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        remove_unused_columns=False,  # keep the teacher tensors: they are not arguments of the model's forward
        prediction_loss_only=True,  # evaluation: the kdfast loss, no logits
    )
    return ShardKDTrainer(model=tiny.llama(tiny.STUDENT, seed=4), args=args, train_dataset=train,
                          eval_dataset=heldout, data_collator=shard_batch)


def main(out: Path) -> dict:
    """Held-out kdfast loss before and after training, and the training log."""
    trainer = build_trainer(out)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out kdfast loss: {before:.4f} before, {after:.4f} after {trainer.state.global_step} steps")
    return {"eval_before": before, "eval_after": after, "log": trainer.state.log_history, "trainer": trainer}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="working directory (default: a temporary one)")
    out = parser.parse_args().out
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
    else:
        main(out)
