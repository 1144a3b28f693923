"""`transformers.Trainer` distilling a student from a live teacher with the fused linear KD loss.

    python examples/hf_trainer_live_teacher.py [--out DIR]

No capture: every step runs the teacher (examples/tiny.py, wider than the student) under no_grad, and
``kdfast.hf.causal_lm_kd_loss`` hands both models' last hidden states and LM heads to
``kdfast.fused_linear_kd_loss`` (``teacher_hidden`` / ``teacher_weight``): hard CE + T^2 * KL between
the temperature-softened distributions, neither model's [B, L, V] logits ever held whole. One process
(see docs/recipes.md for DDP / FSDP).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import tiny
from kdfast.hf import causal_lm_kd_loss


class LiveTeacherKDTrainer(Trainer):
    """A ``Trainer`` whose loss is kdfast's, against ``teacher`` run on the same batch:
    ``hard_weight * CE + soft_weight * T^2 * KL(teacher_T || student_T)`` over the shifted positions."""

    def __init__(self, *args, teacher, temperature: float = 2.0, hard_weight: float = 0.5,
                 soft_weight: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.loss_options = dict(temperature=temperature, hard_weight=hard_weight, soft_weight=soft_weight)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.accelerator.autocast():  # bf16 / fp16 runs: the autocast accelerate gives model.forward
            loss = causal_lm_kd_loss(
                model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],  # unshifted, HF style
                teacher_model=self.teacher,
                num_items=num_items_in_batch,  # Trainer counts labels[:, 1:] of the whole accumulated batch
                **self.loss_options)
        return (loss, {"loss": loss}) if return_outputs else loss


class PatternDataset(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.tokens[index]}


def lm_batch(samples: list[dict]) -> dict:
    """Equal-length sequences: input_ids, an all-ones attention mask, labels = input_ids (unshifted)."""
    input_ids = torch.stack([s["input_ids"] for s in samples])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def build_trainer(out: Path, steps: int = 40) -> LiveTeacherKDTrainer:
    teacher = tiny.train_teacher(tiny.llama(tiny.TEACHER, seed=0), tiny.pattern_tokens(512, seed=1))
    args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        per_device_eval_batch_size=16, learning_rate=3e-3, warmup_steps=4, lr_scheduler_type="cosine",
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        prediction_loss_only=True,  # evaluation: the kdfast loss, no logits
    )
    return LiveTeacherKDTrainer(model=tiny.llama(tiny.STUDENT, seed=4), args=args, teacher=teacher,
                                train_dataset=PatternDataset(tiny.pattern_tokens(256, seed=2)),
                                eval_dataset=PatternDataset(tiny.pattern_tokens(32, seed=3)), data_collator=lm_batch)


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
