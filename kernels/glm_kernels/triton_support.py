"""What every Triton kernel wrapper here shares: whether Triton is usable, output allocation, small helpers.

Owns the one place that imports Triton (it is optional: the torch references must import and run without
it) and the test hook that poisons freshly allocated outputs, so a kernel that leaves an element unwritten
fails its comparison instead of passing by luck on zeroed memory.

Triton decides between compiling and interpreting when a kernel is *defined* (module import), reading
TRITON_INTERPRET then; processes that want the CPU interpreter must set it before importing glm_kernels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the references still work; the wrappers say how to get Triton
    HAS_TRITON = False

    class _MissingTriton:
        """Stands in for `triton` so kernel definitions import; a launch raises `require_triton`'s error."""

        @staticmethod
        def jit(fn=None, **_kwargs):
            def decorate(inner):
                def unavailable(*_args, **_kw):
                    require_triton()

                unavailable.__name__ = inner.__name__
                return _Unlaunchable(unavailable)

            return decorate(fn) if fn is not None else decorate

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 if n <= 1 else 1 << (n - 1).bit_length()

    class _Unlaunchable:
        def __init__(self, fn) -> None:
            self.fn = fn

        def __getitem__(self, _grid):
            return self.fn

        def __call__(self, *args, **kwargs):
            return self.fn(*args, **kwargs)

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

__all__ = [
    "HAS_TRITON",
    "INTERPRETER",
    "cdiv",
    "check",
    "interpreting",
    "new_output",
    "next_power_of_2",
    "poisoned_outputs",
    "require_triton",
    "tl",
    "triton",
]

_poison_outputs = False


def interpreting() -> bool:
    """True when Triton interprets kernels on the CPU (TRITON_INTERPRET=1), read the way Triton reads it."""
    if HAS_TRITON:
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Fixed when this module is imported, like Triton's own choice between compiling and interpreting. Kernels
# branch on it where the interpreter (Triton 3.9) is wrong: it multiplies bf16 tiles in tl.dot into garbage,
# so there dot operands are widened to fp32 first (exact). (Inline `if INTERPRETER:` rather than a helper:
# each nested @triton.jit call costs milliseconds in the interpreter.)
INTERPRETER = tl.constexpr(interpreting()) if HAS_TRITON else False


def require_triton(device: torch.device | None = None) -> None:
    """Raise a clear error when a Triton kernel cannot run here (no Triton; CPU tensors, no interpreter)."""
    if not HAS_TRITON:
        raise RuntimeError(
            "this kernel needs Triton, which is not installed: pip install 'glm-workbench[triton]' "
            "(or use the torch reference, kernels='torch')"
        )
    if device is not None and device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"Triton kernels run on CUDA devices; got a tensor on {device}. Move the inputs to the "
            "GPU, use the torch reference (kernels='torch'), or set TRITON_INTERPRET=1 before "
            "importing glm_kernels to run the kernels in Triton's (slow) CPU interpreter"
        )


def check(condition: bool, message: str) -> None:
    """Shape and dtype checks of the wrappers: a ValueError that says what is wrong and what was expected."""
    if not condition:
        raise ValueError(message)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised kernel output; NaN-filled (or -1 for integers) inside `poisoned_outputs()`."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _poison_outputs:
        out.fill_(-1 if not (dtype.is_floating_point or dtype.is_complex) else float("nan"))
    return out


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Test hook: outputs the wrappers allocate inside this block start as NaN (floats) or -1 (integers)."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = previous
