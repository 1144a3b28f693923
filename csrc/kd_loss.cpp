// kd_loss: fused temperature-softmax + divergence + cross-entropy for the CPU backend, loss and
// gradient in one call (the contract is ../shared/design.md; kdfast/reference.py is the oracle).
//
// Math, per active row (vocabulary V, temperature T, s = soft_scale = soft_weight*T^2, rs = grad_scale):
//   a_j = z_j / T,  q = softmax(a),  log q_j = a_j - L_q,  L_q = logsumexp(a)
//   CE  = logsumexp(z) - z_y                                   (untempered; "hard" part)
//   loss_r = hard_weight * CE + s * D
// Gradients. The softmax Jacobian dq_i/da_k = q_i (1[i=k] - q_k) turns any dD/dq into
//   dD/da_k = q_k (dD/dq_k - sum_i q_i dD/dq_i), and da_k/dz_k = 1/T. Hence:
//   dCE/dz_j = softmax(z)_j - 1[j = y]                         (dCE/dlog_softmax = -onehot)
//   Dense teacher b_j = t_j / T, p = softmax(b) (t_j = -inf gives p_j = 0 and 0 log 0 = 0):
//     forward KL  D = sum p (log p - log q) = const - sum p_i a_i + L_q
//                 dD/dz_j = (1/T) (q_j - p_j)                  (sum p = 1)
//     reverse KL  D = sum q (log q - log p),  dD/dq_j = log q_j - log p_j + 1,  sum_i q_i (...) = D + 1
//                 dD/dz_j = (1/T) q_j ((log q_j - log p_j) - D)
//     JSD(beta)   M = beta p + (1-beta) q,  D = beta KL(p||M) + (1-beta) KL(q||M)
//                 dD/dq_j = -beta (1-beta) p_j/M_j + (1-beta)(log(q_j/M_j) + 1 - (1-beta) q_j/M_j)
//                         = (1-beta) log(q_j / M_j) =: g_j     (beta p_j/M_j + (1-beta) q_j/M_j = 1)
//                 dD/dz_j = (1/T) q_j (g_j - sum_i q_i g_i).
//                 beta = 0 is forward KL and beta = 1 reverse KL (dispatched in Python).
//   Sparse teacher on valid slots I (index -1 = empty), P = sum_{i in I} p_i, Q = sum_{i in I} q_i:
//     "logits", "logprobs" without tail: p = softmax(v / T) over I; "probs": p_i = v_i as given.
//     D = sum_I p_i (log p_i - log q_i) = const - sum_I p_i a_i + P L_q
//     dD/dz_j = (1/T) (q_j P - p_j 1[j in I])
//     (P = 1 for a normalized target, which gives the familiar q - p; P = 0 for an empty row.)
//     "logprobs" with tail: p_i = exp(v_i), p_rest = max(1 - P, 0), q_rest = max(1 - Q, tiny),
//     D = sum_I p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest). The slot part is the
//     sparse case above; dq_rest/da_j = -q_j (1[j in I] - Q), so with R = p_rest/q_rest (R = 0 where
//     a clamp is active, matching the reference's clamp derivative):
//       dD/dz_j = (1/T) (q_j (P - R Q) + 1[j in I] (R q_j - p_j)),
//     i.e. (1/T)(q_j - p_j) on slots and (1/T) q_j (1 - p_rest/q_rest) elsewhere when P + p_rest = 1.
//   The stored gradient is rs * (hard_weight dCE/dz + s dD/dz); backward only scales it by
//   grad_output. Inactive rows (label == ignore_index) get loss 0 and gradient 0.
//
// Numerics: every statistic is computed from fp32 copies of the inputs (16-bit buffers are widened
// here, chunk by chunk) with fp32 vector lanes per 2048-element chunk and double accumulation across
// chunks. Softmax statistics are online over chunks: a chunk's max is found first, the running sums
// are rescaled when the max grows, then exp((x - max) / T) is summed. Shifting before dividing by T
// keeps (z_j - max z) exact for close values, so T = 0.05 with logits of 1e4 loses nothing. The KL
// cross terms are accumulated relative to the current maxima and shifted when a maximum moves, so
// D is never a difference of two large logsumexps. A 16-bit gradient is rounded once, here; a
// grad_output other than 1.0 rounds it a second time in kd_loss_scale_grad.
//
// Passes over a row: one statistics pass (reads z [and t]), one sweep writing the gradient. JSD needs
// one more pass for sum_i q_i g_i before the sweep. The rows of a sweep were just read by the
// statistics pass, so the second read mostly hits L2/L3.
#include "kd_loss.h"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdfast {
namespace {

// ---------------------------------------------------------------------------------------------
// Vector building blocks. Everything here is always_inline so that it is compiled for the ISA of
// the target_clones function it ends up in (AVX-512, AVX2+FMA+F16C, or baseline SSE2).
// ---------------------------------------------------------------------------------------------

#define KD_INLINE inline __attribute__((always_inline))
// Runtime ISA dispatch: GCC emits one clone per entry and an ifunc resolver that picks the best
// one for the running CPU (x86-64-v4 = AVX-512 F/BW/DQ/VL, x86-64-v3 = AVX2 + FMA + F16C).
// Elsewhere (other compilers or architectures) the build target's ISA is used.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define KD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define KD_HAVE_CLONES 1
#else
#define KD_CLONES
#define KD_HAVE_CLONES 0
#endif

constexpr int64_t kChunk = 2048;  // elements per chunk: 3 fp32 buffers of 8 KiB stay in L1
constexpr float kInf = std::numeric_limits<float>::infinity();

KD_INLINE float bits_to_float(uint32_t u) {
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

KD_INLINE uint32_t float_to_bits(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof u);
    return u;
}

// exp(x) for x <= 0 (every argument here is shifted by a maximum). x = n ln2 + r with |r| <= ln2/2,
// Cephes' degree-6 polynomial for exp(r) (about 1 ulp), 2^n built in the exponent bits. Below
// -87 the result would leave the normal range; it is 0 there (it is < 1.7e-38 of the row's max),
// which also maps -inf to 0. NaN propagates. Plain arithmetic and selects, so loops vectorize.
KD_INLINE float exp_nonpos(float x) {
    const float xc = x < -87.0f ? -87.0f : x;
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;            // Cody-Waite ln2 split
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
    return x < -87.0f ? 0.0f : y * scale;
}

// log(x) for positive normal x (Cephes logf, about 1 ulp): x = 2^e m with m in [sqrt(1/2), sqrt(2)).
KD_INLINE float log_pos(float x) {
    const uint32_t u = float_to_bits(x);
    int32_t e = static_cast<int32_t>(u >> 23) - 127;
    float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);
    const bool high = m > 1.41421356f;
    m = high ? m * 0.5f : m;
    e = high ? e + 1 : e;
    const float f = m - 1.0f;
    const float z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z;
    const float fe = static_cast<float>(e);
    y += fe * -2.12194440e-4f;
    y -= 0.5f * z;
    return f + y + fe * 0.693359375f;
}

// fp32 view of n elements at element offset `off` of a buffer: float32 is used in place, the
// others are widened into `buf` (bf16: the high half of a float; fp16 via _Float16, F16C when present).
KD_INLINE const float* load_chunk(const void* base, int dtype, int64_t off, int64_t n, float* __restrict buf) {
    switch (dtype) {
        case kFloat32:
            return static_cast<const float*>(base) + off;
        case kBFloat16: {
            const uint16_t* src = static_cast<const uint16_t*>(base) + off;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) buf[j] = bits_to_float(static_cast<uint32_t>(src[j]) << 16);
            return buf;
        }
        case kFloat16: {
            const _Float16* src = static_cast<const _Float16*>(base) + off;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(src[j]);
            return buf;
        }
        default: {
            const double* src = static_cast<const double*>(base) + off;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(src[j]);
            return buf;
        }
    }
}

// Rounds n fp32 values to `dtype` (round to nearest even) and writes them at element offset `off`.
KD_INLINE void store_chunk(void* base, int dtype, int64_t off, int64_t n, const float* __restrict g) {
    switch (dtype) {
        case kFloat32:
            std::memcpy(static_cast<float*>(base) + off, g, static_cast<size_t>(n) * sizeof(float));
            return;
        case kBFloat16: {
            uint16_t* dst = static_cast<uint16_t*>(base) + off;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const uint32_t u = float_to_bits(g[j]);
                const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
                dst[j] = static_cast<uint16_t>(g[j] != g[j] ? ((u >> 16) | 0x40u) : rounded);
            }
            return;
        }
        default: {
            _Float16* dst = static_cast<_Float16*>(base) + off;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<_Float16>(g[j]);
            return;
        }
    }
}

// Bytes per element of a logits / gradient buffer (float32, bfloat16 or float16).
KD_INLINE size_t element_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

KD_INLINE double load_scalar(const void* base, int dtype, int64_t i) {
    switch (dtype) {
        case kFloat32:
            return static_cast<const float*>(base)[i];
        case kBFloat16:
            return bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16);
        case kFloat16:
            return static_cast<float>(static_cast<const _Float16*>(base)[i]);
        default:
            return static_cast<const double*>(base)[i];
    }
}

KD_INLINE int64_t load_index(const void* base, int dtype, int64_t i) {
    return dtype == kInt32 ? static_cast<const int32_t*>(base)[i] : static_cast<const int64_t*>(base)[i];
}

KD_INLINE float chunk_max(const float* __restrict x, int64_t n) {
    float m = -kInf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
    return m;
}

// ---------------------------------------------------------------------------------------------
// Chunk kernels: one pass over n elements, compile-time specialized so each loop vectorizes.
// kCE: the hard loss needs its own softmax at T = 1 (labels given and T != 1); otherwise the hard
// gradient reuses q (T = 1) or is absent.
// ---------------------------------------------------------------------------------------------

struct ChunkSums {
    float sq = 0, s1 = 0, sp = 0, w = 0;
};

// Student sums of exp((z - mz)/T) [and exp(z - mz)].
template <bool kCE>
KD_INLINE ChunkSums student_sums(const float* __restrict z, int64_t n, float mz, float inv_t) {
    float sq = 0, s1 = 0;
#pragma omp simd reduction(+ : sq, s1)
    for (int64_t j = 0; j < n; ++j) {
        const float d = z[j] - mz;
        sq += exp_nonpos(d * inv_t);
        if (kCE) s1 += exp_nonpos(d);
    }
    ChunkSums s;
    s.sq = sq;
    s.s1 = s1;
    return s;
}

// Student and teacher sums plus the KL cross term relative to the current maxima:
// forward w = sum e^{bt} (bt - at), reverse w = sum e^{at} (at - bt), at = (z - mz)/T, bt = (t - mt)/T.
template <int kMode, bool kCE>
KD_INLINE ChunkSums dense_sums(const float* __restrict z, const float* __restrict t, int64_t n, float mz, float mt,
                               float inv_t) {
    float sq = 0, s1 = 0, sp = 0, w = 0;
#pragma omp simd reduction(+ : sq, s1, sp, w)
    for (int64_t j = 0; j < n; ++j) {
        const float d = z[j] - mz;
        const float at = d * inv_t;
        const float bt = (t[j] - mt) * inv_t;
        const float eq = exp_nonpos(at);
        const float ep = exp_nonpos(bt);
        sq += eq;
        sp += ep;
        if (kCE) s1 += exp_nonpos(d);
        if (kMode == kForwardKL) w += ep > 0.0f ? ep * (bt - at) : 0.0f;
        if (kMode == kReverseKL) w += eq > 0.0f ? eq * (at - bt) : 0.0f;
    }
    return ChunkSums{sq, s1, sp, w};
}

// Constants of a gradient sweep, all in the shifted form (x - max)/T - log(sum).
struct Sweep {
    float mz, mt, inv_t;
    float lsq, lsp, ls1;  // log of the student (T), teacher, student (T = 1) sums
    float c_hard;         // rs * hard_weight
    float c_soft;         // rs * s / T, times (P - R Q) for sparse teachers
    float k_rev;          // reverse KL: lsq - lsp + D
    float log_beta, log_1mbeta, one_m_beta, g_mean;  // JSD
};

// JSD pieces at one element: log q, log p and log M = logaddexp(log p + log beta, log q + log(1-beta)).
struct JsdTerms {
    float lq, lp, lm;
};

KD_INLINE JsdTerms jsd_terms(float z, float t, const Sweep& c) {
    const float lq = (z - c.mz) * c.inv_t - c.lsq;
    const float lp = (t - c.mt) * c.inv_t - c.lsp;
    const float a = lp + c.log_beta;
    const float b = lq + c.log_1mbeta;
    const float hi = a > b ? a : b;
    const float lo = a > b ? b : a;
    return JsdTerms{lq, lp, hi + log_pos(1.0f + exp_nonpos(lo - hi))};
}

// JSD second pass: D and sum_j q_j g_j with g_j = (1-beta)(log q_j - log M_j).
KD_INLINE void jsd_sums(const float* __restrict z, const float* __restrict t, int64_t n, const Sweep& c, float beta,
                        float& d_out, float& g_out) {
    float d = 0, g = 0;
#pragma omp simd reduction(+ : d, g)
    for (int64_t j = 0; j < n; ++j) {
        const JsdTerms e = jsd_terms(z[j], t[j], c);
        const float q = exp_nonpos(e.lq);
        const float p = exp_nonpos(e.lp);
        const float kl_p = p > 0.0f ? p * (e.lp - e.lm) : 0.0f;
        d += beta * kl_p + c.one_m_beta * q * (e.lq - e.lm);
        g += q * (c.one_m_beta * (e.lq - e.lm));
    }
    d_out = d;
    g_out = g;
}

template <int kMode, bool kCE>
KD_INLINE void dense_grad(const float* __restrict z, const float* __restrict t, float* __restrict g, int64_t n,
                          const Sweep& c) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        const float d = z[j] - c.mz;
        const float at = d * c.inv_t;
        const float q = exp_nonpos(at - c.lsq);
        const float hard = kCE ? exp_nonpos(d - c.ls1) : q;
        float soft;
        if (kMode == kForwardKL) {
            soft = q - exp_nonpos((t[j] - c.mt) * c.inv_t - c.lsp);
        } else if (kMode == kReverseKL) {
            const float bt = (t[j] - c.mt) * c.inv_t;
            soft = q > 0.0f ? q * (at - bt - c.k_rev) : 0.0f;
        } else {
            const JsdTerms e = jsd_terms(z[j], t[j], c);
            soft = q * (c.one_m_beta * (e.lq - e.lm) - c.g_mean);
        }
        g[j] = c.c_hard * hard + c.c_soft * soft;
    }
}

template <bool kCE>
KD_INLINE void sparse_grad(const float* __restrict z, float* __restrict g, int64_t n, const Sweep& c) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        const float d = z[j] - c.mz;
        const float q = exp_nonpos(d * c.inv_t - c.lsq);
        const float hard = kCE ? exp_nonpos(d - c.ls1) : q;
        g[j] = c.c_hard * hard + c.c_soft * q;
    }
}

// ---------------------------------------------------------------------------------------------
// Row kernels.
// ---------------------------------------------------------------------------------------------

struct SlotFix {
    int64_t index;
    float delta;  // added to the gradient at `index` before rounding
    bool operator<(const SlotFix& other) const { return index < other.index; }
};

struct Slot {
    int64_t index;
    double value, log_q, p, log_p;
};

// Per-thread scratch: chunk buffers and the k slots of a sparse row.
struct Scratch {
    alignas(64) float zbuf[kChunk];
    alignas(64) float tbuf[kChunk];
    alignas(64) float gbuf[kChunk];
    std::vector<Slot> slots;
    std::vector<SlotFix> fixes;
};

// Running softmax statistics over chunks (maxima of the raw inputs, sums relative to them).
struct Stats {
    float mz = -kInf, mt = -kInf;
    double sq = 0, s1 = 0, sp = 0, w = 0;
    bool p_zero_mass = false;  // reverse KL: q > 0 where p = 0, so D = inf
};

struct RowOut {
    double ce = 0, div = 0;
};

struct RowInfo {
    const KDLossArgs* a;
    int64_t base;   // element offset of the row
    int64_t label;  // -1 without labels
    float inv_t;
    bool ce;        // separate softmax at T = 1 for the hard loss
};

// Moves the running statistics to new chunk maxima. dq, dp are the shifts in units of 1/T.
template <int kMode>
KD_INLINE void rescale(Stats& s, float cz, float ct, double inv_t) {
    if (cz > s.mz) {
        if (s.mz != -kInf) {
            const double d = static_cast<double>(cz) - s.mz;
            const double dq = d * inv_t;
            const double aq = std::exp(-dq);
            if (kMode == kForwardKL) s.w += dq * s.sp;
            if (kMode == kReverseKL) s.w = aq * (s.w - dq * s.sq);
            s.sq *= aq;
            s.s1 *= std::exp(-d);
        }
        s.mz = cz;
    }
    if (ct > s.mt) {
        if (s.mt != -kInf) {
            const double dp = (static_cast<double>(ct) - s.mt) * inv_t;
            const double ap = std::exp(-dp);
            if (kMode == kForwardKL) s.w = ap * (s.w - dp * s.sp);
            if (kMode == kReverseKL) s.w += dp * s.sq;
            s.sp *= ap;
        }
        s.mt = ct;
    }
}

KD_INLINE void add_sums(Stats& s, const ChunkSums& c) {
    s.sq += c.sq;
    s.s1 += c.s1;
    s.sp += c.sp;
    s.w += c.w;
}

template <bool kCE>
KD_INLINE Stats student_stats(const RowInfo& row, Scratch& sc) {
    const KDLossArgs& a = *row.a;
    Stats s;
    for (int64_t off = 0; off < a.vocab; off += kChunk) {
        const int64_t n = std::min(kChunk, a.vocab - off);
        const float* z = load_chunk(a.logits, a.logits_dtype, row.base + off, n, sc.zbuf);
        rescale<-1>(s, chunk_max(z, n), -kInf, row.inv_t);
        add_sums(s, student_sums<kCE>(z, n, s.mz, row.inv_t));
    }
    return s;
}

template <int kMode, bool kCE>
KD_INLINE Stats dense_stats(const RowInfo& row, Scratch& sc) {
    const KDLossArgs& a = *row.a;
    Stats s;
    for (int64_t off = 0; off < a.vocab; off += kChunk) {
        const int64_t n = std::min(kChunk, a.vocab - off);
        const float* z = load_chunk(a.logits, a.logits_dtype, row.base + off, n, sc.zbuf);
        const float* t = load_chunk(a.teacher_logits, a.teacher_dtype, row.base + off, n, sc.tbuf);
        rescale<kMode>(s, chunk_max(z, n), chunk_max(t, n), row.inv_t);
        if (s.mt == -kInf) {  // teacher all -inf so far: p = 0 here, only the student sums move
            add_sums(s, student_sums<kCE>(z, n, s.mz, row.inv_t));
            s.p_zero_mass = true;
        } else {
            add_sums(s, dense_sums<kMode, kCE>(z, t, n, s.mz, s.mt, row.inv_t));
        }
    }
    return s;
}

// Gradient sweep shared by all teachers: compute a chunk in fp32, apply the label and slot
// corrections, round and store. The store may overwrite the logits (inplace): each chunk is fully
// read before it is written. kMode < 0 is a sparse teacher (student-only chunk kernel).
template <int kMode, bool kCE>
KD_INLINE void sweep(const RowInfo& row, Scratch& sc, const Sweep& c) {
    const KDLossArgs& a = *row.a;
    size_t next_fix = 0;
    for (int64_t off = 0; off < a.vocab; off += kChunk) {
        const int64_t n = std::min(kChunk, a.vocab - off);
        const float* z = load_chunk(a.logits, a.logits_dtype, row.base + off, n, sc.zbuf);
        if (kMode < 0) {
            sparse_grad<kCE>(z, sc.gbuf, n, c);
        } else {
            const float* t = load_chunk(a.teacher_logits, a.teacher_dtype, row.base + off, n, sc.tbuf);
            dense_grad<kMode, kCE>(z, t, sc.gbuf, n, c);
        }
        if (row.label >= off && row.label < off + n) sc.gbuf[row.label - off] -= c.c_hard;
        for (; next_fix < sc.fixes.size() && sc.fixes[next_fix].index < off + n; ++next_fix)
            sc.gbuf[sc.fixes[next_fix].index - off] += sc.fixes[next_fix].delta;
        store_chunk(a.grad, a.logits_dtype, row.base + off, n, sc.gbuf);
    }
}

KD_INLINE Sweep base_sweep(const RowInfo& row, const Stats& s) {
    const KDLossArgs& a = *row.a;
    Sweep c{};
    c.mz = s.mz;
    c.mt = s.mt;
    c.inv_t = row.inv_t;
    c.lsq = static_cast<float>(std::log(s.sq));
    c.lsp = static_cast<float>(std::log(s.sp));
    c.ls1 = static_cast<float>(row.ce ? std::log(s.s1) : std::log(s.sq));
    c.c_hard = a.labels ? static_cast<float>(a.grad_scale * a.hard_weight) : 0.0f;
    c.c_soft = static_cast<float>(a.grad_scale * a.soft_scale / a.temperature);
    return c;
}

// CE = logsumexp(z) - z_y, read before any sweep overwrites z.
KD_INLINE double hard_loss(const RowInfo& row, const Stats& s) {
    if (row.label < 0) return 0.0;
    const KDLossArgs& a = *row.a;
    const double z_y = load_scalar(a.logits, a.logits_dtype, row.base + row.label);
    return (static_cast<double>(s.mz) - z_y) + std::log(row.ce ? s.s1 : s.sq);
}

template <int kMode, bool kCE>
KD_INLINE RowOut dense_row(const RowInfo& row, Scratch& sc) {
    const KDLossArgs& a = *row.a;
    const Stats s = dense_stats<kMode, kCE>(row, sc);
    RowOut out;
    out.ce = hard_loss(row, s);
    Sweep c = base_sweep(row, s);
    const double lsq = std::log(s.sq), lsp = std::log(s.sp);
    if (kMode == kForwardKL) out.div = s.w / s.sp - lsp + lsq;
    if (kMode == kReverseKL) out.div = s.p_zero_mass ? static_cast<double>(kInf) : s.w / s.sq - lsq + lsp;
    if (kMode == kJSD) {
        const float beta = static_cast<float>(a.beta);
        c.log_beta = static_cast<float>(std::log(a.beta));
        c.log_1mbeta = static_cast<float>(std::log1p(-a.beta));
        c.one_m_beta = static_cast<float>(1.0 - a.beta);
        double d = 0, g = 0;
        for (int64_t off = 0; off < a.vocab; off += kChunk) {
            const int64_t n = std::min(kChunk, a.vocab - off);
            const float* z = load_chunk(a.logits, a.logits_dtype, row.base + off, n, sc.zbuf);
            const float* t = load_chunk(a.teacher_logits, a.teacher_dtype, row.base + off, n, sc.tbuf);
            float dc, gc;
            jsd_sums(z, t, n, c, beta, dc, gc);
            d += dc;
            g += gc;
        }
        out.div = d;
        c.g_mean = static_cast<float>(g);
    }
    c.k_rev = static_cast<float>(lsq - lsp + out.div);
    if (!a.grad) return out;
    sc.fixes.clear();
    sweep<kMode, kCE>(row, sc, c);
    return out;
}

// Teacher distribution on the valid slots of a sparse row; fills slot p / log p, returns D and
// sets the gradient coefficients (P - R Q) and the per-slot corrections.
KD_INLINE double sparse_divergence(const RowInfo& row, Scratch& sc, double& coef) {
    const KDLossArgs& a = *row.a;
    std::vector<Slot>& slots = sc.slots;
    const double inv_t = 1.0 / a.temperature;
    if (a.teacher_kind == kTeacherProbs) {
        for (Slot& sl : slots) {
            sl.p = sl.value > 0 ? sl.value : 0.0;
            sl.log_p = std::log(sl.p);
        }
    } else if (a.tail) {
        for (Slot& sl : slots) {
            sl.p = std::exp(sl.value);
            sl.log_p = sl.value;
        }
    } else {
        double vmax = -kInf;
        for (const Slot& sl : slots) vmax = std::max(vmax, sl.value);
        double sum = 0;
        for (Slot& sl : slots) {
            sl.p = std::exp((sl.value - vmax) * inv_t);
            sum += sl.p;
        }
        const double log_sum = std::log(sum);
        for (Slot& sl : slots) {
            sl.log_p = (sl.value - vmax) * inv_t - log_sum;
            sl.p /= sum;
        }
    }
    double div = 0, mass_p = 0, mass_q = 0;
    for (const Slot& sl : slots) {
        if (sl.p > 0) div += sl.p * (sl.log_p - sl.log_q);
        mass_p += sl.p;
        mass_q += std::exp(sl.log_q);
    }
    double ratio = 0;  // R = p_rest / q_rest
    if (a.tail) {
        const double p_rest = std::max(1.0 - mass_p, 0.0);
        const double q_rest_raw = 1.0 - mass_q;
        const double q_rest = std::max(q_rest_raw, static_cast<double>(FLT_MIN));
        if (p_rest > 0) {
            div += p_rest * (std::log(p_rest) - std::log(q_rest));
            if (q_rest_raw >= FLT_MIN) ratio = p_rest / q_rest;
        }
    }
    coef = mass_p - ratio * mass_q;
    const double c_soft = a.grad_scale * a.soft_scale * inv_t;
    sc.fixes.clear();
    for (const Slot& sl : slots)
        sc.fixes.push_back(SlotFix{sl.index, static_cast<float>(c_soft * (ratio * std::exp(sl.log_q) - sl.p))});
    std::sort(sc.fixes.begin(), sc.fixes.end());
    return div;
}

template <bool kCE>
KD_INLINE RowOut sparse_row(const RowInfo& row, Scratch& sc, int64_t r, std::atomic<int64_t>& bad_index) {
    const KDLossArgs& a = *row.a;
    const Stats s = student_stats<kCE>(row, sc);
    RowOut out;
    out.ce = hard_loss(row, s);
    const double lsq = std::log(s.sq);
    sc.slots.clear();
    for (int64_t i = 0; i < a.k; ++i) {
        const int64_t index = load_index(a.teacher_indices, a.index_dtype, r * a.k + i);
        if (index == -1) continue;
        if (index < -1 || index >= a.vocab) {
            bad_index.store(index);
            continue;
        }
        const double z = load_scalar(a.logits, a.logits_dtype, row.base + index);
        const double value = load_scalar(a.teacher_values, a.values_dtype, r * a.k + i);
        sc.slots.push_back(Slot{index, value, (z - s.mz) * row.inv_t - lsq, 0.0, 0.0});
    }
    double coef = 0;
    out.div = sparse_divergence(row, sc, coef);
    if (!a.grad) return out;
    Sweep c = base_sweep(row, s);
    c.c_soft = static_cast<float>(c.c_soft * coef);
    sweep<-1, kCE>(row, sc, c);
    return out;
}

KD_INLINE RowOut active_row(const RowInfo& row, Scratch& sc, int64_t r, std::atomic<int64_t>& bad_index) {
    const KDLossArgs& a = *row.a;
    if (!a.teacher_logits) return row.ce ? sparse_row<true>(row, sc, r, bad_index) : sparse_row<false>(row, sc, r, bad_index);
    switch (a.divergence) {
        case kReverseKL:
            return row.ce ? dense_row<kReverseKL, true>(row, sc) : dense_row<kReverseKL, false>(row, sc);
        case kJSD:
            return row.ce ? dense_row<kJSD, true>(row, sc) : dense_row<kJSD, false>(row, sc);
        default:
            return row.ce ? dense_row<kForwardKL, true>(row, sc) : dense_row<kForwardKL, false>(row, sc);
    }
}

KD_CLONES double process_row(const KDLossArgs& a, int64_t r, Scratch& sc, std::atomic<int64_t>& bad_label,
                             std::atomic<int64_t>& bad_index) {
    const int64_t base = r * a.vocab;
    int64_t label = -1;
    bool active = true;
    if (a.labels) {
        label = a.labels[r];
        if (label == a.ignore_index) {
            active = false;
        } else if (label < 0 || label >= a.vocab) {
            bad_label.store(label);
            active = false;
        }
    }
    if (!active) {
        a.loss_rows[r] = a.ce_rows[r] = a.div_rows[r] = 0.0f;
        if (a.grad) {
            const size_t element = element_size(a.logits_dtype);
            std::memset(static_cast<char*>(a.grad) + base * element, 0, static_cast<size_t>(a.vocab) * element);
        }
        return 0.0;
    }
    const float inv_t = static_cast<float>(1.0 / a.temperature);
    const RowInfo row{&a, base, label, inv_t, a.labels != nullptr && inv_t != 1.0f};
    const RowOut out = active_row(row, sc, r, bad_index);
    const double loss = a.hard_weight * out.ce + a.soft_scale * out.div;
    a.loss_rows[r] = static_cast<float>(loss);
    a.ce_rows[r] = static_cast<float>(out.ce);
    a.div_rows[r] = static_cast<float>(out.div);
    return loss;
}

KD_CLONES void scale_row(void* out, const void* in, int dtype, int64_t base, int64_t vocab, float scale) {
    alignas(64) float buf[kChunk];
    alignas(64) float g[kChunk];
    for (int64_t off = 0; off < vocab; off += kChunk) {
        const int64_t n = std::min(kChunk, vocab - off);
        const float* x = load_chunk(in, dtype, base + off, n, buf);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) g[j] = x[j] * scale;
        store_chunk(out, dtype, base + off, n, g);
    }
}

// A freshly allocated [N, V] output is first touched by the kernel. Page faults dominate that
// first touch on VMs (0.2-0.45 s for 512 MiB in 4 KiB pages on the 2-core CI machines, longer
// than the whole kernel), so ask for transparent huge pages on the 2 MiB-aligned interior of
// the buffer; with THP in "madvise" mode this gives 512x fewer faults. The whole buffer is
// written right after, so no memory is wasted; it is a no-op where THP is off or not Linux.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t{1} << 21;
    if (bytes < 16 * kHuge) return;
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)data;
    (void)bytes;
#endif
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers: check, then one OpenMP loop over rows (dynamic: ignored rows finish early).
// ---------------------------------------------------------------------------------------------

double kd_loss_forward(const KDLossArgs& a) {
    if (a.rows < 0 || a.vocab < 1 || !a.logits || !a.loss_rows || !a.ce_rows || !a.div_rows)
        throw std::invalid_argument("kd_loss: bad shapes or missing buffers");
    if (a.logits_dtype != kFloat32 && a.logits_dtype != kBFloat16 && a.logits_dtype != kFloat16)
        throw std::invalid_argument("kd_loss: logits must be float32, bfloat16 or float16");
    const bool dense = a.teacher_logits != nullptr;
    if (!dense && (!a.teacher_indices || !a.teacher_values || a.k < 1))
        throw std::invalid_argument("kd_loss: needs teacher_logits or teacher_indices + teacher_values");
    if (!(a.temperature > 0)) throw std::invalid_argument("kd_loss: temperature must be > 0");

    if (a.grad && a.grad != a.logits)
        advise_huge_pages(a.grad, static_cast<size_t>(a.rows) * a.vocab * element_size(a.logits_dtype));

    std::atomic<int64_t> bad_label{0}, bad_index{0};
    constexpr int64_t kNone = std::numeric_limits<int64_t>::min();
    bad_label.store(kNone);
    bad_index.store(kNone);
    double total = 0;
    const int threads = std::max(1, a.num_threads);
#pragma omp parallel num_threads(threads) if (threads > 1 && a.rows > 1) reduction(+ : total)
    {
        Scratch scratch;
        scratch.slots.reserve(static_cast<size_t>(a.k));
        scratch.fixes.reserve(static_cast<size_t>(a.k));
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < a.rows; ++r) total += process_row(a, r, scratch, bad_label, bad_index);
    }
    if (bad_label.load() != kNone)
        throw std::invalid_argument("kd_loss: labels must be in [0, " + std::to_string(a.vocab) +
                                    ") or ignore_index; got " + std::to_string(bad_label.load()));
    if (bad_index.load() != kNone)
        throw std::invalid_argument("kd_loss: teacher_indices must be in [0, " + std::to_string(a.vocab) +
                                    ") or -1; got " + std::to_string(bad_index.load()));
    return total;
}

void kd_loss_scale_grad(void* out, const void* in, int dtype, int64_t rows, int64_t vocab, const float* row_scale,
                        double scale, int num_threads) {
    if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
        throw std::invalid_argument("kd_loss_scale_grad: gradient must be float32, bfloat16 or float16");
    if (out != in) advise_huge_pages(out, static_cast<size_t>(rows) * vocab * element_size(dtype));
    const int threads = std::max(1, num_threads);
#pragma omp parallel for num_threads(threads) if (threads > 1 && rows > 1) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float s = static_cast<float>(row_scale ? scale * row_scale[r] : scale);
        scale_row(out, in, dtype, r * vocab, vocab, s);
    }
}

const char* kd_loss_isa() {
#if KD_HAVE_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
    if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
    return "baseline";
}

}  // namespace kdfast
