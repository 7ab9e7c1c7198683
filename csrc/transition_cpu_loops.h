// The inner loops of the CPU transition op, compiled once per instruction set.
//
// No include guard: transition_cpu.cpp includes this file several times, each time
// inside `#pragma GCC target(...)` with RISKFAST_LOOPS_NS naming the namespace
// (baseline x86-64, AVX2, AVX-512), and picks one at run time. The generic loops work
// on tiles of kLoopTile elements through local buffers so that every loop is a plain
// vectorisable one (no pointer tests inside); the float32 backward has one loop per set
// of wanted gradients instead and stores straight to the outputs (see
// backward_f32_loop). Without contraction (-ffp-contract=off)
// every variant rounds alike, so the results do not depend on the variant chosen.
// Needs (included before): transition_math.h, c10's Half and BFloat16, <algorithm>.

namespace RISKFAST_LOOPS_NS {

constexpr int64_t kLoopTile = 256;

template <typename scalar_t>
using loop_math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Lanes of the float64 sum of squares: element i of a chunk goes to lane i % kSumLanes,
// lanes are added in order at the end. 32 lanes are four independent 8-double vector
// sums, so the adds do not wait on each other (with 8 lanes the forward was bound by
// the latency of one chain of vector adds).
constexpr int64_t kSumLanes = 32;
static_assert(kLoopTile % kSumLanes == 0, "a tile must start on lane 0");

// Sum of (x_prev - mean)^2 over n elements (float64, kSumLanes lanes added in order at
// the end); writes the mean (math type) when mean_out is set.
template <int PRED, typename scalar_t>
double forward_chunk(const scalar_t* xp, const scalar_t* xt, const scalar_t* m, int64_t n,
                     const TransitionCoefs<loop_math_t<scalar_t>>& c,
                     loop_math_t<scalar_t>* mean_out) {
  using T = loop_math_t<scalar_t>;
  T mean[kLoopTile];
  T squares[kLoopTile];
  double lanes[kSumLanes] = {};
  for (int64_t start = 0; start < n; start += kLoopTile) {
    const int64_t len = std::min(kLoopTile, n - start);
    for (int64_t i = 0; i < len; ++i) {
      bool in_clip;
      mean[i] = transition_mean<PRED>(static_cast<T>(xt[start + i]),
                                      static_cast<T>(m[start + i]), c, in_clip);
      const T diff = static_cast<T>(xp[start + i]) - mean[i];
      squares[i] = diff * diff;
    }
    if (mean_out != nullptr) std::copy(mean, mean + len, mean_out + start);
    int64_t i = 0;
    for (; i + kSumLanes <= len; i += kSumLanes) {
      for (int64_t j = 0; j < kSumLanes; ++j) lanes[j] += static_cast<double>(squares[i + j]);
    }
    for (; i < len; ++i) lanes[i % kSumLanes] += static_cast<double>(squares[i]);
  }
  double total = 0.0;
  for (double lane : lanes) total += lane;
  return total;
}

// Gradients of sum_b g_b log_prob_b (+ <grad_mean, mean>) for n elements of one sample:
// scale = g_b / sigma^2 (/ D). Each output pointer may be null (not needed).
template <int PRED, typename scalar_t>
void backward_chunk(const scalar_t* xp, const scalar_t* xt, const scalar_t* m,
                    const loop_math_t<scalar_t>* grad_mean, int64_t n,
                    const TransitionCoefs<loop_math_t<scalar_t>>& c, loop_math_t<scalar_t> scale,
                    scalar_t* grad_xp, scalar_t* grad_xt, scalar_t* grad_m) {
  using T = loop_math_t<scalar_t>;
  T g_mean[kLoopTile];
  T out_xp[kLoopTile], out_xt[kLoopTile], out_m[kLoopTile];
  for (int64_t start = 0; start < n; start += kLoopTile) {
    const int64_t len = std::min(kLoopTile, n - start);
    if (grad_mean != nullptr) {
      std::copy(grad_mean + start, grad_mean + start + len, g_mean);
    } else {
      std::fill(g_mean, g_mean + len, T(0));
    }
    for (int64_t i = 0; i < len; ++i) {
      bool in_clip;
      const T xt_i = static_cast<T>(xt[start + i]);
      const T mean = transition_mean<PRED>(xt_i, static_cast<T>(m[start + i]), c, in_clip);
      // d log_prob / d mean = (x_prev - mean) / sigma^2 (/ D), times the incoming gradient
      const T r = (static_cast<T>(xp[start + i]) - mean) * scale;
      T g_xt, g_m;
      transition_mean_backward<PRED>(r + g_mean[i], in_clip, c, g_xt, g_m);
      out_xp[i] = -r;
      out_xt[i] = g_xt;
      out_m[i] = g_m;
    }
    if (grad_xp != nullptr) {
      for (int64_t i = 0; i < len; ++i) grad_xp[start + i] = static_cast<scalar_t>(out_xp[i]);
    }
    if (grad_xt != nullptr) {
      for (int64_t i = 0; i < len; ++i) grad_xt[start + i] = static_cast<scalar_t>(out_xt[i]);
    }
    if (grad_m != nullptr) {
      for (int64_t i = 0; i < len; ++i) grad_m[start + i] = static_cast<scalar_t>(out_m[i]);
    }
  }
}

// The float32 backward without tile buffers: each element is read once and its wanted
// gradients stored straight to the outputs. Stores limit this loop (three per element
// against the generic loop's seven: tile, copy, zero fill), so it runs about twice as
// fast. WANT (bits 0, 1, 2: x_prev, x_t, model_output) and HAS_GRAD_MEAN are template
// arguments so that the loop has no tests; the math is backward_chunk's, in its order,
// so the two give the same bits.
template <int PRED, int WANT, bool HAS_GRAD_MEAN>
inline void backward_f32_loop(const float* __restrict__ xp, const float* __restrict__ xt,
                              const float* __restrict__ m, const float* __restrict__ grad_mean,
                              int64_t n, const TransitionCoefs<float>& coefs, float scale,
                              float* __restrict__ grad_xp, float* __restrict__ grad_xt,
                              float* __restrict__ grad_m) {
  const TransitionCoefs<float> c = coefs;  // a local copy: provably not written by the stores
  for (int64_t i = 0; i < n; ++i) {
    bool in_clip;
    const float mean = transition_mean<PRED>(xt[i], m[i], c, in_clip);
    const float r = (xp[i] - mean) * scale;
    float g_xt, g_m;
    transition_mean_backward<PRED>(r + (HAS_GRAD_MEAN ? grad_mean[i] : 0.0f), in_clip, c, g_xt,
                                   g_m);
    if constexpr ((WANT & 1) != 0) grad_xp[i] = -r;
    if constexpr ((WANT & 2) != 0) grad_xt[i] = g_xt;
    if constexpr ((WANT & 4) != 0) grad_m[i] = g_m;
  }
}

// backward_chunk's signature for float32; the null outputs must be those WANT leaves out.
template <int PRED, int WANT>
void backward_chunk_f32(const float* xp, const float* xt, const float* m, const float* grad_mean,
                        int64_t n, const TransitionCoefs<float>& c, float scale, float* grad_xp,
                        float* grad_xt, float* grad_m) {
  if (grad_mean != nullptr) {
    backward_f32_loop<PRED, WANT, true>(xp, xt, m, grad_mean, n, c, scale, grad_xp, grad_xt,
                                        grad_m);
  } else {
    backward_f32_loop<PRED, WANT, false>(xp, xt, m, grad_mean, n, c, scale, grad_xp, grad_xt,
                                         grad_m);
  }
}

using BackwardF32Fn = void (*)(const float*, const float*, const float*, const float*, int64_t,
                               const TransitionCoefs<float>&, float, float*, float*, float*);

// The float32 loop for the wanted gradients (want: 1 to 7, bits as WANT above).
template <int PRED>
BackwardF32Fn backward_f32_for(int want) {
  switch (want) {
    case 1: return &backward_chunk_f32<PRED, 1>;
    case 2: return &backward_chunk_f32<PRED, 2>;
    case 3: return &backward_chunk_f32<PRED, 3>;
    case 4: return &backward_chunk_f32<PRED, 4>;
    case 5: return &backward_chunk_f32<PRED, 5>;
    case 6: return &backward_chunk_f32<PRED, 6>;
    default: return &backward_chunk_f32<PRED, 7>;
  }
}

}  // namespace RISKFAST_LOOPS_NS
