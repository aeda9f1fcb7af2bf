// CUDA implementation of lxmert_fast::roi_feature_mask / roi_feature_mask_ (schema and checks in
// ../roi_mask.cpp, kernels and the per-row rule in ../roi_mask_kernel.h).
//
// Out of place: one pass, one block per row, 16-byte loads/stores when the row size and both base
// pointers allow (else 8/4/2/1). In place: a gather kernel copies the original source rows of
// replaced rows into a buffer sized on the host (no device sync), then a scatter kernel writes
// only the zeroed and replaced rows. Everything runs on the current stream of the features' device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "roi_mask_kernel.h"

namespace lxmert_fast {

// Defined in roi_mask.cpp.
RoiMaskParams check_roi_mask_args(const at::Tensor& features, int64_t seed, int64_t offset, double p_select,
                                  double p_zero, double p_replace);
int64_t count_rows_reading_other_rows(const RoiMaskParams& p);

namespace {

// One const char* message, no std::ostream: see shape_string in ../roi_mask.cpp (issue #10).
void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess,
              (std::string(op) + ": CUDA kernel launch failed: " + cudaGetErrorString(err)).c_str());
}

std::tuple<at::Tensor, at::Tensor> roi_feature_mask_cuda(const at::Tensor& features, int64_t seed,
                                                         int64_t offset, double p_select, double p_zero,
                                                         double p_replace) {
  const RoiMaskParams p = check_roi_mask_args(features, seed, offset, p_select, p_zero, p_replace);
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor out = at::empty(features.sizes(), features.options());
  at::Tensor action = at::empty({p.batch, p.objects}, features.options().dtype(at::kChar));
  if (p.batch * p.objects == 0) return {out, action};
  const int64_t row_bytes = features.size(2) * static_cast<int64_t>(features.element_size());
  check_launch(roi_mask_launch(features.const_data_ptr(), out.mutable_data_ptr(),
                               action.mutable_data_ptr<int8_t>(), p, row_bytes,
                               c10::cuda::getCurrentCUDAStream()),
               "roi_feature_mask");
  return {out, action};
}

at::Tensor roi_feature_mask_inplace_cuda(const at::Tensor& features, int64_t seed, int64_t offset,
                                         double p_select, double p_zero, double p_replace) {
  const RoiMaskParams p = check_roi_mask_args(features, seed, offset, p_select, p_zero, p_replace);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t rows = p.batch * p.objects;
  at::Tensor action = at::empty({p.batch, p.objects}, features.options().dtype(at::kChar));
  if (rows == 0) return action;
  const int64_t row_bytes = features.size(2) * static_cast<int64_t>(features.element_size());
  const int64_t num_moved = count_rows_reading_other_rows(p);
  at::Tensor sources = at::empty({num_moved, features.size(2)}, features.options());
  at::Tensor slot = at::empty({rows}, features.options().dtype(at::kInt));
  at::Tensor count = at::empty({1}, features.options().dtype(at::kInt));
  check_launch(roi_mask_inplace_launch(features.mutable_data_ptr(), num_moved ? sources.mutable_data_ptr() : nullptr,
                                       action.mutable_data_ptr<int8_t>(), slot.mutable_data_ptr<int32_t>(),
                                       reinterpret_cast<unsigned int*>(count.mutable_data_ptr<int32_t>()), p,
                                       row_bytes, c10::cuda::getCurrentCUDAStream()),
               "roi_feature_mask_");
  return action;
}

}  // namespace

TORCH_LIBRARY_IMPL(lxmert_fast, CUDA, m) {
  m.impl("roi_feature_mask", &roi_feature_mask_cuda);
  m.impl("roi_feature_mask_", &roi_feature_mask_inplace_cuda);
}

}  // namespace lxmert_fast
