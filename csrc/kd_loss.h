// Interface of the CPU kd_loss kernels (csrc/kd_loss.cpp), shared with the pybind11 bindings.
// Plain C++17 on raw pointers: no libtorch. Every [rows, vocab] buffer is row-major and contiguous.
#pragma once

#include <cstdint>

namespace kdfast {

// Element types of the buffers; the Python side maps torch dtypes onto these codes.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3, kInt32 = 4, kInt64 = 5 };
enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kSkewKL = 3, kSkewReverseKL = 4 };
enum TeacherKind : int { kTeacherLogits = 0, kTeacherLogprobs = 1, kTeacherProbs = 2 };

struct KDLossArgs {
    int64_t rows = 0;
    int64_t vocab = 0;
    const void* logits = nullptr;           // [rows, vocab] float32 / bfloat16 / float16
    int logits_dtype = kFloat32;
    const int64_t* labels = nullptr;        // [rows] or nullptr (every row active, no hard loss)
    int64_t ignore_index = -100;
    const void* teacher_logits = nullptr;   // [rows, vocab] any float dtype, or nullptr (sparse teacher)
    int teacher_dtype = kFloat32;
    const void* teacher_indices = nullptr;  // [rows, k] int32 / int64, -1 = empty slot
    int index_dtype = kInt64;
    const void* teacher_values = nullptr;   // [rows, k] any float dtype
    int values_dtype = kFloat32;
    const float* teacher_tail = nullptr;    // [rows] log p_rest ("logprobs" + tail only), or nullptr: recompute
    int64_t k = 0;
    int teacher_kind = kTeacherLogits;
    bool tail = false;
    int divergence = kForwardKL;
    double beta = 0.5;                      // jsd: M = beta p + (1 - beta) q
    double alpha = 0.1;                     // skew KL: M = alpha p + (1 - alpha) q; skew reverse: alpha q + (1 - alpha) p
    double temperature = 1.0;
    double hard_weight = 0.0;
    double soft_scale = 1.0;                // soft_weight * T^2 (or soft_weight without scale_t2)
    double grad_scale = 1.0;                // reduction factor folded into the gradient (1 / divisor for "mean")
    void* grad = nullptr;                   // [rows, vocab] logits dtype, may alias logits; nullptr: no gradient
    float* loss_rows = nullptr;             // [rows] hard_weight * CE_r + soft_scale * D_r, 0 on inactive rows
    float* ce_rows = nullptr;               // [rows] CE_r
    float* div_rows = nullptr;              // [rows] unscaled D_r
    int num_threads = 1;
};

// Fills loss_rows / ce_rows / div_rows (and grad unless it is null); returns the sum of loss_rows in
// double precision. Throws std::invalid_argument on a label or teacher index out of range, before
// any row is written. A bad row (duplicate valid index, non-finite teacher value) gets NaN in
// loss_rows / ce_rows / div_rows and a zero gradient.
double kd_loss_forward(const KDLossArgs& args);

// out[r, :] = in[r, :] * scale * (row_scale ? row_scale[r] : 1), computed in float32 and rounded once
// to `dtype`. out may alias in.
void kd_loss_scale_grad(void* out, const void* in, int dtype, int64_t rows, int64_t vocab,
                        const float* row_scale, double scale, int num_threads);

// Name of the instruction set the kernels dispatch to on this machine ("avx512", "avx2" or "baseline").
const char* kd_loss_isa();

}  // namespace kdfast
