"""Kernel selection: which implementation of each hot operation the model calls, chosen once at engine start.

Owns the `KernelOps` table and the choice between the torch references (CPUs, and the slow twin everywhere)
and the Triton kernels (NVIDIA GPUs). `"auto"` picks Triton on CUDA and torch elsewhere; the environment
variable WORKBENCH_KERNELS overrides what the caller asked for, so tests and benchmarks can force a path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import glm_kernels
import torch

KERNEL_CHOICES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class KernelOps:
    name: str
    rms_norm: Callable
    rotary: Callable
    route: Callable
    fused_moe: Callable
    prefill_attention: Callable
    decode_attention: Callable


# The torch path: the references' contracts, with the short decode paths of glm_kernels.cpu where they exist.
TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=glm_kernels.rms_norm_cpu,
    rotary=glm_kernels.rotary_cpu,
    route=glm_kernels.route_reference,
    fused_moe=glm_kernels.fused_moe_cpu,
    prefill_attention=glm_kernels.prefill_attention_reference,
    decode_attention=glm_kernels.decode_attention_cpu,
)


def resolve_kernel_choice(requested: str, device: torch.device) -> str:
    """The concrete path ("torch" | "triton") for a request, after the WORKBENCH_KERNELS override."""
    choice = os.environ.get("WORKBENCH_KERNELS") or requested or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels={choice!r}: choose one of {', '.join(KERNEL_CHOICES)} "
                         "(argument `kernels` or environment variable WORKBENCH_KERNELS)")
    if choice == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels='triton' needs a CUDA device, or TRITON_INTERPRET=1 to run them on the CPU")
    if choice == "triton" and not _triton_available():
        raise ValueError("kernels='triton' but Triton is not installed: pip install 'glm-workbench[triton]'")
    return choice


def select_kernels(requested: str, device: torch.device) -> KernelOps:
    if resolve_kernel_choice(requested, device) == "torch":
        return TORCH_OPS
    # Imported late: Triton is optional on CPUs. glm_kernels.triton_ops exports TRITON_KERNELS, a dict with one
    # entry per KernelOps field (kernels know nothing of the engine, so they hand over a plain dict).
    from glm_kernels.triton_ops import TRITON_KERNELS

    return KernelOps(name="triton", **TRITON_KERNELS)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
