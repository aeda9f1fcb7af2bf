// Philox4x32-10 (Salmon et al., SC'11), the generator of Random123 and cuRAND's
// curand_Philox4x32_10, for host and device code.
//
// Bit-exact with lxmert_fast/philox.py: element i of a draw at (seed, offset) uses
// key = (lo32(seed), hi32(seed)) and counter = (lo32(offset + i), hi32(offset + i), 0, 0).
// Free of torch includes so that nvcc can compile it on a machine whose torch has no CUDA.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LXF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LXF_HOST_DEVICE inline
#endif

namespace lxmert_fast {

struct Philox4 {
  uint32_t x[4];
};

LXF_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
#endif
}

// The four 32-bit words for `index` (offset + element number) under `seed`.
LXF_HOST_DEVICE Philox4 philox4x32_10(uint64_t seed, uint64_t index) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, hi0, lo0);
    philox_mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

}  // namespace lxmert_fast
