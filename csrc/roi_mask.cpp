// lxmert_fast::roi_feature_mask and lxmert_fast::roi_feature_mask_: masked-object corruption of
// RoI features for LXMERT pre-training. Schema (TORCH_LIBRARY), argument checks and the CPU
// implementation; the CUDA implementation is in cuda/roi_mask.cu, the per-row rule (shared by
// both, and bit-exact with lxmert_fast.reference.roi_feature_mask over
// lxmert_fast.philox.philox_bits) in roi_mask_kernel.h.
//
//   roi_feature_mask(features [B, N, D], seed, offset, p_select, p_zero, p_replace)
//       -> (corrupted [B, N, D] same dtype, new tensor; action int8 [B, N])
//   roi_feature_mask_(features, ...) -> action; corrupts `features` in place
//
// features: contiguous, float32/float16/bfloat16/float64 (rows are moved as bytes). seed: any
// int64 (its two's-complement bits are the Philox key); offset: Philox counter of row 0, >= 0.
// Replaced rows read the ORIGINAL features in both variants: the in-place one gathers the source
// rows into a buffer before writing anything. No autograd: the features are data, not parameters.
//
// Built as the Python module lxmert_fast._C (setup.py) or JIT-built by lxmert_fast/roi_mask.py;
// importing it runs the registrations below.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "roi_mask_kernel.h"

namespace lxmert_fast {

namespace {

// Bytes per at::parallel_for task: large enough to amortise a task, small enough to split
// B=256 x N=36 rows of 8 KiB over every core.
constexpr int64_t kGrainBytes = 1 << 16;

// Rows per task when a row costs only its Philox draw (~15 ns): typical batches stay on one
// thread, where a parallel region would cost more than the draws.
constexpr int64_t kDecideGrainRows = 1 << 14;

int64_t grain_rows(int64_t row_bytes) {
  // +64: a row also costs its Philox draw, so rows of a few bytes still make sizeable tasks.
  return std::max<int64_t>(1, kGrainBytes / (row_bytes + 64));
}

char* row_ptr(void* base, int64_t row, int64_t row_bytes) {
  return static_cast<char*>(base) + row * row_bytes;
}

const char* row_ptr(const void* base, int64_t row, int64_t row_bytes) {
  return static_cast<const char*>(base) + row * row_bytes;
}

// Error messages are built here without std::ostream and reach TORCH_CHECK_* as one const char*
// (`.c_str()` of a temporary that lives until the throw has copied it): that is the only argument
// the macros pass through untouched, while any other, even one std::string (torch 2.13), goes
// through c10::str's std::ostringstream. Streaming the sizes into the message segfaulted a GPU
// build (torch 2.11 + cu130) on its first error, suspected to be its stream/locale symbols bound
// to a second C++ runtime (issue #10).
std::string shape_string(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

// "%g" is the text std::ostream gives a double by default (0.1, 1.5, nan), as the messages had.
std::string number_string(double x) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", x);
  return text;
}

}  // namespace

// Shared with cuda/roi_mask.cu: every argument error names the argument (ValueError/TypeError
// in Python, like lxmert_fast.ops).
RoiMaskParams check_roi_mask_args(const at::Tensor& features, int64_t seed, int64_t offset, double p_select,
                                  double p_zero, double p_replace) {
  TORCH_CHECK_VALUE(
      features.dim() == 3,
      ("features: expected a 3-D tensor [B, N, D], got shape " + shape_string(features.sizes())).c_str());
  const auto dtype = features.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
      ("features: expected dtype float32, float16, bfloat16 or float64, got " +
       std::string(c10::toString(dtype)))
          .c_str());
  TORCH_CHECK_VALUE(features.is_contiguous(),
                    ("features: expected a contiguous tensor (call .contiguous()), got shape " +
                     shape_string(features.sizes()) + " with strides " + shape_string(features.strides()))
                        .c_str());
  const std::pair<const char*, double> probabilities[] = {
      {"p_select", p_select}, {"p_zero", p_zero}, {"p_replace", p_replace}};
  for (const auto& [name, p] : probabilities) {
    TORCH_CHECK_VALUE(
        p >= 0.0 && p <= 1.0,
        (std::string(name) + ": expected a probability in [0, 1], got " + number_string(p)).c_str());
  }
  // Same tolerance as lxmert_fast.ops: 0.8 + 0.2 may round above 1.
  TORCH_CHECK_VALUE(p_zero + p_replace <= 1.0 + 1e-9,
                    ("p_zero + p_replace: expected at most 1, got " + number_string(p_zero) + " + " +
                     number_string(p_replace))
                        .c_str());
  TORCH_CHECK_VALUE(
      offset >= 0, ("offset: expected a non-negative Philox counter, got " + std::to_string(offset)).c_str());
  const int64_t batch = features.size(0), objects = features.size(1);
  TORCH_CHECK_VALUE(
      batch <= INT32_MAX && objects <= INT32_MAX && batch * objects <= INT32_MAX,
      ("features: expected B * N < 2**31 objects, got shape " + shape_string(features.sizes())).c_str());
  return RoiMaskParams{static_cast<uint64_t>(seed),
                       static_cast<uint64_t>(offset),
                       roi_probability_threshold(p_select),
                       roi_probability_threshold(p_zero),
                       roi_probability_threshold(p_zero + p_replace),
                       batch,
                       objects};
}

// Rows whose output is another row (replaced, B > 1): the in-place CUDA path sizes its source
// buffer with this, on the host, so it never waits for the device.
int64_t count_rows_reading_other_rows(const RoiMaskParams& p) {
  const int64_t rows = p.batch * p.objects;
  return at::parallel_reduce(
      0, rows, kDecideGrainRows, int64_t{0},
      [&](int64_t begin, int64_t end, int64_t count) {
        for (int64_t row = begin; row < end; ++row) count += roi_reads_other_row(roi_decide(p, row), row);
        return count;
      },
      std::plus<int64_t>());
}

namespace {

std::tuple<at::Tensor, at::Tensor> roi_feature_mask_cpu(const at::Tensor& features, int64_t seed,
                                                        int64_t offset, double p_select, double p_zero,
                                                        double p_replace) {
  const RoiMaskParams p = check_roi_mask_args(features, seed, offset, p_select, p_zero, p_replace);
  at::Tensor out = at::empty(features.sizes(), features.options());
  at::Tensor action = at::empty({p.batch, p.objects}, features.options().dtype(at::kChar));
  const int64_t row_bytes = features.size(2) * static_cast<int64_t>(features.element_size());
  const void* in = features.const_data_ptr();
  void* dst = out.mutable_data_ptr();
  int8_t* act = action.mutable_data_ptr<int8_t>();
  at::parallel_for(0, p.batch * p.objects, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const RoiDecision d = roi_decide(p, row);
      act[row] = d.action;
      if (row_bytes == 0) continue;
      if (d.source < 0) {
        std::memset(row_ptr(dst, row, row_bytes), 0, row_bytes);
      } else {
        std::memcpy(row_ptr(dst, row, row_bytes), row_ptr(in, d.source, row_bytes), row_bytes);
      }
    }
  });
  return {out, action};
}

// Decide every row and list the rows to write (zeroed; replaced from another image), copy the
// ORIGINAL source rows of the replaced ones into a compact buffer, then write. Only selected rows
// are written (~p_select of the bytes the out-of-place op moves). Two parallel regions: each one
// waits for its slowest thread, which on a busy machine costs more than the rows themselves.
at::Tensor roi_feature_mask_inplace_cpu(const at::Tensor& features, int64_t seed, int64_t offset,
                                        double p_select, double p_zero, double p_replace) {
  const RoiMaskParams p = check_roi_mask_args(features, seed, offset, p_select, p_zero, p_replace);
  const int64_t rows = p.batch * p.objects;
  const int64_t row_bytes = features.size(2) * static_cast<int64_t>(features.element_size());
  at::Tensor action = at::empty({p.batch, p.objects}, features.options().dtype(at::kChar));
  int8_t* act = action.mutable_data_ptr<int8_t>();
  std::vector<int64_t> zeroed, moved, sources;
  for (int64_t row = 0; row < rows; ++row) {
    const RoiDecision d = roi_decide(p, row);
    act[row] = d.action;
    if (d.source < 0) {
      zeroed.push_back(row);
    } else if (roi_reads_other_row(d, row)) {
      moved.push_back(row);
      sources.push_back(d.source);
    }
  }
  if (row_bytes == 0) return action;

  const int64_t num_zeroed = static_cast<int64_t>(zeroed.size());
  const int64_t num_moved = static_cast<int64_t>(moved.size());
  std::vector<char> buffer(num_moved * row_bytes);
  void* base = features.mutable_data_ptr();
  const int64_t grain = grain_rows(row_bytes);
  at::parallel_for(0, num_moved, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(buffer.data() + i * row_bytes, row_ptr(base, sources[i], row_bytes), row_bytes);
    }
  });
  at::parallel_for(0, num_zeroed + num_moved, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i < num_zeroed) {
        std::memset(row_ptr(base, zeroed[i], row_bytes), 0, row_bytes);
      } else {
        const int64_t m = i - num_zeroed;
        std::memcpy(row_ptr(base, moved[m], row_bytes), buffer.data() + m * row_bytes, row_bytes);
      }
    }
  });
  return action;
}

}  // namespace

TORCH_LIBRARY(lxmert_fast, m) {
  // The fake (meta) kernels are registered in Python; torch imports this module when it needs them.
  m.set_python_module("lxmert_fast.roi_mask");
  m.def(
      "roi_feature_mask(Tensor features, int seed, int offset=0, float p_select=0.15, float p_zero=0.8, "
      "float p_replace=0.1) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "roi_feature_mask_(Tensor(a!) features, int seed, int offset=0, float p_select=0.15, "
      "float p_zero=0.8, float p_replace=0.1) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(lxmert_fast, CPU, m) {
  m.impl("roi_feature_mask", &roi_feature_mask_cpu);
  m.impl("roi_feature_mask_", &roi_feature_mask_inplace_cpu);
}

}  // namespace lxmert_fast

// `import lxmert_fast._C` loads this library, which runs the registrations above; the module
// itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
