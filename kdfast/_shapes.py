"""Benchmark shapes and the bytes each op must move, shared by bench/ suites and `kdfast bench`.

They live in the package (not in bench/, which is not installed) so that `kdfast bench` works from
a plain `pip install kdfast`; ``bench/shapes.py`` re-exports this module for the pytest-benchmark
suites, so there is one grid.

Bytes moved is the floor of memory traffic for one forward+backward of the fused loss: read the
student logits once, read the teacher (dense logits, or k indices + k values per row), write the
gradient once. Everything else (statistics, labels) is negligible at these vocabulary sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "LossShape", "kd_loss_bytes", "vocab_sweep", "CPU_SHAPES", "CPU_QUICK_SHAPES", "CUDA_SHAPES",
    "VOCAB_SWEEP", "QUICK_VOCAB_SWEEP",
]


@dataclass(frozen=True)
class LossShape:
    rows: int
    vocab: int
    dtype: torch.dtype
    teacher: str  # "dense" or "topk"
    k: int = 64

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        teacher = "dense" if self.teacher == "dense" else f"top{self.k}"
        return f"N{self.rows}-V{self.vocab}-{dtype}-{teacher}"


def kd_loss_bytes(shape: LossShape) -> int:
    """Bytes the fused kd_loss must move: read logits [+ dense teacher], write the gradient."""
    element = torch.empty((), dtype=shape.dtype).element_size()
    logits = shape.rows * shape.vocab * element
    if shape.teacher == "dense":
        teacher = logits
    else:
        teacher = shape.rows * shape.k * (8 + element)  # int64 indices + values
    return 2 * logits + teacher


def vocab_sweep(vocabs: list[int], rows: int, dtype: torch.dtype, teacher: str = "dense") -> list[LossShape]:
    """One shape per vocabulary size, everything else fixed: the time-against-V curve."""
    return [LossShape(rows, vocab, dtype, teacher) for vocab in vocabs]


CPU_SHAPES = [
    LossShape(1024, 128256, dtype, teacher)
    for dtype in (torch.float32, torch.bfloat16)
    for teacher in ("dense", "topk")
]
CPU_QUICK_SHAPES = [LossShape(256, 32000, torch.float32, teacher) for teacher in ("dense", "topk")]
CUDA_SHAPES = [LossShape(16384, 128256, torch.bfloat16, teacher) for teacher in ("dense", "topk")]
VOCAB_SWEEP = [32000, 65536, 128256, 262144]
QUICK_VOCAB_SWEEP = [8192, 16384, 32000]
