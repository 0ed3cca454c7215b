"""Kernel choice: which implementation of each hot operation the model calls, decided in one place at engine start.

Owns the `KernelOps` tables (the torch path, the Triton kernels, the torch path with the compiled CPU prefill
kernels), what a caller asked for (`KernelRequest`: an explicit argument or traitlet wins; the environment
variables WORKBENCH_KERNELS and WORKBENCH_CPU_KERNELS are defaults only, for when nothing was asked) and what was
decided (`KernelChoice`, described in one line that the CLI, `glm/api/status` and the server log all show).
runner.py's `start_runner` makes the decision, once, and is the only code that sets `model.ops`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import glm_kernels
import torch

KERNEL_CHOICES = ("auto", "torch", "triton")
CPU_KERNEL_CHOICES = ("auto", "compiled", "torch")


@dataclass(frozen=True)
class KernelOps:
    name: str
    rms_norm: Callable
    rotary: Callable
    route: Callable
    fused_moe: Callable
    prefill_attention: Callable
    decode_attention: Callable


# The torch path: the references' contracts, with the short decode paths of each op's CPU variant where they exist.
TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=glm_kernels.rms_norm_cpu,
    rotary=glm_kernels.rotary_cpu,
    route=glm_kernels.route_reference,
    fused_moe=glm_kernels.fused_moe_cpu,
    prefill_attention=glm_kernels.prefill_attention_reference,
    decode_attention=glm_kernels.decode_attention_cpu,
)

# The torch path with the compiled CPU prefill kernels (many tokens; each hands what it does not compute to the
# torch path). The compiled decode step is not an op: the compiled CPU runner calls it for the whole step.
COMPILED_CPU_OPS = dataclasses.replace(TORCH_OPS, rotary=glm_kernels.rotary_compiled,
                                       fused_moe=glm_kernels.fused_moe_compiled,
                                       prefill_attention=glm_kernels.prefill_attention_compiled)


@dataclass(frozen=True)
class KernelRequest:
    """What the caller asked for: `kernels` (auto | torch | triton) and `cpu_kernels` (auto | compiled | torch)."""

    kernels: str = "auto"
    cpu_kernels: str = "auto"

    @classmethod
    def from_arguments(cls, kernels: str | None = None, cpu_kernels: str | None = None) -> KernelRequest:
        """The request of these arguments; an argument that is None (not given) takes its environment variable's
        value, else "auto". Raises ValueError naming the argument and the choices for anything else."""
        kernels = kernels or os.environ.get("WORKBENCH_KERNELS") or "auto"
        cpu_kernels = cpu_kernels or os.environ.get("WORKBENCH_CPU_KERNELS") or "auto"
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(KERNEL_CHOICES)} "
                             "(argument `kernels`, else environment variable WORKBENCH_KERNELS)")
        if cpu_kernels not in CPU_KERNEL_CHOICES:
            raise ValueError(f"cpu_kernels={cpu_kernels!r}: choose one of {', '.join(CPU_KERNEL_CHOICES)} "
                             "(argument `cpu_kernels`, else environment variable WORKBENCH_CPU_KERNELS)")
        return cls(kernels, cpu_kernels)

    def kernel_table(self, device: torch.device) -> str:
        """The kernel table this request gets on `device`: "triton" or "torch" ("auto": Triton on CUDA where it
        is installed). Raises ValueError where the request cannot be met, saying why."""
        if self.kernels == "auto":
            return "triton" if device.type == "cuda" and _triton_available() else "torch"
        if self.kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernels='triton' needs a CUDA device, or TRITON_INTERPRET=1 to run them on the CPU")
        if self.kernels == "triton" and not _triton_available():
            raise ValueError("kernels='triton' but Triton is not installed: pip install 'glm-workbench[triton]'")
        return self.kernels


@dataclass(frozen=True)
class KernelChoice:
    """What runs, decided once at engine start: the kernel table (`kernels`: "torch" | "triton") and whether the
    compiled CPU kernels serve (`cpu_kernels`: "compiled" | "torch"), with the table the model calls."""

    kernels: str
    cpu_kernels: str
    ops: KernelOps

    def describe(self) -> str:
        """The one line that says what runs, in `glm/api/status`'s words: the CLI and the server log print it."""
        return f"kernels={self.kernels}, cpu_kernels={self.cpu_kernels}"


def kernel_ops(kernels: str, compiled_cpu: bool = False) -> KernelOps:
    """The table of a decided choice: the Triton kernels, the torch path, or the torch path with the compiled CPU
    prefill kernels."""
    if kernels == "triton":
        # Imported late: Triton is optional on CPUs. glm_kernels.triton_ops exports TRITON_KERNELS, a dict with one
        # entry per KernelOps field (kernels know nothing of the engine, so they hand over a plain dict).
        from glm_kernels.triton_ops import TRITON_KERNELS

        return KernelOps(name="triton", **TRITON_KERNELS)
    return COMPILED_CPU_OPS if compiled_cpu else TORCH_OPS


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
