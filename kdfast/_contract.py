"""What ``kdfast.api`` hands to a backend after validation: flattened tensors plus ``LossOptions``.

Every backend module (``kdfast.ops.cpu.kd_loss``, ``kdfast.ops.triton.kd_loss``,
``kdfast.ops.torch.kd_loss``) exposes

    kd_loss(logits,           # [N, V] fp32/bf16/fp16; overwritten by the gradient if opts.inplace
            labels,           # [N] int64 or None (None: every row active, hard_weight == 0)
            teacher_logits,   # [N, V], or None
            teacher_indices,  # [N, k] int32/int64, -1 = empty slot, or None
            teacher_values,   # [N, k], or None
            teacher_tail,     # [N] float32: log of the teacher's mass outside the valid slots (-inf: none),
                              #   only with teacher_kind="logprobs" and tail=True; None: recompute it
                              #   as log(max(1 - sum exp(values), 0))
            divisor,          # 0-dim float32 on the logits' device: the "mean" denominator, or None
            opts: LossOptions,
    ) -> (loss, ce_rows, div_rows)

``loss`` is a 0-dim float32 tensor ("mean", "sum") or [N] float32 ("none") that is differentiable
with respect to ``logits``; ``ce_rows`` and ``div_rows`` are detached [N] float32 per-row CE_r and
unscaled D_r, zero on inactive rows. Exactly one of the dense / sparse teachers is given. Tensors may
be strided, expanded or sliced: a backend copies what its kernels need contiguous.

In-place contract (how ``kdfast.fused_linear`` calls every backend on its chunk buffer): under
``torch.no_grad`` with ``opts.inplace`` and ``opts.compute_grad``, ``logits`` (contiguous) is
overwritten with d loss / d logits for grad_output = 1 (per row for "none"), divisor applied.

Bad rows (one rule on every backend). With value checks on (the default) ``kdfast.api`` raises
ValueError for labels outside [0, V) other than ignore_index, indices outside [-1, V) and duplicate
valid indices within a row, before any backend runs. With checks off (``KDFAST_CHECK_VALUES=0``,
torch.compile) a backend must still never touch memory outside its tensors: the cpu backend raises
ValueError for out-of-range labels / indices (it is on the host), triton makes such a row's loss NaN.
Duplicate valid indices and non-finite teacher values (NaN or +inf anywhere; -inf is allowed in
dense teacher_logits and in sparse "logits" / "logprobs" values, where it means zero mass, and in
teacher_tail; with teacher_kind="probs" -inf is bad too; values of empty slots are never read) make
that row's loss, ce_rows and div_rows NaN and its gradient zero, on every backend. Inactive rows
(label == ignore_index) stay 0.
"""
from __future__ import annotations

from dataclasses import dataclass

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")
# DistiLLM's skewed KL divergences (Ko et al. 2024) and the default of their mixture weight alpha.
SKEW_DIVERGENCES = ("skew_kl", "skew_reverse_kl")
SKEW_ALPHA_DEFAULT = 0.1
TEACHER_KINDS = ("logits", "logprobs", "probs")
REDUCTIONS = ("mean", "sum", "none")
# Temperatures the backends are accurate for (float32, scaled logits finite); outside: ValueError.
TEMPERATURE_RANGE = (1e-2, 1e2)


def effective_divergence(divergence: str, beta: float, alpha: float) -> str:
    """The divergence a backend computes: jsd at beta = 0 / 1 and the skew divergences at alpha = 0 are
    forward / reverse KL, and run as such on every backend (so those limits are exact)."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence in SKEW_DIVERGENCES and alpha == 0.0:
        return "forward_kl" if divergence == "skew_kl" else "reverse_kl"
    return divergence


@dataclass(frozen=True)
class LossOptions:
    """Static options of one loss call; hashable so that compiled graphs can key on it."""

    temperature: float = 1.0
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5  # jsd only
    alpha: float = SKEW_ALPHA_DEFAULT  # skew_kl / skew_reverse_kl only, in [0, 1)
    teacher_kind: str = "logits"
    tail: bool = False
    ignore_index: int = -100
    reduction: str = "mean"
    scale_t2: bool = True
    inplace: bool = False
    compute_grad: bool = True

    @property
    def soft_scale(self) -> float:
        """soft_weight * s, the factor in front of D_r in the row loss."""
        return self.soft_weight * (self.temperature**2 if self.scale_t2 else 1.0)
