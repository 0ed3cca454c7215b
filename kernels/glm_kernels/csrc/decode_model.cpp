// DecodeModel: one decode step of a whole GLM-4.5 MoE model, for one or many sequences, in one call from Python
// (the engine's CompiledCPURunner, workbench/engine/runner.py, feeds it the model's weights and cache pools).
//
// (Over 600 lines: one decode step of the whole model, float and quantized, read top to bottom as the torch path.)
//
// Why the decode step exists: at decode sizes (a few tokens, hidden 256 to 4096) a torch op costs a few
// microseconds of Python and dispatch whatever its size, and a decoder layer is ~40 of them; the arithmetic of a
// small model is less than that. Here a step is a handful of matrix-vector products per layer (our AVX2 loops for
// the checkpoints' row-major matrices, ATen's gemv/gemm, i.e. MKL, for the column-major fused ones) and plain loops
// for everything elementwise (norms, rotary, cache write, attention over the paged cache, the router's selection,
// SwiGLU), with every buffer allocated once. With several sequences, each weight row is read once for all of them
// and each routed expert runs once on the rows that chose it.
//
// Threads (torch.set_num_threads): every matrix product (its parts, e.g. q/k/v, as one job), the routed experts'
// (expert, row chunk) pairs and the attention heads are shared out over simd.h's ThreadPool, whose threads claim
// chunks as they come free; the rest of a step (norms, rotary, router, SwiGLU, sums) is ~1% of its time at
// GLM-4.5-Air's width and runs on the caller. Python's lock is released during a step.
//
// The contract is the engine's torch path (workbench/engine/model.py with glm_kernels' references), step for step:
// the same casts to the model dtype at the same places, fp32 statistics, the router in fp32 with the correction
// bias used for selection only, group-limited top-k with ties to the lower expert index, expert outputs summed in
// fp32. tests/engine/test_compiled_decode.py holds it to the torch path over the model's configuration space.
//
// Shape legend: D hidden, H query heads, Hk kv heads, Dh head dim, R rotary dims, E experts, K experts per token,
// I expert (or MLP) width, V vocab, B sequences in a decode step. Weights come as [out, in] matrices, any strides.
//
// Quantized weights (glm_kernels.blockquant; kernels in quant_kernels.cpp): any of the linears' keys below --
// qkv_weight, o_weight, mlp_gate_up, mlp_down, experts_gate_up, experts_down, and lm_head in the constructor's
// `quantized` map (then lm_head=None) -- may instead come as the tensors of a quantized weight under the key plus
// a suffix, contiguous (glm_kernels.quant_linear.decode_step_weight(name, qw) writes them):
//   Int8Weight:  NAME.q int8 [.., N, K], NAME.scales fp32 [.., N, K / group]            (group 32 or 16)
//   Int4Weight:  NAME.packed uint8 [.., N, K / 2], NAME.d and NAME.dmin fp32 [.., N, ceil(K / 256)],
//                NAME.sc and NAME.mn uint8 [.., N, K / 32]
// (experts stacked [E, N, K]). The fused matrices may also come in their parts, so that nothing is copied to fuse
// them: q_weight, k_weight, v_weight for qkv_weight (the bias stays one fused qkv_bias), mlp_gate and mlp_up for
// mlp_gate_up; each part may be of its own format. A quantized linear quantizes its input rows to 8 bits per block
// of 32 once, computes every part in fp32 into its columns, adds the bias and rounds once to the model dtype;
// quantized routed experts follow glm_kernels.quant_linear.quantized_fused_moe (gate_up in fp32, hidden and expert
// outputs rounded to the dtype). The router, norms, embeddings and biases stay float.

#pragma once  // compiled as part of module.cpp

#include "simd.h"

namespace {

using namespace glm_cpu;

using at::Tensor;
using TensorMap = std::map<std::string, Tensor>;

// One quantized linear, as one matrix or as several stacked along N (q, k, v; gate, up), each computed into its
// columns of the output.
struct QLinear {
  std::vector<glm_quant::QMat> parts;
  bool defined() const { return !parts.empty(); }
  int64_t n() const {
    int64_t total = 0;
    for (const auto& part : parts) total += part.n;
    return total;
  }
};

// A quantized weight under `key` (its tensors at key + ".q" etc., see the top), or an undefined QMat; its tensors
// are kept alive in `keep`.
glm_quant::QMat take_quantized(const TensorMap& map, const std::string& key, int lead, std::vector<Tensor>& keep) {
  std::vector<std::string> suffixes;
  if (map.count(key + ".q")) {
    suffixes = {".q", ".scales"};
  } else if (map.count(key + ".packed")) {
    suffixes = {".packed", ".d", ".dmin", ".sc", ".mn"};
  } else {
    return {};
  }
  std::vector<Tensor> parts;
  for (const auto& suffix : suffixes) {
    auto it = map.find(key + suffix);
    TORCH_CHECK(it != map.end() && it->second.defined(), "cpu_decode: quantized weight '", key, "' lacks '", key,
                suffix, "'");
    parts.push_back(it->second);
  }
  keep.insert(keep.end(), parts.begin(), parts.end());
  return glm_quant::make_qmat(parts, lead, ("cpu_decode: " + key).c_str());
}

// The quantized linear `fused` (one matrix), or its parts `split` (each its own matrix, stacked along N in this
// order), or an undefined QLinear where neither is given.
QLinear take_quantized_linear(const TensorMap& map, const std::string& fused, const std::vector<std::string>& split,
                              std::vector<Tensor>& keep) {
  QLinear linear;
  const glm_quant::QMat whole = take_quantized(map, fused, 0, keep);
  if (whole.defined()) {
    linear.parts.push_back(whole);
    return linear;
  }
  for (const auto& key : split) {
    const glm_quant::QMat part = take_quantized(map, key, 0, keep);
    if (part.defined()) linear.parts.push_back(part);
  }
  TORCH_CHECK(linear.parts.empty() || linear.parts.size() == split.size(), "cpu_decode: quantized '", fused,
              "' given in parts needs all of them (", split.size(), "), got ", linear.parts.size());
  for (const auto& part : linear.parts)
    TORCH_CHECK(part.k == linear.parts[0].k, "cpu_decode: the parts of '", fused, "' differ in K");
  return linear;
}

Tensor take(const TensorMap& map, const std::string& key, bool required = true) {
  auto it = map.find(key);
  if (it == map.end() || !it->second.defined()) {
    TORCH_CHECK(!required, "cpu_decode: layer weights lack '", key, "'");
    return Tensor();
  }
  return it->second;
}

struct Mlp {  // SwiGLU: dense layers and the shared expert
  Tensor gate_up;  // [2I, D]: gate rows then up rows
  Tensor down;     // [D, I]
  QLinear gate_up_q, down_q;  // quantized instead, where given
};

struct Layer {
  Tensor input_norm, post_norm;  // [D]
  Tensor qkv_weight, qkv_bias;   // [H*Dh + 2*Hk*Dh, D], [same] or undefined
  Tensor q_norm, k_norm;         // [Dh] or undefined (no qk-norm)
  Tensor o_weight;               // [D, H*Dh]
  bool is_moe = false;
  Mlp mlp;                        // dense layer, or the shared expert of a MoE layer
  bool has_mlp = false;
  Tensor router_weight, router_bias;          // [E, D] fp32, [E] fp32
  Tensor experts_gate_up, experts_down;       // [E, 2I, D], [E, D, I]
  Tensor k_cache, v_cache;                    // [blocks, block_size, Hk, Dh]
  QLinear qkv_q, o_q;                                   // quantized instead, where given
  glm_quant::QMat experts_gate_up_q, experts_down_q;  // quantized instead, where given
  std::vector<Tensor> quantized;  // the tensors the QMats point into
};

class DecodeModel {
 public:
  DecodeModel(const std::vector<TensorMap>& layers, Tensor embed, Tensor final_norm, std::optional<Tensor> lm_head,
              Tensor inv_freq, const std::map<std::string, double>& config, const TensorMap& quantized)
      : embed_(std::move(embed)), final_norm_(std::move(final_norm)), lm_head_(lm_head.value_or(Tensor())),
        inv_freq_(inv_freq.to(at::kFloat).contiguous()) {
    lm_head_q_ = take_quantized_linear(quantized, "lm_head", {}, lm_head_parts_);
    TORCH_CHECK(lm_head_.defined() != lm_head_q_.defined(),
                "cpu_decode: give the lm_head either as a float tensor or quantized (lm_head.q / lm_head.packed in "
                "`quantized`), not both or neither");
    auto get = [&](const char* key) {
      auto it = config.find(key);
      TORCH_CHECK(it != config.end(), "cpu_decode: config lacks '", key, "'");
      return it->second;
    };
    heads_ = static_cast<int64_t>(get("num_heads"));
    kv_heads_ = static_cast<int64_t>(get("num_kv_heads"));
    head_dim_ = static_cast<int64_t>(get("head_dim"));
    rotary_dim_ = inv_freq_.numel() * 2;
    eps_ = static_cast<float>(get("rms_norm_eps"));
    top_k_ = static_cast<int64_t>(get("top_k"));
    n_group_ = static_cast<int64_t>(get("n_group"));
    topk_group_ = static_cast<int64_t>(get("topk_group"));
    norm_topk_prob_ = get("norm_topk_prob") != 0.0;
    scaling_ = static_cast<float>(get("routed_scaling_factor"));
    block_size_ = static_cast<int64_t>(get("block_size"));
    TORCH_CHECK(heads_ % kv_heads_ == 0, "cpu_decode: heads must be a multiple of kv heads");
    TORCH_CHECK(rotary_dim_ <= head_dim_, "cpu_decode: rotary dims exceed the head dim");

    dtype_ = embed_.scalar_type();
    TORCH_CHECK(final_norm_.is_contiguous() && final_norm_.scalar_type() == embed_.scalar_type(),
                "cpu_decode: the final norm weight must be contiguous, of the embedding's dtype");
    TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kBFloat16 || dtype_ == at::kHalf,
                "cpu_decode: float32, bfloat16 or float16 weights only");
    hidden_ = embed_.size(1);
    for (const auto& map : layers) {
      Layer layer;
      layer.input_norm = take(map, "input_norm");
      layer.post_norm = take(map, "post_norm");
      layer.qkv_q =
          take_quantized_linear(map, "qkv_weight", {"q_weight", "k_weight", "v_weight"}, layer.quantized);
      layer.qkv_weight = take(map, "qkv_weight", !layer.qkv_q.defined());
      layer.qkv_bias = take(map, "qkv_bias", false);
      layer.q_norm = take(map, "q_norm", false);
      layer.k_norm = take(map, "k_norm", false);
      layer.o_q = take_quantized_linear(map, "o_weight", {}, layer.quantized);
      layer.o_weight = take(map, "o_weight", !layer.o_q.defined());
      layer.k_cache = take(map, "k_cache");
      layer.v_cache = take(map, "v_cache");
      TORCH_CHECK(layer.k_cache.is_contiguous() && layer.v_cache.is_contiguous() &&
                      layer.k_cache.scalar_type() == dtype_ && layer.v_cache.scalar_type() == dtype_,
                  "cpu_decode: the KV cache must be contiguous and of the model dtype");
      layer.router_weight = take(map, "router_weight", false);
      layer.is_moe = layer.router_weight.defined();
      if (layer.is_moe) {
        layer.router_weight = layer.router_weight.to(at::kFloat);
        layer.router_bias = take(map, "router_bias").to(at::kFloat).contiguous();
        layer.experts_gate_up_q = take_quantized(map, "experts_gate_up", 1, layer.quantized);
        layer.experts_down_q = take_quantized(map, "experts_down", 1, layer.quantized);
        TORCH_CHECK(layer.experts_gate_up_q.defined() == layer.experts_down_q.defined(),
                    "cpu_decode: quantize both expert weights (gate_up and down) or neither");
        if (layer.experts_gate_up_q.defined()) {
          TORCH_CHECK(layer.experts_gate_up_q.experts == layer.router_weight.size(0),
                      "cpu_decode: quantized experts and router disagree on the number of experts");
        } else {
          layer.experts_gate_up = take(map, "experts_gate_up");
          layer.experts_down = take(map, "experts_down");
          widest_ = std::max(widest_, layer.experts_gate_up.size(1));
        }
        num_experts_ = layer.router_weight.size(0);
        num_moe_layers_ += 1;
      }
      layer.mlp.gate_up_q =
          take_quantized_linear(map, "mlp_gate_up", {"mlp_gate", "mlp_up"}, layer.quantized);
      layer.mlp.gate_up = take(map, "mlp_gate_up", !layer.is_moe && !layer.mlp.gate_up_q.defined());
      layer.has_mlp = layer.mlp.gate_up.defined() || layer.mlp.gate_up_q.defined();
      if (layer.has_mlp) {
        layer.mlp.down_q = take_quantized_linear(map, "mlp_down", {}, layer.quantized);
        layer.mlp.down = take(map, "mlp_down", !layer.mlp.down_q.defined());
        widest_ = std::max(widest_,
                           layer.mlp.gate_up_q.defined() ? layer.mlp.gate_up_q.n() : layer.mlp.gate_up.size(0));
      }
      for (const Tensor* t : {&layer.input_norm, &layer.post_norm, &layer.qkv_weight, &layer.o_weight,
                              &layer.mlp.gate_up, &layer.mlp.down, &layer.experts_gate_up, &layer.experts_down,
                              &layer.qkv_bias, &layer.q_norm, &layer.k_norm})
        TORCH_CHECK(!t->defined() || (t->scalar_type() == dtype_ && t->device().is_cpu()),
                    "cpu_decode: every weight but the router's must be of the embedding's dtype, on the CPU");
      for (const Tensor* t : {&layer.input_norm, &layer.post_norm, &layer.qkv_bias, &layer.q_norm, &layer.k_norm})
        TORCH_CHECK(!t->defined() || t->is_contiguous(), "cpu_decode: norm weights and biases must be contiguous");
      layers_.push_back(std::move(layer));
    }
    if (num_moe_layers_ > 0) {
      TORCH_CHECK(num_experts_ % n_group_ == 0 && n_group_ >= 1 && topk_group_ >= 1 && topk_group_ <= n_group_,
                  "cpu_decode: experts must split into n_group groups, topk_group in [1, n_group]");
      TORCH_CHECK(top_k_ >= 1 && top_k_ <= num_experts_, "cpu_decode: top_k out of range");
    }
    reserve(1);
  }

  // One new token for each of B sequences: tokens [B] int64, positions [B] int64 (0-based; each sequence's cache
  // holds its positions before), block_tables [B, W] int32 (row b: sequence b's blocks, padded).
  // Returns logits [B, V] fp32 and, when asked, the routing of these tokens in the routing trace's compact types:
  // ids [L_moe, B, K] int16, weights [L_moe, B, K] float16, and with `scores` the sigmoid scores [L_moe, B, E]
  // float16 (None where not asked).
  std::vector<Tensor> step(const Tensor& tokens, const Tensor& positions, const Tensor& block_tables, bool routing,
                           bool scores) {
    c10::InferenceMode guard;
    // Python's lock is released during a step (the binding's call_guard: a server's other threads run meanwhile);
    // this one keeps two threads from stepping one model, whose buffers a step reuses, at once.
    std::lock_guard<std::mutex> one_at_a_time(step_mutex_);
    TORCH_CHECK(tokens.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && tokens.dim() == 1 &&
                    positions.sizes() == tokens.sizes() && tokens.is_contiguous() && positions.is_contiguous(),
                "cpu_decode: tokens and positions must be contiguous 1-D int64 tensors of one length");
    TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.is_contiguous() &&
                    block_tables.size(0) == tokens.size(0),
                "cpu_decode: block_tables must be a contiguous [B, blocks] int32 tensor, a row per token");
    const int64_t batch = tokens.size(0), width = block_tables.size(1);
    TORCH_CHECK(batch > 0, "cpu_decode: no tokens");
    const int64_t* token = tokens.data_ptr<int64_t>();
    const int64_t* position = positions.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(position[b] >= 0 && position[b] / block_size_ < width, "cpu_decode: position ", position[b],
                  " lies past the sequence's ", width, " blocks");
      TORCH_CHECK(token[b] >= 0 && token[b] < embed_.size(0), "cpu_decode: token id ", token[b], " out of range");
    }
    reserve(batch);
    Tensor ids, weights, all_scores;
    if (routing) {
      ids = at::empty({num_moe_layers_, batch, top_k_}, at::kShort);
      weights = at::empty({num_moe_layers_, batch, top_k_}, at::kHalf);
    }
    if (routing && scores) all_scores = at::empty({num_moe_layers_, batch, num_experts_}, at::kHalf);
    Tensor logits;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype_, "cpu_decode_step", [&] {
      logits = run<scalar_t>(batch, token, position, block_tables.data_ptr<int32_t>(), width, ids, weights,
                             all_scores);
    });
    return {logits, ids, weights, all_scores};
  }

  // Profiling: while on, each step adds the wall time of its parts (embed_rotary, norms, qkv, attention, o_proj,
  // router, experts and its experts.* phases, shared_expert, dense_mlp, lm_head, logits_out) to `profile()`.
  void set_profiling(bool on) { profile_.on = on; }
  // Seconds per part since the last call (and resets them).
  std::map<std::string, double> profile() { return std::exchange(profile_.seconds, {}); }

 private:
  // Buffers for `batch` rows, allocated once and again only when a larger batch comes.
  void reserve(int64_t batch) {
    if (batch <= capacity_) return;
    capacity_ = batch;
    auto opts = at::TensorOptions().dtype(dtype_);
    const int64_t q_width = heads_ * head_dim_, kv_width = kv_heads_ * head_dim_;
    const int64_t pairs = batch * std::max<int64_t>(top_k_, 1);  // rows an expert can be given at most
    x_ = at::zeros({batch, hidden_}, opts);
    residual_ = at::zeros({batch, hidden_}, opts);
    normed_ = at::zeros({batch, hidden_}, opts);
    qkv_ = at::zeros({batch, q_width + 2 * kv_width}, opts);
    attn_ = at::zeros({batch, q_width}, opts);
    gate_up_ = at::zeros({pairs, std::max<int64_t>(widest_, 2)}, opts);
    act_ = at::zeros({pairs, std::max<int64_t>(widest_ / 2, 1)}, opts);
    expert_in_ = at::zeros({pairs, hidden_}, opts);
    expert_out_ = at::zeros({pairs, hidden_}, opts);
    shared_out_ = at::zeros({batch, hidden_}, opts);
    accum_ = at::zeros({batch, hidden_}, at::kFloat);
    router_logits_ = at::zeros({batch, std::max<int64_t>(num_experts_, 1)}, at::kFloat);
  }

  template <typename T>
  Tensor run(int64_t batch, const int64_t* token, const int64_t* position, const int32_t* block_tables,
             int64_t width, Tensor& ids, Tensor& weights, Tensor& scores) {
    batch_ = batch;
    Tensor x = x_.narrow(0, 0, batch);
    std::optional<Timed> part(std::in_place, &profile_, "embed_rotary");
    for (int64_t b = 0; b < batch; ++b) x[b].copy_(embed_[token[b]]);
    cos_.resize(batch * rotary_dim_);
    sin_.resize(batch * rotary_dim_);
    const int64_t half = rotary_dim_ / 2;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < half; ++i) {  // rotary_cos_sin: fp32 angle, cos/sin cast to the dtype
        const float angle = static_cast<float>(position[b]) * inv_freq_.data_ptr<float>()[i];
        cos_[b * rotary_dim_ + i] = cos_[b * rotary_dim_ + i + half] = static_cast<float>(cast<T>(std::cos(angle)));
        sin_[b * rotary_dim_ + i] = sin_[b * rotary_dim_ + i + half] = static_cast<float>(cast<T>(std::sin(angle)));
      }
    }
    part.reset();
    int64_t moe_index = 0;
    bool first = true;
    for (auto& layer : layers_) {
      part.emplace(&profile_, "norms");
      add_norm<T>(layer.input_norm, first);
      part.reset();
      first = false;
      attention<T>(layer, position, block_tables, width);
      // o_proj writes straight into x_: the next norm adds the residual.
      part.emplace(&profile_, "o_proj");
      linear<T>(x, layer.o_weight, layer.o_q, Tensor(), attn_.narrow(0, 0, batch));
      part.emplace(&profile_, "norms");
      add_norm<T>(layer.post_norm, false);
      part.reset();
      if (layer.is_moe) {
        moe<T>(layer, layer_slice(ids, moe_index), layer_slice(weights, moe_index), layer_slice(scores, moe_index));
        ++moe_index;
      } else {
        Timed dense(&profile_, "dense_mlp");
        swiglu<T>(layer.mlp, normed_.narrow(0, 0, batch), x);
      }
    }
    part.emplace(&profile_, "norms");
    add_norm<T>(final_norm_, false);
    part.emplace(&profile_, "lm_head");
    const int64_t vocab = lm_head_q_.defined() ? lm_head_q_.n() : lm_head_.size(0);
    // Quantized: fp32 logits, each rounded to the dtype as the torch path's are (linear does both in one pass).
    Tensor logits = at::empty({batch, vocab}, at::TensorOptions().dtype(lm_head_q_.defined() ? at::kFloat
                                                                                              : lm_head_.scalar_type()));
    linear<T>(logits, lm_head_, lm_head_q_, Tensor(), normed_.narrow(0, 0, batch));
    if (logits.scalar_type() == at::kFloat) return logits;
    part.emplace(&profile_, "logits_out");
    // A plain loop rather than logits.to(kFloat): torch's cast is a parallel region of its own (see ThreadPool).
    Tensor out = at::empty({batch, vocab}, at::TensorOptions().dtype(at::kFloat));
    const T* src = logits.data_ptr<T>();
    float* dst = out.data_ptr<float>();
    for (int64_t i = 0; i < batch * vocab; ++i) dst[i] = static_cast<float>(src[i]);
    return out;
  }

  static Tensor layer_slice(const Tensor& t, int64_t layer) { return t.defined() ? t[layer] : Tensor(); }

  // out [n, N] <- in [n, K] @ w.T (+ bias): a torch linear on n rows (contiguous in and out). Row-contiguous
  // float/bfloat16 matrices go through gemv_rows, reading each weight row once for all n rows (fp32 accumulation,
  // one rounding to out's dtype); other layouts through ATen (MKL's gemv for one row, its gemm for more).
  // The same with a quantized weight where `q` is defined: in's rows quantized per block of 32, integer dot
  // products over torch's threads (quant_kernels.cpp), fp32, then the bias and one rounding to out's dtype.
  template <typename T>
  void linear(Tensor out, const Tensor& w, const QLinear& q, const Tensor& bias, const Tensor& in) {
    if (!q.defined()) return linear<T>(out, w, bias, in);
    const int64_t rows = in.size(0), n_out = q.n(), n_in = q.parts[0].k;
    TORCH_CHECK(in.size(1) == n_in && in.stride(1) == 1 && out.is_contiguous() && out.size(1) == n_out,
                "cpu_decode: a quantized linear's input or output does not fit its weight");
    y_out_.resize(rows * n_out);
    // The input rows quantized once for every part; each part fills its columns of y_out_.
    const int isa = glm_quant::isa_setting().load();
    glm_quant::quantize_rows<T>(in.data_ptr<T>(), in.stride(0), rows, n_in, qact_);
    bool pairs = false;
    for (const auto& part : q.parts) pairs = pairs || glm_quant::needs_pairs(part, isa);
    if (pairs) qact_.pair_order(rows);
    glm_quant::qgemm_parts(q.parts, qact_.view(), rows, y_out_.data(), n_out, isa);  // one job for all parts
    for (int64_t b = 0; b < rows; ++b) {
      const float* yb = y_out_.data() + b * n_out;
      const T* bv = bias.defined() ? bias.data_ptr<T>() : nullptr;
      if (out.scalar_type() == at::kFloat) {  // the logits: rounded to the dtype as the torch path's, kept in fp32
        float* o = out.data_ptr<float>() + b * n_out;
        for (int64_t i = 0; i < n_out; ++i) o[i] = static_cast<float>(cast<T>(bv ? yb[i] + static_cast<float>(bv[i]) : yb[i]));
      } else {
        T* o = out.data_ptr<T>() + b * n_out;
        for (int64_t i = 0; i < n_out; ++i) o[i] = cast<T>(bv ? yb[i] + static_cast<float>(bv[i]) : yb[i]);
      }
    }
  }

  template <typename T>
  void linear(Tensor out, const Tensor& w, const Tensor& bias, const Tensor& in) {
    const int64_t rows = in.size(0), n_out = w.size(0), n_in = w.size(1);
    const auto wtype = w.scalar_type();
    if (w.stride(1) != 1 || (wtype != at::kFloat && wtype != at::kBFloat16)) {
      TORCH_CHECK(out.scalar_type() == wtype, "cpu_decode: output and weight dtypes differ");
      const Tensor x = in.scalar_type() == wtype ? in : in.to(wtype);
      if (rows == 1) {
        Tensor out_row = out[0];
        if (bias.defined()) {
          at::addmv_out(out_row, bias, w, x[0]);
        } else {
          at::mv_out(out_row, w, x[0]);
        }
      } else if (bias.defined()) {
        at::addmm_out(out, bias, x, w.t());
      } else {
        at::mm_out(out, x, w.t());
      }
      return;
    }
    const float* x;
    if (in.scalar_type() == at::kFloat) {
      x = in.data_ptr<float>();
    } else {
      x_in_.resize(rows * n_in);
      const T* src = in.data_ptr<T>();
      for (int64_t k = 0; k < rows * n_in; ++k) x_in_[k] = static_cast<float>(src[k]);
      x = x_in_.data();
    }
    const bool direct = out.scalar_type() == at::kFloat && !bias.defined();
    y_out_.resize(rows * n_out);
    float* y = direct ? out.data_ptr<float>() : y_out_.data();
    if (wtype == at::kFloat) {
      gemv_rows<float>(w.data_ptr<float>(), w.stride(0), x, rows, n_in, n_out, y);
    } else {
      gemv_rows<c10::BFloat16>(w.data_ptr<c10::BFloat16>(), w.stride(0), x, rows, n_in, n_out, y);
    }
    if (direct) return;
    for (int64_t b = 0; b < rows; ++b) {
      const float* yb = y + b * n_out;
      if (out.scalar_type() == at::kFloat) {
        float* o = out.data_ptr<float>() + b * n_out;
        const float* bv = bias.data_ptr<float>();
        for (int64_t i = 0; i < n_out; ++i) o[i] = yb[i] + bv[i];
      } else {
        T* o = out.data_ptr<T>() + b * n_out;
        const T* bv = bias.defined() ? bias.data_ptr<T>() : nullptr;
        for (int64_t i = 0; i < n_out; ++i) o[i] = cast<T>(bv ? yb[i] + static_cast<float>(bv[i]) : yb[i]);
      }
    }
  }

  // For each row b: residual_[b] <- x_[b] (+ residual_[b]); normed_[b] <- weight * rms_norm(residual_[b])
  // (statistics in fp32, cast, then the weight, as the torch path).
  template <typename T>
  void add_norm(const Tensor& weight, bool first) {
    const T* w = weight.data_ptr<T>();
    for (int64_t b = 0; b < batch_; ++b) {
      T* x = x_.data_ptr<T>() + b * hidden_;
      T* res = residual_.data_ptr<T>() + b * hidden_;
      T* out = normed_.data_ptr<T>() + b * hidden_;
      float sum_sq = 0.0f;
      for (int64_t i = 0; i < hidden_; ++i) {
        const T h = first ? x[i] : cast<T>(static_cast<float>(x[i]) + static_cast<float>(res[i]));
        res[i] = h;
        const float hf = static_cast<float>(h);
        sum_sq += hf * hf;
      }
      const float inv = 1.0f / std::sqrt(sum_sq / static_cast<float>(hidden_) + eps_);
      for (int64_t i = 0; i < hidden_; ++i) {
        const T n = cast<T>(static_cast<float>(res[i]) * inv);
        out[i] = cast<T>(static_cast<float>(w[i]) * static_cast<float>(n));
      }
    }
  }

  template <typename T>
  void head_norm(T* head, const T* w) {  // qk-norm over one head's Dh values
    float sum_sq = 0.0f;
    for (int64_t d = 0; d < head_dim_; ++d) sum_sq += static_cast<float>(head[d]) * static_cast<float>(head[d]);
    const float inv = 1.0f / std::sqrt(sum_sq / static_cast<float>(head_dim_) + eps_);
    for (int64_t d = 0; d < head_dim_; ++d)
      head[d] = cast<T>(static_cast<float>(w[d]) * static_cast<float>(cast<T>(static_cast<float>(head[d]) * inv)));
  }

  // rotate-half on dims [0, R): (x1 cos - x2 sin, x2 cos + x1 sin), products in the dtype
  template <typename T>
  void rotate(T* head, const float* cos, const float* sin) {
    const int64_t half = rotary_dim_ / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(head[i]), x2 = static_cast<float>(head[i + half]);
      const float a = static_cast<float>(cast<T>(x1 * cos[i])), b = static_cast<float>(cast<T>(x2 * sin[i]));
      const float c = static_cast<float>(cast<T>(x2 * cos[i + half]));
      const float d = static_cast<float>(cast<T>(x1 * sin[i + half]));
      head[i] = cast<T>(a - b);
      head[i + half] = cast<T>(c + d);
    }
  }

  template <typename T>
  void attention(Layer& layer, const int64_t* position, const int32_t* block_tables, int64_t width) {
    Tensor qkv = qkv_.narrow(0, 0, batch_);
    {
      Timed part(&profile_, "qkv");
      linear<T>(qkv, layer.qkv_weight, layer.qkv_q, layer.qkv_bias, normed_.narrow(0, 0, batch_));
    }
    Timed part(&profile_, "attention");
    const int64_t q_width = heads_ * head_dim_, row = kv_heads_ * head_dim_, stride = q_width + 2 * row;
    const int64_t group = heads_ / kv_heads_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
    T* k_cache = layer.k_cache.data_ptr<T>();
    T* v_cache = layer.v_cache.data_ptr<T>();
    auto slot_of = [&](int64_t b, int64_t p) {  // sequence b's position p in the cache pools (times the row)
      const int32_t* table = block_tables + b * width;
      return (static_cast<int64_t>(table[p / block_size_]) * block_size_ + p % block_size_) * row;
    };
    // Per row: qk-norm, rotary, and this token's key and value into its cache slot (before any row reads them).
    for (int64_t b = 0; b < batch_; ++b) {
      T* q = qkv_.data_ptr<T>() + b * stride;
      T* k = q + q_width;
      T* v = k + row;
      if (layer.q_norm.defined()) {
        for (int64_t h = 0; h < heads_; ++h) head_norm<T>(q + h * head_dim_, layer.q_norm.data_ptr<T>());
        for (int64_t h = 0; h < kv_heads_; ++h) head_norm<T>(k + h * head_dim_, layer.k_norm.data_ptr<T>());
      }
      const float* cos = cos_.data() + b * rotary_dim_;
      const float* sin = sin_.data() + b * rotary_dim_;
      for (int64_t h = 0; h < heads_; ++h) rotate<T>(q + h * head_dim_, cos, sin);
      for (int64_t h = 0; h < kv_heads_; ++h) rotate<T>(k + h * head_dim_, cos, sin);

      std::copy(k, k + row, k_cache + slot_of(b, position[b]));
      std::copy(v, v + row, v_cache + slot_of(b, position[b]));
    }

    // Softmax attention of each query head over positions [0, position] of its kv head, in fp32: chunks of
    // (row, heads) over the threads, each head computed whole by one thread with its own scratch.
    int64_t longest = 1;
    for (int64_t b = 0; b < batch_; ++b) longest = std::max(longest, position[b] + 1);
    const int64_t per_chunk = std::clamp<int64_t>((int64_t{1} << 15) / (longest * head_dim_), 1, heads_);
    const int64_t chunks_per_row = (heads_ + per_chunk - 1) / per_chunk;
    attention_scratch_.resize(num_threads());
    parallel_chunks(batch_ * chunks_per_row, [&](int64_t chunk, int thread) {
      const int64_t b = chunk / chunks_per_row, first = chunk % chunks_per_row * per_chunk;
      const int64_t length = position[b] + 1;
      AttentionScratch& scratch = attention_scratch_[thread];
      scratch.probs.resize(length);
      scratch.out.resize(head_dim_);
      scratch.q.resize(head_dim_);
      const T* q = qkv_.data_ptr<T>() + b * stride;
      T* out = attn_.data_ptr<T>() + b * q_width;
      for (int64_t h = first; h < std::min(heads_, first + per_chunk); ++h) {
        const int64_t kv_head = h / group;
        for (int64_t d = 0; d < head_dim_; ++d) scratch.q[d] = static_cast<float>(q[h * head_dim_ + d]);
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < length; ++p) {
          scratch.probs[p] =
              dot<T>(scratch.q.data(), k_cache + slot_of(b, p) + kv_head * head_dim_, head_dim_) * scale;
          top = std::max(top, scratch.probs[p]);
        }
        const float total = exp_shifted(scratch.probs.data(), length, top);
        std::fill(scratch.out.begin(), scratch.out.end(), 0.0f);
        for (int64_t p = 0; p < length; ++p)
          axpy<T>(scratch.probs[p] / total, v_cache + slot_of(b, p) + kv_head * head_dim_, scratch.out.data(),
                  head_dim_);
        for (int64_t d = 0; d < head_dim_; ++d) out[h * head_dim_ + d] = cast<T>(scratch.out[d]);
      }
    });
  }

  // out [n, D] <- down(silu(gate(in)) * up(in)) for in [n, D], each product in the dtype as the torch path
  template <typename T>
  void swiglu(const Mlp& mlp, const Tensor& in, Tensor out) {
    swiglu<T>(mlp.gate_up, mlp.down, in, out, mlp.gate_up_q, mlp.down_q);
  }

  template <typename T>
  void swiglu(const Tensor& w_gate_up, const Tensor& w_down, const Tensor& in, Tensor out,
              const QLinear& gate_up_q = {}, const QLinear& down_q = {}) {
    const int64_t rows = in.size(0), width = (gate_up_q.defined() ? gate_up_q.n() : w_gate_up.size(0)) / 2;
    // Contiguous [rows, 2I] and [rows, I] views at the start of the (widest-sized) buffers.
    Tensor gate_up = gate_up_.view(-1).narrow(0, 0, rows * 2 * width).view({rows, 2 * width});
    linear<T>(gate_up, w_gate_up, gate_up_q, Tensor(), in);
    Tensor act = act_.view(-1).narrow(0, 0, rows * width).view({rows, width});
    for (int64_t b = 0; b < rows; ++b) {
      const T* g = gate_up.data_ptr<T>() + b * 2 * width;
      T* a = act.data_ptr<T>() + b * width;
      for (int64_t i = 0; i < width; ++i) {
        const float activated = static_cast<float>(cast<T>(silu(static_cast<float>(g[i]))));
        a[i] = cast<T>(activated * static_cast<float>(g[i + width]));
      }
    }
    linear<T>(out, w_down, down_q, Tensor(), act);
  }

  // Router of one row: fp32 sigmoid scores, correction bias for the choice only, group-limited top-k with ties to
  // the lower expert index (the reference's stable sort), then normalisation and scaling. Fills picked_/weights.
  void route_row(const float* logits, const float* bias, float* score) {
    const int64_t experts = num_experts_;
    choice_.resize(experts);
    for (int64_t e = 0; e < experts; ++e) {
      score[e] = 1.0f / (1.0f + std::exp(-logits[e]));
      choice_[e] = score[e] + bias[e];
    }
    if (n_group_ > 1) {  // keep the topk_group groups with the largest sum of their two best experts
      const int64_t size = experts / n_group_;
      group_scores_.resize(n_group_);
      for (int64_t g = 0; g < n_group_; ++g) {
        float best = -std::numeric_limits<float>::infinity(), second = best;
        for (int64_t e = g * size; e < (g + 1) * size; ++e) {
          if (choice_[e] > best) {
            second = best;
            best = choice_[e];
          } else if (choice_[e] > second) {
            second = choice_[e];
          }
        }
        group_scores_[g] = best + second;
      }
      kept_.assign(n_group_, false);
      for (int64_t r = 0; r < topk_group_; ++r) kept_[argmax_unkept(group_scores_, kept_)] = true;
      for (int64_t e = 0; e < experts; ++e)
        if (!kept_[e / size]) choice_[e] = -std::numeric_limits<float>::infinity();
    }
    chosen_.assign(experts, false);
    picked_.resize(top_k_);
    picked_weight_.resize(top_k_);
    float total = 0.0f;
    for (int64_t r = 0; r < top_k_; ++r) {
      const int64_t e = argmax_unkept(choice_, chosen_);
      chosen_[e] = true;
      picked_[r] = e;
      picked_weight_[r] = score[e];
      total += score[e];
    }
    for (int64_t r = 0; r < top_k_; ++r) {
      if (norm_topk_prob_) picked_weight_[r] = picked_weight_[r] / (total + 1e-20f);
      picked_weight_[r] *= scaling_;
    }
  }

  template <typename T>
  void moe(Layer& layer, Tensor ids_out, Tensor weights_out, Tensor scores_out) {
    const int64_t experts = num_experts_;
    Tensor normed = normed_.narrow(0, 0, batch_);
    std::optional<Timed> part(std::in_place, &profile_, "router");
    linear<T>(router_logits_.narrow(0, 0, batch_), layer.router_weight, Tensor(), normed);
    // Each row's choices, then the (row, weight) pairs of every expert: an expert's weights are read once a step.
    expert_rows_.assign(experts, {});
    scores_f32_.resize(experts);
    const bool quantized = layer.experts_gate_up_q.defined();
    if (quantized) {
      picked_all_.resize(batch_ * top_k_);
      picked_weight_all_.resize(batch_ * top_k_);
    }
    for (int64_t b = 0; b < batch_; ++b) {
      route_row(router_logits_.data_ptr<float>() + b * experts, layer.router_bias.data_ptr<float>(),
                scores_f32_.data());
      for (int64_t r = 0; r < top_k_; ++r) {
        if (quantized) {
          picked_all_[b * top_k_ + r] = picked_[r];
          picked_weight_all_[b * top_k_ + r] = picked_weight_[r];
        } else {
          expert_rows_[picked_[r]].push_back({b, picked_weight_[r]});
        }
        if (ids_out.defined()) {
          ids_out.data_ptr<int16_t>()[b * top_k_ + r] = static_cast<int16_t>(picked_[r]);
          weights_out.data_ptr<at::Half>()[b * top_k_ + r] = static_cast<at::Half>(picked_weight_[r]);
        }
      }
      if (scores_out.defined())
        for (int64_t e = 0; e < experts; ++e)
          scores_out.data_ptr<at::Half>()[b * experts + e] = static_cast<at::Half>(scores_f32_[e]);
    }

    // Routed experts, summed in fp32 with their weights, then the shared expert added in the dtype.
    part.emplace(&profile_, "experts");
    moe_scratch_.profile = &profile_;
    float* acc = accum_.data_ptr<float>();
    std::fill(acc, acc + batch_ * hidden_, 0.0f);
    if (quantized)  // every routed expert of the step at once, its rows split over the threads
      glm_quant::qmoe<T>(layer.experts_gate_up_q, layer.experts_down_q, normed_.data_ptr<T>(), batch_,
                         picked_all_.data(), picked_weight_all_.data(), top_k_, acc, moe_scratch_);
    for (int64_t e = 0; e < experts; ++e) {
      const auto& pairs = expert_rows_[e];
      if (pairs.empty()) continue;
      const int64_t rows = static_cast<int64_t>(pairs.size());
      Tensor in = expert_in_.narrow(0, 0, rows);
      for (int64_t i = 0; i < rows; ++i)
        std::copy_n(normed_.data_ptr<T>() + pairs[i].first * hidden_, hidden_, in.data_ptr<T>() + i * hidden_);
      Tensor out = expert_out_.narrow(0, 0, rows);
      swiglu<T>(layer.experts_gate_up[e], layer.experts_down[e], in, out);
      for (int64_t i = 0; i < rows; ++i) {
        const T* y = out.data_ptr<T>() + i * hidden_;
        float* a = acc + pairs[i].first * hidden_;
        const float weight = pairs[i].second;
        for (int64_t d = 0; d < hidden_; ++d) a[d] += weight * static_cast<float>(y[d]);
      }
    }
    part.emplace(&profile_, "shared_expert");
    T* x = x_.data_ptr<T>();
    if (layer.has_mlp) {
      Tensor shared = shared_out_.narrow(0, 0, batch_);
      swiglu<T>(layer.mlp, normed, shared);
      const T* s = shared.data_ptr<T>();
      for (int64_t i = 0; i < batch_ * hidden_; ++i)
        x[i] = cast<T>(static_cast<float>(cast<T>(acc[i])) + static_cast<float>(s[i]));
    } else {
      for (int64_t i = 0; i < batch_ * hidden_; ++i) x[i] = cast<T>(acc[i]);
    }
  }

  template <typename V>
  static int64_t argmax_unkept(const std::vector<float>& values, const V& taken) {
    int64_t best = -1;
    for (int64_t i = 0; i < static_cast<int64_t>(values.size()); ++i) {
      if (taken[i]) continue;
      if (best < 0 || values[i] > values[best]) best = i;
    }
    return best;
  }

  Tensor embed_, final_norm_, lm_head_, inv_freq_;
  std::vector<Layer> layers_;
  Profile profile_;
  std::mutex step_mutex_;
  at::ScalarType dtype_;
  int64_t hidden_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, rotary_dim_ = 0, block_size_ = 16;
  int64_t top_k_ = 1, n_group_ = 1, topk_group_ = 1, num_experts_ = 0, num_moe_layers_ = 0, widest_ = 0;
  bool norm_topk_prob_ = true;
  float eps_ = 1e-5f, scaling_ = 1.0f;
  int64_t capacity_ = 0, batch_ = 0;
  // Buffers [capacity, ...], allocated by reserve().
  Tensor x_, residual_, normed_, qkv_, attn_, gate_up_, act_, expert_in_, expert_out_, shared_out_, accum_,
      router_logits_;
  std::vector<float> x_in_, y_out_, cos_, sin_, choice_, group_scores_, picked_weight_, scores_f32_;
  struct AttentionScratch {
    std::vector<float> probs, out, q;
  };
  std::vector<AttentionScratch> attention_scratch_;  // one per thread
  std::vector<int64_t> picked_, picked_all_;
  std::vector<float> picked_weight_all_;
  QLinear lm_head_q_;
  std::vector<Tensor> lm_head_parts_;
  glm_quant::QActBuffer qact_;
  glm_quant::MoeScratch moe_scratch_;
  std::vector<std::vector<std::pair<int64_t, float>>> expert_rows_;
  std::vector<bool> kept_, chosen_;
};

}  // namespace

inline void bind_decode_model(pybind11::module& m) {
  pybind11::class_<DecodeModel>(m, "DecodeModel")
      .def(pybind11::init<const std::vector<TensorMap>&, Tensor, Tensor, std::optional<Tensor>, Tensor,
                          const std::map<std::string, double>&, const TensorMap&>(),
           pybind11::arg("layers"), pybind11::arg("embed"), pybind11::arg("final_norm"), pybind11::arg("lm_head"),
           pybind11::arg("inv_freq"), pybind11::arg("config"), pybind11::arg("quantized") = TensorMap{})
      .def("step", &DecodeModel::step, pybind11::call_guard<pybind11::gil_scoped_release>(),
           pybind11::arg("tokens"), pybind11::arg("positions"),
           pybind11::arg("block_tables"), pybind11::arg("routing") = false, pybind11::arg("scores") = false)
      .def("set_profiling", &DecodeModel::set_profiling, pybind11::arg("on"))
      .def("profile", &DecodeModel::profile);
}
