// The only pybind11 file: exposes the raw-pointer kernels of csrc/ as kdfast._C.
// Buffers arrive as integer addresses (tensor.data_ptr(), 0 for "absent") plus dtype codes from
// kdfast/ops/cpu/*.py, which keeps the tensors alive for the duration of the call. The GIL is
// released while a kernel runs. std::invalid_argument surfaces in Python as ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "kd_loss.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

double kd_loss_forward(int64_t rows, int64_t vocab, uintptr_t logits, int logits_dtype, uintptr_t labels,
                       int64_t ignore_index, uintptr_t teacher_logits, int teacher_dtype, uintptr_t teacher_indices,
                       int index_dtype, uintptr_t teacher_values, int values_dtype, uintptr_t teacher_tail, int64_t k,
                       int teacher_kind, bool tail, int divergence, double beta, double alpha, double temperature,
                       double hard_weight, double soft_scale, double grad_scale, uintptr_t grad, uintptr_t loss_rows,
                       uintptr_t ce_rows, uintptr_t div_rows, int num_threads) {
    kdfast::KDLossArgs a;
    a.rows = rows;
    a.vocab = vocab;
    a.logits = ptr<const void>(logits);
    a.logits_dtype = logits_dtype;
    a.labels = ptr<const int64_t>(labels);
    a.ignore_index = ignore_index;
    a.teacher_logits = ptr<const void>(teacher_logits);
    a.teacher_dtype = teacher_dtype;
    a.teacher_indices = ptr<const void>(teacher_indices);
    a.index_dtype = index_dtype;
    a.teacher_values = ptr<const void>(teacher_values);
    a.values_dtype = values_dtype;
    a.teacher_tail = ptr<const float>(teacher_tail);
    a.k = k;
    a.teacher_kind = teacher_kind;
    a.tail = tail;
    a.divergence = divergence;
    a.beta = beta;
    a.alpha = alpha;
    a.temperature = temperature;
    a.hard_weight = hard_weight;
    a.soft_scale = soft_scale;
    a.grad_scale = grad_scale;
    a.grad = ptr<void>(grad);
    a.loss_rows = ptr<float>(loss_rows);
    a.ce_rows = ptr<float>(ce_rows);
    a.div_rows = ptr<float>(div_rows);
    a.num_threads = num_threads;
    return kdfast::kd_loss_forward(a);
}

void kd_loss_scale_grad(uintptr_t out, uintptr_t in, int dtype, int64_t rows, int64_t vocab, uintptr_t row_scale,
                        double scale, int num_threads) {
    kdfast::kd_loss_scale_grad(ptr<void>(out), ptr<const void>(in), dtype, rows, vocab, ptr<const float>(row_scale),
                               scale, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "kdfast CPU kernels (raw pointers, no libtorch); see csrc/kd_loss.cpp";

    m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = int(kdfast::kFloat32), py::arg("bfloat16") = int(kdfast::kBFloat16),
                                     py::arg("float16") = int(kdfast::kFloat16), py::arg("float64") = int(kdfast::kFloat64),
                                     py::arg("int32") = int(kdfast::kInt32), py::arg("int64") = int(kdfast::kInt64));
    m.attr("DIVERGENCE_CODES") =
        py::dict(py::arg("forward_kl") = int(kdfast::kForwardKL), py::arg("reverse_kl") = int(kdfast::kReverseKL),
                 py::arg("jsd") = int(kdfast::kJSD), py::arg("skew_kl") = int(kdfast::kSkewKL),
                 py::arg("skew_reverse_kl") = int(kdfast::kSkewReverseKL));
    m.attr("TEACHER_KIND_CODES") =
        py::dict(py::arg("logits") = int(kdfast::kTeacherLogits), py::arg("logprobs") = int(kdfast::kTeacherLogprobs),
                 py::arg("probs") = int(kdfast::kTeacherProbs));

    m.def("kd_loss_forward", &kd_loss_forward, py::kw_only(), py::arg("rows"), py::arg("vocab"), py::arg("logits"),
          py::arg("logits_dtype"), py::arg("labels"), py::arg("ignore_index"), py::arg("teacher_logits"),
          py::arg("teacher_dtype"), py::arg("teacher_indices"), py::arg("index_dtype"), py::arg("teacher_values"),
          py::arg("values_dtype"), py::arg("teacher_tail"), py::arg("k"), py::arg("teacher_kind"), py::arg("tail"),
          py::arg("divergence"), py::arg("beta"), py::arg("alpha"), py::arg("temperature"), py::arg("hard_weight"),
          py::arg("soft_scale"), py::arg("grad_scale"), py::arg("grad"), py::arg("loss_rows"), py::arg("ce_rows"),
          py::arg("div_rows"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
          "Loss rows, CE rows, D rows and (grad != 0) the scaled gradient; returns the sum of the loss rows.");
    m.def("kd_loss_scale_grad", &kd_loss_scale_grad, py::kw_only(), py::arg("out"), py::arg("grad"), py::arg("dtype"),
          py::arg("rows"), py::arg("vocab"), py::arg("row_scale"), py::arg("scale"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>(), "out = grad * scale * row_scale[:, None] (row_scale may be 0).");
    m.def("isa", &kdfast::kd_loss_isa, "Instruction set the kernels dispatch to on this CPU.");
}
