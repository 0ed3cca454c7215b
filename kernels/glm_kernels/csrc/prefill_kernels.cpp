// The compiled prefill kernels, each the fast twin of a torch reference it is tested against
// (tests/kernels/test_cpu_compiled.py): prefill_attention (causal attention of one sequence), fused_moe (the
// routed experts of many tokens) and rotary (the rotary embedding of many tokens), all in fp32.

#pragma once  // compiled as part of module.cpp

#include "simd.h"

namespace {

using namespace glm_cpu;

// row[0, valid) <- softmax(row[0, valid) * scale); row[valid, width) <- 0 (the causally masked keys).
void softmax_row(float* row, int64_t valid, int64_t width, float scale) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#ifdef GLM_AVX2
  const __m256 scale8 = _mm256_set1_ps(scale);
  __m256 top8 = _mm256_set1_ps(top);
  for (; i + 8 <= valid; i += 8) {
    const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(row + i), scale8);
    _mm256_storeu_ps(row + i, scaled);
    top8 = _mm256_max_ps(top8, scaled);
  }
  top = max8(top8);
#endif
  for (; i < valid; ++i) {
    row[i] *= scale;
    top = std::max(top, row[i]);
  }
  const float inv = 1.0f / exp_shifted(row, valid, top);
  for (i = 0; i < valid; ++i) row[i] *= inv;
  std::fill(row + valid, row + width, 0.0f);
}

// Causal attention of one sequence in fp32: q [Tq, H, Dh], k and v [Tk, Hk, Dh] with Tk >= Tq, the queries being
// the last Tq positions (query i sees keys j <= i + Tk - Tq) -> [Tq, H, Dh]. prefill_attention_reference's contract.
//
// torch's flash kernel runs a 64-dim-or-smaller head at ~20 GFLOP/s on one AVX2 core (its per-head blocks are too
// thin for the GEMMs, and its exp is not the cost it could be); here the `group` query heads that share a kv head
// are packed together, so each block of query positions is one [positions * group, Dh] x [Dh, keys] GEMM, one
// softmax pass per row with a vectorised exp, and one [.., keys] x [keys, Dh] GEMM, over the keys up to the
// block's causal end only.
Tensor prefill_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t block_rows) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "prefill_attention: q [Tq, H, Dh], k/v [Tk, Hk, Dh]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "prefill_attention: float32 CPU tensors only");
  const int64_t num_q = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t num_k = k.size(0), kv_heads = k.size(1);
  TORCH_CHECK(k.size(2) == head_dim && kv_heads > 0 && heads % kv_heads == 0 && num_k >= num_q,
              "prefill_attention: shapes q ", q.sizes(), ", k ", k.sizes(), " do not fit");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "prefill_attention: k and v need a contiguous head dim");
  c10::InferenceMode guard;
  const Tensor queries = q.contiguous();
  Tensor out = at::empty({num_q, heads, head_dim}, q.options());
  if (num_q == 0) return out;
  const int64_t group = heads / kv_heads, offset = num_k - num_q;
  const int64_t block = std::max<int64_t>(1, block_rows / group);  // query positions per block
  const int64_t max_rows = std::min(block, num_q) * group;
  Tensor packed = at::empty({max_rows, head_dim}, q.options());
  Tensor scores_buffer = at::empty({max_rows * num_k}, q.options());
  Tensor result = at::empty({max_rows, head_dim}, q.options());
  const float* q_data = queries.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  for (int64_t g = 0; g < kv_heads; ++g) {
    const Tensor keys = k.select(1, g), values = v.select(1, g);  // [Tk, Dh], rows Hk*Dh apart
    for (int64_t first = 0; first < num_q; first += block) {
      const int64_t last = std::min(first + block, num_q), rows = (last - first) * group, end = last + offset;
      float* pack = packed.data_ptr<float>();
      for (int64_t pos = first; pos < last; ++pos)  // row (pos - first) * group + j is head g * group + j at pos
        std::copy_n(q_data + (pos * heads + g * group) * head_dim, group * head_dim,
                    pack + (pos - first) * group * head_dim);
      Tensor scores = scores_buffer.narrow(0, 0, rows * end).view({rows, end});
      at::mm_out(scores, packed.narrow(0, 0, rows), keys.narrow(0, 0, end).t());
      float* s = scores.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r)
        softmax_row(s + r * end, first + r / group + offset + 1, end, static_cast<float>(scale));
      Tensor block_out = result.narrow(0, 0, rows);
      at::mm_out(block_out, scores, values.narrow(0, 0, end));
      const float* o = block_out.data_ptr<float>();
      for (int64_t pos = first; pos < last; ++pos)
        std::copy_n(o + (pos - first) * group * head_dim, group * head_dim,
                    out_data + (pos * heads + g * group) * head_dim);
    }
  }
  return out;
}

// The routed experts of many tokens in fp32 (prefill): fused_moe_reference's contract, with fewer passes over
// memory. (token, slot) pairs are ordered by expert with a counting sort (stable, as the reference's argsort),
// gathered once, and each expert's rows run as two GEMMs with SiLU(gate) * up * routing weight in one vectorised
// pass between them (the weight scales the [I]-wide hidden state instead of the [D]-wide output: the same
// product); the rows are then summed back per token in expert order, as the reference's index_add_ does.
Tensor fused_moe(const Tensor& x, const Tensor& w_gate_up, const Tensor& w_down, const Tensor& topk_ids,
                 const Tensor& topk_weights) {
  TORCH_CHECK(x.dim() == 2 && w_gate_up.dim() == 3 && w_down.dim() == 3 && topk_ids.dim() == 2 &&
                  topk_weights.sizes() == topk_ids.sizes() && topk_ids.size(0) == x.size(0),
              "fused_moe: x [T, D], w_gate_up [E, 2I, D], w_down [E, D, I], topk_ids/topk_weights [T, K]");
  const int64_t tokens = x.size(0), hidden = x.size(1), experts = w_gate_up.size(0);
  const int64_t width = w_down.size(2), top_k = topk_ids.size(1);
  TORCH_CHECK(w_gate_up.size(1) == 2 * width && w_gate_up.size(2) == hidden && w_down.size(0) == experts &&
                  w_down.size(1) == hidden,
              "fused_moe: expert shapes ", w_gate_up.sizes(), " and ", w_down.sizes(), " do not fit x ", x.sizes());
  for (const Tensor* t : {&x, &w_gate_up, &w_down, &topk_weights})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "fused_moe: float32 CPU tensors only");
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong, "fused_moe: topk_ids must be int64");
  c10::InferenceMode guard;
  const Tensor ids = topk_ids.contiguous(), weights = topk_weights.contiguous(), inputs = x.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t pairs = tokens * top_k;
  std::vector<int64_t> start(experts + 1, 0), order(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(id[p] >= 0 && id[p] < experts, "fused_moe: expert id ", id[p], " out of range [0, ", experts, ")");
    ++start[id[p] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) order[next[id[p]]++] = p;
  }
  Tensor rows = at::empty({pairs, hidden}, x.options());
  Tensor gate_up = at::empty({pairs, 2 * width}, x.options());
  Tensor hidden_act = at::empty({pairs, width}, x.options());
  Tensor expert_out = at::empty({pairs, hidden}, x.options());
  const float* in = inputs.data_ptr<float>();
  float* packed = rows.data_ptr<float>();
  for (int64_t i = 0; i < pairs; ++i) std::copy_n(in + (order[i] / top_k) * hidden, hidden, packed + i * hidden);
  const float* pair_weight = weights.data_ptr<float>();
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t first = start[e], count = start[e + 1] - first;
    if (count == 0) continue;
    Tensor gu = gate_up.narrow(0, first, count);
    at::mm_out(gu, rows.narrow(0, first, count), w_gate_up[e].t());
    for (int64_t i = first; i < first + count; ++i) {
      const float* g = gate_up.data_ptr<float>() + i * 2 * width;
      float* h = hidden_act.data_ptr<float>() + i * width;
      const float weight = pair_weight[order[i]];
      int64_t j = 0;
#ifdef GLM_AVX2
      const __m256 one = _mm256_set1_ps(1.0f), w8 = _mm256_set1_ps(weight);
      for (; j + 8 <= width; j += 8) {  // silu(g) = g / (1 + e^-g); e^-g <= 1 when g >= 0, else via e^g
        const __m256 gate = _mm256_loadu_ps(g + j);
        const __m256 neg_abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), gate);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), neg_abs));  // e^-|g|
        const __m256 positive = _mm256_div_ps(gate, _mm256_add_ps(one, e));
        const __m256 negative = _mm256_div_ps(_mm256_mul_ps(gate, e), _mm256_add_ps(one, e));
        const __m256 act = _mm256_blendv_ps(positive, negative, gate);  // sign bit of gate picks
        _mm256_storeu_ps(h + j, _mm256_mul_ps(_mm256_mul_ps(act, _mm256_loadu_ps(g + width + j)), w8));
      }
#endif
      for (; j < width; ++j) h[j] = silu(g[j]) * g[width + j] * weight;
    }
    Tensor out = expert_out.narrow(0, first, count);
    at::mm_out(out, hidden_act.narrow(0, first, count), w_down[e].t());
  }
  Tensor result = at::zeros({tokens, hidden}, x.options());
  float* sum = result.data_ptr<float>();
  const float* y = expert_out.data_ptr<float>();
  for (int64_t i = 0; i < pairs; ++i) {
    float* dst = sum + (order[i] / top_k) * hidden;
    const float* src = y + i * hidden;
    for (int64_t d = 0; d < hidden; ++d) dst[d] += src[d];
  }
  return result;
}

// Rotary embedding of many fp32 tokens (prefill): rotary_reference's contract (q [T, Hq, Dh], k [T, Hk, Dh],
// cos/sin [T, R] -> new rotated q and k), each head copied and rotated in one pass instead of torch's slices, cat
// and four products over the whole tensors.
std::vector<Tensor> rotary(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "rotary: q [T, Hq, Dh] and k [T, Hk, Dh]");
  const int64_t tokens = q.size(0), head_dim = q.size(2), rotary_dim = cos.size(-1), half = rotary_dim / 2;
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == tokens && sin.sizes() == cos.sizes() && rotary_dim % 2 == 0 &&
                  rotary_dim > 0 && rotary_dim <= head_dim,
              "rotary: cos/sin must be [T, R] with R even, at most the head dim");
  for (const Tensor* t : {&q, &k, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "rotary: float32 CPU tensors only");
  c10::InferenceMode guard;
  const Tensor c = cos.contiguous(), s = sin.contiguous();
  std::vector<Tensor> outputs;
  for (const Tensor* input : {&q, &k}) {
    const Tensor x = input->contiguous();
    Tensor out = at::empty_like(x);
    const int64_t heads = x.size(1);
    const float* src = x.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    for (int64_t t = 0; t < tokens; ++t) {
      const float* ct = c.data_ptr<float>() + t * rotary_dim;
      const float* st = s.data_ptr<float>() + t * rotary_dim;
      for (int64_t h = 0; h < heads; ++h) {
        const float* a = src + (t * heads + h) * head_dim;
        float* o = dst + (t * heads + h) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          o[i] = a[i] * ct[i] - a[i + half] * st[i];
          o[i + half] = a[i + half] * ct[i + half] + a[i] * st[i + half];
        }
        std::copy(a + rotary_dim, a + head_dim, o + rotary_dim);
      }
    }
    outputs.push_back(out);
  }
  return outputs;
}

}  // namespace

inline void bind_prefill_kernels(pybind11::module& m) {
  m.def("prefill_attention", &prefill_attention, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("scale"), pybind11::arg("block_rows") = 256);
  m.def("rotary", &rotary, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("cos"), pybind11::arg("sin"));
  m.def("fused_moe", &fused_moe, pybind11::arg("x"), pybind11::arg("w_gate_up"), pybind11::arg("w_down"),
        pybind11::arg("topk_ids"), pybind11::arg("topk_weights"));
}
