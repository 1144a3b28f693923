// kd_loss: fused temperature-softmax + divergence + cross-entropy for the CPU backend, loss and
// gradient in one call (the contract is docs/loss.md; kdfast/reference.py is the oracle).
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
//     Skew KL(alpha) (DistiLLM, Ko et al. 2024): one of JSD's two terms, with the mixture weight of p
//     in M (alpha, or 1 - alpha) in place of beta; log M is the same logaddexp. alpha = 0 is forward /
//     reverse KL (dispatched in Python).
//     skew KL     M = alpha p + (1-alpha) q,  D = KL(p||M) = sum p (log p - log M)
//                 dD/dq_j = -(1-alpha) p_j / M_j,  so with w_j = (1-alpha) q_j / M_j (in [0, 1]):
//                 q_j dD/dq_j = -p_j w_j,  sum_i q_i dD/dq_i = -S,  S = sum_i p_i w_i
//                 dD/dz_j = (1/T) (q_j S - p_j w_j)
//     skew reverse KL   M = alpha q + (1-alpha) p,  D = KL(q||M) = sum q (log q - log M)
//                 dD/dq_j = log(q_j / M_j) + 1 - alpha q_j / M_j = log(q_j / M_j) + v_j,
//                 v_j = (1-alpha) p_j / M_j (in [0, 1]; alpha q_j / M_j + v_j = 1),
//                 sum_i q_i dD/dq_i = D + V,  V = sum_i q_i v_i
//                 dD/dz_j = (1/T) q_j ((log(q_j / M_j) + v_j) - (D + V))
//                 (v, not 1 - alpha q / M: as alpha -> 1 every term is O(1 - alpha), the gradient
//                 O((1 - alpha)^2), and terms of O(1) would cancel to eps / (1 - alpha)^2 relative.)
//                 Both D are at most -log alpha (M >= alpha p, resp. alpha q), and finite where the other
//                 distribution is 0 (unlike forward / reverse KL).
//   Sparse teacher on valid slots I (index -1 = empty), P = sum_{i in I} p_i, Q = sum_{i in I} q_i:
//     "logits", "logprobs" without tail: p = softmax(v / T) over I; "probs": p_i = v_i as given.
//     D = sum_I p_i (log p_i - log q_i) = const - sum_I p_i a_i + P L_q
//     dD/dz_j = (1/T) (q_j P - p_j 1[j in I])
//     (P = 1 for a normalized target, which gives the familiar q - p; P = 0 for an empty row.)
//     "logprobs" with tail: p_i = exp(v_i), p_rest = exp(teacher_tail) when given (the teacher's
//     exact mass outside the slots), else max(1 - P, 0) recomputed from the values; q_rest is the
//     student's mass outside the slots, q_rest_f = max(q_rest, FLT_MIN) (the floor, shared with the
//     Triton backend: below FLT_MIN, q_rest is a constant).
//     D = sum_I p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest_f). The slot part is the
//     sparse case above; dq_rest/da_j = q_j (1 - q_rest) off the slots and -q_j q_rest on them, so
//     with R = p_rest / q_rest (R = 0 where the floor is active) and Q = 1 - q_rest:
//       dD/dz_j = (1/T) (q_j (P - R Q) + 1[j in I] (R q_j - p_j))
//               = (1/T) q_j C                     off the slots, C = P - R (1 - q_rest) = P + p_rest - R,
//               = (1/T) ((P + R q_rest) q_j - p_j)  on the slots  (= q_j - p_j when P + p_rest = 1).
//     Both forms are evaluated as written: q_rest is never 1 - Q, and a slot's gradient is never the
//     off-slot value plus a correction (with a confident student R reaches 1e13 and more, and
//     1 - Q or C q_j + R q_j would cancel in float32).
//   The stored gradient is rs * (hard_weight dCE/dz + s dD/dz); backward only scales it by
//   grad_output. Inactive rows (label == ignore_index) get loss 0 and gradient 0.
//   Bad rows: a duplicate valid index, or a non-finite teacher value (NaN or +inf; -inf also for
//   "probs"; -inf is zero mass in dense logits, sparse "logits" / "logprobs" and teacher_tail) gives
//   NaN loss / CE / D rows and a zero gradient row. Out-of-range labels and indices throw before
//   any row is written.
//
// Numerics: every statistic is computed from fp32 copies of the inputs (16-bit buffers are widened
// here, chunk by chunk) with fp32 vector lanes per 2048-element chunk and double accumulation across
// chunks. Softmax statistics are online over chunks: a chunk's max is found first, the running sums
// are rescaled when the max grows, then exp((x - max) / T) is summed. Shifting before dividing by T
// keeps (z_j - max z) exact for close values, so T = 1e-2 with logits of 1e4 loses nothing. The KL
// cross terms are accumulated relative to the current maxima and shifted when a maximum moves, so
// D is never a difference of two large logsumexps. Measured against float64 over TEMPERATURE_RANGE
// (tests/test_kd_loss_cpu_edges.py): D per row within 1e-4 relative (worst at T = 1e2, where D is
// ~1e-3 and the log-sum cancellation leaves ~1e-7 absolute), each gradient entry within ~1e-5 of its
// own scale T (q_j + p_j). Tail rows sum the entries outside the slots on their own, relative to their
// own maximum (so q_rest has fp32 relative accuracy however close Q is to 1), and when |C| > 1 the
// off-slot term is eq_j exp((cz - max z)/T - lsq + log|C|) (the chunk multiplier is formed in
// double), which stays representable where q_j underflows. JSD and skew entries with p = q = 0 (a
// masked vocabulary) contribute 0. Skew KL's p_j w_j is exp(log p_j + log(1-alpha) + log q_j - log M_j)
// and skew reverse KL's v_j is exp(log(1-alpha) + log p_j - log M_j), every log taken from the logits
// (log q_j - log M_j stays exact where q_j underflows: M_j is then alpha p_j, resp. (1-alpha) p_j, and
// the term goes to 0 without a 0/0). As alpha -> 1 the skew D vanish like (1-alpha)^2 while log q_j -
// log M_j keeps an ulp of log q_j: D within 2e-5 relative at alpha = 0.99, 7e-3 at 0.999 (docs/loss.md).
// A 16-bit gradient is rounded once, here; a grad_output other than 1.0 rounds it a second time in
// kd_loss_scale_grad.
//
// Passes over a row: one statistics pass reads z [and t] from memory and stores every exponential
// it computes (eq = e^{(z - cz)/T}, ep = e^{(t - ct)/T}, e1 = e^{z - cz}, relative to the running
// maxima cz, ct of their 2048-element chunk) in per-thread row-sized scratch (0.5 MB per array at
// V = 128256, so it stays in L2/L3). The sweep turns them into the gradient with one multiplier per
// chunk and array (q_j = eq_j e^{(cz - max z)/T - log sum}, ...), so it computes no exponential; it
// re-reads z [and t] (from cache) only for reverse KL and JSD. JSD needs one more pass for
// sum_i q_i g_i before the sweep, which leaves log M_j in place of ep for it. The skew divergences
// take the same extra pass for D and S (V), which leaves each element's gradient term (p_j w_j, or
// log(q_j / M_j) + v_j) in place of ep, so that their sweep reads neither z nor t. At T = 2 the hard
// softmax is e1 = eq^2 (not stored; the square costs about one ulp). A gradient larger than
// kStreamBytes is written with non-temporal stores (no read for ownership). Sparse rows sort their
// k slots by index (O(k log k), which also finds duplicates).
//
// Exponentials per vocabulary element (per-row and per-slot scalar work not counted), before this
// layout (statistics + sweep) and now; "CE" = labels given at T != 1 (the hard loss has its own
// softmax; its value is reported even when hard_weight = 0, so e1 is summed then too, but the sweep
// never reads it):
//   path                        T = 1 or no labels      CE, T != 1            CE, T = 2
//   dense forward KL            2 + 2 -> 2              3 + 3 -> 3            3 + 3 -> 2
//   dense reverse KL            2 + 1 -> 2              3 + 2 -> 3            3 + 2 -> 2
//   dense JSD (+ logs)          2 + 3 + 2 -> 3 (+1)     3 + 3 + 3 -> 4 (+1)   -> 3 (+1)    (2 logs -> 1)
//   dense skew KL / reverse     -> 4 (+1)               -> 5 (+1)             -> 4 (+1)    (2 stats + 2 skew_sums)
//   sparse top-k (tail too)     1 + 1 -> 1              2 + 2 -> 2            2 + 2 -> 1
#include "kd_loss.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <emmintrin.h>
#endif

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

// Copies `bytes` bytes with non-temporal stores on the 16-byte-aligned interior (SSE2, baseline on
// x86-64): a gradient far larger than the caches goes straight to memory, without the read for
// ownership a normal store does first (that read is a third of the sweep's traffic).
KD_INLINE void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__x86_64__) && defined(__GNUC__)
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    const size_t head = std::min(bytes, static_cast<size_t>((16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15));
    std::memcpy(d, s, head);
    size_t i = head;
    for (; i + 16 <= bytes; i += 16) {
        __m128i v;
        __builtin_memcpy(&v, s + i, 16);
        __builtin_ia32_movntdq(reinterpret_cast<__v2di*>(d + i), reinterpret_cast<__v2di>(v));
    }
    std::memcpy(d + i, s + i, bytes - i);
#else
    std::memcpy(dst, src, bytes);
#endif
}

// Rounds n fp32 values to `dtype` (round to nearest even) and writes them at element offset `off`,
// with non-temporal stores when `stream`. n <= kChunk.
KD_INLINE void store_chunk(void* base, int dtype, int64_t off, int64_t n, const float* __restrict g, bool stream) {
    const size_t element = dtype == kFloat32 ? 4 : 2;
    void* dst = static_cast<char*>(base) + static_cast<size_t>(off) * element;
    alignas(64) uint16_t out[kChunk];
    const void* src = g;
    switch (dtype) {
        case kFloat32:
            break;
        case kBFloat16: {
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) {
                const uint32_t u = float_to_bits(g[j]);
                const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
                out[j] = static_cast<uint16_t>(g[j] != g[j] ? ((u >> 16) | 0x40u) : rounded);
            }
            src = out;
            break;
        }
        default: {
            _Float16* half = reinterpret_cast<_Float16*>(out);
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) half[j] = static_cast<_Float16>(g[j]);
            src = out;
            break;
        }
    }
    const size_t bytes = static_cast<size_t>(n) * element;
    if (stream)
        stream_copy(dst, src, bytes);
    else
        std::memcpy(dst, src, bytes);
}

// Bytes per element of a logits / gradient buffer (float32, bfloat16 or float16).
KD_INLINE size_t element_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Gradients of more than kStreamBytes are written with non-temporal stores: far larger than the
// caches, they would only evict the rows the kernel reads next. Smaller ones stay in cache for their
// consumer (a chunk of the fused linear loss, the backward GEMM).
constexpr size_t kStreamBytes = size_t{32} << 20;

KD_INLINE bool streams(int64_t rows, int64_t vocab, int dtype) {
    return static_cast<size_t>(rows) * static_cast<size_t>(vocab) * element_size(dtype) > kStreamBytes;
}

// Orders this thread's non-temporal stores before anything it does next.
KD_INLINE void store_fence() {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_ia32_sfence();
#endif
}

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

KD_INLINE bool any_nan(const float* __restrict x, int64_t n) {
    bool nan = false;
    for (int64_t j = 0; j < n; ++j) nan |= x[j] != x[j];
    return nan;
}

// ---------------------------------------------------------------------------------------------
// Chunk kernels: one pass over n elements, compile-time specialized so each loop vectorizes.
// kCE: the hard loss needs its own softmax at T = 1 (labels given and T != 1); otherwise the hard
// gradient reuses q (T = 1) or is absent. kSquare (kCE at T = 2): exp(z - m) = exp((z - m) / 2)^2,
// one exponential fewer (the square adds about one ulp), and e1 is not stored: the sweep squares eq.
// The statistics pass stores every exponential it computes (relative to the running maxima of its
// chunk) in row-sized scratch; the gradient sweep rescales them per chunk instead of recomputing.
// ---------------------------------------------------------------------------------------------

struct ChunkSums {
    float sq = 0, s1 = 0, sp = 0, w = 0;
};

// Student sums of eq = exp((z - mz)/T) [and e1 = exp(z - mz)], stored to eq [e1]. A chunk whose
// running maximum is still -inf has no mass (0, NaN if it holds a NaN) and stores zeros.
template <bool kCE, bool kSquare>
KD_INLINE ChunkSums student_sums(const float* __restrict z, int64_t n, float mz, float inv_t, float* __restrict eq,
                                 float* __restrict e1) {
    ChunkSums s;
    if (mz == -kInf) {
        std::memset(eq, 0, static_cast<size_t>(n) * sizeof(float));
        if (kCE && !kSquare) std::memset(e1, 0, static_cast<size_t>(n) * sizeof(float));
        if (any_nan(z, n)) s.sq = s.s1 = std::numeric_limits<float>::quiet_NaN();
        return s;
    }
    float sq = 0, s1 = 0;
#pragma omp simd reduction(+ : sq, s1)
    for (int64_t j = 0; j < n; ++j) {
        const float d = z[j] - mz;
        const float e = exp_nonpos(d * inv_t);
        eq[j] = e;
        sq += e;
        if (kCE) {
            const float f = kSquare ? e * e : exp_nonpos(d);
            if (!kSquare) e1[j] = f;
            s1 += f;
        }
    }
    s.sq = sq;
    s.s1 = s1;
    return s;
}

// Student and teacher sums plus the KL cross term relative to the current maxima:
// forward w = sum e^{bt} (bt - at), reverse w = sum e^{at} (at - bt), at = (z - mz)/T, bt = (t - mt)/T.
// Stores eq = e^{at}, ep = e^{bt} [and e1 = e^{z - mz}].
template <int kMode, bool kCE, bool kSquare>
KD_INLINE ChunkSums dense_sums(const float* __restrict z, const float* __restrict t, int64_t n, float mz, float mt,
                               float inv_t, float* __restrict eq_out, float* __restrict ep_out,
                               float* __restrict e1_out) {
    float sq = 0, s1 = 0, sp = 0, w = 0;
#pragma omp simd reduction(+ : sq, s1, sp, w)
    for (int64_t j = 0; j < n; ++j) {
        const float d = z[j] - mz;
        const float at = d * inv_t;
        const float bt = (t[j] - mt) * inv_t;
        const float eq = exp_nonpos(at);
        const float ep = exp_nonpos(bt);
        eq_out[j] = eq;
        ep_out[j] = ep;
        sq += eq;
        sp += ep;
        if (kCE) {
            const float e1 = kSquare ? eq * eq : exp_nonpos(d);
            if (!kSquare) e1_out[j] = e1;
            s1 += e1;
        }
        if (kMode == kForwardKL) w += ep > 0.0f ? ep * (bt - at) : 0.0f;
        if (kMode == kReverseKL) w += eq > 0.0f ? eq * (at - bt) : 0.0f;
    }
    return ChunkSums{sq, s1, sp, w};
}

// Constants of a gradient sweep, all in the shifted form (x - max)/T - log(sum).
struct Sweep {
    float mz, mt, inv_t;
    double lsq, lsp, ls1;  // log of the student (T), teacher, student (T = 1) sums
    double lsq_soft;       // lsq; tail bucket with |C| > 1: lsq - log|C| (|C| q_j = e^{a_j - lsq_soft} cannot overflow)
    double c_hard;         // rs * hard_weight
    double c_soft;         // rs * s / T; sparse: times the off-slot coefficient C (tail: times sign(C))
    float k_rev;           // reverse KL: lsq - lsp + D
    float log_wp, log_wq;      // JSD and skew: logs of p's and q's weights in the mixture M
    float one_m_beta, g_mean;  // JSD
    float skew_k;              // skew KL: S = sum_i p_i w_i; skew reverse KL: D + V
};

// Per-chunk factors that turn the stored exponentials into the terms of the gradient:
// q_j = eq_j fq, p_j = ep_j fp1, c_hard softmax(z)_j = hard_j fh (hard = e1 or eq), c_soft C q_j = eq_j fs,
// c_soft p_j = ep_j fp.
struct ChunkScale {
    float fq, fp1, fh, fs, fp;
};

KD_INLINE ChunkScale chunk_scale(const Sweep& c, float cz, float ct, bool ce) {
    const double dz = cz == -kInf ? -static_cast<double>(kInf) : static_cast<double>(cz) - c.mz;  // <= 0
    const double dt = ct == -kInf ? -static_cast<double>(kInf) : static_cast<double>(ct) - c.mt;
    const double az = dz * c.inv_t;
    ChunkScale f;
    f.fq = static_cast<float>(std::exp(az - c.lsq));
    f.fh = static_cast<float>(c.c_hard * std::exp(ce ? dz - c.ls1 : az - c.lsq));
    f.fs = static_cast<float>(c.c_soft * std::exp(az - c.lsq_soft));
    const double fp1 = std::exp(dt * c.inv_t - c.lsp);
    f.fp1 = static_cast<float>(fp1);
    f.fp = static_cast<float>(c.c_soft * fp1);
    return f;
}

// Mixture pieces at one element: log q, log p and log M = logaddexp(log p + log w_p, log q + log w_q)
// (JSD: w_p = beta; skew KL: alpha; skew reverse KL: 1 - alpha; w_q = 1 - w_p).
struct MixtureTerms {
    float lq, lp, lm;
};

KD_INLINE MixtureTerms mixture_terms(float z, float t, const Sweep& c) {
    const float lq = (z - c.mz) * c.inv_t - static_cast<float>(c.lsq);
    const float lp = (t - c.mt) * c.inv_t - static_cast<float>(c.lsp);
    const float a = lp + c.log_wp;
    const float b = lq + c.log_wq;
    const float hi = a > b ? a : b;
    const float lo = a > b ? b : a;
    const float gap = hi == -kInf ? -kInf : lo - hi;  // p = q = 0 (masked entry): M = 0, not NaN
    return MixtureTerms{lq, lp, hi + log_pos(1.0f + exp_nonpos(gap))};
}

// JSD second pass: D and sum_j q_j g_j with g_j = (1-beta)(log q_j - log M_j); q and p from the
// stored exponentials. log M_j replaces p's exponential in `ep_lm` for the sweep.
KD_INLINE void jsd_sums(const float* __restrict z, const float* __restrict t, const float* __restrict eq,
                        float* __restrict ep_lm, int64_t n, const Sweep& c, const ChunkScale& f, float beta,
                        float& d_out, float& g_out) {
    float d = 0, g = 0;
#pragma omp simd reduction(+ : d, g)
    for (int64_t j = 0; j < n; ++j) {
        const MixtureTerms e = mixture_terms(z[j], t[j], c);
        const float q = eq[j] * f.fq;
        const float p = ep_lm[j] * f.fp1;
        ep_lm[j] = e.lm;
        const float kl_p = p > 0.0f ? p * (e.lp - e.lm) : 0.0f;
        const float kl_q = q > 0.0f ? q * (e.lq - e.lm) : 0.0f;
        d += beta * kl_p + c.one_m_beta * kl_q;
        g += c.one_m_beta * kl_q;
    }
    d_out = d;
    g_out = g;
}

// Skew second pass: D and the gradient's row sum (skew KL: S = sum_j p_j w_j; skew reverse KL:
// V = sum_j q_j v_j); q and p from the stored exponentials, the logs from the logits. Each element's
// gradient term (p_j w_j; log(q_j / M_j) + v_j, read by the sweep only where q_j > 0) replaces p's
// exponential in `ep_term`.
template <int kMode>
KD_INLINE void skew_sums(const float* __restrict z, const float* __restrict t, const float* __restrict eq,
                         float* __restrict ep_term, int64_t n, const Sweep& c, const ChunkScale& f, float& d_out,
                         float& s_out) {
    float d = 0, s = 0;
#pragma omp simd reduction(+ : d, s)
    for (int64_t j = 0; j < n; ++j) {
        const MixtureTerms e = mixture_terms(z[j], t[j], c);
        const float q = eq[j] * f.fq;
        const float p = ep_term[j] * f.fp1;
        if (kMode == kSkewKL) {
            // p_j w_j = p_j (1-alpha) q_j / M_j; the exponent is <= 0 as M_j >= (1-alpha) q_j
            const float pw = p > 0.0f ? exp_nonpos(e.lp + c.log_wq + e.lq - e.lm) : 0.0f;
            d += p > 0.0f ? p * (e.lp - e.lm) : 0.0f;
            s += pw;
            ep_term[j] = pw;
        } else {
            // v_j = (1-alpha) p_j / M_j; NaN where p = q = 0 (log M = -inf), which is never read
            const float v = exp_nonpos(c.log_wp + e.lp - e.lm);
            d += q > 0.0f ? q * (e.lq - e.lm) : 0.0f;
            s += q > 0.0f ? q * v : 0.0f;
            ep_term[j] = (e.lq - e.lm) + v;
        }
    }
    d_out = d;
    s_out = s;
}

// Where the hard gradient's softmax comes from: q itself (T = 1, or hard_weight = 0), the stored
// e1, or eq^2 (T = 2).
constexpr int kHardQ = 0, kHardE1 = 1, kHardSquare = 2;

// Gradient of a chunk from the stored exponentials: hard part fh hard_j (hard_j per kHard), then
// forward KL fs eq_j - fp ep_j (fs = c_soft fq); sparse fs eq_j (slots are overwritten later);
// reverse KL and JSD from q_j = fq eq_j and the logits; the skew divergences from q_j and the
// element's term that skew_sums left in ep.
template <int kMode, int kHard>
KD_INLINE void chunk_grad(const float* __restrict hard, const float* __restrict eq, const float* __restrict ep,
                          const float* __restrict z, const float* __restrict t, float* __restrict g, int64_t n,
                          const Sweep& c, const ChunkScale& f) {
    if (kMode == kForwardKL || kMode < 0) {
        const float fq = kHard != kHardQ ? f.fs : f.fs + f.fh;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
            float v = eq[j] * fq;
            if (kHard == kHardE1) v += hard[j] * f.fh;
            if (kHard == kHardSquare) v += eq[j] * eq[j] * f.fh;
            if (kMode == kForwardKL) v -= ep[j] * f.fp;
            g[j] = v;
        }
        return;
    }
    const float c_soft = static_cast<float>(c.c_soft);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        const float q = eq[j] * f.fq;
        float soft;
        if (kMode == kReverseKL) {
            const float at = (z[j] - c.mz) * c.inv_t;
            const float bt = (t[j] - c.mt) * c.inv_t;
            soft = q > 0.0f ? q * (at - bt - c.k_rev) : 0.0f;
        } else if (kMode == kSkewKL) {
            soft = q * c.skew_k - ep[j];  // q_j S - p_j w_j
        } else if (kMode == kSkewReverseKL) {
            soft = q > 0.0f ? q * (ep[j] - c.skew_k) : 0.0f;  // q_j ((log(q_j / M_j) + v_j) - (D + V))
        } else {
            const float lq = (z[j] - c.mz) * c.inv_t - static_cast<float>(c.lsq);
            soft = q > 0.0f ? q * (c.one_m_beta * (lq - ep[j]) - c.g_mean) : 0.0f;  // ep holds log M
        }
        const float h = kHard == kHardE1 ? hard[j] : kHard == kHardSquare ? eq[j] * eq[j] : eq[j];
        g[j] = h * f.fh + c_soft * soft;
    }
}

// ---------------------------------------------------------------------------------------------
// Row kernels.
// ---------------------------------------------------------------------------------------------

constexpr int kSparse = -1;  // sweep mode below the divergences: sparse teacher (with or without tail)

// A valid slot of a sparse row. Slots are kept sorted by index; `grad` is the full gradient at the
// slot (hard + soft, before the label correction), which the sweep writes over the off-slot value.
struct Slot {
    int64_t index;
    double value, z, log_q, p, log_p;
    float grad;
};

// Per-thread scratch: chunk buffers, the statistics pass's exponentials of one row (relative to the
// running maxima cz / ct of their chunk) and the k slots of a sparse row.
struct Scratch {
    alignas(64) float zbuf[kChunk];
    alignas(64) float tbuf[kChunk];
    alignas(64) float gbuf[kChunk];
    std::vector<float> eq, ep, e1;  // [vocab] e^{(z - cz)/T}, e^{(t - ct)/T}, e^{z - cz}
    std::vector<float> cz, ct;      // [chunks]
    std::vector<Slot> slots;
};

// Row-sized pointers into the scratch at element offset off (e1 / ep only where they exist).
struct RowExps {
    float *eq, *ep, *e1;
};

KD_INLINE RowExps row_exps(Scratch& sc, int64_t off) {
    return RowExps{sc.eq.data() + off, sc.ep.empty() ? nullptr : sc.ep.data() + off,
                   sc.e1.empty() ? nullptr : sc.e1.data() + off};
}

// Running softmax statistics over chunks (maxima of the raw inputs, sums relative to them).
struct Stats {
    float mz = -kInf, mt = -kInf;
    double sq = 0, s1 = 0, sp = 0, w = 0;
    bool p_zero_mass = false;  // reverse KL: q > 0 where p = 0, so D = inf
    bool teacher_nan = false;  // a NaN in a teacher chunk whose finite maximum is -inf
};

struct RowOut {
    double ce = 0, div = 0;
    bool bad = false;  // NaN row, zero gradient (duplicate index, non-finite teacher value)
};

struct RowInfo {
    const KDLossArgs* a;
    int64_t base;   // element offset of the row
    int64_t label;  // -1 without labels
    float inv_t;
    bool ce;        // separate softmax at T = 1 for the hard loss
    bool square;    // ce at T = 2: e^{z - m} = (e^{(z - m)/2})^2
    bool stream;    // non-temporal gradient stores (a gradient larger than kStreamBytes)
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
KD_INLINE ChunkSums student_chunk(const RowInfo& row, const float* z, int64_t n, float mz, const RowExps& e) {
    return kCE && row.square ? student_sums<kCE, kCE>(z, n, mz, row.inv_t, e.eq, e.e1)
                             : student_sums<kCE, false>(z, n, mz, row.inv_t, e.eq, e.e1);
}

template <bool kCE>
KD_INLINE Stats student_stats(const RowInfo& row, Scratch& sc) {
    const KDLossArgs& a = *row.a;
    Stats s;
    for (int64_t off = 0, ci = 0; off < a.vocab; off += kChunk, ++ci) {
        const int64_t n = std::min(kChunk, a.vocab - off);
        const float* z = load_chunk(a.logits, a.logits_dtype, row.base + off, n, sc.zbuf);
        rescale<-1>(s, chunk_max(z, n), -kInf, row.inv_t);
        sc.cz[ci] = s.mz;
        add_sums(s, student_chunk<kCE>(row, z, n, s.mz, row_exps(sc, off)));
    }
    return s;
}

// Tail rows: the entries outside the (sorted) slots are summed on their own (each chunk copied with
// its slots set to -inf), relative to their own maximum, and the slots are added in double.
// log_q_rest = log(rest sum) - log(full sum) is then as accurate as the fp32 rest sum (relative),
// however close Q = 1 - q_rest is to 1, where 1 - Q would cancel. Entries below e^-87 of the rest
// maximum count as 0 (exp_nonpos). The stored exponentials are 0 at the slots.
template <bool kCE>
KD_INLINE Stats tail_stats(const RowInfo& row, Scratch& sc, double& log_q_rest) {
    const KDLossArgs& a = *row.a;
    Stats rest;
    size_t next_slot = 0;
    for (int64_t off = 0, ci = 0; off < a.vocab; off += kChunk, ++ci) {
        const int64_t n = std::min(kChunk, a.vocab - off);
        const float* z = load_chunk(a.logits, a.logits_dtype, row.base + off, n, sc.zbuf);
        if (z != sc.zbuf) std::memcpy(sc.zbuf, z, static_cast<size_t>(n) * sizeof(float));
        for (; next_slot < sc.slots.size() && sc.slots[next_slot].index < off + n; ++next_slot) {
            Slot& sl = sc.slots[next_slot];
            sl.z = sc.zbuf[sl.index - off];
            sc.zbuf[sl.index - off] = -kInf;
        }
        rescale<-1>(rest, chunk_max(sc.zbuf, n), -kInf, row.inv_t);
        sc.cz[ci] = rest.mz;
        add_sums(rest, student_chunk<kCE>(row, sc.zbuf, n, rest.mz, row_exps(sc, off)));
    }
    Stats s;
    s.mz = rest.mz;
    for (const Slot& sl : sc.slots) s.mz = std::max(s.mz, static_cast<float>(sl.z));
    const double shift = rest.sq > 0 ? static_cast<double>(rest.mz) - s.mz : 0.0;  // <= 0
    if (rest.sq > 0) {
        s.sq = rest.sq * std::exp(shift * row.inv_t);
        s.s1 = rest.s1 * std::exp(shift);
    }
    for (const Slot& sl : sc.slots) {
        s.sq += std::exp((sl.z - s.mz) * row.inv_t);
        if (kCE) s.s1 += std::exp(sl.z - s.mz);
    }
    log_q_rest = rest.sq > 0 ? std::log(rest.sq) + shift * row.inv_t - std::log(s.sq) : -static_cast<double>(kInf);
    return s;
}

template <int kMode, bool kCE>
KD_INLINE Stats dense_stats(const RowInfo& row, Scratch& sc) {
    const KDLossArgs& a = *row.a;
    Stats s;
    for (int64_t off = 0, ci = 0; off < a.vocab; off += kChunk, ++ci) {
        const int64_t n = std::min(kChunk, a.vocab - off);
        const float* z = load_chunk(a.logits, a.logits_dtype, row.base + off, n, sc.zbuf);
        const float* t = load_chunk(a.teacher_logits, a.teacher_dtype, row.base + off, n, sc.tbuf);
        rescale<kMode>(s, chunk_max(z, n), chunk_max(t, n), row.inv_t);
        sc.cz[ci] = s.mz;
        sc.ct[ci] = s.mt;
        const RowExps e = row_exps(sc, off);
        if (s.mt == -kInf) {  // teacher all -inf (or NaN) so far: p = 0 here, only the student sums move
            add_sums(s, student_chunk<kCE>(row, z, n, s.mz, e));
            std::memset(e.ep, 0, static_cast<size_t>(n) * sizeof(float));
            s.p_zero_mass = true;
            s.teacher_nan |= any_nan(t, n);
        } else if (kCE && row.square) {
            add_sums(s, dense_sums<kMode, kCE, kCE>(z, t, n, s.mz, s.mt, row.inv_t, e.eq, e.ep, e.e1));
        } else {
            add_sums(s, dense_sums<kMode, kCE, false>(z, t, n, s.mz, s.mt, row.inv_t, e.eq, e.ep, e.e1));
        }
    }
    return s;
}

// Gradient sweep shared by all teachers: form a chunk's gradient from the stored exponentials (and,
// for reverse KL / JSD, the logits), write the slot values, apply the label correction, round and
// store. The store may overwrite the logits (inplace): a chunk's logits are read before it is
// written.
template <int kMode, int kHard>
KD_INLINE void sweep(const RowInfo& row, Scratch& sc, const Sweep& c) {
    const KDLossArgs& a = *row.a;
    size_t next_slot = 0;
    for (int64_t off = 0, ci = 0; off < a.vocab; off += kChunk, ++ci) {
        const int64_t n = std::min(kChunk, a.vocab - off);
        const RowExps e = row_exps(sc, off);
        const ChunkScale f = chunk_scale(c, sc.cz[ci], kMode < 0 ? -kInf : sc.ct[ci], kHard != kHardQ);
        const float* z = nullptr;
        const float* t = nullptr;
        if (kMode == kReverseKL || kMode == kJSD) {
            z = load_chunk(a.logits, a.logits_dtype, row.base + off, n, sc.zbuf);
            t = load_chunk(a.teacher_logits, a.teacher_dtype, row.base + off, n, sc.tbuf);
        }
        chunk_grad<kMode, kHard>(e.e1, e.eq, e.ep, z, t, sc.gbuf, n, c, f);
        for (; next_slot < sc.slots.size() && sc.slots[next_slot].index < off + n; ++next_slot)
            sc.gbuf[sc.slots[next_slot].index - off] = sc.slots[next_slot].grad;
        if (row.label >= off && row.label < off + n) sc.gbuf[row.label - off] -= static_cast<float>(c.c_hard);
        store_chunk(a.grad, a.logits_dtype, row.base + off, n, sc.gbuf, row.stream);
    }
}

// The sweep for the row's hard softmax (none is read when hard_weight = 0).
template <int kMode>
KD_INLINE void run_sweep(const RowInfo& row, Scratch& sc, const Sweep& c) {
    if (!row.ce || c.c_hard == 0)
        sweep<kMode, kHardQ>(row, sc, c);
    else if (row.square)
        sweep<kMode, kHardSquare>(row, sc, c);
    else
        sweep<kMode, kHardE1>(row, sc, c);
}

KD_INLINE Sweep base_sweep(const RowInfo& row, const Stats& s) {
    const KDLossArgs& a = *row.a;
    Sweep c{};
    c.mz = s.mz;
    c.mt = s.mt;
    c.inv_t = row.inv_t;
    c.lsq = std::log(s.sq);
    c.lsq_soft = c.lsq;
    c.lsp = std::log(s.sp);
    c.ls1 = row.ce ? std::log(s.s1) : c.lsq;
    c.c_hard = a.labels ? a.grad_scale * a.hard_weight : 0.0;
    c.c_soft = a.grad_scale * a.soft_scale / a.temperature;
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
    if (s.teacher_nan || s.mt == kInf || std::isnan(s.sp)) {  // NaN or +inf in the teacher
        out.bad = true;
        return out;
    }
    out.ce = hard_loss(row, s);
    Sweep c = base_sweep(row, s);
    const double lsq = std::log(s.sq), lsp = std::log(s.sp);
    if (kMode == kForwardKL) out.div = s.w / s.sp - lsp + lsq;
    if (kMode == kReverseKL) out.div = s.p_zero_mass ? static_cast<double>(kInf) : s.w / s.sq - lsq + lsp;
    if (kMode == kJSD) {
        const float beta = static_cast<float>(a.beta);
        c.log_wp = static_cast<float>(std::log(a.beta));
        c.log_wq = static_cast<float>(std::log1p(-a.beta));
        c.one_m_beta = static_cast<float>(1.0 - a.beta);
        double d = 0, g = 0;
        for (int64_t off = 0, ci = 0; off < a.vocab; off += kChunk, ++ci) {
            const int64_t n = std::min(kChunk, a.vocab - off);
            const float* z = load_chunk(a.logits, a.logits_dtype, row.base + off, n, sc.zbuf);
            const float* t = load_chunk(a.teacher_logits, a.teacher_dtype, row.base + off, n, sc.tbuf);
            const RowExps e = row_exps(sc, off);
            float dc, gc;
            jsd_sums(z, t, e.eq, e.ep, n, c, chunk_scale(c, sc.cz[ci], sc.ct[ci], false), beta, dc, gc);
            d += dc;
            g += gc;
        }
        out.div = d;
        c.g_mean = static_cast<float>(g);
    }
    if (kMode == kSkewKL || kMode == kSkewReverseKL) {
        const double log_alpha = std::log(a.alpha), log_1malpha = std::log1p(-a.alpha);
        c.log_wp = static_cast<float>(kMode == kSkewKL ? log_alpha : log_1malpha);
        c.log_wq = static_cast<float>(kMode == kSkewKL ? log_1malpha : log_alpha);
        double d = 0, sum = 0;
        for (int64_t off = 0, ci = 0; off < a.vocab; off += kChunk, ++ci) {
            const int64_t n = std::min(kChunk, a.vocab - off);
            const float* z = load_chunk(a.logits, a.logits_dtype, row.base + off, n, sc.zbuf);
            const float* t = load_chunk(a.teacher_logits, a.teacher_dtype, row.base + off, n, sc.tbuf);
            const RowExps e = row_exps(sc, off);
            float dc, sum_c;
            skew_sums<kMode>(z, t, e.eq, e.ep, n, c, chunk_scale(c, sc.cz[ci], sc.ct[ci], false), dc, sum_c);
            d += dc;
            sum += sum_c;
        }
        out.div = d;
        c.skew_k = static_cast<float>(kMode == kSkewKL ? sum : d + sum);
    }
    c.k_rev = static_cast<float>(lsq - lsp + out.div);
    if (!a.grad) return out;
    sc.slots.clear();
    run_sweep<kMode>(row, sc, c);
    return out;
}

// Reads the valid slots of row r (index -1 = empty; the range was checked up front), sorted by
// index; the student logits at the slots are read by the statistics pass. False for a bad row: a
// duplicate index, a NaN or +inf value (-inf too for "probs"; it is zero mass for "logits" /
// "logprobs"), a NaN or +inf tail.
KD_INLINE bool gather_slots(const RowInfo& row, Scratch& sc, int64_t r) {
    const KDLossArgs& a = *row.a;
    std::vector<Slot>& slots = sc.slots;
    slots.clear();
    bool finite = true;
    for (int64_t i = 0; i < a.k; ++i) {
        const int64_t index = load_index(a.teacher_indices, a.index_dtype, r * a.k + i);
        if (index < 0) continue;
        const double value = load_scalar(a.teacher_values, a.values_dtype, r * a.k + i);
        finite &= !std::isnan(value) && value != static_cast<double>(kInf) &&
                  (a.teacher_kind != kTeacherProbs || value != -static_cast<double>(kInf));
        slots.push_back(Slot{index, value, 0.0, 0.0, 0.0, 0.0, 0.0f});
    }
    if (a.teacher_tail) finite &= !std::isnan(a.teacher_tail[r]) && a.teacher_tail[r] != kInf;
    std::sort(slots.begin(), slots.end(), [](const Slot& x, const Slot& y) { return x.index < y.index; });
    for (size_t i = 1; i < slots.size(); ++i)
        if (slots[i].index == slots[i - 1].index) return false;
    return finite;
}

// Teacher distribution on the slots and D. Returns the off-slot gradient coefficient
// C = P - R (1 - q_rest) and sets coef_on = P + R q_rest (slot gradient: coef_on q_i - p_i).
KD_INLINE double sparse_divergence(const RowInfo& row, Scratch& sc, int64_t r, double log_q_rest, double& coef_on,
                                   double& div) {
    const KDLossArgs& a = *row.a;
    std::vector<Slot>& slots = sc.slots;
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
        const double inv_t = 1.0 / a.temperature;
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
    double d = 0, mass_p = 0;
    for (const Slot& sl : slots) {
        if (sl.p > 0) d += sl.p * (sl.log_p - sl.log_q);
        mass_p += sl.p;
    }
    double coef_off = mass_p;
    coef_on = mass_p;
    if (a.tail) {
        const double log_p_rest = a.teacher_tail ? static_cast<double>(a.teacher_tail[r])
                                                 : std::log(std::max(1.0 - mass_p, 0.0));
        const double log_floor = std::log(static_cast<double>(FLT_MIN));
        const bool floored = !(log_q_rest >= log_floor);  // q_rest < FLT_MIN (or no entry outside the slots)
        if (log_p_rest > -static_cast<double>(kInf)) {
            const double p_rest = std::exp(log_p_rest);
            d += p_rest * (log_p_rest - (floored ? log_floor : log_q_rest));
            if (!floored) {  // a floored q_rest is a constant: R = 0, as the reference's clamp
                const double ratio = std::exp(log_p_rest - log_q_rest);  // R = p_rest / q_rest
                coef_on += p_rest;                                       // R q_rest
                coef_off = (mass_p + p_rest) - ratio;                    // P - R (1 - q_rest)
            }
        }
    }
    div = d;
    return coef_off;
}

// kTail: the tail bucket, a template parameter so that the plain sparse rows do not carry its code.
template <bool kCE, bool kTail>
KD_INLINE RowOut sparse_row(const RowInfo& row, Scratch& sc, int64_t r) {
    const KDLossArgs& a = *row.a;
    RowOut out;
    if (!gather_slots(row, sc, r)) {
        out.bad = true;
        return out;
    }
    double log_q_rest = 0;
    Stats s;
    if (kTail) {
        s = tail_stats<kCE>(row, sc, log_q_rest);
    } else {
        s = student_stats<kCE>(row, sc);
        for (Slot& sl : sc.slots) sl.z = load_scalar(a.logits, a.logits_dtype, row.base + sl.index);
    }
    out.ce = hard_loss(row, s);
    const double lsq = std::log(s.sq), ls1 = row.ce ? std::log(s.s1) : lsq;
    for (Slot& sl : sc.slots) sl.log_q = (sl.z - s.mz) * row.inv_t - lsq;
    double coef_on = 0;
    const double coef_off = sparse_divergence(row, sc, r, log_q_rest, coef_on, out.div);
    if (!a.grad) return out;
    Sweep c = base_sweep(row, s);
    for (Slot& sl : sc.slots) {
        const double q = std::exp(sl.log_q);
        const double hard = row.ce ? std::exp(sl.z - s.mz - ls1) : q;
        sl.grad = static_cast<float>(c.c_hard * hard + c.c_soft * (coef_on * q - sl.p));
    }
    if (kTail && std::fabs(coef_off) > 1) {  // R > 1: C q_j may be large where q_j underflows
        c.c_soft = coef_off < 0 ? -c.c_soft : c.c_soft;
        c.lsq_soft = lsq - std::log(std::fabs(coef_off));
    } else {
        c.c_soft *= coef_off;
    }
    run_sweep<kSparse>(row, sc, c);
    return out;
}

KD_INLINE RowOut active_row(const RowInfo& row, Scratch& sc, int64_t r) {
    const KDLossArgs& a = *row.a;
    if (!a.teacher_logits && a.tail)
        return row.ce ? sparse_row<true, true>(row, sc, r) : sparse_row<false, true>(row, sc, r);
    if (!a.teacher_logits) return row.ce ? sparse_row<true, false>(row, sc, r) : sparse_row<false, false>(row, sc, r);
    switch (a.divergence) {
        case kReverseKL:
            return row.ce ? dense_row<kReverseKL, true>(row, sc) : dense_row<kReverseKL, false>(row, sc);
        case kJSD:
            return row.ce ? dense_row<kJSD, true>(row, sc) : dense_row<kJSD, false>(row, sc);
        case kSkewKL:
            return row.ce ? dense_row<kSkewKL, true>(row, sc) : dense_row<kSkewKL, false>(row, sc);
        case kSkewReverseKL:
            return row.ce ? dense_row<kSkewReverseKL, true>(row, sc) : dense_row<kSkewReverseKL, false>(row, sc);
        default:
            return row.ce ? dense_row<kForwardKL, true>(row, sc) : dense_row<kForwardKL, false>(row, sc);
    }
}

// One row: loss, CE and D rows and the gradient row. Inactive rows (label == ignore_index) get 0
// and a zero gradient, bad rows NaN and a zero gradient.
KD_CLONES double process_row(const KDLossArgs& a, int64_t r, Scratch& sc) {
    const int64_t base = r * a.vocab;
    const int64_t label = a.labels ? a.labels[r] : -1;
    const bool active = !a.labels || label != a.ignore_index;
    RowOut out;
    if (active) {
        const float inv_t = static_cast<float>(1.0 / a.temperature);
        const bool ce = a.labels != nullptr && inv_t != 1.0f;
        const RowInfo row{&a, base, label, inv_t, ce, ce && inv_t == 0.5f, streams(a.rows, a.vocab, a.logits_dtype)};
        out = active_row(row, sc, r);
    }
    if (!active || out.bad) {
        const float fill = active ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
        a.loss_rows[r] = a.ce_rows[r] = a.div_rows[r] = fill;
        if (a.grad) {
            const size_t element = element_size(a.logits_dtype);
            std::memset(static_cast<char*>(a.grad) + base * element, 0, static_cast<size_t>(a.vocab) * element);
        }
        return fill;
    }
    if (a.grad) store_fence();
    const double loss = a.hard_weight * out.ce + a.soft_scale * out.div;
    a.loss_rows[r] = static_cast<float>(loss);
    a.ce_rows[r] = static_cast<float>(out.ce);
    a.div_rows[r] = static_cast<float>(out.div);
    return loss;
}

KD_CLONES void scale_row(void* out, const void* in, int dtype, int64_t base, int64_t vocab, float scale, bool stream) {
    alignas(64) float buf[kChunk];
    alignas(64) float g[kChunk];
    for (int64_t off = 0; off < vocab; off += kChunk) {
        const int64_t n = std::min(kChunk, vocab - off);
        const float* x = load_chunk(in, dtype, base + off, n, buf);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) g[j] = x[j] * scale;
        store_chunk(out, dtype, base + off, n, g, stream);
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

// Labels and teacher indices are range-checked before any row runs, so that a bad value throws
// before anything (possibly the logits themselves, inplace) is written.
static void check_ranges(const KDLossArgs& a) {
    for (int64_t r = 0; a.labels && r < a.rows; ++r) {
        const int64_t label = a.labels[r];
        if (label != a.ignore_index && (label < 0 || label >= a.vocab))
            throw std::invalid_argument("kd_loss: labels must be in [0, " + std::to_string(a.vocab) +
                                        ") or ignore_index; got " + std::to_string(label));
    }
    for (int64_t i = 0; !a.teacher_logits && i < a.rows * a.k; ++i) {
        const int64_t index = load_index(a.teacher_indices, a.index_dtype, i);
        if (index < -1 || index >= a.vocab)
            throw std::invalid_argument("kd_loss: teacher_indices must be in [0, " + std::to_string(a.vocab) +
                                        ") or -1; got " + std::to_string(index));
    }
}

double kd_loss_forward(const KDLossArgs& a) {
    if (a.rows < 0 || a.vocab < 1 || !a.logits || !a.loss_rows || !a.ce_rows || !a.div_rows)
        throw std::invalid_argument("kd_loss: bad shapes or missing buffers");
    if (a.logits_dtype != kFloat32 && a.logits_dtype != kBFloat16 && a.logits_dtype != kFloat16)
        throw std::invalid_argument("kd_loss: logits must be float32, bfloat16 or float16");
    const bool dense = a.teacher_logits != nullptr;
    if (!dense && (!a.teacher_indices || !a.teacher_values || a.k < 1))
        throw std::invalid_argument("kd_loss: needs teacher_logits or teacher_indices + teacher_values");
    if (a.teacher_tail && (dense || !a.tail || a.teacher_kind != kTeacherLogprobs))
        throw std::invalid_argument("kd_loss: teacher_tail needs a sparse \"logprobs\" teacher with tail");
    if (!(a.temperature > 0)) throw std::invalid_argument("kd_loss: temperature must be > 0");
    check_ranges(a);

    if (a.grad && a.grad != a.logits)
        advise_huge_pages(a.grad, static_cast<size_t>(a.rows) * a.vocab * element_size(a.logits_dtype));

    double total = 0;
    const int threads = std::max(1, a.num_threads);
#pragma omp parallel num_threads(threads) if (threads > 1 && a.rows > 1) reduction(+ : total)
    {
        Scratch scratch;
        const size_t vocab = static_cast<size_t>(a.vocab), chunks = static_cast<size_t>((a.vocab + kChunk - 1) / kChunk);
        scratch.eq.resize(vocab);
        if (dense) scratch.ep.resize(vocab);
        const float inv_t = static_cast<float>(1.0 / a.temperature);
        if (a.labels && inv_t != 1.0f && inv_t != 0.5f) scratch.e1.resize(vocab);
        scratch.cz.resize(chunks);
        scratch.ct.resize(chunks, -kInf);
        scratch.slots.reserve(static_cast<size_t>(a.k));
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < a.rows; ++r) total += process_row(a, r, scratch);
    }
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
        scale_row(out, in, dtype, r * vocab, vocab, s, streams(rows, vocab, dtype));
        store_fence();
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
