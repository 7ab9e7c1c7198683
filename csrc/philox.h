// Philox4x32-10 and the uniform of riskfast's normal stream, for C++ and CUDA.
//
// Torch-free (only <cstdint>), so that both the CPU operators and the raw-pointer
// CUDA kernels (compiled by nvcc without torch's headers) share one definition.
// The stream itself is specified in python/riskfast/ops/philox.py: element n is
// lane n % 4 of the block with counter (n/4 lo, n/4 hi, 0, 0) and key (seed lo,
// seed hi); each word r becomes the float32 uniform (2 (r >> 9) + 1) / 2^24 and
// Box-Muller pairs (r0, r1) and (r2, r3) with the angle v * float32(2 pi).
//
// Philox4x32-10: Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy
// as 1, 2, 3" (SC 2011); multipliers and key increments are theirs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RISKFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RISKFAST_HOST_DEVICE inline
#endif

namespace riskfast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
// float32(2 pi): the reference multiplies by this float, so every implementation does.
constexpr float kTwoPiF = 6.28318548202514648438f;
// 2^-24: (2 (r >> 9) + 1) * 2^-24 is exact in float32.
constexpr float kUniformScale = 5.9604644775390625e-08f;

struct PhiloxWords {
  uint32_t r0, r1, r2, r3;
};

// Philox4x32-10 of the counter (lo, hi, 0, 0) under the key (k0, k1).
RISKFAST_HOST_DEVICE PhiloxWords philox4x32_10(uint32_t counter_lo, uint32_t counter_hi,
                                               uint32_t k0, uint32_t k1) {
  uint32_t c0 = counter_lo, c1 = counter_hi, c2 = 0u, c3 = 0u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {c0, c1, c2, c3};
}

// The float32 uniform in (0, 1) of one Philox word: 2^23 values, symmetric.
RISKFAST_HOST_DEVICE float philox_uniform(uint32_t word) {
  return static_cast<float>(static_cast<int32_t>(((word >> 9) << 1) | 1u)) * kUniformScale;
}

}  // namespace riskfast
