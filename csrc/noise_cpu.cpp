// Counter-based normal noise on the CPU: riskfast::philox_normal_fill_ and
// riskfast::accumulate_noise_ (schemas in ops_schema.cpp).
//
// The stream is python/riskfast/ops/philox.py's, bit for bit. Philox, the uniforms
// and the products are exact IEEE float32 arithmetic; the three transcendental steps
// (log, sqrt, sin/cos) go through the very functions torch's CPU kernels use for
// torch.log/sqrt/sin/cos on float32 tensors, so the compiled stream equals the
// reference's on the same machine:
//
// * "mkl": torch built with MKL computes those ops with MKL's vector math (vmsLn,
//   vmsSqrt, vmsSin, vmsCos, exported by libtorch_cpu); this file calls them directly
//   on chunks of a few thousand numbers (their results do not depend on the length
//   or position of the chunk);
// * "aten": otherwise (or when a probe finds that the MKL functions do not give
//   torch's bits) the same chunks go through at::log/sqrt/sin/cos (slower: one
//   dispatcher call per chunk and step).
//
// Work is split into chunks of whole Philox blocks at fixed stream positions, so the
// numbers do not depend on the thread count or on how a list is split into tensors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cos.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/log.h>
#include <ATen/ops/sin.h>
#include <ATen/ops/sqrt.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "noise_cpu.h"
#include "op_checks.h"
#include "philox.h"

// MKL's vector math, as exported by libtorch_cpu when torch is built with MKL. Weak:
// absent symbols are null and the "aten" path is taken. The length is MKL_INT (32-bit
// in MKL's LP64 interface, 64-bit in ILP64); passed as a 64-bit register holding a
// small non-negative value it reads the same under both. The mode is MKL_INT64.
extern "C" {
void vmsLn(int64_t n, const float* a, float* r, int64_t mode) __attribute__((weak));
void vmsSqrt(int64_t n, const float* a, float* r, int64_t mode) __attribute__((weak));
void vmsSin(int64_t n, const float* a, float* r, int64_t mode) __attribute__((weak));
void vmsCos(int64_t n, const float* a, float* r, int64_t mode) __attribute__((weak));
}

namespace riskfast {
namespace {

// Philox blocks per chunk: 4 * 1024 numbers, a few tens of KB of buffers per thread.
constexpr int64_t kChunkBlocks = 1024;
constexpr int64_t kChunkNumbers = 4 * kChunkBlocks;
// Numbers of noise held per chunk and thread when several seeds are accumulated.
constexpr int64_t kNoiseBufferNumbers = 1 << 16;

enum class Math { kMkl, kAten };

// The mode torch's CPU kernels pass (ATen/cpu/vml.h): VML_HA | VML_FTZDAZ_OFF |
// VML_ERRMODE_IGNORE. A wrong value would show in the probe of detect_math().
constexpr int64_t kVmlMode = 0x2 | 0x140000 | 0x100;

// ------------------------------------------------------------ the float32 math steps
void aten_unary(at::Tensor& (*op)(at::Tensor&, const at::Tensor&), int64_t n, const float* in,
                float* out) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor input = at::from_blob(const_cast<float*>(in), {n}, options);
  at::Tensor output = at::from_blob(out, {n}, options);
  op(output, input);
}

void math_log(Math math, int64_t n, const float* in, float* out) {
  if (math == Math::kMkl) return vmsLn(n, in, out, kVmlMode);
  aten_unary(&at::log_out, n, in, out);
}
void math_sqrt(Math math, int64_t n, const float* in, float* out) {
  if (math == Math::kMkl) return vmsSqrt(n, in, out, kVmlMode);
  aten_unary(&at::sqrt_out, n, in, out);
}
void math_sin(Math math, int64_t n, const float* in, float* out) {
  if (math == Math::kMkl) return vmsSin(n, in, out, kVmlMode);
  aten_unary(&at::sin_out, n, in, out);
}
void math_cos(Math math, int64_t n, const float* in, float* out) {
  if (math == Math::kMkl) return vmsCos(n, in, out, kVmlMode);
  aten_unary(&at::cos_out, n, in, out);
}

// Whether MKL's functions are there and give torch's bits on a probe covering the
// uniforms and angles of the stream (torch may be built without MKL, or another
// library may provide these names).
Math detect_math() {
  if (vmsLn == nullptr || vmsSqrt == nullptr || vmsSin == nullptr || vmsCos == nullptr) {
    return Math::kAten;
  }
  constexpr int64_t n = 4099;  // not a multiple of any vector width
  std::vector<float> in(n), mkl(n), aten(n);
  for (int64_t i = 0; i < n; ++i) {
    in[i] = philox_uniform(static_cast<uint32_t>((i * 1048573) & 0xFFFFFFFF) * 2654435761u);
  }
  using Step = void (*)(Math, int64_t, const float*, float*);
  for (Step step : {Step{&math_log}, Step{&math_sqrt}, Step{&math_sin}, Step{&math_cos}}) {
    std::vector<float> arg = in;
    if (step == &math_sin || step == &math_cos) {
      for (float& x : arg) x *= kTwoPiF;
    } else if (step == &math_sqrt) {
      for (float& x : arg) x *= 30.0f;
    }
    step(Math::kMkl, n, arg.data(), mkl.data());
    step(Math::kAten, n, arg.data(), aten.data());
    if (std::memcmp(mkl.data(), aten.data(), n * sizeof(float)) != 0) return Math::kAten;
  }
  return Math::kMkl;
}

Math noise_math() {
  static const Math math = detect_math();  // a fixed property of the process
  return math;
}

// ------------------------------------------------------------ generating a chunk
// Uniforms of blocks [first, first + nb) of a chunk: radius arguments (lanes 0 and 2)
// and angles (lanes 1 and 3), laid out as [lane 0/1 of every block..., lane 2/3 ...].
// Integer Philox, an exact int -> float conversion and IEEE products: the SIMD and
// scalar versions below give the same bits.
void philox_chunk_scalar(uint64_t first, int64_t begin, int64_t end, int64_t nb, uint32_t k0,
                         uint32_t k1, float* radius_arg, float* angle) {
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t block = first + static_cast<uint64_t>(i);
    const PhiloxWords w = philox4x32_10(static_cast<uint32_t>(block),
                                        static_cast<uint32_t>(block >> 32), k0, k1);
    radius_arg[i] = philox_uniform(w.r0);
    angle[i] = philox_uniform(w.r1) * kTwoPiF;
    radius_arg[nb + i] = philox_uniform(w.r2);
    angle[nb + i] = philox_uniform(w.r3) * kTwoPiF;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// Philox on 16 (AVX-512) or 8 (AVX2) blocks at once. The 32 x 32 -> 64-bit products
// take two vpmuludq (even and odd lanes) and two blends; written out because the
// compiler's own vectorisation of the scalar loop widens every lane to 64 bits
// (about 4x slower here).
__attribute__((target("avx512f"))) inline void mulhilo_avx512(__m512i m, __m512i x, __m512i& hi,
                                                               __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

__attribute__((target("avx512f"))) inline __m512 uniform_avx512(__m512i w) {
  const __m512i k =
      _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(w, 9), 1), _mm512_set1_epi32(1));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(k), _mm512_set1_ps(kUniformScale));
}

__attribute__((target("avx512f"))) void philox_chunk_avx512(uint64_t first, int64_t nb,
                                                             uint32_t k0, uint32_t k1,
                                                             float* radius_arg, float* angle) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512 two_pi = _mm512_set1_ps(kTwoPiF);
  int64_t i = 0;
  for (; i + 16 <= nb; i += 16) {
    const uint64_t base = first + static_cast<uint64_t>(i);
    if (static_cast<uint32_t>(base) > 0xFFFFFFFFu - 15u) {  // the low counter word wraps
      philox_chunk_scalar(first, i, i + 16, nb, k0, k1, radius_arg, angle);
      continue;
    }
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)), lane);
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(base >> 32));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo_avx512(m0, c0, hi0, lo0);
      mulhilo_avx512(m1, c2, hi1, lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(key0)));
      c1 = lo1;
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(key1)));
      c3 = lo0;
      key0 += kPhiloxW0;
      key1 += kPhiloxW1;
    }
    _mm512_storeu_ps(radius_arg + i, uniform_avx512(c0));
    _mm512_storeu_ps(angle + i, _mm512_mul_ps(uniform_avx512(c1), two_pi));
    _mm512_storeu_ps(radius_arg + nb + i, uniform_avx512(c2));
    _mm512_storeu_ps(angle + nb + i, _mm512_mul_ps(uniform_avx512(c3), two_pi));
  }
  philox_chunk_scalar(first, i, nb, nb, k0, k1, radius_arg, angle);
}

__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i m, __m256i x, __m256i& hi,
                                                          __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) inline __m256 uniform_avx2(__m256i w) {
  const __m256i k =
      _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(w, 9), 1), _mm256_set1_epi32(1));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(k), _mm256_set1_ps(kUniformScale));
}

__attribute__((target("avx2"))) void philox_chunk_avx2(uint64_t first, int64_t nb, uint32_t k0,
                                                        uint32_t k1, float* radius_arg,
                                                        float* angle) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256 two_pi = _mm256_set1_ps(kTwoPiF);
  int64_t i = 0;
  for (; i + 8 <= nb; i += 8) {
    const uint64_t base = first + static_cast<uint64_t>(i);
    if (static_cast<uint32_t>(base) > 0xFFFFFFFFu - 7u) {  // the low counter word wraps
      philox_chunk_scalar(first, i, i + 8, nb, k0, k1, radius_arg, angle);
      continue;
    }
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base)), lane);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(base >> 32));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(m0, c0, hi0, lo0);
      mulhilo_avx2(m1, c2, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(key0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(key1)));
      c3 = lo0;
      key0 += kPhiloxW0;
      key1 += kPhiloxW1;
    }
    _mm256_storeu_ps(radius_arg + i, uniform_avx2(c0));
    _mm256_storeu_ps(angle + i, _mm256_mul_ps(uniform_avx2(c1), two_pi));
    _mm256_storeu_ps(radius_arg + nb + i, uniform_avx2(c2));
    _mm256_storeu_ps(angle + nb + i, _mm256_mul_ps(uniform_avx2(c3), two_pi));
  }
  philox_chunk_scalar(first, i, nb, nb, k0, k1, radius_arg, angle);
}
#endif

enum class Simd { kAvx512, kAvx2, kNone };

Simd detect_simd() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Simd::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Simd::kAvx2;
#endif
  return Simd::kNone;
}

void philox_chunk(Simd simd, uint64_t first, int64_t nb, uint32_t k0, uint32_t k1,
                  float* radius_arg, float* angle) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (simd == Simd::kAvx512) return philox_chunk_avx512(first, nb, k0, k1, radius_arg, angle);
  if (simd == Simd::kAvx2) return philox_chunk_avx2(first, nb, k0, k1, radius_arg, angle);
#endif
  philox_chunk_scalar(first, 0, nb, nb, k0, k1, radius_arg, angle);
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void scale_by_minus_two(
    int64_t n, float* x) {
  for (int64_t i = 0; i < n; ++i) x[i] = -2.0f * x[i];
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void box_muller_lanes(
    int64_t nb, const float* radius, const float* cosine, const float* sine, float* z) {
  for (int64_t i = 0; i < nb; ++i) {
    z[4 * i + 0] = radius[i] * cosine[i];
    z[4 * i + 1] = radius[i] * sine[i];
    z[4 * i + 2] = radius[nb + i] * cosine[nb + i];
    z[4 * i + 3] = radius[nb + i] * sine[nb + i];
  }
}

// Scratch of one thread: generates 4 * nb numbers of the stream at a time.
class ChunkGenerator {
 public:
  explicit ChunkGenerator(Simd simd = detect_simd())
      : math_(noise_math()), simd_(simd), scratch_(new float[6 * 2 * kChunkBlocks]) {}

  // Numbers 4 * first .. 4 * (first + nb) - 1 of the stream of seed into z.
  void generate(uint64_t seed, uint64_t first, int64_t nb, float* z) {
    float* radius_arg = scratch_.get();
    float* angle = radius_arg + 2 * kChunkBlocks;
    float* log_u = angle + 2 * kChunkBlocks;
    float* radius = log_u + 2 * kChunkBlocks;
    float* cosine = radius + 2 * kChunkBlocks;
    float* sine = cosine + 2 * kChunkBlocks;
    const int64_t n = 2 * nb;
    philox_chunk(simd_, first, nb, static_cast<uint32_t>(seed),
                 static_cast<uint32_t>(seed >> 32), radius_arg, angle);
    math_log(math_, n, radius_arg, log_u);  // radius = sqrt(-2 log u), as the reference
    scale_by_minus_two(n, log_u);
    math_sqrt(math_, n, log_u, radius);
    math_cos(math_, n, angle, cosine);
    math_sin(math_, n, angle, sine);
    box_muller_lanes(nb, radius, cosine, sine, z);
  }

 private:
  Math math_;
  Simd simd_;
  std::unique_ptr<float[]> scratch_;
};

// ------------------------------------------------------------ dtypes
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
void store_numbers(const float* z, int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(z[i]);
}

// x += sum_s scales[s] * noise[s] in the accumulation type, terms in order, product
// then sum (two roundings), as the reference: float32 tensor * Python float rounds the
// scale to float32 first.
template <typename scalar_t>
void apply_noise(scalar_t* x, int64_t n, const float* noise, int64_t noise_stride,
                 const std::vector<double>& scales) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kTile = 512;
  acc_t acc[kTile];
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t len = std::min(kTile, n - start);
    for (int64_t i = 0; i < len; ++i) acc[i] = static_cast<acc_t>(x[start + i]);
    for (size_t s = 0; s < scales.size(); ++s) {
      const acc_t scale = static_cast<acc_t>(scales[s]);
      const float* z = noise + static_cast<int64_t>(s) * noise_stride + start;
      for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + static_cast<acc_t>(z[i]) * scale;
    }
    for (int64_t i = 0; i < len; ++i) x[start + i] = static_cast<scalar_t>(acc[i]);
  }
}

template <typename F>
void dispatch_floating(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype);
  }
}

// ------------------------------------------------------------ the operators
void philox_normal_fill_cpu(at::Tensor& out, int64_t seed, int64_t offset) {
  check_fill_args(out, seed, offset);
  TORCH_CHECK_VALUE(out.device().is_cpu(), "out: expected a CPU tensor, got ", out.device());
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const int64_t first_block = offset / 4;
  const int64_t last_block = (offset + numel - 1) / 4;
  const int64_t chunks = (last_block - first_block) / kChunkBlocks + 1;
  dispatch_floating(out.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* data = out.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      ChunkGenerator generator;
      std::vector<float> z(kChunkNumbers);
      for (int64_t c = begin; c < end; ++c) {
        const int64_t block = first_block + c * kChunkBlocks;
        const int64_t nb = std::min(kChunkBlocks, last_block + 1 - block);
        generator.generate(static_cast<uint64_t>(seed), static_cast<uint64_t>(block), nb,
                           z.data());
        // stream numbers [4 block, 4 (block + nb)) intersected with [offset, offset + numel)
        const int64_t lo = std::max(4 * block, offset);
        const int64_t hi = std::min(4 * (block + nb), offset + numel);
        store_numbers(z.data() + (lo - 4 * block), hi - lo, data + (lo - offset));
      }
    });
  });
}

void accumulate_noise_cpu(at::TensorList tensors, at::IntArrayRef seeds,
                          at::ArrayRef<double> scales) {
  check_noise_tensors(tensors);
  check_seeds_and_scales(seeds, scales);
  TORCH_CHECK_VALUE(tensors[0].device().is_cpu(), "tensors[0]: expected a CPU tensor, got ",
                    tensors[0].device());
  const int64_t num_seeds = static_cast<int64_t>(seeds.size());
  if (num_seeds == 0) return;
  // Stream offset of each tensor: the list is one stream.
  std::vector<int64_t> starts(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) starts[i + 1] = starts[i] + tensors[i].numel();
  const int64_t total = starts.back();
  if (total == 0) return;
  // Chunk length (whole blocks) so that the noise of every seed fits one buffer.
  const int64_t chunk_blocks = std::clamp<int64_t>(kNoiseBufferNumbers / (4 * num_seeds), 64,
                                                   kChunkBlocks);
  const int64_t chunk_numbers = 4 * chunk_blocks;
  const int64_t chunks = (total + chunk_numbers - 1) / chunk_numbers;
  const std::vector<double> scale_list(scales.begin(), scales.end());
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    ChunkGenerator generator;
    std::vector<float> noise(static_cast<size_t>(num_seeds * chunk_numbers));
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * chunk_numbers;
      const int64_t hi = std::min(lo + chunk_numbers, total);
      const int64_t nb = (hi - lo + 3) / 4;
      for (int64_t s = 0; s < num_seeds; ++s) {
        generator.generate(static_cast<uint64_t>(seeds[s]), static_cast<uint64_t>(lo / 4), nb,
                           noise.data() + s * chunk_numbers);
      }
      // the tensors overlapping [lo, hi)
      size_t t = std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin() - 1;
      for (; t < tensors.size() && starts[t] < hi; ++t) {
        const int64_t seg_lo = std::max(lo, starts[t]);
        const int64_t seg_hi = std::min(hi, starts[t + 1]);
        if (seg_hi <= seg_lo) continue;
        const at::Tensor& tensor = tensors[t];
        dispatch_floating(tensor.scalar_type(), [&](auto tag) {
          using scalar_t = decltype(tag);
          scalar_t* data = static_cast<scalar_t*>(tensor.data_ptr()) + (seg_lo - starts[t]);
          apply_noise(data, seg_hi - seg_lo, noise.data() + (seg_lo - lo), chunk_numbers,
                      scale_list);
        });
      }
    }
  });
}

}  // namespace

const char* noise_math_name() { return noise_math() == Math::kMkl ? "mkl" : "aten"; }

}  // namespace riskfast

TORCH_LIBRARY_IMPL(riskfast, CPU, m) {
  m.impl("philox_normal_fill_", &riskfast::philox_normal_fill_cpu);
  m.impl("accumulate_noise_", &riskfast::accumulate_noise_cpu);
}
