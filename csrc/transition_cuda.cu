// The fused transition log-density on CUDA (torch-free: raw pointers, cuda_runtime.h).
//
// Forward: a batch * chunks grid; each thread block reads kChunk elements of one
// sample (x_prev, x_t, model_output), forms the mean (transition_math.h), optionally
// writes it, and reduces (x_prev - mean)^2 in float64 in a fixed order into
// partial[b, chunk]; a second kernel adds each sample's partials in chunk order and
// writes log N(x_prev; mean, sigma^2 I). No atomics: the result does not depend on
// scheduling. Backward: one elementwise pass recomputing the mean.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda_kernels.h"
#include "transition_math.h"

namespace riskfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kChunk = kThreads * kPerThread;

template <typename T> struct Elem;
template <> struct Elem<float> {
  using math = float;
  __device__ static float load(const float* p) { return *p; }
  __device__ static void store(float* p, float v) { *p = v; }
};
template <> struct Elem<double> {
  using math = double;
  __device__ static double load(const double* p) { return *p; }
  __device__ static void store(double* p, double v) { *p = v; }
};
template <> struct Elem<__half> {
  using math = float;
  __device__ static float load(const __half* p) { return __half2float(*p); }
  __device__ static void store(__half* p, float v) { *p = __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  using math = float;
  __device__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

template <typename M>
TransitionCoefs<M> make_coefs(const TransitionArgs& a) {
  TransitionCoefs<M> c;
  c.root_a = static_cast<M>(std::sqrt(a.alpha_prod_t));
  c.root_b = static_cast<M>(std::sqrt(1.0 - a.alpha_prod_t));
  c.inv_root_a = static_cast<M>(1.0 / std::sqrt(a.alpha_prod_t));
  c.inv_root_b = static_cast<M>(1.0 / std::sqrt(1.0 - a.alpha_prod_t));
  c.coef_x0 = static_cast<M>(a.coef_x0);
  c.coef_eps = static_cast<M>(a.coef_eps);
  c.coef_sample = static_cast<M>(a.coef_sample);
  c.lo = a.has_clip ? static_cast<M>(-a.clip_range) : static_cast<M>(-INFINITY);
  c.hi = a.has_clip ? static_cast<M>(a.clip_range) : static_cast<M>(INFINITY);
  c.use_eps = a.coef_eps != 0.0;
  c.use_sample = a.coef_sample != 0.0;
  return c;
}

__device__ __forceinline__ double block_sum(double value, double* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  }
  return total;  // in thread 0
}

template <int PRED, typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x_prev, const T* __restrict__ sample,
                   const T* __restrict__ model_output, int64_t dims, int64_t chunks,
                   const TransitionCoefs<typename Elem<T>::math> c,
                   typename Elem<T>::math* __restrict__ mean_out, double* __restrict__ partial) {
  using M = typename Elem<T>::math;
  __shared__ double shared[kThreads / 32];
  const int64_t b = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t row = b * dims;
  double squares = 0.0;
  for (int j = 0; j < kPerThread; ++j) {
    // consecutive threads read consecutive elements (coalesced)
    const int64_t i = chunk * kChunk + static_cast<int64_t>(j) * kThreads + threadIdx.x;
    if (i < dims) {
      bool in_clip;
      const M mean = transition_mean<PRED>(Elem<T>::load(sample + row + i),
                                           Elem<T>::load(model_output + row + i), c, in_clip);
      if (mean_out != nullptr) mean_out[row + i] = mean;
      const M diff = Elem<T>::load(x_prev + row + i) - mean;
      squares += static_cast<double>(diff * diff);
    }
  }
  const double total = block_sum(squares, shared);
  if (threadIdx.x == 0) partial[b * chunks + chunk] = total;
}

template <typename Out>
__global__ void finish_kernel(const double* __restrict__ partial, int64_t batch, int64_t chunks,
                              int64_t dims, double sigma, int reduce_mean, Out* log_prob,
                              int64_t stride) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  double squares = 0.0;
  for (int64_t k = 0; k < chunks; ++k) squares += partial[b * chunks + k];
  const double d = static_cast<double>(dims);
  const double half_log_2pi = 0.91893853320467274178;
  double value = squares * (-0.5 / (sigma * sigma)) - d * (log(sigma) + half_log_2pi);
  if (reduce_mean) value /= d;
  log_prob[b * stride] = static_cast<Out>(value);
}

template <int PRED, typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ x_prev, const T* __restrict__ sample,
                    const T* __restrict__ model_output, int64_t batch, int64_t dims,
                    const TransitionCoefs<typename Elem<T>::math> c, double grad_scale,
                    const double* __restrict__ grad_log_prob,
                    const typename Elem<T>::math* __restrict__ grad_mean, T* grad_xp, T* grad_xt,
                    T* grad_m) {
  using M = typename Elem<T>::math;
  const int64_t total = batch * dims;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const M scale = static_cast<M>(grad_log_prob[i / dims] * grad_scale);
    bool in_clip;
    const M xt = Elem<T>::load(sample + i);
    const M mean = transition_mean<PRED>(xt, Elem<T>::load(model_output + i), c, in_clip);
    const M r = (Elem<T>::load(x_prev + i) - mean) * scale;
    const M g = grad_mean != nullptr ? r + grad_mean[i] : r;
    M g_xt, g_m;
    transition_mean_backward<PRED>(g, in_clip, c, g_xt, g_m);
    if (grad_xp != nullptr) Elem<T>::store(grad_xp + i, -r);
    if (grad_xt != nullptr) Elem<T>::store(grad_xt + i, g_xt);
    if (grad_m != nullptr) Elem<T>::store(grad_m + i, g_m);
  }
}

template <int PRED, typename T>
cudaError_t forward_typed(const TransitionArgs& a, void* mean_out, double* partial,
                          void* log_prob, int log_prob_dtype, int64_t stride, cudaStream_t s) {
  using M = typename Elem<T>::math;
  const int64_t chunks = transition_chunks(a.dims);
  // one thread block per (sample, chunk): batch * chunks < 2^31 for any tensor that fits
  const unsigned grid = static_cast<unsigned>(a.batch * chunks);
  forward_kernel<PRED, T><<<grid, kThreads, 0, s>>>(
      static_cast<const T*>(a.x_prev), static_cast<const T*>(a.sample),
      static_cast<const T*>(a.model_output), a.dims, chunks, make_coefs<M>(a),
      static_cast<M*>(mean_out), partial);
  const int finish_grid = static_cast<int>((a.batch + 127) / 128);
  if (log_prob_dtype == kFloat64) {
    finish_kernel<<<finish_grid, 128, 0, s>>>(partial, a.batch, chunks, a.dims, a.sigma,
                                              a.reduce_mean, static_cast<double*>(log_prob),
                                              stride);
  } else {
    finish_kernel<<<finish_grid, 128, 0, s>>>(partial, a.batch, chunks, a.dims, a.sigma,
                                              a.reduce_mean, static_cast<float*>(log_prob),
                                              stride);
  }
  return cudaGetLastError();
}

template <int PRED, typename T>
cudaError_t backward_typed(const TransitionArgs& a, const double* grad_log_prob,
                           const void* grad_mean, void* gxp, void* gxt, void* gm,
                           cudaStream_t s) {
  using M = typename Elem<T>::math;
  const double scale = (a.reduce_mean ? 1.0 / static_cast<double>(a.dims) : 1.0) /
                       (a.sigma * a.sigma);
  const int64_t total = a.batch * a.dims;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < 65536 ? blocks : 65536);
  backward_kernel<PRED, T><<<grid, kThreads, 0, s>>>(
      static_cast<const T*>(a.x_prev), static_cast<const T*>(a.sample),
      static_cast<const T*>(a.model_output), a.batch, a.dims, make_coefs<M>(a), scale,
      grad_log_prob, static_cast<const M*>(grad_mean), static_cast<T*>(gxp),
      static_cast<T*>(gxt), static_cast<T*>(gm));
  return cudaGetLastError();
}

template <int PRED>
cudaError_t forward_pred(const TransitionArgs& a, void* mean_out, double* partial, void* lp,
                         int lp_dtype, int64_t stride, cudaStream_t s) {
  switch (a.dtype) {
    case kFloat32: return forward_typed<PRED, float>(a, mean_out, partial, lp, lp_dtype, stride, s);
    case kFloat64: return forward_typed<PRED, double>(a, mean_out, partial, lp, lp_dtype, stride, s);
    case kFloat16: return forward_typed<PRED, __half>(a, mean_out, partial, lp, lp_dtype, stride, s);
    default:
      return forward_typed<PRED, __nv_bfloat16>(a, mean_out, partial, lp, lp_dtype, stride, s);
  }
}

template <int PRED>
cudaError_t backward_pred(const TransitionArgs& a, const double* g, const void* gmean, void* gxp,
                          void* gxt, void* gm, cudaStream_t s) {
  switch (a.dtype) {
    case kFloat32: return backward_typed<PRED, float>(a, g, gmean, gxp, gxt, gm, s);
    case kFloat64: return backward_typed<PRED, double>(a, g, gmean, gxp, gxt, gm, s);
    case kFloat16: return backward_typed<PRED, __half>(a, g, gmean, gxp, gxt, gm, s);
    default: return backward_typed<PRED, __nv_bfloat16>(a, g, gmean, gxp, gxt, gm, s);
  }
}

}  // namespace

int64_t transition_chunks(int64_t dims) { return dims > 0 ? (dims + kChunk - 1) / kChunk : 1; }

cudaError_t transition_forward(const TransitionArgs& args, void* mean_out, double* partial,
                               void* log_prob, int log_prob_dtype, int64_t log_prob_stride,
                               cudaStream_t stream) {
  switch (args.prediction) {
    case kPredEpsilon:
      return forward_pred<kPredEpsilon>(args, mean_out, partial, log_prob, log_prob_dtype,
                                        log_prob_stride, stream);
    case kPredSample:
      return forward_pred<kPredSample>(args, mean_out, partial, log_prob, log_prob_dtype,
                                       log_prob_stride, stream);
    default:
      return forward_pred<kPredV>(args, mean_out, partial, log_prob, log_prob_dtype,
                                  log_prob_stride, stream);
  }
}

cudaError_t transition_backward(const TransitionArgs& args, const double* grad_log_prob,
                                const void* grad_mean, void* grad_x_prev, void* grad_sample,
                                void* grad_model_output, cudaStream_t stream) {
  switch (args.prediction) {
    case kPredEpsilon:
      return backward_pred<kPredEpsilon>(args, grad_log_prob, grad_mean, grad_x_prev, grad_sample,
                                         grad_model_output, stream);
    case kPredSample:
      return backward_pred<kPredSample>(args, grad_log_prob, grad_mean, grad_x_prev, grad_sample,
                                        grad_model_output, stream);
    default:
      return backward_pred<kPredV>(args, grad_log_prob, grad_mean, grad_x_prev, grad_sample,
                                   grad_model_output, stream);
  }
}

}  // namespace cuda
}  // namespace riskfast
