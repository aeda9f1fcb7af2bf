// RoI-feature masking for masked-object pre-training: the per-object decision (host and device)
// and the CUDA kernels with their launchers.
//
// Computes, for features [B, N, D] (row-major, contiguous; row r = b * N + n holds D elements)
// and the Philox draw r = philox4x32_10(seed, offset + r), exactly what
// lxmert_fast.reference.roi_feature_mask computes from lxmert_fast.philox.philox_bits:
//   u(w) = w >> 8 (24 bits); selected iff u(r0) < floor(p_select * 2**24); then ZEROED iff
//   u(r1) < floor(p_zero * 2**24), else REPLACED iff u(r1) < floor((p_zero + p_replace) * 2**24),
//   else KEPT. A replaced row copies row (k / N skipping its own image) * N + k % N of the ORIGINAL
//   features, k = (r2 * ((B - 1) * N)) >> 32 in 64 bits; with B == 1 it is left unchanged.
// Action codes (int8 [B, N]): 0 unselected, 1 zeroed, 2 replaced, 3 kept.
//
// The kernels move bytes, never arithmetic on values: a zeroed row is all-zero bits (+0.0 in every
// IEEE float format), every other row is a bit copy, so one kernel serves fp32/fp16/bf16/fp64 and
// the result is bit-exact (NaN payloads and -0.0 included).
//
// Limits: B * N < 2**31 (one CUDA block per row on grid.x; (B - 1) * N * r2 stays below 2**63,
// where the int64 reference is exact). Vector width: the widest of 16/8/4/2/1 bytes dividing the
// row size and the alignment of every base pointer; a row of 2048 fp32 moves as 512 uint4.
//
// Hazard (in-place): a replaced row must read the ORIGINAL source row, which may itself be zeroed
// or replaced in the same call. roi_mask_gather_kernel first copies every source row into a
// compact buffer [R, D] (R = replaced rows, counted on the host, so no device sync), then
// roi_mask_scatter_kernel writes; the stream orders the two launches.
//
// Free of torch includes: `nvcc -arch=sm_90 -c` compiles it on a machine whose torch is a CPU build
// (tests/test_roi_mask_op.py does). The torch glue lives in roi_mask.cpp and cuda/roi_mask.cu.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

#include "philox.h"

namespace lxmert_fast {

enum RoiAction : int8_t { kRoiUnselected = 0, kRoiZeroed = 1, kRoiReplaced = 2, kRoiKept = 3 };

struct RoiMaskParams {
  uint64_t seed;
  uint64_t offset;
  uint32_t select_below;   // floor(p_select * 2**24)
  uint32_t zero_below;     // floor(p_zero * 2**24)
  uint32_t replace_below;  // floor((p_zero + p_replace) * 2**24)
  int64_t batch;           // B
  int64_t objects;         // N
};

// Same double arithmetic as reference.probability_threshold (math.floor(p * 2**24)).
inline uint32_t roi_probability_threshold(double p) {
  return static_cast<uint32_t>(std::floor(p * 16777216.0));
}

struct RoiDecision {
  int8_t action;
  int64_t source;  // row whose original bytes the output row receives; -1: all-zero row
};

LXF_HOST_DEVICE RoiDecision roi_decide(const RoiMaskParams& p, int64_t row) {
  const Philox4 r = philox4x32_10(p.seed, p.offset + static_cast<uint64_t>(row));
  if ((r.x[0] >> 8) >= p.select_below) return {kRoiUnselected, row};
  const uint32_t u1 = r.x[1] >> 8;
  if (u1 < p.zero_below) return {kRoiZeroed, -1};
  if (u1 >= p.replace_below) return {kRoiKept, row};
  if (p.batch < 2) return {kRoiReplaced, row};
  const uint64_t others = static_cast<uint64_t>((p.batch - 1) * p.objects);
  const uint64_t k = (static_cast<uint64_t>(r.x[2]) * others) >> 32;
  int64_t image = static_cast<int64_t>(k / static_cast<uint64_t>(p.objects));
  const int64_t object = static_cast<int64_t>(k % static_cast<uint64_t>(p.objects));
  if (image >= row / p.objects) ++image;
  return {kRoiReplaced, image * p.objects + object};
}

// True when the row's output comes from another row (so the in-place variant must buffer it).
LXF_HOST_DEVICE bool roi_reads_other_row(const RoiDecision& d, int64_t row) {
  return d.source >= 0 && d.source != row;
}

// Widest access (bytes) that divides the row size and every base address.
inline int roi_vector_bytes(int64_t row_bytes, uintptr_t a, uintptr_t b) {
  for (int width = 16; width > 1; width /= 2) {
    if (row_bytes % width == 0 && a % width == 0 && b % width == 0) return width;
  }
  return 1;
}

#if defined(__CUDACC__)

template <typename Vec>
__global__ void roi_mask_kernel(const Vec* __restrict__ features,  // [B * N, vecs_per_row]
                                Vec* __restrict__ out,             // [B * N, vecs_per_row]
                                int8_t* __restrict__ action,       // [B * N]
                                RoiMaskParams params, int64_t vecs_per_row) {
  const int64_t row = static_cast<int64_t>(blockIdx.x);
  // Every thread derives the decision itself: ten Philox rounds cost less than a
  // shared-memory broadcast and a barrier.
  const RoiDecision d = roi_decide(params, row);
  if (threadIdx.x == 0) action[row] = d.action;
  Vec* dst = out + row * vecs_per_row;
  if (d.source < 0) {
    const Vec zero{};
    for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) dst[v] = zero;
    return;
  }
  const Vec* src = features + d.source * vecs_per_row;
  for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) dst[v] = src[v];
}

template <typename Vec>
__global__ void roi_mask_gather_kernel(const Vec* __restrict__ features,  // [B * N, vecs_per_row]
                                       Vec* __restrict__ sources,         // [R, vecs_per_row]
                                       int8_t* __restrict__ action,       // [B * N]
                                       int32_t* __restrict__ slot,        // [B * N], -1: no source
                                       unsigned int* __restrict__ count,  // [1], zero on entry
                                       RoiMaskParams params, int64_t vecs_per_row) {
  const int64_t row = static_cast<int64_t>(blockIdx.x);
  __shared__ int32_t row_slot;
  const RoiDecision d = roi_decide(params, row);
  if (threadIdx.x == 0) {
    action[row] = d.action;
    row_slot = roi_reads_other_row(d, row) ? static_cast<int32_t>(atomicAdd(count, 1u)) : -1;
    slot[row] = row_slot;
  }
  __syncthreads();
  if (row_slot < 0) return;
  const Vec* src = features + d.source * vecs_per_row;
  Vec* dst = sources + static_cast<int64_t>(row_slot) * vecs_per_row;
  for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) dst[v] = src[v];
}

template <typename Vec>
__global__ void roi_mask_scatter_kernel(Vec* __restrict__ features,        // [B * N, vecs_per_row]
                                        const Vec* __restrict__ sources,   // [R, vecs_per_row]
                                        const int8_t* __restrict__ action, // [B * N]
                                        const int32_t* __restrict__ slot,  // [B * N]
                                        int64_t vecs_per_row) {
  const int64_t row = static_cast<int64_t>(blockIdx.x);
  Vec* dst = features + row * vecs_per_row;
  if (action[row] == kRoiZeroed) {
    const Vec zero{};
    for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) dst[v] = zero;
    return;
  }
  const int32_t s = slot[row];
  if (s < 0) return;
  const Vec* src = sources + static_cast<int64_t>(s) * vecs_per_row;
  for (int64_t v = threadIdx.x; v < vecs_per_row; v += blockDim.x) dst[v] = src[v];
}

// One block per row; enough threads for one pass over a row of up to 256 vectors.
inline unsigned int roi_threads(int64_t vecs_per_row) {
  unsigned int threads = 32;
  while (threads < 256 && threads < vecs_per_row) threads *= 2;
  return threads;
}

template <typename Vec>
cudaError_t roi_mask_launch_vec(const void* features, void* out, int8_t* action, const RoiMaskParams& p,
                                int64_t row_bytes, cudaStream_t stream) {
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
  const dim3 grid(static_cast<unsigned int>(p.batch * p.objects));
  roi_mask_kernel<Vec><<<grid, roi_threads(vecs), 0, stream>>>(
      static_cast<const Vec*>(features), static_cast<Vec*>(out), action, p, vecs);
  return cudaGetLastError();
}

template <typename Vec>
cudaError_t roi_mask_inplace_launch_vec(void* features, void* sources, int8_t* action, int32_t* slot,
                                        unsigned int* count, const RoiMaskParams& p, int64_t row_bytes,
                                        cudaStream_t stream) {
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
  const dim3 grid(static_cast<unsigned int>(p.batch * p.objects));
  const unsigned int threads = roi_threads(vecs);
  cudaError_t err = cudaMemsetAsync(count, 0, sizeof(unsigned int), stream);
  if (err != cudaSuccess) return err;
  roi_mask_gather_kernel<Vec><<<grid, threads, 0, stream>>>(
      static_cast<const Vec*>(features), static_cast<Vec*>(sources), action, slot, count, p, vecs);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  roi_mask_scatter_kernel<Vec><<<grid, threads, 0, stream>>>(
      static_cast<Vec*>(features), static_cast<const Vec*>(sources), action, slot, vecs);
  return cudaGetLastError();
}

// Out-of-place: out[r] = zeros / features[source(r)]; action[r]. Rows B * N must be > 0.
inline cudaError_t roi_mask_launch(const void* features, void* out, int8_t* action, const RoiMaskParams& p,
                                   int64_t row_bytes, cudaStream_t stream) {
  switch (roi_vector_bytes(row_bytes, reinterpret_cast<uintptr_t>(features),
                           reinterpret_cast<uintptr_t>(out))) {
    case 16: return roi_mask_launch_vec<uint4>(features, out, action, p, row_bytes, stream);
    case 8: return roi_mask_launch_vec<uint2>(features, out, action, p, row_bytes, stream);
    case 4: return roi_mask_launch_vec<uint32_t>(features, out, action, p, row_bytes, stream);
    case 2: return roi_mask_launch_vec<uint16_t>(features, out, action, p, row_bytes, stream);
    default: return roi_mask_launch_vec<uint8_t>(features, out, action, p, row_bytes, stream);
  }
}

// In-place: `sources` holds R rows (R = rows with roi_reads_other_row; may be null when R == 0),
// `slot` B * N int32 scratch, `count` one unsigned int of scratch. Rows B * N must be > 0.
inline cudaError_t roi_mask_inplace_launch(void* features, void* sources, int8_t* action, int32_t* slot,
                                           unsigned int* count, const RoiMaskParams& p, int64_t row_bytes,
                                           cudaStream_t stream) {
  switch (roi_vector_bytes(row_bytes, reinterpret_cast<uintptr_t>(features),
                           reinterpret_cast<uintptr_t>(sources))) {
    case 16:
      return roi_mask_inplace_launch_vec<uint4>(features, sources, action, slot, count, p, row_bytes, stream);
    case 8:
      return roi_mask_inplace_launch_vec<uint2>(features, sources, action, slot, count, p, row_bytes, stream);
    case 4:
      return roi_mask_inplace_launch_vec<uint32_t>(features, sources, action, slot, count, p, row_bytes,
                                                   stream);
    case 2:
      return roi_mask_inplace_launch_vec<uint16_t>(features, sources, action, slot, count, p, row_bytes,
                                                   stream);
    default:
      return roi_mask_inplace_launch_vec<uint8_t>(features, sources, action, slot, count, p, row_bytes,
                                                  stream);
  }
}

#endif  // __CUDACC__

}  // namespace lxmert_fast
