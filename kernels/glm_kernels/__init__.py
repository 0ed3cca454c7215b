"""Kernels of the GLM MoE engine: pure functions on tensors, each with a torch reference beside it.

Each module holds one operation: the torch reference (`*_reference`: the slow, obviously-correct twin), its
CPU variants (`*_cpu`: the engine's torch path, fewer and larger ops for decode sizes; `*_compiled`: the entry to
the compiled CPU kernel, which `cpu_compiled` builds and loads) and the Triton kernel with a wrapper of the same
signature that checks shapes, allocates and launches (`*_triton`). Nothing here knows about models,
checkpoints or tokens. Triton is optional: without it the references work and the wrappers raise a clear error.
Triton decides at import whether it compiles or interprets, so set TRITON_INTERPRET=1 before importing
glm_kernels to run the kernels on a CPU.
"""

from glm_kernels.attention import (
    decode_attention_cpu,
    decode_attention_reference,
    decode_attention_triton,
    prefill_attention_compiled,
    prefill_attention_reference,
    prefill_attention_triton,
)
from glm_kernels.fp8 import (
    fp8_linear_reference,
    fp8_linear_triton,
    per_token_quant_reference,
    per_token_quant_triton,
    quantize_weight_blockwise,
    quantize_weight_per_channel,
)
from glm_kernels.fused_moe import fused_moe_compiled, fused_moe_cpu, fused_moe_reference, fused_moe_triton
from glm_kernels.moe_align import moe_align_block_size
from glm_kernels.rms_norm import rms_norm_cpu, rms_norm_reference, rms_norm_triton
from glm_kernels.rotary import rotary_compiled, rotary_cpu, rotary_reference, rotary_triton
from glm_kernels.router import route_reference, route_triton
from glm_kernels.triton_support import HAS_TRITON

__all__ = [
    "HAS_TRITON",
    "decode_attention_cpu",
    "decode_attention_reference",
    "decode_attention_triton",
    "fp8_linear_reference",
    "fp8_linear_triton",
    "fused_moe_compiled",
    "fused_moe_cpu",
    "fused_moe_reference",
    "fused_moe_triton",
    "moe_align_block_size",
    "per_token_quant_reference",
    "per_token_quant_triton",
    "prefill_attention_compiled",
    "prefill_attention_reference",
    "prefill_attention_triton",
    "quantize_weight_blockwise",
    "quantize_weight_per_channel",
    "rms_norm_cpu",
    "rms_norm_reference",
    "rms_norm_triton",
    "rotary_compiled",
    "rotary_cpu",
    "rotary_reference",
    "rotary_triton",
    "route_reference",
    "route_triton",
]
