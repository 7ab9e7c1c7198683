// The inner loops of the CPU transition op, compiled once per instruction set.
//
// No include guard: transition_cpu.cpp includes this file several times, each time
// inside `#pragma GCC target(...)` with RISKFAST_LOOPS_NS naming the namespace
// (baseline x86-64, AVX2, AVX-512), and picks one at run time. The loops work on
// tiles of kLoopTile elements through local buffers so that every loop is a plain
// vectorisable one (no pointer tests inside). Without contraction (-ffp-contract=off)
// every variant rounds alike, so the results do not depend on the variant chosen.
// Needs (included before): transition_math.h, c10's Half and BFloat16, <algorithm>.

namespace RISKFAST_LOOPS_NS {

constexpr int64_t kLoopTile = 256;

template <typename scalar_t>
using loop_math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Sum of (x_prev - mean)^2 over n elements (float64, 8 lanes added in order at the
// end); writes the mean (math type) when mean_out is set.
template <int PRED, typename scalar_t>
double forward_chunk(const scalar_t* xp, const scalar_t* xt, const scalar_t* m, int64_t n,
                     const TransitionCoefs<loop_math_t<scalar_t>>& c,
                     loop_math_t<scalar_t>* mean_out) {
  using T = loop_math_t<scalar_t>;
  T mean[kLoopTile];
  T squares[kLoopTile];
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
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
    for (; i + 8 <= len; i += 8) {
      for (int j = 0; j < 8; ++j) lanes[j] += static_cast<double>(squares[i + j]);
    }
    for (; i < len; ++i) lanes[i % 8] += static_cast<double>(squares[i]);
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

}  // namespace RISKFAST_LOOPS_NS
