"""The Triton kernel set, one entry per operation of the engine's `KernelOps` table.

Kernels know nothing of the engine, so they hand over a plain dict; `workbench.engine.ops` builds its table
from it. Prefill attention is the Triton flash kernel; `bench/gpu.py` times it against torch SDPA.
"""

from __future__ import annotations

from glm_kernels.attention import decode_attention_triton, prefill_attention_triton
from glm_kernels.fused_moe import fused_moe_triton
from glm_kernels.rms_norm import rms_norm_triton
from glm_kernels.rotary import rotary_triton
from glm_kernels.router import route_triton

TRITON_KERNELS = dict(
    rms_norm=rms_norm_triton,
    rotary=rotary_triton,
    route=route_triton,
    fused_moe=fused_moe_triton,
    prefill_attention=prefill_attention_triton,
    decode_attention=decode_attention_triton,
)
