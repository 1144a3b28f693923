"""TRL's GKDTrainer (trl 1.16, ``trl.experimental.gkd``) with kdfast's fused generalized JSD as its loss.

    python examples/trl_gkd.py [--out DIR]

GKD (on-policy distillation, arXiv 2306.13649) trains on a mix of dataset completions and completions
the student samples itself (``lmbda``: the share of steps that sample), against the teacher's
distribution under the generalized Jensen-Shannon divergence ``beta``. ``GKDTrainer.compute_loss``
computes both models' full logits and TRL's ``generalized_jsd_loss`` on them; the subclass below
overrides it with ``kdfast.hf.causal_lm_kd_loss(..., teacher_model=..., divergence="jsd", beta=...)``:
the same loss (the test suite checks that on a batch), from the two models' hidden states, with no
[B, L, V] logits. Generation, the lmbda / seq_kd schedule and the data stay TRL's.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from trl.experimental.gkd import GKDConfig, GKDTrainer

import tiny
from kdfast.hf import causal_lm_kd_loss

PROMPT_LEN = 8


class KdfastGKDTrainer(GKDTrainer):
    """``GKDTrainer`` whose loss is kdfast's generalized JSD(beta) between the teacher's and the student's
    next-token distributions, over the completion tokens (labels != -100), at temperature 1 as in
    ``GKDTrainer.compute_loss`` (``GKDConfig.temperature`` is the sampling temperature)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.teacher_model.eval()
        with self.accelerator.autocast():  # bf16 / fp16 runs: the autocast accelerate gives model.forward
            loss = causal_lm_kd_loss(
                model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                teacher_model=self.teacher_model, divergence="jsd", beta=self.beta, hard_weight=0.0,
                soft_weight=1.0, num_items=num_items_in_batch)
        return (loss, {"loss": loss}) if return_outputs else loss


def prompt_completion_batch(samples: list[dict]) -> dict:
    """What GKDTrainer reads: the whole sequences with labels on the completion only, and the prompts
    alone (``prompts``, ``prompt_attention_mask``) for the steps where the student samples completions."""
    input_ids = torch.tensor([s["input_ids"] for s in samples])
    labels = input_ids.clone()
    labels[:, :PROMPT_LEN] = -100
    prompts = input_ids[:, :PROMPT_LEN]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "prompts": prompts, "prompt_attention_mask": torch.ones_like(prompts)}


def build_trainer(out: Path, steps: int = 30) -> KdfastGKDTrainer:
    teacher = tiny.train_teacher(tiny.llama(tiny.TEACHER, seed=0), tiny.pattern_tokens(512, seed=1))
    args = GKDConfig(
        output_dir=str(out / "run"), max_steps=steps, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=3e-3, warmup_steps=3, lr_scheduler_type="cosine", logging_steps=5, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, prediction_loss_only=True,
        bf16=False, gradient_checkpointing=False,  # SFTConfig's defaults are True; a float32 CPU run here
        lmbda=0.5, beta=0.5, temperature=0.9, max_new_tokens=tiny.SEQ_LEN - PROMPT_LEN,
    )
    data = {split: Dataset.from_dict({"input_ids": tiny.pattern_tokens(count, seed=seed).tolist()})
            for split, count, seed in (("train", 256, 2), ("eval", 32, 3))}
    return KdfastGKDTrainer(model=tiny.llama(tiny.STUDENT, seed=4), teacher_model=teacher, args=args,
                            train_dataset=data["train"], eval_dataset=data["eval"],
                            processing_class=tiny.tokenizer(), data_collator=prompt_completion_batch)


def main(out: Path) -> dict:
    """Held-out kdfast JSD before and after training, and the training log."""
    trainer = build_trainer(out)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out generalized JSD: {before:.4f} before, {after:.4f} after {trainer.state.global_step} steps")
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
