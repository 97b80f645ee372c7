// C++ CPU row kernels for rlhf_kernels (the `cpp` backend).
//
// Two kernels over a [N, V] logits view (unit column stride, row stride given):
//   forward : logp[i] = x[i, label_i] / T - lse_i, lse_i = log sum_j exp(x[i, j] / T)
//             one sweep from memory per row: blocks of BLOCK columns are read into L1, the block
//             max rescales the running sum once, then exp(x - max) is summed (one exp / element).
//   backward: out[i, j] = g_i / T * (onehot(j == label_i) - exp(x[i, j] / T - lse_i))
//             one sweep, the gradient written once (out may alias x).
// fp32 accumulation whatever the input dtype (fp32, bf16, fp16). Rows are split across threads;
// AVX-512F, AVX2+FMA+F16C or portable scalar code is chosen at run time from CPUID (rows.h is
// compiled once per instruction set).
// Tensors cross the boundary as raw pointers so the extension does not link against torch.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RLHF_X86 1
#endif

namespace py = pybind11;

namespace {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };
constexpr int64_t BLOCK = 2048;

// ----------------------------------------------------------------------------- scalar helpers

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(half);
}

template <int D> inline float load1(const void* p, int64_t i) {
  if constexpr (D == F32) return static_cast<const float*>(p)[i];
  else if constexpr (D == BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  else return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

template <int D> inline void store1(void* p, int64_t i, float v) {
  if constexpr (D == F32) static_cast<float*>(p)[i] = v;
  else if constexpr (D == BF16) static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  else static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
}

constexpr int elem_size(int d) { return d == F32 ? 4 : 2; }

// ----------------------------------------------------------------------------- scalar rows

template <int D>
void forward_row_scalar(const void* row, int64_t n, float inv_t, float& max_out, float& sum_out) {
  float m = -std::numeric_limits<float>::infinity(), s = 0.f;
  for (int64_t start = 0; start < n; start += BLOCK) {
    int64_t end = std::min(n, start + BLOCK);
    float bm = -std::numeric_limits<float>::infinity();
    for (int64_t j = start; j < end; ++j) bm = std::max(bm, load1<D>(row, j) * inv_t);
    if (bm > m) { s *= std::exp(m - bm); m = bm; }
    if (m == -std::numeric_limits<float>::infinity()) continue;  // a block of -inf logits adds nothing
    for (int64_t j = start; j < end; ++j) s += std::exp(load1<D>(row, j) * inv_t - m);
  }
  max_out = m;
  sum_out = s;
}

template <int D>
void backward_row_scalar(const void* row, void* out, int64_t n, float inv_t, float lse, float g) {
  for (int64_t j = 0; j < n; ++j) store1<D>(out, j, -g * std::exp(load1<D>(row, j) * inv_t - lse));
}

// ----------------------------------------------------------------------------- SIMD rows
// Shared constants of the exp approximation: x = n ln2 + r, degree-6 polynomial on r, scale by
// 2^n (Cephes). Relative error ~1e-7 on the clamped range; inputs below EXP_LO give exactly 0.
#define RLHF_EXP_CONSTANTS                                                         \
  constexpr float EXP_HI = 88.3762626647949f, EXP_LO = -87.3365478515625f;         \
  constexpr float LOG2E = 1.44269504088896341f, LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f; \
  constexpr float P0 = 1.9875691500e-4f, P1 = 1.3981999507e-3f, P2 = 8.3334519073e-3f; \
  constexpr float P3 = 4.1665795894e-2f, P4 = 1.6666665459e-1f, P5 = 5.0000001201e-1f;

#ifdef RLHF_X86
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
struct Ops {
  static constexpr int W = 8;
  using V = __m256;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static float hmax(V v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static V exp(V x) {
    RLHF_EXP_CONSTANTS
    const V below = _mm256_cmp_ps(x, set1(EXP_LO), _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, set1(EXP_HI)), set1(EXP_LO));
    const V fx = _mm256_round_ps(_mm256_mul_ps(x, set1(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, set1(LN2_LO), _mm256_fnmadd_ps(fx, set1(LN2_HI), x));
    V y = _mm256_fmadd_ps(set1(P0), x, set1(P1));
    y = _mm256_fmadd_ps(y, x, set1(P2));
    y = _mm256_fmadd_ps(y, x, set1(P3));
    y = _mm256_fmadd_ps(y, x, set1(P4));
    y = _mm256_fmadd_ps(y, x, set1(P5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, set1(1.f)));
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(below, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2)));
  }
  template <int D> static V load(const void* p, int64_t i) {
    if constexpr (D == F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (D == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
  template <int D> static void store(void* p, int64_t i, V v) {
    if constexpr (D == F32) {
      _mm256_storeu_ps(static_cast<float*>(p) + i, v);
    } else {
      __m128i h;
      if constexpr (D == F16) {
        h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {  // bf16, round to nearest even (gradients are finite)
        __m256i b = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
        b = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
        h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), h);
    }
  }
};
#include "rows.h"
#pragma GCC pop_options
}  // namespace avx2

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
struct Ops {
  static constexpr int W = 16;
  using V = __m512;
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static V exp(V x) {
    RLHF_EXP_CONSTANTS
    const __mmask16 below = _mm512_cmp_ps_mask(x, set1(EXP_LO), _CMP_LT_OQ);
    x = _mm512_max_ps(_mm512_min_ps(x, set1(EXP_HI)), set1(EXP_LO));
    const V fx = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, set1(LN2_LO), _mm512_fnmadd_ps(fx, set1(LN2_HI), x));
    V y = _mm512_fmadd_ps(set1(P0), x, set1(P1));
    y = _mm512_fmadd_ps(y, x, set1(P2));
    y = _mm512_fmadd_ps(y, x, set1(P3));
    y = _mm512_fmadd_ps(y, x, set1(P4));
    y = _mm512_fmadd_ps(y, x, set1(P5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, set1(1.f)));
    const __m512i pow2 = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~below), _mm512_mul_ps(y, _mm512_castsi512_ps(pow2)));
  }
  template <int D> static V load(const void* p, int64_t i) {
    if constexpr (D == F32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (D == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
  template <int D> static void store(void* p, int64_t i, V v) {
    if constexpr (D == F32) {
      _mm512_storeu_ps(static_cast<float*>(p) + i, v);
    } else {
      __m256i h;
      if constexpr (D == F16) {
        h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {  // bf16, round to nearest even (gradients are finite)
        __m512i b = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        b = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
        h = _mm512_cvtepi32_epi16(b);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), h);
    }
  }
};
#include "rows.h"
#pragma GCC pop_options
}  // namespace avx512
#endif

// Instruction-set levels: 0 scalar, 1 AVX2+FMA+F16C, 2 AVX-512F.
int cpu_level() {
#ifdef RLHF_X86
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                                   __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")
                               ? 2
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")
                               ? 1
                               : 0;
  return level;
#else
  return 0;
#endif
}

template <int D>
void forward_row_at(int level, const void* row, int64_t n, float inv_t, float& m, float& s) {
#ifdef RLHF_X86
  if (level >= 2) return avx512::forward_row<D>(row, n, inv_t, m, s);
  if (level == 1) return avx2::forward_row<D>(row, n, inv_t, m, s);
#endif
  forward_row_scalar<D>(row, n, inv_t, m, s);
}

template <int D>
void backward_row_at(int level, const void* row, void* out, int64_t n, float inv_t, float lse, float g) {
#ifdef RLHF_X86
  if (level >= 2) return avx512::backward_row<D>(row, out, n, inv_t, lse, g);
  if (level == 1) return avx2::backward_row<D>(row, out, n, inv_t, lse, g);
#endif
  backward_row_scalar<D>(row, out, n, inv_t, lse, g);
}

// ----------------------------------------------------------------------------- drivers

// Rows split across threads; a thread is only worth starting for a few hundred KiB of logits.
constexpr int64_t MIN_ELEMS_PER_THREAD = 1 << 16;

template <typename Fn>
void parallel_rows(int64_t n_rows, int64_t n_cols, int threads, Fn fn) {
  const int64_t by_work = std::max<int64_t>(1, n_rows * n_cols / MIN_ELEMS_PER_THREAD);
  const int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, n_rows, by_work})));
  if (t == 1) { fn(0, n_rows); return; }
  std::vector<std::thread> pool;
  const int64_t per = (n_rows + t - 1) / t;
  for (int k = 1; k < t; ++k) {
    const int64_t a = k * per, b = std::min(n_rows, a + per);
    if (a < b) pool.emplace_back(fn, a, b);
  }
  fn(0, std::min(n_rows, per));
  for (auto& th : pool) th.join();
}

// One row's gradient: out = g / T * (onehot(label) - exp(x / T - lse)), or zeros for an ignored row.
template <int D>
void gradient_row(int level, const char* row, char* orow, int64_t n_cols, int64_t label, int64_t ignore, float inv_t,
                  float lse, float upstream) {
  if (label == ignore) { std::memset(orow, 0, static_cast<size_t>(n_cols) * elem_size(D)); return; }
  const float g = upstream * inv_t;
  // Read the label's logit before the sweep: when out aliases logits it is overwritten.
  const float p_label = std::exp(load1<D>(row, label) * inv_t - lse);
  backward_row_at<D>(level, row, orow, n_cols, inv_t, lse, g);
  store1<D>(orow, label, g * (1.f - p_label));
}

// The PPO clipped loss's derivative with respect to logp_i (times `scale` = 1 / n_valid):
// -A r when the unclipped term -A r is the max (ties included, as torch.maximum + clamp give),
// 0 where the clip is active. r = exp(logp - old).
inline float ppo_coef(float logp, float old, float adv, float clip_eps, float scale) {
  const float r = std::exp(logp - old);
  const float unclipped = -adv * r;
  const float clipped = -adv * std::min(std::max(r, 1.f - clip_eps), 1.f + clip_eps);
  return unclipped >= clipped ? unclipped * scale : 0.f;
}

// Forward; with `out`, also the gradient of sum_i c_i * logp_i, written while the row is still in
// cache (loss and gradient in one sweep from memory). c_i = coef, or with `old`/`adv` the PPO
// coefficient (scaled by coef), which is returned in `coef_out`.
template <int D>
void forward_impl(const char* logits, int64_t n_rows, int64_t n_cols, int64_t stride, const int64_t* labels,
                  float* logp, float* lse, float inv_t, int64_t ignore, int threads, int level, char* out,
                  int64_t out_stride, float coef, const float* old, const float* adv, float clip_eps,
                  float* coef_out) {
  parallel_rows(n_rows, n_cols, threads, [=](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t label = labels[i];
      const char* row = logits + i * stride * elem_size(D);
      if (label == ignore) {
        logp[i] = 0.f;
        lse[i] = 0.f;
      } else {
        float m, s;
        forward_row_at<D>(level, row, n_cols, inv_t, m, s);
        lse[i] = m + std::log(s);
        logp[i] = load1<D>(row, label) * inv_t - lse[i];
      }
      if (out != nullptr) {
        float c = coef;
        if (old != nullptr) c = label == ignore ? 0.f : ppo_coef(logp[i], old[i], adv[i], clip_eps, coef);
        if (coef_out != nullptr) coef_out[i] = c;
        gradient_row<D>(level, row, out + i * out_stride * elem_size(D), n_cols, label, ignore, inv_t, lse[i], c);
      }
    }
  });
}

template <int D>
void backward_impl(const char* logits, int64_t n_rows, int64_t n_cols, int64_t stride, const int64_t* labels,
                   const float* lse, const float* grad, char* out, int64_t out_stride, float inv_t, int64_t ignore,
                   int threads, int level) {
  parallel_rows(n_rows, n_cols, threads, [=](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i)
      gradient_row<D>(level, logits + i * stride * elem_size(D), out + i * out_stride * elem_size(D), n_cols,
                      labels[i], ignore, inv_t, lse[i], grad[i]);
  });
}

// Entropy of softmax(x / T) per row: (max, sum) from the SIMD sweep, then H = log sum - sum_j p_j (z_j - max)
// (z = x / T, p = exp(z - lse)) in a second sweep. Writes H and lse (the backward reuses it).
template <int D>
void entropy_forward_impl(const char* logits, int64_t n_rows, int64_t n_cols, int64_t stride, float* h, float* lse,
                          float inv_t, int threads, int level) {
  parallel_rows(n_rows, n_cols, threads, [=](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const char* row = logits + i * stride * elem_size(D);
      float m, s;
      forward_row_at<D>(level, row, n_cols, inv_t, m, s);
      // Second sweep, relative to the max, in double: e_j = exp(z_j - max), S = sum e_j,
      // D = sum e_j (z_j - max); H = log S - D / S. z_j - max is formed exactly as the max was
      // found (product rounded first), so a near-certain row (H ~ 0, large logits) keeps H exact.
      (void)s;
      double es = 0.0, ed = 0.0;
      for (int64_t j = 0; j < n_cols; ++j) {
        const float zm = load1<D>(row, j) * inv_t - m;
        const double e = std::exp(static_cast<double>(zm));
        es += e;
        ed += e * zm;
      }
      lse[i] = static_cast<float>(m + std::log(es));
      h[i] = static_cast<float>(std::log(es) - ed / es);
    }
  });
}

// d H / d x_j = -p_j (z_j - lse + H) / T, times the upstream gradient g_i; written once into out.
template <int D>
void entropy_backward_impl(const char* logits, int64_t n_rows, int64_t n_cols, int64_t stride, const float* lse,
                           const float* h, const float* grad, char* out, int64_t out_stride, float inv_t, int threads) {
  parallel_rows(n_rows, n_cols, threads, [=](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const char* row = logits + i * stride * elem_size(D);
      char* orow = out + i * out_stride * elem_size(D);
      const float l = lse[i], ent = h[i], g = -grad[i] * inv_t;
      for (int64_t j = 0; j < n_cols; ++j) {
        const float zl = load1<D>(row, j) * inv_t - l;  // log p_j, formed first: z and lse may both be large
        const float p = std::exp(zl);
        store1<D>(orow, j, p > 0.f ? g * p * (zl + ent) : 0.f);
      }
    }
  });
}

template <template <int> class Op, typename... Args>
void dispatch(int dtype, Args... args) {
  switch (dtype) {
    case F32: Op<F32>::run(args...); break;
    case BF16: Op<BF16>::run(args...); break;
    case F16: Op<F16>::run(args...); break;
    default: throw std::invalid_argument("rlhf_kernels._cpu: unsupported dtype code");
  }
}

template <int D> struct Fwd { template <typename... A> static void run(A... a) { forward_impl<D>(a...); } };
template <int D> struct Bwd { template <typename... A> static void run(A... a) { backward_impl<D>(a...); } };
template <int D> struct EntFwd { template <typename... A> static void run(A... a) { entropy_forward_impl<D>(a...); } };
template <int D> struct EntBwd { template <typename... A> static void run(A... a) { entropy_backward_impl<D>(a...); } };

// The level to run at: the CPU's best, capped by the caller (-1 = no cap), e.g. to test every path.
int use_level(int cap) { return cap < 0 ? cpu_level() : std::min(cap, cpu_level()); }

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "rlhf C++ CPU kernels: log-prob forward (online LSE) and backward (one-write gradient)";
  m.def("logprobs_forward",
        [](uintptr_t logits, int dtype, int64_t n_rows, int64_t n_cols, int64_t stride, uintptr_t labels,
           uintptr_t logp, uintptr_t lse, float inv_t, int64_t ignore, int threads, int level, uintptr_t out,
           int64_t out_stride, float coef, uintptr_t old, uintptr_t adv, float clip_eps, uintptr_t coef_out) {
          py::gil_scoped_release release;
          dispatch<Fwd>(dtype, reinterpret_cast<const char*>(logits), n_rows, n_cols, stride,
                        reinterpret_cast<const int64_t*>(labels), reinterpret_cast<float*>(logp),
                        reinterpret_cast<float*>(lse), inv_t, ignore, threads, use_level(level),
                        reinterpret_cast<char*>(out), out_stride, coef, reinterpret_cast<const float*>(old),
                        reinterpret_cast<const float*>(adv), clip_eps, reinterpret_cast<float*>(coef_out));
        },
        py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("n_cols"), py::arg("stride"),
        py::arg("labels"), py::arg("logp"), py::arg("lse"), py::arg("inv_temperature"), py::arg("ignore_index"),
        py::arg("threads"), py::arg("level") = -1, py::arg("out") = 0, py::arg("out_stride") = 0,
        py::arg("grad_coef") = 0.f, py::arg("old_logprobs") = 0, py::arg("advantages") = 0,
        py::arg("clip_eps") = 0.f, py::arg("coef_out") = 0);
  m.def("logprobs_backward",
        [](uintptr_t logits, int dtype, int64_t n_rows, int64_t n_cols, int64_t stride, uintptr_t labels,
           uintptr_t lse, uintptr_t grad, uintptr_t out, int64_t out_stride, float inv_t, int64_t ignore,
           int threads, int level) {
          py::gil_scoped_release release;
          dispatch<Bwd>(dtype, reinterpret_cast<const char*>(logits), n_rows, n_cols, stride,
                        reinterpret_cast<const int64_t*>(labels), reinterpret_cast<const float*>(lse),
                        reinterpret_cast<const float*>(grad), reinterpret_cast<char*>(out), out_stride, inv_t,
                        ignore, threads, use_level(level));
        },
        py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("n_cols"), py::arg("stride"),
        py::arg("labels"), py::arg("lse"), py::arg("grad"), py::arg("out"), py::arg("out_stride"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("threads"), py::arg("level") = -1);
  m.def("entropy_forward",
        [](uintptr_t logits, int dtype, int64_t n_rows, int64_t n_cols, int64_t stride, uintptr_t h, uintptr_t lse,
           float inv_t, int threads, int level) {
          py::gil_scoped_release release;
          dispatch<EntFwd>(dtype, reinterpret_cast<const char*>(logits), n_rows, n_cols, stride,
                           reinterpret_cast<float*>(h), reinterpret_cast<float*>(lse), inv_t, threads, use_level(level));
        },
        py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("n_cols"), py::arg("stride"), py::arg("h"),
        py::arg("lse"), py::arg("inv_temperature"), py::arg("threads"), py::arg("level") = -1);
  m.def("entropy_backward",
        [](uintptr_t logits, int dtype, int64_t n_rows, int64_t n_cols, int64_t stride, uintptr_t lse, uintptr_t h,
           uintptr_t grad, uintptr_t out, int64_t out_stride, float inv_t, int threads) {
          py::gil_scoped_release release;
          dispatch<EntBwd>(dtype, reinterpret_cast<const char*>(logits), n_rows, n_cols, stride,
                           reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(h),
                           reinterpret_cast<const float*>(grad), reinterpret_cast<char*>(out), out_stride, inv_t,
                           threads);
        },
        py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("n_cols"), py::arg("stride"), py::arg("lse"),
        py::arg("h"), py::arg("grad"), py::arg("out"), py::arg("out_stride"), py::arg("inv_temperature"),
        py::arg("threads"));
  m.def("cpu_level", &cpu_level, "Best instruction set here: 0 scalar, 1 AVX2+FMA+F16C, 2 AVX-512F");
}
