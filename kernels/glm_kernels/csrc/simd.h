// Shared inner loops of the compiled CPU kernels (decode_model.cpp, prefill_kernels.cpp): AVX2 loads of fp32 and
// bf16, a vectorised exp, horizontal max and sum, dot products, axpy, one exp pass over a row, and the row-major
// GEMV (each weight row read once for several inputs, split over torch's threads when large). Every function has
// a scalar path for the tails and for CPUs without AVX2 + FMA (the build is -march=native).
#pragma once

#include <torch/extension.h>

#include <pybind11/stl.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GLM_AVX2 1
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace glm_cpu {

using at::Tensor;

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

template <typename T>
inline T cast(float x) { return static_cast<T>(x); }  // one rounding to the model dtype, where torch rounds

#ifdef GLM_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bfloat16 is the top half of a float: widen and shift
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
// e^x for x <= 0 (softmax after subtracting the row max): 2^n * e^r with n = round(x / ln 2), r in
// [-ln2/2, ln2/2], e^r by its Taylor polynomial to degree 7 (relative error < 2e-7, an ulp or two).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // below this e^x is < 2^-125: keep 2^n a normal float
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// sum_d q[d] k[d] with k in the model dtype (a key of the cache), fp32 accumulation.
template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  int64_t d = 0;
  float s = 0.0f;
#ifdef GLM_AVX2
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), acc);
    s = sum8(acc);
  }
#endif
  for (; d < n; ++d) s += q[d] * static_cast<float>(k[d]);
  return s;
}

// out[d] += w * v[d] with v in the model dtype (a value of the cache).
template <typename T>
inline void axpy(float w, const T* v, float* out, int64_t n) {
  int64_t d = 0;
#ifdef GLM_AVX2
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    const __m256 w8 = _mm256_set1_ps(w);
    for (; d + 8 <= n; d += 8) _mm256_storeu_ps(out + d, _mm256_fmadd_ps(w8, load8(v + d), _mm256_loadu_ps(out + d)));
  }
#endif
  for (; d < n; ++d) out[d] += w * static_cast<float>(v[d]);
}

// x[i] <- e^(x[i] - shift) for i < n; returns their sum (the softmax's denominator).
inline float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0.0f;
#ifdef GLM_AVX2
  const __m256 shift8 = _mm256_set1_ps(shift);
  __m256 total8 = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift8));
    _mm256_storeu_ps(x + i, e);
    total8 = _mm256_add_ps(total8, e);
  }
  total = sum8(total8);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    total += x[i];
  }
  return total;
}

// y[b, n] = sum_k w[n, k] x[b, k] for output rows n in [first, last), `rows` inputs, and a matrix whose rows are
// contiguous (the checkpoints' [out, in] layout). Each group of four weight rows is read from memory once and used
// for every input row while it sits in L1; fp32 accumulation.
template <typename T>
void gemv_rows_range(const T* w, int64_t row_stride, const float* x, int64_t rows, int64_t n_in, int64_t n_out,
                     float* y, int64_t first, int64_t last) {
  int64_t r = first;
#ifdef GLM_AVX2
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    for (; r + 4 <= last; r += 4) {
      const T* w0 = w + r * row_stride;
      const T* w1 = w0 + row_stride;
      const T* w2 = w1 + row_stride;
      const T* w3 = w2 + row_stride;
      for (int64_t b = 0; b < rows; ++b) {
        const float* xb = x + b * n_in;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 8 <= n_in; k += 8) {
          const __m256 xv = _mm256_loadu_ps(xb + k);
          a0 = _mm256_fmadd_ps(load8(w0 + k), xv, a0);
          a1 = _mm256_fmadd_ps(load8(w1 + k), xv, a1);
          a2 = _mm256_fmadd_ps(load8(w2 + k), xv, a2);
          a3 = _mm256_fmadd_ps(load8(w3 + k), xv, a3);
        }
        float s0 = sum8(a0), s1 = sum8(a1), s2 = sum8(a2), s3 = sum8(a3);
        for (; k < n_in; ++k) {
          s0 += static_cast<float>(w0[k]) * xb[k];
          s1 += static_cast<float>(w1[k]) * xb[k];
          s2 += static_cast<float>(w2[k]) * xb[k];
          s3 += static_cast<float>(w3[k]) * xb[k];
        }
        float* yb = y + b * n_out;
        yb[r] = s0;
        yb[r + 1] = s1;
        yb[r + 2] = s2;
        yb[r + 3] = s3;
      }
    }
  }
#endif
  for (; r < last; ++r) {
    const T* row = w + r * row_stride;
    for (int64_t b = 0; b < rows; ++b) {
      const float* xb = x + b * n_in;
      float s = 0.0f;
      for (int64_t k = 0; k < n_in; ++k) s += static_cast<float>(row[k]) * xb[k];
      y[b * n_out + r] = s;
    }
  }
}

// All output rows. MKL's gemv reads this layout 3x slower than the column-major one at decode sizes (measured: 1.2
// vs 0.35 ms for an 8192x256 fp32 matrix). Decode is memory-bound, and one core cannot draw a big model's weights
// from memory fast enough: groups of rows are split over torch's intra-op threads (torch.set_num_threads) once a
// matrix is large enough to pay for it; small ones run inline.
template <typename T>
void gemv_rows(const T* w, int64_t row_stride, const float* x, int64_t rows, int64_t n_in, int64_t n_out,
               float* y) {
  const int64_t groups = (n_out + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(4 * n_in, 1));  // ~1 MB of fp32 a task
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    gemv_rows_range<T>(w, row_stride, x, rows, n_in, n_out, y, begin * 4, std::min(end * 4, n_out));
  });
}

}  // namespace glm_cpu
