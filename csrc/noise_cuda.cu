// Counter-based normal noise on CUDA (torch-free: raw pointers, cuda_runtime.h).
//
// The stream of python/riskfast/ops/philox.py: Philox4x32-10 (philox.h), exact
// float32 uniforms, radius sqrtf(-2 logf(u0)), angle u1 * float32(2 pi), lanes
// radius * cosf / sinf. These are the functions torch's CUDA kernels call for
// torch.log/sqrt/cos/sin on float32 (no fast-math), so the stream is the CUDA
// reference's; products and sums of the accumulation use __fmul_rn/__fadd_rn so
// that nvcc cannot fuse them into an FMA (the reference rounds twice).
//
// One thread computes one Philox block (4 numbers) for every seed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_kernels.h"
#include "philox.h"

namespace riskfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void normals4(uint64_t block, uint64_t seed, float z[4]) {
  const PhiloxWords w = philox4x32_10(static_cast<uint32_t>(block),
                                      static_cast<uint32_t>(block >> 32),
                                      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float radius01 = sqrtf(__fmul_rn(-2.0f, logf(philox_uniform(w.r0))));
  const float angle01 = __fmul_rn(philox_uniform(w.r1), kTwoPiF);
  const float radius23 = sqrtf(__fmul_rn(-2.0f, logf(philox_uniform(w.r2))));
  const float angle23 = __fmul_rn(philox_uniform(w.r3), kTwoPiF);
  z[0] = __fmul_rn(radius01, cosf(angle01));
  z[1] = __fmul_rn(radius01, sinf(angle01));
  z[2] = __fmul_rn(radius23, cosf(angle23));
  z[3] = __fmul_rn(radius23, sinf(angle23));
}

// Element access in the accumulation type: float64 for float64, float32 otherwise.
template <typename T> struct Elem;
template <> struct Elem<float> {
  using acc = float;
  __device__ static float load(const float* p) { return *p; }
  __device__ static void store(float* p, float v) { *p = v; }
};
template <> struct Elem<double> {
  using acc = double;
  __device__ static double load(const double* p) { return *p; }
  __device__ static void store(double* p, double v) { *p = v; }
};
template <> struct Elem<__half> {
  using acc = float;
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static void store(__half* p, float v) { *p = __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  using acc = float;
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

// acc + z * scale with the reference's two roundings, in the accumulation type.
__device__ __forceinline__ float axpy(float acc, float z, double scale) {
  return __fadd_rn(acc, __fmul_rn(z, static_cast<float>(scale)));
}
__device__ __forceinline__ double axpy(double acc, float z, double scale) {
  return __dadd_rn(acc, __dmul_rn(static_cast<double>(z), scale));
}

// Four consecutive elements at once, when aligned.
template <typename T>
__device__ __forceinline__ void load4(const T* p, typename Elem<T>::acc v[4]) {
  for (int j = 0; j < 4; ++j) v[j] = Elem<T>::load(p + j);
}
template <>
__device__ __forceinline__ void load4<float>(const float* p, float v[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
template <typename T>
__device__ __forceinline__ void store4(T* p, const typename Elem<T>::acc v[4]) {
  for (int j = 0; j < 4; ++j) Elem<T>::store(p + j, v[j]);
}
template <>
__device__ __forceinline__ void store4<float>(float* p, const float v[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

template <typename T>
__global__ void fill_kernel(T* out, int64_t numel, uint64_t seed, int64_t offset,
                            int64_t first_block, int64_t blocks) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < blocks;
       k += stride) {
    const int64_t block = first_block + k;
    float z[4];
    normals4(static_cast<uint64_t>(block), seed, z);
    for (int j = 0; j < 4; ++j) {
      const int64_t index = 4 * block + j - offset;
      if (index >= 0 && index < numel) {
        Elem<T>::store(out + index, static_cast<typename Elem<T>::acc>(z[j]));
      }
    }
  }
}

template <typename T>
__device__ void accumulate_segment(const NoiseBatch& batch, const NoiseSegment& seg,
                                   int64_t block) {
  using acc_t = typename Elem<T>::acc;
  T* data = static_cast<T*>(seg.data);
  const int64_t first = 4 * block - seg.stream_offset;  // index of lane 0 in the tensor
  const bool whole = seg.aligned && first >= 0 && first + 4 <= seg.numel;
  acc_t acc[4];
  if (whole) {
    load4<T>(data + first, acc);
  } else {
    for (int j = 0; j < 4; ++j) {
      const int64_t index = first + j;
      acc[j] = (index >= 0 && index < seg.numel) ? Elem<T>::load(data + index) : acc_t(0);
    }
  }
  for (int s = 0; s < batch.num_seeds; ++s) {
    float z[4];
    normals4(static_cast<uint64_t>(block), batch.seeds[s], z);
    for (int j = 0; j < 4; ++j) acc[j] = axpy(acc[j], z[j], batch.scales[s]);
  }
  if (whole) {
    store4<T>(data + first, acc);
  } else {
    for (int j = 0; j < 4; ++j) {
      const int64_t index = first + j;
      if (index >= 0 && index < seg.numel) Elem<T>::store(data + index, acc[j]);
    }
  }
}

// __grid_constant__: the segments are read in place from the parameter space (taking
// their address would otherwise copy 2.6 KB to every thread's stack).
__global__ void accumulate_kernel(const __grid_constant__ NoiseBatch batch) {
  const int64_t total = batch.first_work[batch.num_segments];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t work = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; work < total;
       work += stride) {
    int s = 0;
    while (work >= batch.first_work[s + 1]) ++s;
    const NoiseSegment& seg = batch.segments[s];
    const int64_t block = seg.stream_offset / 4 + (work - batch.first_work[s]);
    switch (seg.dtype) {
      case kFloat32: accumulate_segment<float>(batch, seg, block); break;
      case kFloat64: accumulate_segment<double>(batch, seg, block); break;
      case kFloat16: accumulate_segment<__half>(batch, seg, block); break;
      default: accumulate_segment<__nv_bfloat16>(batch, seg, block); break;
    }
  }
}

int grid_for(int64_t work) {
  // Enough blocks to fill any current GPU several times over; the loops stride.
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

cudaError_t philox_normal_fill(void* out, int dtype, int64_t numel, uint64_t seed,
                               int64_t offset, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int64_t first_block = offset / 4;
  const int64_t blocks = (offset + numel - 1) / 4 - first_block + 1;
  const int grid = grid_for(blocks);
  switch (dtype) {
    case kFloat32:
      fill_kernel<<<grid, kThreads, 0, stream>>>(static_cast<float*>(out), numel, seed, offset,
                                                 first_block, blocks);
      break;
    case kFloat64:
      fill_kernel<<<grid, kThreads, 0, stream>>>(static_cast<double*>(out), numel, seed, offset,
                                                 first_block, blocks);
      break;
    case kFloat16:
      fill_kernel<<<grid, kThreads, 0, stream>>>(static_cast<__half*>(out), numel, seed, offset,
                                                 first_block, blocks);
      break;
    default:
      fill_kernel<<<grid, kThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(out), numel, seed,
                                                 offset, first_block, blocks);
      break;
  }
  return cudaGetLastError();
}

cudaError_t accumulate_noise(const NoiseBatch& batch, cudaStream_t stream) {
  const int64_t total = batch.first_work[batch.num_segments];
  if (total == 0 || batch.num_seeds == 0) return cudaSuccess;
  accumulate_kernel<<<grid_for(total), kThreads, 0, stream>>>(batch);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace riskfast
