// Launchers of riskfast's CUDA kernels: raw pointers and cudaStream_t, no torch.
//
// The kernels (noise_cuda.cu, transition_cuda.cu) include only this header,
// philox.h, transition_math.h and CUDA's own headers, so that nvcc compiles them
// without torch's headers (tests/test_csrc_compile.py does, for sm_90, wherever
// nvcc exists). cuda_ops.cpp binds them to the torch operators. Each launcher
// returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace riskfast {
namespace cuda {

// Element types of the tensors the kernels read and write.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ------------------------------------------------------------------- noise
// out[k] = number offset + k of the stream of seed, k < numel, cast to dtype.
cudaError_t philox_normal_fill(void* out, int dtype, int64_t numel, uint64_t seed,
                               int64_t offset, cudaStream_t stream);

// One tensor of a noise list: numel elements at data, numbers stream_offset ..
// of the list's stream. aligned: stream_offset % 4 == 0 and data aligned to 4
// elements (the kernel then moves whole Philox blocks with vector loads).
struct NoiseSegment {
  void* data;
  int64_t numel;
  int64_t stream_offset;
  int32_t dtype;
  int32_t aligned;
};

// Segments and seeds of one launch, passed by value as the kernel's parameter
// (about 2.6 KB, inside the 4 KB every architecture accepts): no host-to-device copy,
// so the launch can be captured in a CUDA graph. Longer lists take several launches
// (cuda_ops.cpp).
constexpr int kMaxNoiseSegments = 40;
constexpr int kMaxNoiseSeeds = 64;
struct NoiseBatch {
  NoiseSegment segments[kMaxNoiseSegments];
  int64_t first_work[kMaxNoiseSegments + 1];  // cumulative Philox blocks per segment
  uint64_t seeds[kMaxNoiseSeeds];
  double scales[kMaxNoiseSeeds];
  int32_t num_segments;
  int32_t num_seeds;
};

// x += sum_s scales[s] * u(seeds[s]) on every segment (the reference's arithmetic).
cudaError_t accumulate_noise(const NoiseBatch& batch, cudaStream_t stream);

// -------------------------------------------------------------- transition
struct TransitionArgs {
  const void* x_prev;
  const void* sample;
  const void* model_output;
  int32_t dtype;  // of the three inputs (one dtype)
  int64_t batch;
  int64_t dims;   // elements per sample
  double alpha_prod_t, coef_x0, coef_eps, coef_sample, sigma;
  int32_t prediction;  // kPredEpsilon, kPredSample, kPredV (transition_math.h)
  int32_t has_clip;
  double clip_range;
  int32_t reduce_mean;
};

// Chunks per sample of the forward's partial sums (the partial buffer holds
// batch * transition_chunks(dims) doubles).
int64_t transition_chunks(int64_t dims);

// log_prob[b * log_prob_stride] (float32 or float64 as log_prob_dtype) and, when
// mean_out is set, the mean (math dtype: float64 for float64 inputs, else float32).
cudaError_t transition_forward(const TransitionArgs& args, void* mean_out, double* partial,
                               void* log_prob, int log_prob_dtype, int64_t log_prob_stride,
                               cudaStream_t stream);

// Gradients (input dtype) to x_prev, sample, model_output where the pointer is set;
// grad_log_prob: [batch] float64; grad_mean: optional, math dtype.
cudaError_t transition_backward(const TransitionArgs& args, const double* grad_log_prob,
                                const void* grad_mean, void* grad_x_prev, void* grad_sample,
                                void* grad_model_output, cudaStream_t stream);

}  // namespace cuda
}  // namespace riskfast
