// Compiled CPU kernels for quantized weights (glm_kernels.blockquant's Int8Weight and Int4Weight; the formats are
// described there): activations quantized to 8 bits per block of 32, integer dot products per group with fp32
// accumulation, for one linear (`quantized_linear`), the routed experts of many tokens (`quantized_fused_moe`),
// and the decode step (decode_model.cpp calls `qlinear_rows` and `qmoe`).
//
// (Over 600 lines: each kernel's scalar, AVX2 and AVX-512-VNNI paths side by side, so they can be read against
// each other.)
//
// The exact model of every kernel here is blockquant.linear_q8a_reference: activations quantized per block of 32
// and dequantized, weights dequantized, an fp32 matmul. Per group g of a weight row and the matching block b of an
// activation row the kernels compute, in integers, dot(q_w, q_x) (exact), then in fp32
//   int8:  (scale_w[g] * scale_x[b]) * dot
//   int4:  ((d * sc[g]) * scale_x[b]) * dot(q, q_x)  -  ((dmin * mn[g]) * scale_x[b]) * sum(q_x)
// so they differ from the reference only by the order of fp32 additions.
//
// Instruction sets (the build is -march=native: one build per machine; the paths below that the compiler can
// target are compiled, and one is chosen at run time):
// - "avx512vnni": 256-bit vpdpbusd (AVX512-VNNI with AVX512-VL, or AVX-VNNI): one instruction for the 32 u8 x s8
//   products of a group summed into 8 int32 lanes. 256-bit rather than 512-bit: a group of 32 fills one 256-bit
//   register exactly, so the per-group fp32 scale is one broadcast; Zen 4 runs 512-bit ops as two 256-bit halves
//   anyway, and decode is bound by memory, not by these instructions.
// - "avx2": llama.cpp's pair: vpmaddubsw (u8 x s8 -> pairs summed to s16) and vpmaddwd with ones (-> int32).
//   Signed int8 weights go through the sign trick: |w| as u8 (a -128 weight becomes 128, still exact) times x with
//   w's sign, so no pair sum exceeds 2 * 128 * 127 < 32767 (activations are clamped to [-127, 127]).
// - "scalar": plain loops, for CPUs without AVX2 (and for tests).
// The environment variable WORKBENCH_CPU_ISA (scalar | avx2 | avx512vnni), read once at load, or `set_isa` picks
// a lower path than the best compiled one: the tests run the AVX2 path on every machine that has it.
//
// Threads: chunks of output rows (for the experts, (expert, row chunk) pairs of every routed expert of a step at
// once) are shared out over simd.h's ThreadPool (torch's thread count: torch.set_num_threads), claimed one by one
// by whichever thread is free, no thread start-up per token; each output is computed whole by one thread, so
// results do not depend on the thread count.
//
// GEMM (prefill, many rows): the same integer kernel, with the rows of activations tiled so that a tile and a
// block of weight rows stay in L2 while each weight row is reused for every activation row of the tile.

#pragma once  // compiled as part of module.cpp

#include "simd.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(GLM_AVX2) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#define GLM_VNNI 1
#endif

namespace glm_quant {

using at::Tensor;
using glm_cpu::cast;
using glm_cpu::silu;
#ifdef GLM_AVX2
using glm_cpu::max8;
using glm_cpu::sum8;
#endif

enum Isa : int { kScalar = 0, kAvx2 = 1, kVnni = 2 };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512vnni"};

inline int best_isa() {
#if defined(GLM_VNNI)
  return kVnni;
#elif defined(GLM_AVX2)
  return kAvx2;
#else
  return kScalar;
#endif
}

inline int parse_isa(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) {
      TORCH_CHECK(i <= best_isa(), "set_isa: '", name, "' is not compiled on this machine (the best here is '",
                  kIsaNames[best_isa()], "'); choose one of scalar..", kIsaNames[best_isa()]);
      return i;
    }
  TORCH_CHECK(false, "unknown CPU instruction set '", name, "': use scalar, avx2 or avx512vnni (the best here is '",
              kIsaNames[best_isa()], "')");
  return kScalar;
}

inline std::atomic<int>& isa_setting() {
  static std::atomic<int> setting{[] {
    const char* env = std::getenv("WORKBENCH_CPU_ISA");
    if (env == nullptr || *env == '\0') return best_isa();
    return parse_isa(env);
  }()};
  return setting;
}

inline std::string isa() { return kIsaNames[isa_setting().load()]; }
inline void set_isa(const std::string& name) { isa_setting().store(name.empty() ? best_isa() : parse_isa(name)); }

// ---- Views of the formats (raw pointers into contiguous tensors) ------------------------------------------------

struct QMat {  // one quantized [N, K] matrix (or a stack of E of them: `expert(e)`)
  int bits = 0;  // 8 or 4; 0: undefined
  int64_t n = 0, k = 0, group = 32, experts = 1;
  const int8_t* q = nullptr;  // int8: [N, K]
  const float* scales = nullptr;  // int8: [N, K / group]
  const uint8_t* packed = nullptr;  // int4: [N, K / 2]
  const float *d = nullptr, *dmin = nullptr;  // int4: [N, ceil(K / 256)]
  const uint8_t *sc = nullptr, *mn = nullptr;  // int4: [N, K / 32]

  bool defined() const { return bits != 0; }
  int64_t supers() const { return (k + 255) / 256; }
  QMat expert(int64_t e) const {
    QMat m = *this;
    m.experts = 1;
    if (bits == 8) {
      m.q += e * n * k;
      m.scales += e * n * (k / group);
    } else {
      m.packed += e * n * (k / 2);
      m.d += e * n * supers();
      m.dmin += e * n * supers();
      m.sc += e * n * (k / 32);
      m.mn += e * n * (k / 32);
    }
    return m;
  }
  int64_t bytes_per_row() const {
    return bits == 8 ? k + 4 * (k / group) : k / 2 + 8 * supers() + 2 * (k / 32);
  }
};

// parts: [q, scales] (Int8Weight) or [packed, d, dmin, sc, mn] (Int4Weight), with leading dims `lead` (0: one
// matrix [N, K]; 1: stacked experts [E, N, K]).
inline QMat make_qmat(const std::vector<Tensor>& parts, int lead, const char* what) {
  QMat m;
  TORCH_CHECK(parts.size() == 2 || parts.size() == 5, what, ": a quantized weight is [q, scales] (int8) or ",
              "[packed, d, dmin, sc, mn] (int4), got ", parts.size(), " tensors");
  for (const Tensor& t : parts)
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous() && t.dim() == 2 + lead, what,
                ": quantized weight tensors must be contiguous CPU tensors with ", 2 + lead, " dims, got ",
                t.defined() ? t.sizes() : at::IntArrayRef{});
  const Tensor& first = parts[0];
  m.experts = lead ? first.size(0) : 1;
  m.n = first.size(lead);
  auto same_lead = [&](const Tensor& t, int64_t cols, const char* name) {
    TORCH_CHECK((!lead || t.size(0) == m.experts) && t.size(lead) == m.n && t.size(lead + 1) == cols, what, ": ",
                name, " has shape ", t.sizes(), ", expected its last dims [", m.n, ", ", cols, "]");
  };
  if (parts.size() == 2) {
    m.bits = 8;
    TORCH_CHECK(first.scalar_type() == at::kChar && parts[1].scalar_type() == at::kFloat, what,
                ": Int8Weight needs q int8 and scales float32");
    m.k = first.size(lead + 1);
    const int64_t groups = parts[1].size(lead + 1);
    TORCH_CHECK(groups > 0 && m.k % groups == 0 && (m.k / groups == 32 || m.k / groups == 16), what,
                ": Int8Weight groups of 32 or 16 along K, got K=", m.k, " with ", groups, " scales a row");
    m.group = m.k / groups;
    same_lead(parts[1], groups, "scales");
    m.q = first.data_ptr<int8_t>();
    m.scales = parts[1].data_ptr<float>();
  } else {
    m.bits = 4;
    TORCH_CHECK(first.scalar_type() == at::kByte && parts[1].scalar_type() == at::kFloat &&
                    parts[2].scalar_type() == at::kFloat && parts[3].scalar_type() == at::kByte &&
                    parts[4].scalar_type() == at::kByte,
                what, ": Int4Weight needs packed uint8, d and dmin float32, sc and mn uint8");
    m.k = first.size(lead + 1) * 2;
    TORCH_CHECK(m.k % 32 == 0, what, ": Int4Weight needs K a multiple of 32, got ", m.k);
    same_lead(parts[1], m.supers(), "d");
    same_lead(parts[2], m.supers(), "dmin");
    same_lead(parts[3], m.k / 32, "sc");
    same_lead(parts[4], m.k / 32, "mn");
    m.packed = first.data_ptr<uint8_t>();
    m.d = parts[1].data_ptr<float>();
    m.dmin = parts[2].data_ptr<float>();
    m.sc = parts[3].data_ptr<uint8_t>();
    m.mn = parts[4].data_ptr<uint8_t>();
  }
  return m;
}

struct QAct {  // activations quantized per block of 32: rows of K int8, K / 32 scales and sums
  const int8_t* q;
  const float* scales;
  const int32_t* sums;
  int64_t k;
  const int8_t* pairs = nullptr;  // q in pair order (see `pair_order`), where an int4 kernel needs it
  const int8_t* qrow(int64_t m) const { return q + m * k; }
  const float* srow(int64_t m) const { return scales + m * (k / 32); }
  const int32_t* sumrow(int64_t m) const { return sums + m * (k / 32); }
  const int8_t* prow(int64_t m) const { return pairs + m * k; }
  QAct from(int64_t m) const {  // the rows from m on
    return {qrow(m), srow(m), sumrow(m), k, pairs ? prow(m) : nullptr};
  }
};

// ---- Activation quantization ----------------------------------------------------------------------------------

// One row of K floats -> q, scales, sums (blockquant.quantize_activations' contract: scale = amax / 127, q =
// round-half-even(x / scale), an all-zero block has scale 0 and q 0).
inline void quantize_row(const float* x, int64_t k, int8_t* q, float* scales, int32_t* sums) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* xb = x + 32 * b;
    int8_t* qb = q + 32 * b;
    float amax = 0.0f;
#ifdef GLM_AVX2
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 32; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xb + i), abs_mask));
    amax = max8(m);
#else
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
#endif
    const float scale = amax / 127.0f;
    scales[b] = scale;
    int32_t total = 0;
    if (scale == 0.0f) {
      std::memset(qb, 0, 32);
    } else {
#ifdef GLM_AVX2
      const __m256 s = _mm256_set1_ps(scale);
      __m256i v[4];
      for (int i = 0; i < 4; ++i) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xb + 8 * i), s),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f)));
      }
      const __m256i s01 = _mm256_packs_epi32(v[0], v[1]), s23 = _mm256_packs_epi32(v[2], v[3]);
      const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
      __m256i bytes = _mm256_packs_epi16(s01, s23);  // lanes interleaved by the packs: restore the order
      bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), bytes);
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
      total = _mm_cvtsi128_si32(t);
#else
      for (int i = 0; i < 32; ++i) {
        const float r = std::nearbyint(xb[i] / scale);  // the default rounding mode: half to even
        const int v = static_cast<int>(std::min(127.0f, std::max(-127.0f, r)));
        qb[i] = static_cast<int8_t>(v);
        total += v;
      }
#endif
    }
    sums[b] = total;
  }
}

// Buffers of quantized activations for up to `rows` rows of K.
struct QActBuffer {
  std::vector<int8_t> q, pairs;
  std::vector<float> scales;
  std::vector<int32_t> sums;
  int64_t k = 0;
  bool paired = false;
  void resize(int64_t rows, int64_t width) {
    k = width;
    paired = false;
    if (static_cast<int64_t>(q.size()) < rows * k) q.resize(rows * k);
    if (static_cast<int64_t>(scales.size()) < rows * (k / 32)) {
      scales.resize(rows * (k / 32));
      sums.resize(rows * (k / 32));
    }
  }
  // The int4 kernels' order of each row: per pair of groups (64 values), the first halves of both groups, then
  // their second halves ([0, 16), [32, 48), [16, 32), [48, 64)): the order in which 32 packed bytes, masked and
  // shifted, hold their nibbles. An odd last group stays as it is.
  void pair_order(int64_t rows) {
    if (static_cast<int64_t>(pairs.size()) < rows * k) pairs.resize(rows * k);
    for (int64_t m = 0; m < rows; ++m) {
      const int8_t* src = q.data() + m * k;
      int8_t* dst = pairs.data() + m * k;
      int64_t i = 0;
      for (; i + 64 <= k; i += 64) {
        std::memcpy(dst + i, src + i, 16);
        std::memcpy(dst + i + 16, src + i + 32, 16);
        std::memcpy(dst + i + 32, src + i + 16, 16);
        std::memcpy(dst + i + 48, src + i + 48, 16);
      }
      std::memcpy(dst + i, src + i, k - i);
    }
    paired = true;
  }
  QAct view() const { return {q.data(), scales.data(), sums.data(), k, paired ? pairs.data() : nullptr}; }
};

// rows of x (fp32 or bf16 or fp16, row stride `stride` elements) -> buf, split over threads when large
template <typename T>
void quantize_rows(const T* x, int64_t stride, int64_t rows, int64_t k, QActBuffer& buf) {
  buf.resize(rows, k);
  glm_cpu::parallel_range(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> row;
    for (int64_t m = begin; m < end; ++m) {
      const float* src;
      if constexpr (std::is_same_v<T, float>) {
        src = x + m * stride;
      } else {
        row.resize(k);
        for (int64_t i = 0; i < k; ++i) row[i] = static_cast<float>(x[m * stride + i]);
        src = row.data();
      }
      quantize_row(src, k, buf.q.data() + m * k, buf.scales.data() + m * (k / 32), buf.sums.data() + m * (k / 32));
    }
  });
}

// ---- Dot products of one weight row with one activation row ---------------------------------------------------

inline float dot_i8_scalar(const QMat& w, int64_t n, const QAct& x, int64_t m) {
  const int8_t* wq = w.q + n * w.k;
  const float* ws = w.scales + n * (w.k / w.group);
  const int8_t* a = x.qrow(m);
  const float* as = x.srow(m);
  float total = 0.0f;
  for (int64_t g = 0; g < w.k / w.group; ++g) {
    int32_t dot = 0;
    for (int64_t i = g * w.group; i < (g + 1) * w.group; ++i) dot += static_cast<int32_t>(wq[i]) * a[i];
    total += (ws[g] * as[g * w.group / 32]) * static_cast<float>(dot);
  }
  return total;
}

inline float dot_i4_scalar(const QMat& w, int64_t n, const QAct& x, int64_t m) {
  const uint8_t* p = w.packed + n * (w.k / 2);
  const float* d = w.d + n * w.supers();
  const float* dmin = w.dmin + n * w.supers();
  const uint8_t* sc = w.sc + n * (w.k / 32);
  const uint8_t* mn = w.mn + n * (w.k / 32);
  const int8_t* a = x.qrow(m);
  const float* as = x.srow(m);
  const int32_t* sums = x.sumrow(m);
  float total = 0.0f, mins = 0.0f;
  for (int64_t g = 0; g < w.k / 32; ++g) {
    int32_t dot = 0;
    for (int i = 0; i < 16; ++i) {
      dot += static_cast<int32_t>(p[16 * g + i] & 0x0F) * a[32 * g + i];
      dot += static_cast<int32_t>(p[16 * g + i] >> 4) * a[32 * g + i + 16];
    }
    total += ((d[g / 8] * static_cast<float>(sc[g])) * as[g]) * static_cast<float>(dot);
    mins += ((dmin[g / 8] * static_cast<float>(mn[g])) * as[g]) * static_cast<float>(sums[g]);
  }
  return total - mins;
}

#ifdef GLM_AVX2
// 32 u8 x 32 s8 products summed by fours into 8 int32 lanes (lane i: bytes 4i..4i+3).
template <bool Vnni>
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef GLM_VNNI
  if constexpr (Vnni) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#endif
  }
#endif
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// int8 weights times int8 activations, 8 int32 lanes (the sign trick: see the top of the file)
template <bool Vnni>
inline __m256i dot_s8s8(__m256i w, __m256i a) {
  return dot_u8s8<Vnni>(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
}

inline __m256 lane(__m256 v, int j) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(j)); }

template <bool Vnni>
float dot_i8g32(const QMat& w, int64_t n, const QAct& x, int64_t m) {
  const int8_t* wq = w.q + n * w.k;
  const float* ws = w.scales + n * (w.k / 32);
  const int8_t* a = x.qrow(m);
  const float* as = x.srow(m);
  const int64_t blocks = w.k / 32;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {  // eight groups: their eight scales multiplied in one go
    const __m256 s8 = _mm256_mul_ps(_mm256_loadu_ps(ws + b), _mm256_loadu_ps(as + b));
#pragma GCC unroll 8
    for (int j = 0; j < 8; j += 2) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * (b + j)));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * (b + j + 1)));
      const __m256i p0 = dot_s8s8<Vnni>(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * (b + j))));
      const __m256i p1 =
          dot_s8s8<Vnni>(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * (b + j + 1))));
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), lane(s8, j), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), lane(s8, j + 1), acc1);
    }
  }
  for (; b < blocks; ++b) {
    const __m256i p = dot_s8s8<Vnni>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * b)),
                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * b)));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ws[b] * as[b]), acc0);
  }
  return sum8(_mm256_add_ps(acc0, acc1));
}

template <bool Vnni>
float dot_i8g16(const QMat& w, int64_t n, const QAct& x, int64_t m) {
  const int8_t* wq = w.q + n * w.k;
  const float* ws = w.scales + n * (w.k / 16);
  const int8_t* a = x.qrow(m);
  const float* as = x.srow(m);
  const int64_t blocks = w.k / 32;
  // lanes 0-3 of a block's product are its first group of 16, lanes 4-7 its second
  const __m256i halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const __m128 s4 = _mm_mul_ps(_mm_loadu_ps(ws + 2 * b), _mm_setr_ps(as[b], as[b], as[b + 1], as[b + 1]));
    const __m256 s8 = _mm256_castps128_ps256(s4);
    const __m256i p0 = dot_s8s8<Vnni>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * b)),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * b)));
    const __m256i p1 = dot_s8s8<Vnni>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * b + 32)),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * b + 32)));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_permutevar8x32_ps(s8, halves), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1),
                           _mm256_permutevar8x32_ps(s8, _mm256_add_epi32(halves, _mm256_set1_epi32(2))), acc1);
  }
  for (; b < blocks; ++b) {
    const __m256 s8 = _mm256_setr_m128(_mm_set1_ps(ws[2 * b] * as[b]), _mm_set1_ps(ws[2 * b + 1] * as[b]));
    const __m256i p = dot_s8s8<Vnni>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * b)),
                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * b)));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s8, acc0);
  }
  return sum8(_mm256_add_ps(acc0, acc1));
}

// One group of 32 int4 weights (16 bytes: element i in the low nibble of byte i, element i+16 in its high nibble)
// as 32 u8 in element order.
inline __m256i unpack_i4(const uint8_t* bytes) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  return _mm256_and_si256(_mm256_setr_m128i(v, _mm_srli_epi16(v, 4)), _mm256_set1_epi8(0x0F));
}

// Two groups of int4 weights against their activations in pair order: lanes 0-3 the first group's sum, 4-7 the
// second's. AVX2: each vpmaddubsw pair sum is at most 2 * 15 * 127, so the two halves add in int16 exactly.
template <bool Vnni>
inline __m256i dot_i4_pair(__m256i lo, __m256i a_lo, __m256i hi, __m256i a_hi) {
#ifdef GLM_VNNI
  if constexpr (Vnni) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, a_lo), hi, a_hi);
#else
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, a_lo), hi, a_hi);
#endif
  }
#endif
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_maddubs_epi16(hi, a_hi)),
                           _mm256_set1_epi16(1));
}

// Needs x.pairs (QActBuffer::pair_order): 32 packed bytes (two groups) are split by one mask and one shift into
// the first and the second halves of both groups, which meet the activations in that order.
template <bool Vnni>
float dot_i4(const QMat& w, int64_t n, const QAct& x, int64_t m) {
  const uint8_t* p = w.packed + n * (w.k / 2);
  const float* d = w.d + n * w.supers();
  const float* dmin = w.dmin + n * w.supers();
  const uint8_t* sc = w.sc + n * (w.k / 32);
  const uint8_t* mn = w.mn + n * (w.k / 32);
  const int8_t* a = x.prow(m);
  const float* as = x.srow(m);
  const int32_t* sums = x.sumrow(m);
  const int64_t groups = w.k / 32;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  auto pair = [&](int64_t g) {  // groups g and g + 1 (g even) -> 8 int32 lanes
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * g));
    return dot_i4_pair<Vnni>(_mm256_and_si256(v, nibble),
                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * g)),
                             _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble),
                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * g + 32)));
  };
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), mins = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {  // one whole super-block: its eight scales and minimums in one go
    const int64_t s = g / 8;
    const __m256 as8 = _mm256_loadu_ps(as + g);
    const __m256 sc8 =
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + g))));
    const __m256 mn8 =
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + g))));
    const __m256 ds8 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(d[s]), sc8), as8);
    const __m256 dm8 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(dmin[s]), mn8), as8);
    mins = _mm256_fmadd_ps(dm8, _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums + g))),
                           mins);
    const __m256i first = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i two = _mm256_set1_epi32(2);
    const __m256i second = _mm256_add_epi32(first, two), third = _mm256_add_epi32(second, two);
    const __m256i fourth = _mm256_add_epi32(third, two);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair(g)), _mm256_permutevar8x32_ps(ds8, first), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair(g + 2)), _mm256_permutevar8x32_ps(ds8, second), acc1);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair(g + 4)), _mm256_permutevar8x32_ps(ds8, third), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair(g + 6)), _mm256_permutevar8x32_ps(ds8, fourth), acc1);
  }
  // The groups of a partial last super-block (K not a multiple of 256): pairs, then an odd last group.
  float tail_mins = 0.0f;
  auto scale = [&](int64_t i) { return (d[i / 8] * static_cast<float>(sc[i])) * as[i]; };
  for (; g < groups; ++g)
    tail_mins += ((dmin[g / 8] * static_cast<float>(mn[g])) * as[g]) * static_cast<float>(sums[g]);
  for (g = groups / 8 * 8; g + 2 <= groups; g += 2)
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair(g)),
                           _mm256_setr_m128(_mm_set1_ps(scale(g)), _mm_set1_ps(scale(g + 1))), acc0);
  if (g < groups) {
    const __m256i pr = dot_u8s8<Vnni>(unpack_i4(p + 16 * g),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * g)));
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr), _mm256_set1_ps(scale(g)), acc0);
  }
  return sum8(_mm256_add_ps(acc0, acc1)) - (sum8(mins) + tail_mins);
}

// ---- Four activation rows at once (prefill and batched decode) ------------------------------------------------
// One weight row against rows m..m+3 of x: the weight is loaded and unpacked once for the four, and its per-group
// scale factors (d * sc, dmin * mn) are computed once; each row keeps its own accumulators, and every product and
// rounding is the one-row kernel's, so only the order of fp32 additions differs from it.

template <bool Vnni>
void dot4_i8g32(const QMat& w, int64_t n, const QAct& x, int64_t m, float* y, int64_t ldy) {
  constexpr int R = 4;
  const int8_t* wq = w.q + n * w.k;
  const float* ws = w.scales + n * (w.k / 32);
  const int64_t blocks = w.k / 32;
  const int8_t* a[R];
  const float* as[R];
  __m256 acc[R];
  for (int r = 0; r < R; ++r) {
    a[r] = x.qrow(m + r);
    as[r] = x.srow(m + r);
    acc[r] = _mm256_setzero_ps();
  }
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    const __m256 ws8 = _mm256_loadu_ps(ws + b);
    __m256 s8[R];
    for (int r = 0; r < R; ++r) s8[r] = _mm256_mul_ps(ws8, _mm256_loadu_ps(as[r] + b));
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * (b + j)));
      const __m256i wabs = _mm256_sign_epi8(wv, wv);
      for (int r = 0; r < R; ++r) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r] + 32 * (b + j)));
        const __m256i p = dot_u8s8<Vnni>(wabs, _mm256_sign_epi8(av, wv));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), lane(s8[r], j), acc[r]);
      }
    }
  }
  for (; b < blocks; ++b) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * b));
    for (int r = 0; r < R; ++r) {
      const __m256i p = dot_s8s8<Vnni>(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r] + 32 * b)));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(ws[b] * as[r][b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[(m + r) * ldy + n] = sum8(acc[r]);
}

template <bool Vnni>
void dot4_i4(const QMat& w, int64_t n, const QAct& x, int64_t m, float* y, int64_t ldy) {
  constexpr int R = 4;
  const uint8_t* p = w.packed + n * (w.k / 2);
  const float* d = w.d + n * w.supers();
  const float* dmin = w.dmin + n * w.supers();
  const uint8_t* sc = w.sc + n * (w.k / 32);
  const uint8_t* mn = w.mn + n * (w.k / 32);
  const int64_t groups = w.k / 32;
  const int8_t* a[R];
  const float* as[R];
  const int32_t* sums[R];
  __m256 acc[R], mins[R];
  float tail_mins[R];
  for (int r = 0; r < R; ++r) {
    a[r] = x.prow(m + r);
    as[r] = x.srow(m + r);
    sums[r] = x.sumrow(m + r);
    acc[r] = _mm256_setzero_ps();
    mins[r] = _mm256_setzero_ps();
    tail_mins[r] = 0.0f;
  }
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const int64_t s = g / 8;
    const __m256 sc8 =
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + g))));
    const __m256 mn8 =
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + g))));
    const __m256 dsc = _mm256_mul_ps(_mm256_set1_ps(d[s]), sc8);
    const __m256 dmn = _mm256_mul_ps(_mm256_set1_ps(dmin[s]), mn8);
    __m256 ds8[R];
    for (int r = 0; r < R; ++r) {
      const __m256 as8 = _mm256_loadu_ps(as[r] + g);
      ds8[r] = _mm256_mul_ps(dsc, as8);
      mins[r] = _mm256_fmadd_ps(
          _mm256_mul_ps(dmn, as8),
          _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums[r] + g))), mins[r]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 8; j += 2) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * (g + j)));
      const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      const __m256i index = _mm256_setr_epi32(j, j, j, j, j + 1, j + 1, j + 1, j + 1);
      for (int r = 0; r < R; ++r) {
        const int8_t* ar = a[r] + 32 * (g + j);
        const __m256i pr = dot_i4_pair<Vnni>(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar)), hi,
                                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar + 32)));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr), _mm256_permutevar8x32_ps(ds8[r], index), acc[r]);
      }
    }
  }
  const int64_t tail = g;
  for (int r = 0; r < R; ++r) {
    for (g = tail; g < groups; ++g)
      tail_mins[r] += ((dmin[g / 8] * static_cast<float>(mn[g])) * as[r][g]) * static_cast<float>(sums[r][g]);
    auto scale = [&](int64_t i) { return (d[i / 8] * static_cast<float>(sc[i])) * as[r][i]; };
    const uint8_t* pw = p;
    for (g = tail; g + 2 <= groups; g += 2) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw + 16 * g));
      const __m256i pr = dot_i4_pair<Vnni>(
          _mm256_and_si256(v, nibble), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r] + 32 * g)),
          _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r] + 32 * g + 32)));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr),
                               _mm256_setr_m128(_mm_set1_ps(scale(g)), _mm_set1_ps(scale(g + 1))), acc[r]);
    }
    if (g < groups) {
      const __m256i pr = dot_u8s8<Vnni>(unpack_i4(pw + 16 * g),
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r] + 32 * g)));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr), _mm256_set1_ps(scale(g)), acc[r]);
    }
    y[(m + r) * ldy + n] = sum8(acc[r]) - (sum8(mins[r]) + tail_mins[r]);
  }
}
#endif

using DotFn = float (*)(const QMat&, int64_t, const QAct&, int64_t);
using Dot4Fn = void (*)(const QMat&, int64_t, const QAct&, int64_t, float*, int64_t);

struct Kernel {  // a weight row against one activation row, and (where there is one) against four
  DotFn one;
  Dot4Fn four = nullptr;
};

// The kernel for w on `isa`; int4 ones above scalar read x.pairs, so without them the scalar kernel serves.
inline Kernel dot_fn(const QMat& w, int isa, const QAct& x) {
  if (w.bits == 4 && x.pairs == nullptr) isa = kScalar;
#ifdef GLM_VNNI
  if (isa >= kVnni) {
    if (w.bits == 4) return {dot_i4<true>, dot4_i4<true>};
    return w.group == 32 ? Kernel{dot_i8g32<true>, dot4_i8g32<true>} : Kernel{dot_i8g16<true>};
  }
#endif
#ifdef GLM_AVX2
  if (isa >= kAvx2) {
    if (w.bits == 4) return {dot_i4<false>, dot4_i4<false>};
    return w.group == 32 ? Kernel{dot_i8g32<false>, dot4_i8g32<false>} : Kernel{dot_i8g16<false>};
  }
#endif
  return {w.bits == 4 ? dot_i4_scalar : dot_i8_scalar};
}

inline bool needs_pairs(const QMat& w, int isa) { return w.bits == 4 && isa >= kAvx2; }

// ---- Matrix products ------------------------------------------------------------------------------------------

// Activation rows per tile and weight rows per block: a tile (64 x K int8) and a block of weight rows (16 x K)
// stay in L2 while every weight row of the block meets every activation row of the tile.
constexpr int64_t kTileRows = 64;
constexpr int64_t kBlockRows = 16;

// y[m * ldy + n] = sum_k w[n, k] x[m, k] for weight rows n in [first, last) and activation rows m in [0, rows).
inline void qgemm_range(Kernel dot, const QMat& w, const QAct& x, int64_t rows, float* y, int64_t ldy,
                        int64_t first, int64_t last) {
  for (int64_t n0 = first; n0 < last; n0 += kBlockRows) {
    const int64_t n1 = std::min(last, n0 + kBlockRows);
    for (int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
      const int64_t m1 = std::min(rows, m0 + kTileRows);
      for (int64_t n = n0; n < n1; ++n) {
        int64_t m = m0;
        if (dot.four != nullptr)
          for (; m + 4 <= m1; m += 4) dot.four(w, n, x, m, y, ldy);
        for (; m < m1; ++m) y[m * ldy + n] = dot.one(w, n, x, m);
      }
    }
  }
}

// Weight rows per chunk of work: ~kChunkBytes of weights (a decode step reads its weights once: chunks of equal
// bytes are chunks of equal time), fewer where many activation rows make each weight row's work large (prefill),
// so that each thread gets several chunks; a multiple of 4, at least 4.
inline int64_t chunk_rows(const QMat& w, int64_t rows) {
  const int64_t by_bytes = glm_cpu::kChunkBytes / std::max<int64_t>(1, w.bytes_per_row());
  const int64_t by_work = (int64_t{1} << 22) / std::max<int64_t>(1, w.k * std::max<int64_t>(rows, 1));
  return std::max<int64_t>(4, std::min(by_bytes, by_work) / 4 * 4);
}

// Several matrices of one input (q, k and v; gate and up), each into its columns of y (part p's first column is
// the sum of the earlier parts' N), all their chunks in one job over the threads.
inline void qgemm_parts(const std::vector<QMat>& parts, const QAct& x, int64_t rows, float* y, int64_t ldy, int isa) {
  struct Chunk {
    int part;
    int64_t first, last;
  };
  std::vector<Chunk> chunks;
  std::vector<Kernel> kernels;
  std::vector<int64_t> columns;
  int64_t column = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    const QMat& w = parts[p];
    kernels.push_back(dot_fn(w, isa, x));
    columns.push_back(column);
    column += w.n;
    const int64_t step = chunk_rows(w, rows);
    for (int64_t n = 0; n < w.n; n += step) chunks.push_back({static_cast<int>(p), n, std::min(w.n, n + step)});
  }
  glm_cpu::parallel_chunks(static_cast<int64_t>(chunks.size()), [&](int64_t c, int) {
    const Chunk& chunk = chunks[c];
    qgemm_range(kernels[chunk.part], parts[chunk.part], x, rows, y + columns[chunk.part], ldy, chunk.first,
                chunk.last);
  });
}

// All output rows, shared out over the threads.
inline void qgemm(const QMat& w, const QAct& x, int64_t rows, float* y, int64_t ldy, int isa) {
  const Kernel dot = dot_fn(w, isa, x);
  glm_cpu::parallel_range(w.n, chunk_rows(w, rows), [&](int64_t begin, int64_t end) {
    qgemm_range(dot, w, x, rows, y, ldy, begin, end);
  });
}

// ---- Prefill through a bf16 GEMM -------------------------------------------------------------------------------
// Where the CPU multiplies bf16 natively (AVX512-BF16, AMX-BF16), a product of many activation rows runs faster as
// ATen's bf16 GEMM (oneDNN) over weights dequantized to bf16 than as the integer kernels above: their per-group
// fp32 scaling costs two vector ops per 32 multiply-adds, the GEMM's none. Measured on an AMD EPYC (Zen 4,
// AVX512-BF16, no AMX), x [512, 4096] @ w [14336, 4096] at one thread: bf16 GEMM 107 GMAC/s against 50 (int8) and
// 62 (int4) for the integer kernels; with AMX the gap is wider still. The weights are dequantized a block of rows
// at a time (blockquant.dequantize's fp32 numbers, rounded to nearest-even bf16) into a buffer that stays in cache,
// and each block is one GEMM into its columns of the result. The numbers are then blockquant.linear_bf16_reference's
// (x in bf16, not quantized, times the bf16 weights, fp32 accumulation, one rounding to bf16), not
// linear_q8a_reference's: this path runs only for bf16 activations, which it takes as they are.
//
// Which products take it is glm_kernels.quant_linear's choice (bf16 x of many rows, on CPUs with native bf16, by
// default): `quantized_linear(x, weight, bf16_gemm=True)`.

// fp32 -> bf16, round to nearest even (c10::BFloat16's rounding for finite values; weights have no NaN)
inline uint16_t bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#ifdef GLM_AVX2
// 8 fp32 -> 8 bf16 (bf16_bits' rounding) at out
inline void store_bf16x8(uint16_t* out, __m256 values) {
  const __m256i bits = _mm256_castps_si256(values);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed);
}

// 8 u8 or s8 values (the low 8 bytes of v) as fp32
inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 s8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
#endif

// Weight rows [first, last) of w, dequantized (fp32: int8 scale * q; int4 (d * sc) * q - (dmin * mn), a product
// then a difference, as blockquant.dequantize) and rounded to bf16 into out [last - first, K].
inline void dequantize_rows_bf16(const QMat& w, int64_t first, int64_t last, uint16_t* out) {
  const int64_t groups = w.k / 32;
  for (int64_t n = first; n < last; ++n) {
    uint16_t* o = out + (n - first) * w.k;
    if (w.bits == 8) {
      const int8_t* q = w.q + n * w.k;
      const float* scales = w.scales + n * (w.k / w.group);
      for (int64_t i0 = 0; i0 < w.k; i0 += w.group) {
        const float s = scales[i0 / w.group];
        int64_t i = i0;
#ifdef GLM_AVX2
        for (; i + 8 <= i0 + w.group; i += 8)
          store_bf16x8(o + i, _mm256_mul_ps(_mm256_set1_ps(s), s8x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)))));
#endif
        for (; i < i0 + w.group; ++i) o[i] = bf16_bits(s * static_cast<float>(q[i]));
      }
    } else {
      const uint8_t* p = w.packed + n * (w.k / 2);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t at = n * groups + g, super = n * w.supers() + g / 8;
        const float scale = w.d[super] * static_cast<float>(w.sc[at]);
        const float minimum = w.dmin[super] * static_cast<float>(w.mn[at]);
        const uint8_t* bytes = p + 16 * g;
        uint16_t* og = o + 32 * g;
#ifdef GLM_AVX2
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
        const __m128i nibble = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(v, nibble), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
        const __m256 s8 = _mm256_set1_ps(scale), m8 = _mm256_set1_ps(minimum);
        auto put = [&](uint16_t* at8, __m128i q8) { store_bf16x8(at8, _mm256_sub_ps(_mm256_mul_ps(s8, u8x8(q8)), m8)); };
        put(og, lo);
        put(og + 8, _mm_srli_si128(lo, 8));
        put(og + 16, hi);
        put(og + 24, _mm_srli_si128(hi, 8));
#else
        for (int i = 0; i < 16; ++i) {
          og[i] = bf16_bits(scale * static_cast<float>(bytes[i] & 0x0F) - minimum);
          og[i + 16] = bf16_bits(scale * static_cast<float>(bytes[i] >> 4) - minimum);
        }
#endif
      }
    }
  }
}

// x [M, K] bf16 (contiguous) -> out [M, N] bf16 = x @ dequantize(w).bfloat16().T, block of weight rows by block.
inline void bf16_gemm_linear(const QMat& w, const Tensor& x, Tensor& out) {
  // ~8 MiB of bf16 weights per block: large enough for the GEMM to run at speed, small enough to stay in L3.
  const int64_t block = std::min(w.n, std::max<int64_t>(64, (int64_t{8} << 20) / (2 * w.k) / 64 * 64));
  Tensor weights = at::empty({block, w.k}, x.options());
  uint16_t* buffer = reinterpret_cast<uint16_t*>(weights.data_ptr<c10::BFloat16>());
  for (int64_t n0 = 0; n0 < w.n; n0 += block) {
    const int64_t rows = std::min(block, w.n - n0);
    glm_cpu::parallel_range(rows, 16, [&](int64_t begin, int64_t end) {
      dequantize_rows_bf16(w, n0 + begin, n0 + end, buffer + begin * w.k);
    });
    out.narrow(1, n0, rows).copy_(at::mm(x, weights.narrow(0, 0, rows).t()));
  }
}

// The weight as bf16 [N, K] (blockquant.dequantize(w, torch.bfloat16)'s numbers): the bf16 GEMM's weights, for
// tests.
inline Tensor dequantize_bf16(const std::vector<Tensor>& weight) {
  const QMat w = make_qmat(weight, 0, "dequantize_bf16");
  Tensor out = at::empty({w.n, w.k}, weight[0].options().dtype(at::kBFloat16));
  glm_cpu::parallel_range(w.n, 16, [&](int64_t begin, int64_t end) {
    dequantize_rows_bf16(w, begin, end, reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()) + begin * w.k);
  });
  return out;
}

// ---- One linear ----------------------------------------------------------------------------------------------

// out [rows, N] (fp32, row stride ldo) <- in [rows, K] @ w.T for in of any float type T (row stride `stride`)
template <typename T>
void qlinear_rows(const QMat& w, const T* in, int64_t stride, int64_t rows, float* out, int64_t ldo,
                  QActBuffer& buf) {
  const int isa = isa_setting().load();
  quantize_rows<T>(in, stride, rows, w.k, buf);
  if (needs_pairs(w, isa)) buf.pair_order(rows);
  qgemm(w, buf.view(), rows, out, ldo, isa);
}

inline void check_input(const Tensor& x, int64_t k, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                                      x.scalar_type() == at::kHalf),
              what, ": x must be a float32, bfloat16 or float16 CPU tensor, got ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, what, ": x must be [M, K] with K=", k, ", got ", x.sizes());
}

// x [M, K] -> [M, N] in x's dtype (computed in fp32): blockquant.linear_q8a_reference's contract, or with
// bf16_gemm (bf16 x) linear_bf16_reference's (see "Prefill through a bf16 GEMM").
inline Tensor quantized_linear(const Tensor& x_in, const std::vector<Tensor>& weight, bool bf16_gemm) {
  const QMat w = make_qmat(weight, 0, "quantized_linear");
  check_input(x_in, w.k, "quantized_linear");
  TORCH_CHECK(!bf16_gemm || x_in.scalar_type() == at::kBFloat16, "quantized_linear: bf16_gemm takes bf16 x, got ",
              x_in.scalar_type());
  c10::InferenceMode guard;
  const Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t rows = x.size(0);
  if (bf16_gemm && rows > 0 && w.n > 0) {
    Tensor out = at::empty({rows, w.n}, x.options());
    bf16_gemm_linear(w, x.is_contiguous() ? x : x.contiguous(), out);
    return out;
  }
  Tensor out = at::empty({rows, w.n}, x.options().dtype(at::kFloat));
  if (rows == 0 || w.n == 0) return out.to(x.scalar_type());
  QActBuffer buf;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantized_linear", [&] {
    qlinear_rows<scalar_t>(w, x.data_ptr<scalar_t>(), x.stride(0), rows, out.data_ptr<float>(), w.n, buf);
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

inline std::tuple<Tensor, Tensor, Tensor> quantize_activations(const Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % 32 == 0, "quantize_activations: x must be [M, K] with K a ",
              "multiple of 32, got ", x_in.sizes());
  check_input(x_in, x_in.size(1), "quantize_activations");
  c10::InferenceMode guard;
  const Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), k = x.size(1);
  QActBuffer buf;
  buf.resize(rows, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_activations", [&] {
    quantize_rows<scalar_t>(x.data_ptr<scalar_t>(), k, rows, k, buf);
  });
  Tensor q = at::empty({rows, k}, x.options().dtype(at::kChar));
  Tensor scales = at::empty({rows, k / 32}, x.options().dtype(at::kFloat));
  Tensor sums = at::empty({rows, k / 32}, x.options().dtype(at::kInt));
  std::copy_n(buf.q.data(), rows * k, q.data_ptr<int8_t>());
  std::copy_n(buf.scales.data(), rows * (k / 32), scales.data_ptr<float>());
  std::copy_n(buf.sums.data(), rows * (k / 32), sums.data_ptr<int32_t>());
  return {q, scales, sums};
}

// ---- Routed experts -------------------------------------------------------------------------------------------

// Scratch of the routed experts, kept between calls by the decode step.
struct MoeScratch {
  std::vector<int64_t> order, starts, token_of;  // pairs sorted by expert; each expert's first sorted pair
  std::vector<float> pair_weight, gate_up, hidden, down;
  QActBuffer x_q, sorted_q, hidden_q;
  glm_cpu::Profile* profile = nullptr;  // where the phases' times go, if anywhere
};

// The routed experts of `tokens` rows: x [tokens, D] (any float type T, row stride D), ids / weights [tokens, K]
// -> acc [tokens, D] fp32 (overwritten): sum over each token's K experts of weight * down(silu(gate) * up), with
// the hidden activations and each expert's output rounded to T as the torch path does. Every (expert, block of
// weight rows) pair of a step is one task over torch's threads: one parallel region for gate_up, one for down.
// With bf16_min_rows > 0 (bf16 x only), an expert given at least that many rows runs both its products as bf16
// GEMMs instead ("Prefill through a bf16 GEMM": linear_bf16_reference's numbers for that expert).
template <typename T>
void qmoe(const QMat& gate_up, const QMat& down, const T* x, int64_t tokens, const int64_t* ids,
          const float* weights, int64_t top_k, float* acc, MoeScratch& s, int64_t bf16_min_rows = 0) {
  const int64_t experts = gate_up.experts, dim = gate_up.k, width = down.k, pairs = tokens * top_k;
  TORCH_CHECK(down.experts == experts && gate_up.n == 2 * width && down.n == dim, "quantized_fused_moe: gate_up ",
              "[E, 2I, D] and down [E, D, I] do not fit: E=", experts, "/", down.experts, ", 2I=", gate_up.n,
              ", I=", width, ", D=", dim, "/", down.n);
  std::fill(acc, acc + tokens * dim, 0.0f);
  if (pairs == 0) return;
  std::optional<glm_cpu::Timed> part(std::in_place, s.profile, "experts.sort_quantize");
  for (int64_t p = 0; p < pairs; ++p)
    TORCH_CHECK(ids[p] >= 0 && ids[p] < experts, "quantized_fused_moe: expert id ", ids[p], " out of [0, ", experts,
                ")");
  // Stable counting sort of the (token, slot) pairs by expert.
  s.starts.assign(experts + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) s.starts[ids[p] + 1] += 1;
  for (int64_t e = 0; e < experts; ++e) s.starts[e + 1] += s.starts[e];
  s.order.resize(pairs);
  {
    std::vector<int64_t> next(s.starts.begin(), s.starts.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) s.order[next[ids[p]]++] = p;
  }
  // Quantize each token once, then lay its rows out in expert order (int8 copies).
  quantize_rows<T>(x, dim, tokens, dim, s.x_q);
  s.sorted_q.resize(pairs, dim);
  const int64_t blocks = dim / 32;
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t t = s.order[i] / top_k;
    std::copy_n(s.x_q.q.data() + t * dim, dim, s.sorted_q.q.data() + i * dim);
    std::copy_n(s.x_q.scales.data() + t * blocks, blocks, s.sorted_q.scales.data() + i * blocks);
    std::copy_n(s.x_q.sums.data() + t * blocks, blocks, s.sorted_q.sums.data() + i * blocks);
  }
  // Experts with enough rows for the bf16 GEMM (bf16 x only); the integer kernels take the others.
  std::vector<char> by_gemm(experts, 0);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t e = 0; bf16_min_rows > 0 && e < experts; ++e)
      by_gemm[e] = s.starts[e + 1] - s.starts[e] >= bf16_min_rows;
  }
  // in [rows, K] (bf16, from `row(i, dst)` for each of the expert's sorted rows) -> out's rows (fp32) via bf16 GEMM
  auto gemm = [&](const QMat& w, int64_t e, float* out, int64_t ldo, const std::function<void(int64_t, c10::BFloat16*)>& row) {
    const int64_t first = s.starts[e], rows = s.starts[e + 1] - first;
    Tensor in = at::empty({rows, w.k}, at::TensorOptions().dtype(at::kBFloat16));
    for (int64_t i = 0; i < rows; ++i) row(first + i, in.data_ptr<c10::BFloat16>() + i * w.k);
    Tensor result = at::empty({rows, w.n}, in.options());
    bf16_gemm_linear(w.expert(e), in, result);
    const c10::BFloat16* r = result.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < w.n; ++j) out[(first + i) * ldo + j] = static_cast<float>(r[i * w.n + j]);
  };
  // Tasks: (expert, first weight row) for every expert that got rows.
  const int isa_now = isa_setting().load();
  auto run = [&](const QMat& w, const QAct& in, float* out, int64_t ldo) {
    std::vector<std::pair<int64_t, int64_t>> tasks;
    int64_t rows_max = 1;
    for (int64_t e = 0; e < experts; ++e) rows_max = std::max(rows_max, s.starts[e + 1] - s.starts[e]);
    const int64_t block = chunk_rows(w, rows_max);
    for (int64_t e = 0; e < experts; ++e)
      if (s.starts[e + 1] > s.starts[e] && !by_gemm[e])
        for (int64_t n = 0; n < w.n; n += block) tasks.push_back({e, n});
    const Kernel dot = dot_fn(w, isa_now, in);
    glm_cpu::parallel_chunks(static_cast<int64_t>(tasks.size()), [&](int64_t t, int) {
      const auto [e, n] = tasks[t];
      const int64_t first = s.starts[e], rows = s.starts[e + 1] - first;
      const QAct rows_in = in.from(first);
      qgemm_range(dot, w.expert(e), rows_in, rows, out + first * ldo, ldo, n, std::min(n + block, w.n));
    });
  };
  s.gate_up.resize(pairs * 2 * width);
  if (needs_pairs(gate_up, isa_now)) s.sorted_q.pair_order(pairs);
  part.emplace(s.profile, "experts.gate_up");
  run(gate_up, s.sorted_q.view(), s.gate_up.data(), 2 * width);
  for (int64_t e = 0; e < experts; ++e)
    if (by_gemm[e])
      gemm(gate_up, e, s.gate_up.data(), 2 * width, [&](int64_t i, c10::BFloat16* dst) {
        std::memcpy(dst, x + (s.order[i] / top_k) * dim, dim * sizeof(c10::BFloat16));
      });
  part.emplace(s.profile, "experts.silu_quantize");
  s.hidden.resize(pairs * width);
  for (int64_t i = 0; i < pairs; ++i) {
    const float* g = s.gate_up.data() + i * 2 * width;
    float* h = s.hidden.data() + i * width;
    for (int64_t j = 0; j < width; ++j) h[j] = static_cast<float>(cast<T>(silu(g[j]) * g[j + width]));
  }
  quantize_rows<float>(s.hidden.data(), width, pairs, width, s.hidden_q);
  s.down.resize(pairs * dim);
  if (needs_pairs(down, isa_now)) s.hidden_q.pair_order(pairs);
  part.emplace(s.profile, "experts.down");
  run(down, s.hidden_q.view(), s.down.data(), dim);
  for (int64_t e = 0; e < experts; ++e)
    if (by_gemm[e])
      gemm(down, e, s.down.data(), dim, [&](int64_t i, c10::BFloat16* dst) {
        // the hidden activations are bf16 values already (rounded to T above): exact
        for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<c10::BFloat16>(s.hidden[i * width + j]);
      });
  part.emplace(s.profile, "experts.sum");
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t p = s.order[i], t = p / top_k;
    const float w = weights[p];
    const float* y = s.down.data() + i * dim;
    float* a = acc + t * dim;
    for (int64_t j = 0; j < dim; ++j) a[j] += w * static_cast<float>(cast<T>(y[j]));
  }
}

// x [T, D], topk_ids / topk_weights [T, K] -> [T, D] in x's dtype: fused_moe_reference's contract with stacked
// quantized experts (gate_up [E, 2I, D], down [E, D, I]).
inline Tensor quantized_fused_moe(const Tensor& x_in, const std::vector<Tensor>& w_gate_up,
                                  const std::vector<Tensor>& w_down, const Tensor& topk_ids,
                                  const Tensor& topk_weights, int64_t bf16_min_rows) {
  const QMat gate_up = make_qmat(w_gate_up, 1, "quantized_fused_moe (gate_up)");
  const QMat down = make_qmat(w_down, 1, "quantized_fused_moe (down)");
  check_input(x_in, gate_up.k, "quantized_fused_moe");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x_in.size(0) && topk_weights.sizes() == topk_ids.sizes(),
              "quantized_fused_moe: topk_ids and topk_weights must both be [T, K] with T=", x_in.size(0));
  c10::InferenceMode guard;
  const Tensor x = x_in.contiguous();
  const Tensor ids = topk_ids.to(at::kLong).contiguous();
  const Tensor weights = topk_weights.to(at::kFloat).contiguous();
  const int64_t tokens = x.size(0);
  Tensor acc = at::empty({tokens, gate_up.k}, x.options().dtype(at::kFloat));
  MoeScratch scratch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantized_fused_moe", [&] {
    qmoe<scalar_t>(gate_up, down, x.data_ptr<scalar_t>(), tokens, ids.data_ptr<int64_t>(), weights.data_ptr<float>(),
                   ids.size(1), acc.data_ptr<float>(), scratch, bf16_min_rows);
  });
  return x.scalar_type() == at::kFloat ? acc : acc.to(x.scalar_type());
}

}  // namespace glm_quant

inline void bind_quant_kernels(pybind11::module& m) {
  m.def("quantized_linear", &glm_quant::quantized_linear, pybind11::arg("x"), pybind11::arg("weight"),
        pybind11::arg("bf16_gemm") = false);
  m.def("quantized_fused_moe", &glm_quant::quantized_fused_moe, pybind11::arg("x"), pybind11::arg("w_gate_up"),
        pybind11::arg("w_down"), pybind11::arg("topk_ids"), pybind11::arg("topk_weights"),
        pybind11::arg("bf16_min_rows") = 0);
  m.def("quantize_activations", &glm_quant::quantize_activations, pybind11::arg("x"));
  m.def("dequantize_bf16", &glm_quant::dequantize_bf16, pybind11::arg("weight"));
  m.def("isa", &glm_quant::isa);
  m.def("set_isa", &glm_quant::set_isa, pybind11::arg("name"));
  m.def("best_isa", [] { return std::string(glm_quant::kIsaNames[glm_quant::best_isa()]); });
}
