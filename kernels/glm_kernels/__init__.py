"""Kernels of the GLM MoE engine: pure functions on tensors, each with a torch reference beside it.

Each module holds one operation: the torch reference (the slow, obviously-correct twin, and the engine's
path on CPUs) and, where written, the Triton kernel with a wrapper that checks shapes, allocates and
launches. Nothing here knows about models, checkpoints or tokens.
"""

from glm_kernels.attention import decode_attention_reference, prefill_attention_reference
from glm_kernels.fused_moe import fused_moe_reference
from glm_kernels.rms_norm import rms_norm_reference
from glm_kernels.rotary import rotary_reference
from glm_kernels.router import route_reference

__all__ = [
    "decode_attention_reference",
    "fused_moe_reference",
    "prefill_attention_reference",
    "rms_norm_reference",
    "rotary_reference",
    "route_reference",
]
