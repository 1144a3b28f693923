"""Fused distillation loss on GPU (Triton), its gradient computed in the forward pass.

Math (per active row; z student logits [V], T temperature, c = soft_weight * s, s = T^2 or 1):
    b_j = z_j / T,  q = softmax(b),  log q_j = b_j - lse(b)
    CE  = lse(z) - z_y                                   untempered
    dCE/dz_j = softmax(z)_j - 1[j = y]
    dD/dz_j  = (1/T) dD/db_j, with D the row's divergence:
  dense teacher t:  a_j = t_j / T,  p = softmax(a)  (t_j = -inf gives p_j = 0, and 0 log 0 = 0)
    forward KL  D = sum_j p_j (log p_j - log q_j)              dD/db_j = q_j - p_j
    reverse KL  D = sum_j q_j (log q_j - log p_j)              dD/db_j = q_j ((log q_j - log p_j) - D)
    jsd(beta)   M = beta p + (1 - beta) q,  D = beta KL(p||M) + (1 - beta) KL(q||M)   (TRL)
                g_j = dD/dq_j = (1 - beta) log(q_j / M_j)      dD/db_j = q_j (g_j - sum_i q_i g_i)
                beta = 0 is forward KL and beta = 1 is reverse KL (dispatched to those kernels).
    skew KL(alpha) and skew reverse KL(alpha) (DistiLLM, Ko et al. 2024): one of jsd's two terms, the
                mixture weight of p in M (alpha, or 1 - alpha) in place of beta; alpha = 0 is forward /
                reverse KL (dispatched to those kernels). Both D are at most -log alpha.
    skew_kl     M = alpha p + (1 - alpha) q,  D = KL(p||M) = sum_j p_j (log p_j - log M_j)
                dD/dq_j = -(1 - alpha) p_j / M_j; with w_j = (1 - alpha) q_j / M_j in [0, 1]:
                dD/db_j = q_j S - p_j w_j,  S = sum_i p_i w_i
    skew_reverse_kl   M = alpha q + (1 - alpha) p,  D = KL(q||M) = sum_j q_j (log q_j - log M_j)
                dD/dq_j = log(q_j / M_j) + 1 - alpha q_j / M_j = log(q_j / M_j) + v_j,  v_j = (1 - alpha) p_j / M_j:
                dD/db_j = q_j ((log(q_j / M_j) + v_j) - (D + V)),  V = sum_i q_i v_i
                (v rather than 1 - alpha q / M: as alpha -> 1 all terms stay O(1 - alpha), none O(1) cancels.)
  sparse teacher, slots I (index -1 = empty), target mass P = sum_{i in I} p_i, Q = sum_{i in I} q_i:
    "logits", tail-less "logprobs": p = softmax(values / T) over valid slots (P = 1, or 0 without any)
    "probs": p_i = values_i as given.
    Both: D = sum_I p_i (log p_i - log q_i),  dD/db_j = P q_j - p_j 1[j in I]   (0 for an all-empty row)
    "logprobs" + tail: p_i = exp(values_i); p_rest = exp(teacher_tail) when given, else max(1 - P, 0);
        q_rest = max(sum_{j not in I} q_j, FLT_MIN), the off-slot sum itself (1 - Q would cancel to
        an ulp of 1.0 when the student is confident on the slots: a logit of 40 leaves q_rest ~ 1e-15);
        D = sum_I p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest),  r = p_rest / q_rest
        (r = 0 where the floor is active, the floor's derivative; the CPU backend's floor too), and
        dD/db_j = (P - r Q) q_j off the slots,  (P + r q_rest) q_j - p_j on them
        (from dq_rest/db_j = q_j (1[j not in I] - q_rest); written so that no r - r Q cancels).
    Row gradient: w * (hard_weight * dCE/dz + (c / T) * dD/db), w = 1/divisor ("mean") or 1;
    backward multiplies it by grad_output (scalar, or per row for reduction="none").
  fp16 under autograd: the stored gradient is 2^H times the un-divided row gradient, H =
    floor(log2(256 / B)) clamped to [-16, 24], B = |hard_weight| + |c / T| (an entry of the forward-KL row
    gradient is at most B; 256 is headroom for reverse KL and jsd), and backward applies grad_output / (2^H divisor) in float32 and rounds once more: a "mean"
    1/divisor of 1/16384 would otherwise flush most entries to zero in fp16 before GradScaler's factor
    could lift them. Without autograd (kdfast.fused_linear's no_grad chunks, inplace=True) the buffer
    holds d loss / d logits for grad_output = 1, divisor applied, as for every other dtype.

Bad rows (_contract.py): the kernels never touch memory outside their tensors. An active label outside
[0, V), an index outside [-1, V), a duplicate valid index, a NaN or +inf teacher value (dense, slot
value, teacher_tail; also -inf for "probs") make the row's loss, CE and D NaN and its gradient 0, found
on the device (no host sync): labels and slots before the row's passes, a dense teacher by l_p being
NaN after pass 1 (a NaN term, or +inf - +inf).

Numerics: float32 throughout (inputs are upcast on load, never divided by T in bf16), exponentials
as exp2. Running maxima are kept in raw logits and subtracted before scaling, exp2((x - m) * log2(e)/T):
scaling first would cost an ulp of 1e4 * log2(e) per logit, which KL amplifies by |log p - log q|.
Forward and reverse KL are separable and accumulated online in the statistics pass from centred raw
differences, as the CPU backend does: acc = sum_j e^p_j ((t_j - m_p) - (z_j - m_q)) (reverse: e^q_j and
the opposite sign), shifted when a maximum moves, and D = acc / (T l_p) + ln l_q - ln l_p (reverse:
acc / (T l_q) + ln l_p - ln l_q). The centred differences are exact for close logits however large, so
D does not depend on a shift of either row (teacher +5000, student -5000). The reverse-KL gradient uses
log q_j - log p_j - D = ((z_j - m_q) - (t_j - m_p) - acc / l_q) / T, where the log-normalizers cancel
exactly, so no ulp of D is left where the exact value is 0 (the student's mode at T = 0.05, logits 1e4).
tests/test_kd_loss_triton_edges.py checks D and the gradient per element against float64 at both ends of
TEMPERATURE_RANGE (1e-2, 1e2) with logits of +-5000 (scaled: 5e5 at T = 1e-2). Generalized JSD
is not separable (log M_j needs both final normalizers) and takes one more pass for sum_i q_i g_i and D;
where student and teacher are both -inf (a masked vocabulary) q = p = 0 and the entry adds nothing.
The skew divergences take the same extra pass for D and S (V), with log M_j the same log-space mixture;
p_j w_j = exp2(log2 p_j + log2(1 - alpha) + log2 q_j - log2 M_j) and v_j = exp2(log2(1 - alpha) + log2 p_j
- log2 M_j), so where q_j underflows the term goes to 0 from exact logs (M_j is then alpha p_j, resp.
(1 - alpha) p_j), never as 0/0; masked entries add nothing, as for jsd.

Schedule: a persistent grid (programs_per_sm programs per SM) walks the rows, one row at a time; row
offsets are int64 (the row id is cast before the multiply).
  pass 1 (stats): online max / sum over BLOCK_V blocks for q (tempered), softmax(z) (untempered, only
          when T != 1 and labels are given) and p (dense), plus the online KL accumulator. With the
          tail bucket the program first marks the row's slots in its own int8 scratch row ([programs, V],
          zeroed once per call, cleared after the pass; CTA barriers order marks, reads and clears), and
          pass 1 also sums q's terms off the marks: q_rest without cancellation, for one extra 1-byte
          load per element from L2 and no extra exponential.
  (jsd only: one more pass for D and sum_i q_i g_i; skew: for D and S, resp. V)
  pass 2 (grad):  re-reads the row, writes the gradient; sparse slots are then overwritten with their
          exact value after a CTA barrier (a per-element membership test against k slots would cost
          k compares per element; the fix-up touches k elements).
  Ignored and bad rows skip both passes and write zeros. compute_grad=False skips the gradient pass.

H100 performance reasoning (not measured here: there was no GPU; bench/gpu.sh measures it):
  * Bytes the op must move (bench/shapes.py): read z, read the dense teacher, write the gradient; at
    bf16 V=128k that is 6 B/element dense, 4 B/element sparse. The second read of z (and of the teacher)
    must come from L2 to approach copy bandwidth, so pass 1 loads with evict_last, pass 2 loads and the
    gradient stores with evict_first (Triton emits L2 createpolicy hints on sm_80+), and pass 2 walks
    the row backwards, so the blocks read last in pass 1 are re-read first (their reuse distance is
    short; a forward sweep would put every block at a full-pass distance, an LRU cliff).
  * L2 footprint between the two reads ~= rows in flight x row bytes. The persistent grid fixes the
    rows in flight at programs_per_sm per SM (1: 132 on H100), whatever the occupancy: 132 x 256 KB =
    33 MB sparse, which fits the 50 MB L2, and 132 x 512 KB = 67 MB dense, which does not quite; the
    backwards sweep still turns part of that re-read into hits. Expect dense bf16 at V=128k to be
    furthest from the target. The tail bucket's scratch rows (V bytes per program) add 132 x 128 KB =
    17 MB to that footprint at V=128k.
  * Whole row on chip, one read: a bf16 row at V=128k is 256 KB, more than the 228 KB of SMEM of an SM
    and the whole 256 KB register file; Triton has no user-level distributed shared memory to spread
    a row over a cluster, so a single-read kernel is not possible there. For V <= 32k the row would fit,
    but then 132 rows in flight are <= 17 MB and the re-read hits L2 anyway, so no special path.
  * Launch parameters are the table _LAUNCH, by shape class: BLOCK_V = 8192 (dense: two streams; 4096
    for jsd, whose pass 3 needs more registers) / 16384 (sparse: one stream; 8192 with the tail bucket,
    whose slot marks are a second stream), 16 warps: 16-32 elements per thread per stream, 32 KB in
    flight per SM per iteration, which covers HBM latency (Little's law: 3.35 TB/s x ~1 us / 132 SMs
    ~= 25 KB per SM); num_stages is Triton's default (3), and one program per SM. Registers per thread
    (Triton 3.9 AOT for sm_90, bf16 with labels at T != 1, from cuobjdump --dump-resource-usage; no
    GPU needed): dense 96 (forward KL) / 94 (reverse) / 90 (jsd; the skew divergences, which share its launch
    class, are not measured yet), sparse 99-104 (k = 64), the tail
    bucket 96 (128, the cap, at BLOCK_V = 16384), the scale kernel 76, none with stack or spills. A
    512-thread CTA above 64 registers/thread leaves no room for a second one in an SM's 64k registers,
    so one CTA per SM runs, whatever programs_per_sm says; latency hiding is the in-flight bytes of
    that one CTA. These are the knobs to sweep on the GPU (bench/gpu.sh).
    Loads are 16-byte vectors when V is a multiple of 16 (Triton specializes on it; all common
    vocabularies are), scalar otherwise.
    Arithmetic: pass 1 is 2-3 ex2 per element (q, p, untempered CE when T != 1), pass 2 the same;
    ~6 ex2/element at ~475 G elements/s (85% of 3.35 TB/s over 6 B) is ~2.9 T ex2/s, below the
    ~3.8 T/s MUFU rate of H100, so the kernel should stay memory-bound, with little headroom at T != 1.
  * Backward: scaling [N, V] by grad_output would move 4 B/element more; the scale kernel reads
    grad_output on the device and skips rows whose factor is exactly 1 (the usual case for a loss that
    is the final scalar), so there is no host sync and, usually, no traffic. That needs the gradient
    buffer to be the op's own; with inplace=True it is the caller's logits, which keep the stored
    gradient, and backward writes a scaled copy (a full read + write). The fp16 autograd path always
    scales (its factor is 2^-H / divisor).
  * No [N, V] float32 temporaries: the gradient is written in the logits' dtype (into the logits
    themselves when inplace=True); statistics are per-row scalars; loss rows are [N] float32.

Inputs may be strided, expanded or sliced: the launcher makes contiguous copies of what is not
(the logits through a differentiable .contiguous(); inplace=True needs contiguous logits).

Compile safety: the forward and the gradient scale are ``torch.library.custom_op``s (opaque to
Dynamo/Inductor, with fake implementations), wrapped in one ``autograd.Function``; nothing calls
.item() or synchronizes with the host, so the op can be captured in CUDA graphs. Backward scales the
op's gradient buffer in place, so it runs once per forward: a second backward through a retained
graph raises (the buffer's version changed) instead of scaling twice. Under torch.compile the in-place
op (inplace=True) is functionalized like any mutating op; whether the logits buffer is then reused
is up to Inductor's re-inplacing, the values are the same.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kdfast import _backend
from kdfast._contract import LossOptions, effective_divergence

__all__ = ["kd_loss"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_Q_REST_FLOOR = tl.constexpr(1.1754943508222875e-38)  # FLT_MIN, the smallest normal float32
_FORWARD_KL = tl.constexpr(0)
_REVERSE_KL = tl.constexpr(1)
_JSD = tl.constexpr(2)
_SKEW_KL = tl.constexpr(3)
_SKEW_REVERSE_KL = tl.constexpr(4)
_DIVERGENCE_CODES = {"forward_kl": _FORWARD_KL, "reverse_kl": _REVERSE_KL, "jsd": _JSD, "skew_kl": _SKEW_KL,
                     "skew_reverse_kl": _SKEW_REVERSE_KL}
_SLOT_SOFTMAX = tl.constexpr(0)  # "logits", and "logprobs" without the tail bucket
_SLOT_PROBS = tl.constexpr(1)
_SLOT_TAIL = tl.constexpr(2)


@dataclass(frozen=True)
class _LaunchParams:
    block_v: int  # vocabulary elements per loop iteration (a power of two)
    num_warps: int  # at block_v; fewer, with a smaller block, for small V
    num_stages: int  # software pipelining depth of the loops (Triton's default)
    programs_per_sm: int  # persistent grid: rows in flight per SM (see the L2 footprint above)


# Launch parameters by shape class (the kernel and its streams): the values of the module docstring, to be
# tuned on a GPU with bench/gpu.sh. jsd at 8192 hit the 128-register cap of 512 threads and spilled (sm_90
# ptxas), hence its smaller block; so did the tail bucket (its slot marks) at 16384. The skew divergences
# run in the "jsd" class (the same three passes over the row). Tests shrink the blocks to make rows span
# several of them.
_LAUNCH = {
    "dense": _LaunchParams(block_v=8192, num_warps=16, num_stages=3, programs_per_sm=1),
    "jsd": _LaunchParams(block_v=4096, num_warps=16, num_stages=3, programs_per_sm=1),
    "sparse": _LaunchParams(block_v=16384, num_warps=16, num_stages=3, programs_per_sm=1),
    "tail": _LaunchParams(block_v=8192, num_warps=16, num_stages=3, programs_per_sm=1),
    "scale": _LaunchParams(block_v=16384, num_warps=16, num_stages=3, programs_per_sm=1),
}
# Under the interpreter: small blocks keep CPU tests fast, and a few programs walk several rows each.
_INTERPRET_BLOCK_V = 1024
_INTERPRET_PROGRAMS = 3
# fp16 gradients under autograd are stored times 2^H with H = log2(_FP16_HEADROOM / B), B the bound of an
# entry of the un-divided row gradient (see "fp16" above).
_FP16_HEADROOM = 256.0

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_offset(row_id, row_stride):
    """Element offset of a row; int64 so that N * V beyond 2^31 does not wrap."""
    return tl.cast(row_id, tl.int64) * row_stride


@triton.jit
def _row_label(labels_ptr, row, ignore_index, V, HAS_LABELS: tl.constexpr):
    """(y, ok, bad): ok for an active row with a label in [0, V); bad for an active label outside it
    (then y = 0, so that nothing reads outside the row)."""
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        active = y != ignore_index
        bad = active & ((y < 0) | (y >= V))
        y = tl.where(bad, 0, y)
        ok = active & (bad == 0)
    else:
        y = -1
        ok = True
        bad = False
    return y, ok, bad


@triton.jit
def _rescale(m, x, scale):
    """Online max step over raw logits x: new max, factor for the old sum, exp2((x - new max) * scale).

    Shifting before scaling keeps logits of 1e4 exact: scaling first costs an ulp of 1e4 * log2(e),
    which KL amplifies by |log p - log q| (up to ~1e4 too)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # All -inf so far (masked lanes, teacher -inf): -inf - -inf would be NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2((m - m_safe) * scale), tl.exp2((x - m_safe) * scale)


@triton.jit
def _finite_max(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _logaddexp2(x, y):
    mx = tl.maximum(x, y)
    return mx + tl.log2(1.0 + tl.exp2(-tl.abs(x - y)))


@triton.jit
def _to_store(x, ptr, EMULATE_RTNE: tl.constexpr):
    """x in the element type of ptr. The interpreter truncates float32 -> bfloat16 where the GPU rounds
    to nearest even; EMULATE_RTNE (interpreter and bf16 only) rounds the bits first, so CPU tests see
    GPU numerics."""
    if EMULATE_RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _store_row_results(loss_rows_ptr, ce_rows_ptr, div_rows_ptr, row, ce, div, hard_weight, soft_scale):
    tl.store(loss_rows_ptr + row, hard_weight * ce + soft_scale * div)
    tl.store(ce_rows_ptr + row, ce)
    tl.store(div_rows_ptr + row, div)


@triton.jit
def _zero_row(g_row, V, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty), mask=cols < V)


@triton.jit
def _skipped_row(g_row, loss_rows_ptr, ce_rows_ptr, div_rows_ptr, row, V, bad, COMPUTE_GRAD: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """An ignored row (loss 0) or a bad one (loss, CE and D NaN); the gradient is 0 in both."""
    value = tl.where(bad, float("nan"), 0.0)
    _store_row_results(loss_rows_ptr, ce_rows_ptr, div_rows_ptr, row, value, value, 1.0, 1.0)
    if COMPUTE_GRAD:
        _zero_row(g_row, V, BLOCK_V)


@triton.jit
def _grad_weights(divisor_ptr, hard_weight, soft_grad, grad_scale, DIVIDE: tl.constexpr):
    """Factors of the CE term and of dD/db in the stored gradient: grad_scale (1, or 2^H for deferred
    fp16), divided by the "mean" divisor unless backward applies it."""
    w = grad_scale
    if DIVIDE:
        w = w / tl.load(divisor_ptr)
    return hard_weight * w, soft_grad * w


@triton.jit
def _ce_value(z_row, y, m_c, log2l_c):
    """CE = lse(z) - z_y = (m_c - z_y) + ln(l_c), with m_c the raw max."""
    return (m_c - tl.load(z_row + y).to(tl.float32)) + _LN2 * log2l_c


@triton.jit
def _ce_term(q, z, cols, y, m_c, log2l_c, SAME_T: tl.constexpr):
    """softmax(z)_j - 1[j = y]; at T = 1 softmax(z) is q itself."""
    if SAME_T:
        sm = q
    else:
        sm = tl.exp2((z - m_c) * _LOG2E - log2l_c)
    return sm - tl.where(cols == y, 1.0, 0.0)


@triton.jit
def _dense_stats(z_row, t_row, V, scale2, DIVERGENCE: tl.constexpr, CE_STATS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1: raw maxima m and log2-scaled sums l of q, p and (CE_STATS) softmax(z), plus the centred
    cross term: forward KL acc = sum_j e^p_j ((t_j - m_p) - (z_j - m_q)), reverse KL
    acc = sum_j e^q_j ((z_j - m_q) - (t_j - m_p)), kept relative to the current maxima (when they move by
    dq, dp: forward acc <- alpha_p (acc + (dq - dp) l_p), reverse acc <- alpha_q (acc + (dp - dq) l_q))."""
    m_q = float("-inf")
    l_q = 0.0
    m_p = float("-inf")
    l_p = 0.0
    m_c = float("-inf")
    l_c = 0.0
    acc = 0.0
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
        m_q_new, alpha_q, e_q = _rescale(m_q, z, scale2)
        m_p_new, alpha_p, e_p = _rescale(m_p, t, scale2)
        if DIVERGENCE == _FORWARD_KL or DIVERGENCE == _REVERSE_KL:
            # Centred differences: exact for close logits however large, so D is shift-invariant.
            dzt = (z - _finite_max(m_q_new)) - (t - _finite_max(m_p_new))
            shift = (m_q_new - m_q) - (m_p_new - m_p)  # dq - dp, raw units
            if DIVERGENCE == _FORWARD_KL:
                acc = (acc + tl.where(l_p > 0, shift * l_p, 0.0)) * alpha_p
                acc += tl.sum(tl.where(e_p > 0, -e_p * dzt, 0.0), axis=0)
            else:
                acc = (acc - tl.where(l_q > 0, shift * l_q, 0.0)) * alpha_q
                acc += tl.sum(tl.where(e_q > 0, e_q * dzt, 0.0), axis=0)
        l_q = l_q * alpha_q + tl.sum(e_q, axis=0)
        l_p = l_p * alpha_p + tl.sum(e_p, axis=0)
        if CE_STATS:
            m_c_new, alpha_c, e_c = _rescale(m_c, z, _LOG2E)
            l_c = l_c * alpha_c + tl.sum(e_c, axis=0)
            m_c = m_c_new
        m_q = m_q_new
        m_p = m_p_new
    return m_q, l_q, m_p, l_p, m_c, l_c, acc


@triton.jit
def _jsd_sums(z_row, t_row, V, m_q, log2l_q, m_p, log2l_p, scale2, log2_wp, log2_wq, BLOCK_V: tl.constexpr):
    """Pass 2 of jsd, backwards (L2 reuse): sum_j p_j log2(p_j / M_j) and sum_j q_j log2(q_j / M_j),
    M = w_p p + w_q q."""
    sp = 0.0
    sq = 0.0
    offs = tl.arange(0, BLOCK_V)
    num_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(num_blocks):
        cols = (num_blocks - 1 - i) * BLOCK_V + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
        lq = (z - m_q) * scale2 - log2l_q
        lp = (t - m_p) * scale2 - log2l_p
        lm = _logaddexp2(lp + log2_wp, lq + log2_wq)
        q = tl.exp2(lq)
        p = tl.exp2(lp)
        sq += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), axis=0)
        sp += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), axis=0)
    return sp, sq


@triton.jit
def _skew_weighted_p(p, lp, lq, lm, log2_wq):
    """skew_kl's p_j w_j = p_j (1 - alpha) q_j / M_j from the logs; 0 where p_j = 0."""
    return tl.where(p > 0, tl.exp2(lp + log2_wq + lq - lm), 0.0)


@triton.jit
def _skew_reverse_v(lp, lm, log2_wp):
    """skew_reverse_kl's v_j = (1 - alpha) p_j / M_j from the logs (NaN where p = q = 0: unused there)."""
    return tl.exp2(log2_wp + lp - lm)


@triton.jit
def _skew_sums(z_row, t_row, V, m_q, log2l_q, m_p, log2l_p, scale2, log2_wp, log2_wq, DIVERGENCE: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """Pass 2 of the skew divergences, backwards (L2 reuse): (D, the gradient's row constant k), with
    dD/db_j = q_j k - p_j w_j for skew_kl (k = S) and q_j ((log(q_j / M_j) + v_j) - k) for skew_reverse_kl
    (k = D + V), M = w_p p + w_q q."""
    d = 0.0
    s = 0.0
    offs = tl.arange(0, BLOCK_V)
    num_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(num_blocks):
        cols = (num_blocks - 1 - i) * BLOCK_V + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
        lq = (z - m_q) * scale2 - log2l_q
        lp = (t - m_p) * scale2 - log2l_p
        lm = _logaddexp2(lp + log2_wp, lq + log2_wq)
        q = tl.exp2(lq)
        if DIVERGENCE == _SKEW_KL:
            p = tl.exp2(lp)
            d += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), axis=0)
            s += tl.sum(_skew_weighted_p(p, lp, lq, lm, log2_wq), axis=0)
        else:
            d += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), axis=0)
            s += tl.sum(tl.where(q > 0, q * _skew_reverse_v(lp, lm, log2_wp), 0.0), axis=0)  # q_j v_j
    d = _LN2 * d
    if DIVERGENCE == _SKEW_KL:
        k = s
    else:
        k = d + s
    return d, k


@triton.jit
def _dense_grad_pass(z_row, t_row, g_row, V, y, m_q, log2l_q, m_p, log2l_p, m_c, log2l_c, k_rev, sq, skew_k, scale2,
                     inv_t, kh, ks, beta, log2_wp, log2_wq, DIVERGENCE: tl.constexpr, HARD: tl.constexpr,
                     SAME_T: tl.constexpr, EMULATE_RTNE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Last pass: the gradient, walking opposite to the previous pass (its last blocks are in L2)."""
    offs = tl.arange(0, BLOCK_V)
    num_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(num_blocks):
        if DIVERGENCE == _FORWARD_KL or DIVERGENCE == _REVERSE_KL:
            block = num_blocks - 1 - i
        else:
            block = i
        cols = block * BLOCK_V + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        lq = (z - m_q) * scale2 - log2l_q
        q = tl.exp2(lq)
        if DIVERGENCE == _FORWARD_KL:
            d = q - tl.exp2((t - m_p) * scale2 - log2l_p)
        elif DIVERGENCE == _REVERSE_KL:
            # log q_j - log p_j - D = ((z_j - m_q) - (t_j - m_p) - k_rev) / T: the log-normalizers cancel
            # exactly, so no ulp of D is left where the exact value is 0 (the student's mode).
            dzt = (z - m_q) - (t - _finite_max(m_p))
            d = tl.where(q > 0, q * ((dzt - k_rev) * inv_t), 0.0)
        elif DIVERGENCE == _JSD:
            lp = (t - m_p) * scale2 - log2l_p
            lm = _logaddexp2(lp + log2_wp, lq + log2_wq)
            d = (1.0 - beta) * _LN2 * (tl.where(q > 0, q * (lq - lm), 0.0) - q * sq)
        elif DIVERGENCE == _SKEW_KL:  # q_j S - p_j w_j
            lp = (t - m_p) * scale2 - log2l_p
            lm = _logaddexp2(lp + log2_wp, lq + log2_wq)
            d = q * skew_k - _skew_weighted_p(tl.exp2(lp), lp, lq, lm, log2_wq)
        else:  # skew_reverse_kl: q_j ((log(q_j / M_j) + v_j) - (D + V))
            lp = (t - m_p) * scale2 - log2l_p
            lm = _logaddexp2(lp + log2_wp, lq + log2_wq)
            d = tl.where(q > 0, q * ((_LN2 * (lq - lm) + _skew_reverse_v(lp, lm, log2_wp)) - skew_k), 0.0)
        g = ks * d
        if HARD:
            g += kh * _ce_term(q, z, cols, y, m_c, log2l_c, SAME_T)
        tl.store(g_row + cols, _to_store(g, g_row, EMULATE_RTNE), mask=mask, eviction_policy="evict_first")


@triton.jit
def _kd_loss_dense_kernel(
    logits_ptr,  # [N, V] student logits, fp32/bf16/fp16
    teacher_ptr,  # [N, V] teacher logits, -inf allowed
    labels_ptr,  # [N] int64 (unread without labels)
    divisor_ptr,  # [] float32 "mean" denominator (unread unless DIVIDE)
    grad_ptr,  # [N, V] gradient out, logits dtype; the logits themselves when inplace
    loss_rows_ptr,  # [N] float32 hard_weight * CE + c * D
    ce_rows_ptr,  # [N] float32 CE
    div_rows_ptr,  # [N] float32 D
    N,
    V,
    ignore_index,
    scale2,  # log2(e) / T
    inv_t,  # 1 / T
    hard_weight,
    soft_grad,  # c / T
    soft_scale,  # c
    grad_scale,  # 1, or 2^H (deferred fp16 gradient)
    beta,  # jsd
    log2_wp,  # jsd and skew: log2 of p's weight in the mixture M
    log2_wq,  # log2 of q's weight in M
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HARD: tl.constexpr,  # labels and hard_weight != 0: the CE gradient term is written
    SAME_T: tl.constexpr,  # T == 1: softmax(z) is q
    DIVIDE: tl.constexpr,  # the stored gradient includes 1 / divisor
    COMPUTE_GRAD: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Persistent: each program walks rows, so the rows in flight (and the L2 footprint between the
    # reads of a row) are set by the grid, not by occupancy.
    for row in range(tl.program_id(0), N, tl.num_programs(0)):
        base = _row_offset(row, V)
        z_row = logits_ptr + base
        t_row = teacher_ptr + base
        g_row = grad_ptr + base
        y, ok, bad_label = _row_label(labels_ptr, row, ignore_index, V, HAS_LABELS)
        if ok:
            m_q, l_q, m_p, l_p, m_c, l_c, acc = _dense_stats(
                z_row, t_row, V, scale2, DIVERGENCE, HAS_LABELS and not SAME_T, BLOCK_V
            )
            # NaN or +inf anywhere in the teacher makes l_p NaN (a NaN term, or +inf - +inf).
            teacher_ok = l_p == l_p
            log2l_q = tl.log2(l_q)
            log2l_p = tl.log2(l_p)
            if SAME_T:
                m_c = m_q
                log2l_c = log2l_q
            else:
                log2l_c = tl.log2(l_c)
            sq = 0.0
            k_rev = 0.0
            skew_k = 0.0
            if DIVERGENCE == _FORWARD_KL:  # D = acc / (T l_p) + ln l_q - ln l_p
                div = acc / l_p * inv_t + _LN2 * (log2l_q - log2l_p)
            elif DIVERGENCE == _REVERSE_KL:  # D = acc / (T l_q) + ln l_p - ln l_q
                k_rev = acc / l_q
                div = k_rev * inv_t + _LN2 * (log2l_p - log2l_q)
            elif DIVERGENCE == _JSD:
                sp, sq = _jsd_sums(z_row, t_row, V, m_q, log2l_q, m_p, log2l_p, scale2, log2_wp, log2_wq, BLOCK_V)
                div = _LN2 * (beta * sp + (1.0 - beta) * sq)
            else:
                div, skew_k = _skew_sums(z_row, t_row, V, m_q, log2l_q, m_p, log2l_p, scale2, log2_wp, log2_wq,
                                         DIVERGENCE, BLOCK_V)
            ce = 0.0
            if HAS_LABELS:
                ce = _ce_value(z_row, y, m_c, log2l_c)
            ce = tl.where(teacher_ok, ce, float("nan"))
            div = tl.where(teacher_ok, div, float("nan"))
            _store_row_results(loss_rows_ptr, ce_rows_ptr, div_rows_ptr, row, ce, div, hard_weight, soft_scale)
            if COMPUTE_GRAD:
                if teacher_ok:
                    kh, ks = _grad_weights(divisor_ptr, hard_weight, soft_grad, grad_scale, DIVIDE)
                    _dense_grad_pass(z_row, t_row, g_row, V, y, m_q, log2l_q, m_p, log2l_p, m_c, log2l_c, k_rev, sq,
                                     skew_k, scale2, inv_t, kh, ks, beta, log2_wp, log2_wq, DIVERGENCE, HARD, SAME_T,
                                     EMULATE_RTNE, BLOCK_V)
                else:
                    _zero_row(g_row, V, BLOCK_V)
        else:
            _skipped_row(g_row, loss_rows_ptr, ce_rows_ptr, div_rows_ptr, row, V, bad_label, COMPUTE_GRAD, BLOCK_V)


@triton.jit
def _sparse_stats(z_row, flag_row, V, scale2, CE_STATS: tl.constexpr, REST: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1: raw maxima and log2-scaled sums of q and (CE_STATS) softmax(z); with REST also the sum
    of q's terms off the slots (flag_row[j] == 0), which is q_rest * l_q without any cancellation."""
    m_q = float("-inf")
    l_q = 0.0
    l_rest = 0.0
    m_c = float("-inf")
    l_c = 0.0
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
        m_q_new, alpha_q, e_q = _rescale(m_q, z, scale2)
        l_q = l_q * alpha_q + tl.sum(e_q, axis=0)
        if REST:
            on_slot = tl.load(flag_row + cols, mask=mask, other=1)
            l_rest = l_rest * alpha_q + tl.sum(tl.where(on_slot == 0, e_q, 0.0), axis=0)
        m_q = m_q_new
        if CE_STATS:
            m_c_new, alpha_c, e_c = _rescale(m_c, z, _LOG2E)
            l_c = l_c * alpha_c + tl.sum(e_c, axis=0)
            m_c = m_c_new
    return m_q, l_q, l_rest, m_c, l_c


@triton.jit
def _nan_or_pos_inf(x):
    return (x != x) | (x == float("inf"))


@triton.jit
def _slot_problems(idx_row, idx, vals, valid, koffs, K, V, KIND: tl.constexpr, DUP_BLOCK: tl.constexpr):
    """Number of reasons the row is bad: an index outside [-1, V), a NaN or +inf value (also -inf for
    "probs"), a duplicate valid index (idx compared with DUP_BLOCK slots at a time, re-read from idx_row,
    so that registers stay O(BLOCK_K) for any k)."""
    out_of_range = (idx < -1) | (idx >= V)
    if KIND == _SLOT_PROBS:
        non_finite = valid & _nan_or_pos_inf(tl.abs(vals))
    else:
        non_finite = valid & _nan_or_pos_inf(vals)
    n = tl.sum(out_of_range.to(tl.int32), axis=0) + tl.sum(non_finite.to(tl.int32), axis=0)
    joffs = tl.arange(0, DUP_BLOCK)
    for start in range(0, K, DUP_BLOCK):
        cols = start + joffs
        idx_j = tl.load(idx_row + cols, mask=cols < K, other=-1)
        same = (idx[:, None] == idx_j[None, :]) & valid[:, None] & (koffs[:, None] < cols[None, :])
        n += tl.sum(tl.sum(same.to(tl.int32), axis=1), axis=0)
    return n


@triton.jit
def _slot_targets(vals, valid, lq_s, q_s, scale2, q_rest_raw, tail, KIND: tl.constexpr, HAS_TAIL: tl.constexpr):
    """Per slot p_i (0 on empty slots), the row's D, and the gradient weights: dD/db_j = alpha q_j off the
    slots and beta_s q_j - p_j on them."""
    if KIND == _SLOT_SOFTMAX:
        v_s = tl.where(valid, vals, float("-inf"))
        m_s = tl.max(v_s, axis=0)
        m_s = tl.where(m_s == float("-inf"), 0.0, m_s)  # no valid slot: p = 0, D = 0
        e_s = tl.exp2((v_s - m_s) * scale2)
        l_s = tl.sum(e_s, axis=0)
        l_s = tl.where(l_s > 0, l_s, 1.0)
        p_s = e_s / l_s
        lp_s = (v_s - m_s) * scale2 - tl.log2(l_s)
    elif KIND == _SLOT_PROBS:
        p_s = tl.where(valid, vals, 0.0)
        lp_s = tl.log2(p_s)
    else:
        lp_s = vals * _LOG2E
        p_s = tl.where(valid, tl.exp2(lp_s), 0.0)
    mass_p = tl.sum(p_s, axis=0)
    div = _LN2 * tl.sum(tl.where(p_s > 0, p_s * (lp_s - lq_s), 0.0), axis=0)
    alpha = mass_p
    beta_s = mass_p
    if KIND == _SLOT_TAIL:
        if HAS_TAIL:
            p_rest = tl.exp(tail)
            log_p_rest = tail
        else:
            p_rest = tl.maximum(1.0 - mass_p, 0.0)
            log_p_rest = tl.log(p_rest)
        q_rest = tl.maximum(q_rest_raw, _Q_REST_FLOOR)
        div += tl.where(p_rest > 0, p_rest * (log_p_rest - tl.log(q_rest)), 0.0)
        # r = p_rest / q_rest; 0 where the floor is active (the clamp's derivative). Off the slots
        # dD/db_j = (P - r Q) q_j; on them (P + r q_rest) q_j - p_j, no (r - r Q) cancellation.
        r = tl.where((p_rest > 0) & (q_rest_raw >= _Q_REST_FLOOR), p_rest / q_rest, 0.0)
        alpha = mass_p - r * tl.sum(q_s, axis=0)
        beta_s = mass_p + r * q_rest
    return p_s, div, alpha, beta_s


@triton.jit
def _sparse_grad_pass(z_row, g_row, V, y, m_q, log2l_q, m_c, log2l_c, scale2, kh, ks, alpha, HARD: tl.constexpr,
                      SAME_T: tl.constexpr, EMULATE_RTNE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 2, backwards (L2 reuse): the gradient off the slots, kh * CE term + ks * (alpha * q_j); alpha
    * q_j first: with the tail bucket alpha ~ -p_rest / q_rest reaches 1e38 while alpha q_j <= p_rest."""
    offs = tl.arange(0, BLOCK_V)
    num_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(num_blocks):
        cols = (num_blocks - 1 - i) * BLOCK_V + offs
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        q = tl.exp2((z - m_q) * scale2 - log2l_q)
        g = ks * (alpha * q)
        if HARD:
            g += kh * _ce_term(q, z, cols, y, m_c, log2l_c, SAME_T)
        tl.store(g_row + cols, _to_store(g, g_row, EMULATE_RTNE), mask=mask, eviction_policy="evict_first")


@triton.jit
def _kd_loss_sparse_kernel(
    logits_ptr,  # [N, V] student logits, fp32/bf16/fp16
    indices_ptr,  # [N, K] int32/int64, -1 = empty slot
    values_ptr,  # [N, K] teacher logits / logprobs / probs of the slots
    tail_ptr,  # [N] float32 teacher log tail mass (unread without HAS_TAIL)
    flags_ptr,  # [programs, V] int8 zeros, slot marks of each program's row (unread unless KIND is tail)
    labels_ptr,  # [N] int64 (unread without labels)
    divisor_ptr,  # [] float32 "mean" denominator (unread unless DIVIDE)
    grad_ptr,  # [N, V] gradient out, logits dtype; the logits themselves when inplace
    loss_rows_ptr,  # [N] float32 hard_weight * CE + c * D
    ce_rows_ptr,  # [N] float32 CE
    div_rows_ptr,  # [N] float32 D
    N,
    V,
    K,
    ignore_index,
    scale2,  # log2(e) / T
    hard_weight,
    soft_grad,  # c / T
    soft_scale,  # c
    grad_scale,  # 1, or 2^H (deferred fp16 gradient)
    KIND: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HARD: tl.constexpr,
    SAME_T: tl.constexpr,
    DIVIDE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DUP_BLOCK: tl.constexpr,  # slots per step of the duplicate check, min(BLOCK_K, 32)
):
    koffs = tl.arange(0, BLOCK_K)
    flag_row = flags_ptr + _row_offset(tl.program_id(0), V)
    for row in range(tl.program_id(0), N, tl.num_programs(0)):  # persistent, as the dense kernel
        z_row = logits_ptr + _row_offset(row, V)
        g_row = grad_ptr + _row_offset(row, V)
        y, ok, bad_label = _row_label(labels_ptr, row, ignore_index, V, HAS_LABELS)
        if ok:
            slot_base = _row_offset(row, K)
            idx = tl.load(indices_ptr + slot_base + koffs, mask=koffs < K, other=-1)
            valid = (idx >= 0) & (idx < V)  # in range: safe to dereference
            vals = tl.load(values_ptr + slot_base + koffs, mask=valid, other=0.0).to(tl.float32)
            problems = _slot_problems(indices_ptr + slot_base, idx, vals, valid, koffs, K, V, KIND, DUP_BLOCK)
            tail = 0.0
            if HAS_TAIL:
                tail = tl.load(tail_ptr + row).to(tl.float32)
                problems += _nan_or_pos_inf(tail).to(tl.int32)
            if problems == 0:
                if KIND == _SLOT_TAIL:  # mark the slots for the off-slot sum (CTA-private scratch row)
                    tl.store(flag_row + idx, tl.full([BLOCK_K], 1, tl.int8), mask=valid)
                    tl.debug_barrier()
                m_q, l_q, l_rest, m_c, l_c = _sparse_stats(z_row, flag_row, V, scale2, HAS_LABELS and not SAME_T,
                                                           KIND == _SLOT_TAIL, BLOCK_V)
                if KIND == _SLOT_TAIL:  # unmark, ordered after every read and before the next row's marks
                    tl.debug_barrier()
                    tl.store(flag_row + idx, tl.zeros([BLOCK_K], tl.int8), mask=valid)
                    tl.debug_barrier()
                log2l_q = tl.log2(l_q)
                if SAME_T:
                    m_c = m_q
                    log2l_c = log2l_q
                else:
                    log2l_c = tl.log2(l_c)
                # Slots, gathered before the gradient pass overwrites the logits (inplace).
                z_s = tl.load(z_row + idx, mask=valid, other=0.0).to(tl.float32)
                lq_s = (z_s - m_q) * scale2 - log2l_q
                q_s = tl.where(valid, tl.exp2(lq_s), 0.0)
                p_s, div, alpha, beta_s = _slot_targets(vals, valid, lq_s, q_s, scale2, l_rest / l_q, tail, KIND,
                                                        HAS_TAIL)
                ce = 0.0
                if HAS_LABELS:
                    ce = _ce_value(z_row, y, m_c, log2l_c)
                _store_row_results(loss_rows_ptr, ce_rows_ptr, div_rows_ptr, row, ce, div, hard_weight, soft_scale)
                if COMPUTE_GRAD:
                    kh, ks = _grad_weights(divisor_ptr, hard_weight, soft_grad, grad_scale, DIVIDE)
                    _sparse_grad_pass(z_row, g_row, V, y, m_q, log2l_q, m_c, log2l_c, scale2, kh, ks, alpha, HARD,
                                      SAME_T, EMULATE_RTNE, BLOCK_V)
                    # The slot values replace what the sweep wrote there: order the CTA's stores first.
                    tl.debug_barrier()
                    g_s = ks * (beta_s * q_s - p_s)
                    if HARD:
                        g_s += kh * _ce_term(q_s, z_s, idx, y, m_c, log2l_c, SAME_T)
                    tl.store(g_row + idx, _to_store(g_s, g_row, EMULATE_RTNE), mask=valid)
            else:
                _skipped_row(g_row, loss_rows_ptr, ce_rows_ptr, div_rows_ptr, row, V, problems > 0, COMPUTE_GRAD,
                             BLOCK_V)
        else:
            _skipped_row(g_row, loss_rows_ptr, ce_rows_ptr, div_rows_ptr, row, V, bad_label, COMPUTE_GRAD, BLOCK_V)


@triton.jit
def _scale_grad_kernel(
    grad_ptr,  # [N, V] stored gradient
    out_ptr,  # [N, V] scaled gradient; grad_ptr itself when IN_PLACE
    scale_ptr,  # [N] (stride scale_stride) or [] (stride 0) grad_output
    divisor_ptr,  # [] float32 "mean" denominator (unread unless DIVIDE)
    scale_stride,
    inv_grad_scale,  # 1 / grad_scale of the forward
    V,
    DIVIDE: tl.constexpr,  # the forward deferred 1 / divisor to here
    IN_PLACE: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    g_row = grad_ptr + _row_offset(row, V)
    o_row = out_ptr + _row_offset(row, V)
    # One float32 factor, so the stored gradient is rounded once more, here.
    scale = tl.load(scale_ptr + _row_offset(row, scale_stride)).to(tl.float32) * inv_grad_scale
    if DIVIDE:
        scale = scale / tl.load(divisor_ptr)
    # Decided on the device: in place, a factor of exactly 1 (the usual final loss) moves no memory.
    if (not IN_PLACE) or scale != 1.0:
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            g = tl.load(g_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            g = _to_store(g * scale, o_row, EMULATE_RTNE)
            tl.store(o_row + cols, g, mask=mask, eviction_policy="evict_first")


# ----------------------------------------------------------------------------------------------
# Launcher: check, allocate, launch
# ----------------------------------------------------------------------------------------------


def _launch_config(kind: str, vocab: int) -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, num_stages) of a shape class: fewer warps with a smaller block for small V."""
    params = _LAUNCH[kind]
    block_cap = params.block_v
    if _backend.triton_interpret():
        block_cap = min(block_cap, _INTERPRET_BLOCK_V)
    block = min(triton.next_power_of_2(vocab), block_cap)
    return block, max(4, params.num_warps * block // block_cap), params.num_stages


def _grid(kind: str, n_rows: int, device: torch.device) -> tuple[int]:
    if _backend.triton_interpret():
        return (min(n_rows, _INTERPRET_PROGRAMS),)
    return (min(n_rows, _sm_count(device.index) * _LAUNCH[kind].programs_per_sm),)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _emulate_rtne(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.bfloat16 and _backend.triton_interpret()


def _effective_divergence(opts: LossOptions) -> int:
    """The kernel's DIVERGENCE (kdfast._contract.effective_divergence: the limits run as forward /
    reverse KL)."""
    return _DIVERGENCE_CODES[effective_divergence(opts.divergence, opts.beta, opts.alpha)].value


def _log2_mixture_weights(divergence: int, opts: LossOptions) -> tuple[float, float]:
    """log2 of p's and q's weights in the mixture M (both in (0, 1) here); unused (0) by forward / reverse KL."""
    if divergence == _JSD.value:
        weight_p = opts.beta
    elif divergence == _SKEW_KL.value:
        weight_p = opts.alpha
    elif divergence == _SKEW_REVERSE_KL.value:
        weight_p = 1.0 - opts.alpha
    else:
        return 0.0, 0.0
    return math.log2(weight_p), math.log2(1.0 - weight_p)


def _slot_kind(opts: LossOptions) -> int:
    if opts.teacher_kind == "probs":
        return _SLOT_PROBS.value
    if opts.teacher_kind == "logprobs" and opts.tail:
        return _SLOT_TAIL.value
    return _SLOT_SOFTMAX.value


def _deferred_log2_scale(logits: torch.Tensor, has_labels: bool, opts: LossOptions) -> int | None:
    """H of the fp16 autograd path (gradient stored times 2^H, 1/divisor applied in backward); None:
    the stored gradient is d loss / d logits itself."""
    if logits.dtype != torch.float16 or not (opts.compute_grad and torch.is_grad_enabled() and logits.requires_grad):
        return None
    bound = (abs(opts.hard_weight) if has_labels else 0.0) + abs(opts.soft_scale / opts.temperature)
    if bound == 0.0:
        return 0
    return min(max(math.floor(math.log2(_FP16_HEADROOM / bound)), -16), 24)


def _check(logits, labels, teacher_logits, teacher_indices, teacher_values, teacher_tail, divisor,
           opts: LossOptions) -> None:
    """Backend preconditions that api.py establishes; a direct caller gets a ValueError, not a fault."""
    if logits.dim() != 2:
        raise ValueError(f"triton kd_loss: logits must be [N, V], got shape {tuple(logits.shape)}")
    if opts.inplace and opts.compute_grad and not logits.is_contiguous():
        raise ValueError("triton kd_loss: inplace=True needs contiguous logits, got strides "
                         f"{logits.stride()}")
    tensors = {"labels": labels, "teacher_logits": teacher_logits, "teacher_indices": teacher_indices,
               "teacher_values": teacher_values, "teacher_tail": teacher_tail, "divisor": divisor}
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != logits.device:
            raise ValueError(f"triton kd_loss: {name} is on {tensor.device} but logits are on {logits.device}")
    if (teacher_logits is None) == (teacher_indices is None or teacher_values is None):
        raise ValueError("triton kd_loss: give exactly one of teacher_logits or teacher_indices + teacher_values")
    if teacher_tail is not None:
        if _slot_kind(opts) != _SLOT_TAIL.value or teacher_indices is None:
            raise ValueError("triton kd_loss: teacher_tail needs sparse teacher_kind='logprobs' with tail=True, got "
                             f"teacher_kind={opts.teacher_kind!r}, tail={opts.tail}")
        if tuple(teacher_tail.shape) != (logits.shape[0],):
            raise ValueError(f"triton kd_loss: teacher_tail must be [{logits.shape[0]}], got {tuple(teacher_tail.shape)}")
    if opts.reduction == "mean" and divisor is None:
        raise ValueError("triton kd_loss: reduction='mean' needs the divisor tensor, got None")


def _dense(tensor: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A contiguous copy where the kernels need one (strided, expanded, sliced), else the tensor itself."""
    if tensor is None:
        return None
    return tensor.to(dtype or tensor.dtype).contiguous()


def _launch(
    logits: torch.Tensor,  # [N, V], contiguous
    labels: torch.Tensor | None,  # [N] int64, contiguous
    teacher_logits: torch.Tensor | None,  # [N, V], contiguous
    teacher_indices: torch.Tensor | None,  # [N, k], contiguous
    teacher_values: torch.Tensor | None,  # [N, k], contiguous
    teacher_tail: torch.Tensor | None,  # [N] float32, contiguous
    divisor: torch.Tensor | None,  # [] float32
    grad: torch.Tensor,  # [N, V] gradient destination (the logits when inplace); unused without compute_grad
    grad_log2_scale: int | None,  # H of the deferred fp16 gradient, or None
    opts: LossOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs the forward kernel; returns (loss, ce_rows, div_rows) and fills ``grad`` when compute_grad."""
    n, vocab = logits.shape
    loss_rows = torch.empty(n, dtype=torch.float32, device=logits.device)  # [N]
    ce_rows = torch.empty_like(loss_rows)  # [N]
    div_rows = torch.empty_like(loss_rows)  # [N]
    has_labels = labels is not None
    mean = opts.reduction == "mean"
    common = dict(
        labels_ptr=labels if has_labels else loss_rows,
        divisor_ptr=divisor if mean else loss_rows,
        grad_ptr=grad,
        loss_rows_ptr=loss_rows,
        ce_rows_ptr=ce_rows,
        div_rows_ptr=div_rows,
        N=n,
        V=vocab,
        ignore_index=opts.ignore_index,
        scale2=math.log2(math.e) / opts.temperature,
        hard_weight=opts.hard_weight,
        soft_grad=opts.soft_scale / opts.temperature,
        soft_scale=opts.soft_scale,
        grad_scale=1.0 if grad_log2_scale is None else 2.0**grad_log2_scale,
        HAS_LABELS=has_labels,
        HARD=has_labels and opts.hard_weight != 0.0,
        SAME_T=opts.temperature == 1.0,
        DIVIDE=mean and grad_log2_scale is None,
        COMPUTE_GRAD=opts.compute_grad,
        EMULATE_RTNE=_emulate_rtne(logits),
    )
    if teacher_logits is not None:
        divergence = _effective_divergence(opts)
        log2_wp, log2_wq = _log2_mixture_weights(divergence, opts)
        kind = "dense" if divergence in (_FORWARD_KL.value, _REVERSE_KL.value) else "jsd"
        block, warps, stages = _launch_config(kind, vocab)
        _kd_loss_dense_kernel[_grid(kind, n, logits.device)](
            logits, teacher_logits, **common, inv_t=1.0 / opts.temperature, beta=opts.beta,
            log2_wp=log2_wp, log2_wq=log2_wq, DIVERGENCE=divergence, BLOCK_V=block, num_warps=warps,
            num_stages=stages,
        )
    else:
        k = teacher_indices.shape[1]
        slot_kind = _slot_kind(opts)
        kind = "tail" if slot_kind == _SLOT_TAIL.value else "sparse"
        block, warps, stages = _launch_config(kind, vocab)
        grid = _grid(kind, n, logits.device)
        # Each program's slot marks for the off-slot sum q_rest; the kernel clears what it sets.
        flags = torch.zeros((grid[0], vocab) if slot_kind == _SLOT_TAIL.value else 1, dtype=torch.int8,
                            device=logits.device)  # [programs, V]
        _kd_loss_sparse_kernel[grid](
            logits, teacher_indices, teacher_values, teacher_tail if teacher_tail is not None else loss_rows, flags,
            **common, K=k, KIND=slot_kind, HAS_TAIL=teacher_tail is not None, BLOCK_V=block,
            BLOCK_K=triton.next_power_of_2(k), DUP_BLOCK=min(triton.next_power_of_2(k), 32), num_warps=warps,
            num_stages=stages,
        )
    if opts.reduction == "none":
        return loss_rows, ce_rows, div_rows
    loss = loss_rows.sum()
    return (loss / divisor if mean else loss), ce_rows, div_rows


def _scale_grad(
    grad: torch.Tensor,  # [N, V]
    grad_output: torch.Tensor,  # [] or [N] float32
    divisor: torch.Tensor | None,  # [] float32 when the forward deferred 1 / divisor, else None
    grad_log2_scale: int,  # H of the forward's stored gradient (0: none)
    out: torch.Tensor,  # [N, V], may be grad itself
) -> None:
    n, vocab = grad.shape
    scale_stride = grad_output.stride(0) if grad_output.dim() == 1 else 0
    block, warps, stages = _launch_config("scale", vocab)
    _scale_grad_kernel[(n,)](
        grad, out, grad_output, divisor if divisor is not None else grad_output, scale_stride,
        2.0**-grad_log2_scale, vocab, DIVIDE=divisor is not None, IN_PLACE=out is grad,
        EMULATE_RTNE=_emulate_rtne(out), BLOCK_V=block, num_warps=warps, num_stages=stages,
    )


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and the autograd.Function
# ----------------------------------------------------------------------------------------------


def _options(temperature, hard_weight, soft_weight, divergence, beta, alpha, teacher_kind, tail, ignore_index,
             reduction, scale_t2, compute_grad, inplace) -> LossOptions:
    return LossOptions(
        temperature=temperature, hard_weight=hard_weight, soft_weight=soft_weight, divergence=divergence,
        beta=beta, alpha=alpha, teacher_kind=teacher_kind, tail=tail, ignore_index=ignore_index, reduction=reduction,
        scale_t2=scale_t2, inplace=inplace, compute_grad=compute_grad,
    )


def _option_args(opts: LossOptions) -> tuple:
    return (opts.temperature, opts.hard_weight, opts.soft_weight, opts.divergence, opts.beta, opts.alpha,
            opts.teacher_kind,
            opts.tail, opts.ignore_index, opts.reduction, opts.scale_t2, opts.compute_grad)


def _fake_outputs(logits: torch.Tensor, reduction: str):
    n = logits.shape[0]
    loss = logits.new_empty((n,) if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("kdfast::triton_kd_loss", mutates_args=())
def _kd_loss_op(
    logits: torch.Tensor,  # [N, V]
    labels: torch.Tensor | None,  # [N]
    teacher_logits: torch.Tensor | None,  # [N, V]
    teacher_indices: torch.Tensor | None,  # [N, k]
    teacher_values: torch.Tensor | None,  # [N, k]
    teacher_tail: torch.Tensor | None,  # [N]
    divisor: torch.Tensor | None,  # []
    grad_log2_scale: int | None,
    temperature: float,
    hard_weight: float,
    soft_weight: float,
    divergence: str,
    beta: float,
    alpha: float,
    teacher_kind: str,
    tail: bool,
    ignore_index: int,
    reduction: str,
    scale_t2: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce_rows, div_rows, grad [N, V], or [0] without compute_grad) into a new gradient buffer."""
    opts = _options(temperature, hard_weight, soft_weight, divergence, beta, alpha, teacher_kind, tail, ignore_index,
                    reduction, scale_t2, compute_grad, inplace=False)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    teacher = (teacher_logits, teacher_indices, teacher_values, teacher_tail)
    loss, ce_rows, div_rows = _launch(logits, labels, *teacher, divisor, grad, grad_log2_scale, opts)
    return loss, ce_rows, div_rows, grad


@_kd_loss_op.register_fake
def _(logits, labels, teacher_logits, teacher_indices, teacher_values, teacher_tail, divisor, grad_log2_scale,
      temperature, hard_weight, soft_weight, divergence, beta, alpha, teacher_kind, tail, ignore_index, reduction,
      scale_t2, compute_grad):
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return (*_fake_outputs(logits, reduction), grad)


@torch.library.custom_op("kdfast::triton_kd_loss_inplace_", mutates_args=("logits",))
def _kd_loss_inplace_op(
    logits: torch.Tensor,  # [N, V], overwritten by the gradient
    labels: torch.Tensor | None,  # [N]
    teacher_logits: torch.Tensor | None,  # [N, V]
    teacher_indices: torch.Tensor | None,  # [N, k]
    teacher_values: torch.Tensor | None,  # [N, k]
    teacher_tail: torch.Tensor | None,  # [N]
    divisor: torch.Tensor | None,  # []
    grad_log2_scale: int | None,
    temperature: float,
    hard_weight: float,
    soft_weight: float,
    divergence: str,
    beta: float,
    alpha: float,
    teacher_kind: str,
    tail: bool,
    ignore_index: int,
    reduction: str,
    scale_t2: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce_rows, div_rows); the gradient replaces the logits."""
    opts = _options(temperature, hard_weight, soft_weight, divergence, beta, alpha, teacher_kind, tail, ignore_index,
                    reduction, scale_t2, compute_grad, inplace=True)
    teacher = (teacher_logits, teacher_indices, teacher_values, teacher_tail)
    return _launch(logits, labels, *teacher, divisor, logits, grad_log2_scale, opts)


@_kd_loss_inplace_op.register_fake
def _(logits, labels, teacher_logits, teacher_indices, teacher_values, teacher_tail, divisor, grad_log2_scale,
      temperature, hard_weight, soft_weight, divergence, beta, alpha, teacher_kind, tail, ignore_index, reduction,
      scale_t2, compute_grad):
    return _fake_outputs(logits, reduction)


@torch.library.custom_op("kdfast::triton_kd_loss_scale_grad_", mutates_args=("grad",))
def _scale_grad_inplace_op(
    grad: torch.Tensor,  # [N, V]
    grad_output: torch.Tensor,  # [] or [N]
    divisor: torch.Tensor | None,  # [], when the forward deferred it
    grad_log2_scale: int,
) -> None:
    _scale_grad(grad, grad_output, divisor, grad_log2_scale, grad)


@_scale_grad_inplace_op.register_fake
def _(grad, grad_output, divisor, grad_log2_scale):
    return None


@torch.library.custom_op("kdfast::triton_kd_loss_scaled_grad", mutates_args=())
def _scaled_grad_op(
    grad: torch.Tensor,  # [N, V]
    grad_output: torch.Tensor,  # [] or [N]
    divisor: torch.Tensor | None,  # [], when the forward deferred it
    grad_log2_scale: int,
) -> torch.Tensor:  # [N, V]
    out = torch.empty_like(grad)
    _scale_grad(grad, grad_output, divisor, grad_log2_scale, out)
    return out


@_scaled_grad_op.register_fake
def _(grad, grad_output, divisor, grad_log2_scale):
    return torch.empty_like(grad)


class _KDLossFunction(torch.autograd.Function):
    """Forward runs the fused kernel and keeps its gradient; backward scales it by grad_output.

    The kernel's own gradient buffer is scaled in place (the mutation bumps its version, so a second
    backward through a retained graph raises instead of scaling twice). With inplace=True the buffer
    is the caller's logits, which keep the stored gradient: backward returns a scaled copy. For fp16
    the stored gradient is 2^H times the un-divided one and backward applies grad_output / (2^H divisor).
    """

    @staticmethod
    def forward(ctx, logits, labels, teacher_logits, teacher_indices, teacher_values, teacher_tail, divisor,
                grad_log2_scale, opts: LossOptions):
        teacher = (teacher_logits, teacher_indices, teacher_values, teacher_tail)
        args = (logits, labels, *teacher, divisor, grad_log2_scale, *_option_args(opts))
        ctx.grad_in_logits = opts.inplace and opts.compute_grad
        ctx.grad_log2_scale = grad_log2_scale or 0
        ctx.defer_divisor = grad_log2_scale is not None and opts.reduction == "mean"
        if ctx.grad_in_logits:
            loss, ce_rows, div_rows = torch.ops.kdfast.triton_kd_loss_inplace_(*args)
            grad = logits
        else:
            loss, ce_rows, div_rows, grad = torch.ops.kdfast.triton_kd_loss(*args)
        ctx.save_for_backward(grad, divisor if ctx.defer_divisor else None)
        ctx.mark_non_differentiable(ce_rows, div_rows)
        return loss, ce_rows, div_rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_div):
        grad, divisor = ctx.saved_tensors
        args = (grad_loss.float(), divisor, ctx.grad_log2_scale)
        if ctx.grad_in_logits:
            grad = torch.ops.kdfast.triton_kd_loss_scaled_grad(grad, *args)
        else:
            torch.ops.kdfast.triton_kd_loss_scale_grad_(grad, *args)
        return grad, None, None, None, None, None, None, None, None


def kd_loss(
    logits: torch.Tensor,  # [N, V] fp32/bf16/fp16; overwritten by the gradient if opts.inplace (then contiguous)
    labels: torch.Tensor | None,  # [N] int64, or None
    teacher_logits: torch.Tensor | None,  # [N, V], or None
    teacher_indices: torch.Tensor | None,  # [N, k] int32/int64, or None
    teacher_values: torch.Tensor | None,  # [N, k], or None
    teacher_tail: torch.Tensor | None,  # [N] float32 log tail mass (teacher_kind="logprobs", tail=True), or None
    divisor: torch.Tensor | None,  # [] float32 on the logits' device, for reduction="mean"
    opts: LossOptions,
):
    """The backend entry point of ``_contract.py``: (loss, ce_rows, div_rows)."""
    _check(logits, labels, teacher_logits, teacher_indices, teacher_values, teacher_tail, divisor, opts)
    grad_log2_scale = _deferred_log2_scale(logits, labels is not None, opts)
    if not logits.is_contiguous():  # only without inplace (checked): a differentiable copy
        logits = logits.contiguous()
    teacher = (_dense(teacher_logits), _dense(teacher_indices), _dense(teacher_values),
               _dense(teacher_tail, torch.float32))
    divisor = _dense(divisor, torch.float32)
    return _KDLossFunction.apply(logits, _dense(labels, torch.int64), *teacher, divisor, grad_log2_scale, opts)
