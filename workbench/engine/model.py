"""The GLM-4.5 MoE transformer (`Glm4MoeForCausalLM`), in call order, in one file.

Owns the modules and the forward pass; knows nothing of files, tokenizers or sampling. Hot operations go
through a `KernelOps` table (torch references or Triton kernels, chosen once by the engine).

Tokens travel flattened: a forward pass takes T tokens from one or more sequences as one [T, D] matrix (which
is what the MoE wants: experts see rows, not sequences), and an `AttentionBatch` that says which rows belong to
which sequence and where each sequence keeps its keys and values in the paged cache.

Shape legend: T = tokens, D = hidden, H = query heads, Hk = kv heads, Dh = head dim, R = rotary dims,
E = routed experts, K = experts per token, I = expert width, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from glm_kernels.attention import gather_kv
from glm_kernels.quant_linear import decode_step_weight
from glm_kernels.rotary import rotary_cos_sin

from workbench.engine.config import GLMConfig
from workbench.engine.ops import TORCH_OPS, KernelOps
from workbench.engine.routing import RoutingRecorder


@dataclass
class Segment:
    """Rows [start, start + length) of the batch: one sequence's new tokens, at positions [cached, cached + length)."""

    start: int
    length: int
    # Tokens of this sequence already in the cache: a prefill that continues after them (a cached prefix). The
    # scheduler prefills whole sequences today (0); kept, and held correct by tests/engine/test_prefill_rows.py,
    # for prefix caching and chunked prefill, which continue a sequence this way.
    cached: int = 0
    block_table: torch.Tensor | None = None  # [blocks] int32, when the sequence lives in the cache


@dataclass
class AttentionBatch:
    """How the T rows of a forward pass map onto sequences.

    Exactly one of three forms:
    - `uniform_len`: T = B * S rows, B independent sequences of S tokens from position 0, no cache (training, logits);
    - `segments`: prefill, each segment a run of new tokens of one sequence (possibly after a cached prefix);
    - `decode`: one new token per sequence; `block_tables` [B, max_blocks] and `seq_lens` [B] (own token included).
    `slot_mapping` [T] says where each new row's key and value go in the cache (None without a cache).
    """

    positions: torch.Tensor
    uniform_len: int | None = None
    segments: list[Segment] | None = None
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None

    @property
    def last_rows(self) -> list[int]:
        """Each segment's last row (segments form): the rows whose next-token logits a prefill wants."""
        return [seg.start + seg.length - 1 for seg in self.segments]

    @classmethod
    def uniform(cls, batch: int, seq_len: int, device: torch.device) -> AttentionBatch:
        positions = torch.arange(seq_len, device=device).repeat(batch)
        return cls(positions=positions, uniform_len=seq_len)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: KernelOps, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """Grouped-query attention with q/k/v bias, optional qk-norm, partial rotary embedding, paged KV cache."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

        self.fused_qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # by fuse_projections()
        # int8/int4 q, k and v as one quantized matrix (int_quant.fuse_quantized; q/k/v_proj hold views of it)
        self.fused_qkv_quantized: tuple[object, torch.Tensor | None] | None = None

    def fuse_projections(self) -> None:
        """Put q, k and v in one [Hq*Dh + 2*Hk*Dh, D] matrix: one GEMM instead of three (at decode sizes the call
        count, not the arithmetic, costs). q_proj/k_proj/v_proj become views of it, so names and memory stay."""
        self.fused_qkv = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, cos, sin, batch: AttentionBatch, kv: tuple[torch.Tensor, torch.Tensor] | None, ops: KernelOps,
                last_rows_only: bool = False):
        """[T, D] -> [T, D]; with `last_rows_only` (segments form), [segments, D]: the output of each segment's
        last row alone, while every row's key and value still go to the cache."""
        num_tokens = x.shape[0]
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        query_rows = batch.last_rows if last_rows_only else None
        # The fused matrix shares the originals' storage, so it always holds their values; but autograd only sees
        # the originals, so a model whose weights train again (requires_grad) takes the separate GEMMs.
        if self.fused_qkv is not None and not self.q_proj.weight.requires_grad:
            weight, bias = self.fused_qkv
            if query_rows is None:
                q, k, v = F.linear(x, weight, bias).split((q_width, kv_width, kv_width), dim=-1)
            else:  # keys and values of every row, queries of the wanted rows only
                k, v = F.linear(x, weight[q_width:], None if bias is None else bias[q_width:]).split(kv_width, -1)
                q = F.linear(x[query_rows], weight[:q_width], None if bias is None else bias[:q_width])
        else:
            q = self.q_proj(x if query_rows is None else x[query_rows])
            k, v = self.k_proj(x), self.v_proj(x)
        q = q.view(q.shape[0], self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, _ = self.q_norm(q, ops)
            k, _ = self.k_norm(k, ops)
        if query_rows is None:
            q, k = ops.rotary(q, k, cos, sin)
        else:
            q, _ = ops.rotary(q, q[:, :0], cos[query_rows], sin[query_rows])  # each alone: no kv heads beside it
            k, _ = ops.rotary(k, k[:, :0], cos, sin)
        if kv is not None:
            k_cache, v_cache = kv
            k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
            v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))

        if batch.seq_lens is not None:  # decode: one query per sequence, keys from the cache
            out = ops.decode_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, self.scale)
        elif batch.uniform_len is not None:
            out = self._uniform_attention(q, k, v, batch.uniform_len)
        else:
            out = torch.empty_like(q)
            for i, seg in enumerate(batch.segments):
                rows = slice(seg.start, seg.start + seg.length)
                if seg.cached == 0:
                    seg_k, seg_v = k[rows], v[rows]
                else:  # continue after a cached prefix: this segment's keys are already in the cache
                    total = seg.cached + seg.length
                    seg_k = gather_kv(k_cache, seg.block_table, total)
                    seg_v = gather_kv(v_cache, seg.block_table, total)
                # Queries are the last rows of the keys' positions: all of the segment's, or its last one.
                queries = slice(i, i + 1) if query_rows is not None else rows
                out[queries] = ops.prefill_attention(q[queries], seg_k, seg_v, self.scale)
        return self.o_proj(out.reshape(q.shape[0], -1))

    def _uniform_attention(self, q, k, v, seq_len: int) -> torch.Tensor:
        # B equal-length sequences from position 0: one batched causal SDPA call (training and full logits).
        batch = q.shape[0] // seq_len
        qh = q.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        kh = k.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        vh = v.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale)
        return out.transpose(1, 2).reshape(q.shape)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense layers and the shared expert."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.fused_gate_up: tuple[torch.Tensor, None] | None = None  # by fuse_projections()
        self.fused_gate_up_quantized: tuple[object, None] | None = None  # int8/int4: int_quant.fuse_quantized

    def fuse_projections(self) -> None:
        """gate and up in one matrix (one GEMM instead of two); gate_proj/up_proj become views of it."""
        self.fused_gate_up = _fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor, ops: KernelOps | None = None, recorder=None) -> torch.Tensor:
        # `ops` and `recorder` are MoE.forward's: a decoder layer calls its mlp the same way, dense or MoE.
        if self.fused_gate_up is not None and not self.gate_proj.weight.requires_grad:  # see Attention.forward
            gate, up = F.linear(x, *self.fused_gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of one GEMM computing the given linears side by side; their parameters become views of it.

    Plain tensors, not parameters: the fused copy is not a second set of weights in state_dict() or
    parameters(). None (nothing changed) unless all are plain nn.Linear modules of one dtype and device with
    biases alike: quantised replacements (FP8, int8/int4) keep their own kernels."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    weights = [m.weight for m in linears]
    if len({(w.dtype, w.device) for w in weights}) != 1 or len({m.bias is None for m in linears}) != 1:
        return None
    weight = _gemv_layout(torch.cat([w.detach() for w in weights]))
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    start = 0
    for m in linears:  # the originals now read the fused storage: no second copy of the weights
        rows = slice(start, start + m.weight.shape[0])
        m.weight = nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[rows], requires_grad=False)
        start = rows.stop
    return weight, bias


def _gemv_layout(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] matrix, stored column-major on the CPU: there x @ W.T with W.T contiguous is the GEMM
    layout oneDNN/MKL run fastest at one or a few rows (3x for the 8192-row lm_head of bench-10m, measured);
    other devices keep the usual row-major weights."""
    return weight.t().contiguous().t() if weight.device.type == "cpu" else weight


def _decode_linear(name: str, linear: nn.Module) -> dict[str, torch.Tensor]:
    if getattr(linear, "qweight", None) is not None:  # int_quant.QuantLinear
        return decode_step_weight(name, linear.qweight)
    if type(linear) is not nn.Linear:
        raise ValueError("the compiled decode step needs float or int8/int4 linears (not FP8)")
    return {name: linear.weight}


def _decode_matrix(name: str, fused, fused_quantized, parts: dict[str, nn.Module]) -> tuple[
        dict[str, torch.Tensor], torch.Tensor | None]:
    """A fused matrix (q/k/v, or gate/up) for the decode step: (its tensors, its bias). Quantized projections that
    could not be fused (formats differ: a GGUF's Q6_K v beside Q4_K q and k) go as their parts, each in its own
    format, which the decode step computes into their columns; their biases are joined (a small copy)."""
    if fused_quantized is not None:
        return decode_step_weight(name, fused_quantized[0]), fused_quantized[1]
    if fused is not None:
        return {name: fused[0]}, fused[1]
    if all(getattr(module, "qweight", None) is not None for module in parts.values()):
        tensors: dict[str, torch.Tensor] = {}
        for part_name, module in parts.items():
            tensors |= decode_step_weight(part_name, module.qweight)
        biases = [module.bias for module in parts.values()]
        bias = None if all(b is None for b in biases) else torch.cat([
            b if b is not None else torch.zeros(m.out_features, dtype=next(x for x in biases if x is not None).dtype)
            for b, m in zip(biases, parts.values(), strict=True)])
        return tensors, bias
    raise ValueError("the compiled decode step needs q/k/v and gate/up fused by fuse_projections() (float "
                     "matrices of one dtype), or int8/int4 ones")


class Router(nn.Module):
    """Sigmoid router with a selection-only correction bias; weights kept in fp32 (they decide discrete choices)."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        # A parameter (not a buffer) so load-balancing code can update it in place; it never receives gradients.
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(config.n_routed_experts, dtype=torch.float32), requires_grad=False)
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor

    def forward(self, x: torch.Tensor, ops: KernelOps):
        return ops.route(x, self.weight, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                         self.norm_topk_prob, self.scaling)


class Experts(nn.Module):
    """The routed experts, stacked: gate_up_proj [E, 2I, D] (gate rows, then up rows), down_proj [E, D, I]."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        num, hidden, width = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num, hidden, width))

    def forward(self, x, topk_ids, topk_weights, ops: KernelOps) -> torch.Tensor:
        return ops.fused_moe(x, self.gate_up_proj, self.down_proj, topk_ids, topk_weights)


class MoE(nn.Module):
    """sum_k weight_k * expert_k(x) + shared_expert(x), experts chosen per token by the router."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts) \
            if config.n_shared_experts > 0 else None

    def forward(self, x: torch.Tensor, ops: KernelOps, recorder: RoutingRecorder | None = None) -> torch.Tensor:
        topk_ids, topk_weights, scores = self.gate(x, ops)
        if recorder is not None:
            recorder.record(topk_ids, topk_weights, scores)
        out = self.experts(x, topk_ids, topk_weights, ops)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_id) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, residual, cos, sin, batch, kv, ops, recorder, last_rows_only: bool = False):
        # The residual add is fused into each norm: it returns (normed, x + residual) and we carry the sum.
        h, residual = self.input_layernorm(x, ops, residual)
        h = self.self_attn(h, cos, sin, batch, kv, ops, last_rows_only)
        if last_rows_only:
            residual = residual[batch.last_rows]
        h, residual = self.post_attention_layernorm(h, ops, residual)
        return self.mlp(h, ops, recorder), residual


class GLMForCausalLM(nn.Module):
    """Embeddings -> decoder layers (dense first, then MoE) -> final norm -> lm_head.

    Module names follow the Hugging Face checkpoint (minus its `model.` prefix), so the weight-name table in
    `weights.py` is short. The multi-token-prediction layer is not built: plain decoding never uses it.
    """

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.ops = TORCH_OPS
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        dim = self.config.rotary_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
        return 1.0 / (self.config.rope_theta**exponents)

    def fuse_projections(self) -> None:
        """For inference: q/k/v of every attention, and gate/up of every dense MLP and shared expert, each become
        one GEMM, and (on the CPU) the fused matrices and an untied lm_head are stored in the layout the decode
        GEMMs read fastest. Parameter names, shapes and values are unchanged (the originals become views), so this
        is invisible to checkpoints; training keeps the separate matrices."""
        for module in self.modules():
            if isinstance(module, Attention | MLP):
                module.fuse_projections()
        if not self.config.tie_word_embeddings and type(self.lm_head) is nn.Linear:
            self.lm_head.weight = nn.Parameter(_gemv_layout(self.lm_head.weight.detach()), requires_grad=False)

    def decode_step_tensors(self, kv_cache: list[tuple[torch.Tensor, torch.Tensor]], block_size: int) -> dict:
        """The weights, cache pools and sizes that `glm_kernels.cpu_compiled`'s decode step reads, as its
        constructor's keyword arguments (views of this model's tensors: nothing is copied).

        Integer-quantized linears and experts (int_quant.py's modules, which hold a `qweight` / `gate_up`) go under
        their key plus the suffixes of their tensors (`qkv_weight.q`, `qkv_weight.scales`, ...: decode_model.cpp's
        contract), a quantized lm_head in the `quantized` argument. Raises ValueError saying why where that step
        cannot run this model: it knows weights of one float dtype (or int8/int4) on the CPU, after
        `fuse_projections()`, and not FP8 linears or weights that train again."""
        embed = self.embed_tokens.weight
        if embed.device.type != "cpu" or embed.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"the compiled decode step runs float weights on the CPU, not {embed.dtype} "
                             f"on {embed.device}")
        if any(p.requires_grad for p in self.parameters()):
            raise ValueError("the compiled decode step is for inference: some weights require grad")
        if getattr(self, "quant_scheme", None) is not None:
            raise ValueError(f"the compiled decode step runs float or int8/int4 weights, not FP8-quantised ones "
                             f"({self.quant_scheme.name})")
        head_q = getattr(self.lm_head, "qweight", None)
        if head_q is None and type(self.lm_head) is not nn.Linear:
            raise ValueError("the compiled decode step needs a plain or int8/int4 lm_head (not FP8)")
        layers = []
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            dense_mlps = [mlp] if isinstance(mlp, MLP) else [m for m in [mlp.shared_experts] if m is not None]
            tensors = {"input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
                       "k_cache": k_cache, "v_cache": v_cache}
            qkv, qkv_bias = _decode_matrix("qkv_weight", attn.fused_qkv, getattr(attn, "fused_qkv_quantized", None),
                                           {"q_weight": attn.q_proj, "k_weight": attn.k_proj, "v_weight": attn.v_proj})
            tensors |= qkv | _decode_linear("o_weight", attn.o_proj)
            if qkv_bias is not None:
                tensors["qkv_bias"] = qkv_bias
            if attn.use_qk_norm:
                tensors |= {"q_norm": attn.q_norm.weight, "k_norm": attn.k_norm.weight}
            if isinstance(mlp, MoE):
                tensors |= {"router_weight": mlp.gate.weight, "router_bias": mlp.gate.e_score_correction_bias}
                if type(mlp.experts) is Experts:
                    tensors |= {"experts_gate_up": mlp.experts.gate_up_proj, "experts_down": mlp.experts.down_proj}
                elif hasattr(mlp.experts, "gate_up"):  # int_quant.QuantExperts
                    tensors |= decode_step_weight("experts_gate_up", mlp.experts.gate_up)
                    tensors |= decode_step_weight("experts_down", mlp.experts.down)
                else:
                    raise ValueError("the compiled decode step needs float or int8/int4 experts (not FP8)")
            if dense_mlps:
                gate_up, _ = _decode_matrix("mlp_gate_up", dense_mlps[0].fused_gate_up,
                                            getattr(dense_mlps[0], "fused_gate_up_quantized", None),
                                            {"mlp_gate": dense_mlps[0].gate_proj, "mlp_up": dense_mlps[0].up_proj})
                tensors |= gate_up | _decode_linear("mlp_down", dense_mlps[0].down_proj)
            layers.append({name: t.detach() for name, t in tensors.items()})
        config = self.config
        sizes = {"num_heads": config.num_attention_heads, "num_kv_heads": config.num_key_value_heads,
                 "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
                 "top_k": config.num_experts_per_tok, "n_group": config.n_group, "topk_group": config.topk_group,
                 "norm_topk_prob": float(config.norm_topk_prob),
                 "routed_scaling_factor": config.routed_scaling_factor, "block_size": block_size}
        out = {"layers": layers, "embed": embed.detach(), "final_norm": self.norm.weight.detach(),
               "lm_head": None if head_q is not None else self.lm_head.weight.detach(), "inv_freq": self.inv_freq,
               "config": sizes}
        if head_q is not None:
            out["quantized"] = decode_step_weight("lm_head", head_q)
        return out

    def materialize_buffers(self, device: torch.device) -> None:
        """Recompute non-persistent buffers after the weights were assigned to a model built on `meta`."""
        self.inv_freq = self._inv_freq(device)

    def hidden_states(self, input_ids: torch.Tensor, batch: AttentionBatch,
                      kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                      recorder: RoutingRecorder | None = None, last_rows_only: bool = False) -> torch.Tensor:
        """input_ids [T] -> final-normed hidden states [T, D].

        `last_rows_only` (prefill, segments form): only each segment's last row is wanted (the next token's
        logits), so the last layer computes queries, attention output, MLP and norm for those rows alone, and
        the result is [segments, D]; every row's keys and values still reach the cache. Earlier layers must run
        in full (their outputs are the last layer's keys and values). This saves 1/num_layers of a prefill,
        as llama.cpp does with its output rows; it needs `recorder` None, since a routing trace covers every row.
        """
        if last_rows_only and (batch.segments is None or recorder is not None):
            raise ValueError("last_rows_only needs the segments form of the batch and no routing recorder")
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(batch.positions, self.inv_freq, x.dtype)
        residual = None
        last_layer = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            kv = None if kv_cache is None else kv_cache[i]
            only_last = last_rows_only and i == last_layer
            x, residual = layer(x, residual, cos, sin, batch, kv, self.ops, recorder, only_last)
        x, _ = self.norm(x, self.ops, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward(self, input_ids: torch.Tensor, recorder: RoutingRecorder | None = None) -> torch.Tensor:
        """Training and scoring: input_ids [B, S] (every row from position 0, no cache) -> logits [B, S, V] fp32."""
        batch, seq_len = input_ids.shape
        attention = AttentionBatch.uniform(batch, seq_len, input_ids.device)
        hidden = self.hidden_states(input_ids.reshape(-1), attention, None, recorder)
        return self.compute_logits(hidden).view(batch, seq_len, -1)
