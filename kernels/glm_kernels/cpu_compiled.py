"""The compiled CPU kernels (csrc/cpu_compiled.cpp): building them once per machine, and finding them built.

Each the compiled twin of a torch path that stays the reference:
- `DecodeModel`: one decode step of a whole GLM-4.5 MoE model in one call, for one or many sequences (the
  engine's torch decode path; the engine hands over its weights and cache pools);
- `prefill_attention(q, k, v, scale)`: causal attention of one sequence, fp32, grouped-query heads taken
  together (`prefill_attention_reference`'s contract);
- `fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights)`: the routed experts of many fp32 tokens
  (`fused_moe_reference`'s contract);
- `rotary(q, k, cos, sin)`: the rotary embedding of many fp32 tokens (`rotary_reference`'s contract).

The source is compiled on first use with torch's extension builder (g++ and ninja; the `ninja` package from PyPI
brings the latter) and cached under torch's extensions folder, so a machine compiles it once (about a minute).
`load()` builds if needed and answers None where it cannot (see `build_error()`); the prefill wrappers below never
build: they use the kernels once someone (the engine, at start) has loaded them. A machine without a compiler logs
one line and keeps the torch paths.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_compiled.cpp"
# -march=native: compiled on the machine that runs it. -ffp-contract=off: no fused multiply-adds where the torch
# path has none, so results stay within an ulp or so of it.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off"]

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def load() -> ModuleType | None:
    """The compiled extension, building it first if this machine has not; None if it cannot be built here."""
    global _module, _error
    with _lock:
        if _module is None and _error is None:
            try:
                _module = _compile()
            except Exception as exc:  # no compiler, no headers, a failed compile: the torch paths serve instead
                lines = str(exc).strip().splitlines()
                # A failed compile's message is the whole compiler output: its first error says the most.
                errors = [line for line in lines if "error" in line.lower()]
                _error = f"{type(exc).__name__}: {(errors or lines or [''])[0]}"
                log.warning("compiled CPU kernels unavailable (%s); the torch paths serve instead", _error)
        return _module


def build_error() -> str | None:
    """Why the extension could not be built, or None."""
    return _error


def _compile() -> ModuleType:
    try:  # torch's builder runs `ninja` from PATH; the PyPI package keeps its binary beside the module
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils.cpp_extension import get_default_build_root
    from torch.utils.cpp_extension import load as load_extension

    # torch names a rebuild after a source change glm_cpu_compiled_v1.so, _v2, ...: any one newer than the source
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    built = Path(root).glob("**/glm_cpu_compiled/glm_cpu_compiled*.so")
    if not any(path.stat().st_mtime >= SOURCE.stat().st_mtime for path in built):
        # A warning, so that a plain script or the CLI shows why its first start pauses.
        log.warning("compiling the workbench's CPU kernels for this machine (once, about a minute)")
    return load_extension(name="glm_cpu_compiled", sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False)


def _compiled_can_take(*tensors) -> bool:
    """The compiled kernels compute fp32 CPU tensors without autograd: a model that trains (inputs that require
    grad, with grad on) takes the torch path, which autograd sees through."""
    import torch

    if _module is None or not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def prefill_attention(q, k, v, scale: float):
    """`prefill_attention_reference` (same arguments, same result): fp32 CPU tensors through the compiled kernel
    once this process has loaded it (and no gradient is wanted), everything else through the reference."""
    from glm_kernels.attention import prefill_attention_reference

    module = _module
    if not _compiled_can_take(q, k, v):
        return prefill_attention_reference(q, k, v, scale)
    return module.prefill_attention(q, k, v, scale)


def fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights, **fp8_args):
    """`fused_moe_reference` (same arguments, same result): many fp32 tokens through the compiled kernel once
    this process has loaded it (and no gradient is wanted); one token, FP8 experts, other dtypes and training
    through `fused_moe_cpu`."""
    from glm_kernels.cpu import fused_moe_cpu

    module = _module
    if fp8_args or x.shape[0] == 1 or not _compiled_can_take(x, w_gate_up, w_down, topk_weights):
        return fused_moe_cpu(x, w_gate_up, w_down, topk_ids, topk_weights, **fp8_args)
    return module.fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights.float())


def rotary(q, k, cos, sin):
    """`rotary_reference` (same arguments, same result): many fp32 tokens through the compiled kernel once this
    process has loaded it (and no gradient is wanted); one token, other dtypes and training through `rotary_cpu`."""
    from glm_kernels.cpu import rotary_cpu

    module = _module
    if q.shape[0] == 1 or not _compiled_can_take(q, k, cos, sin):
        return rotary_cpu(q, k, cos, sin)
    q_out, k_out = module.rotary(q, k, cos, sin)
    return q_out, k_out
