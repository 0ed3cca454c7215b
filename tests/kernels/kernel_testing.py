"""What the kernel tests share besides fixtures: the dtype -> tolerance table and the comparison."""

from __future__ import annotations

import torch

# Largest |kernel - reference| allowed, relative to the reference's largest magnitude. bf16 carries 8
# significant bits, and the CPU interpreter truncates (not rounds) when narrowing to bf16, so a few ulps of
# 2^-8 are expected where the kernel rounds once and the reference after every op; fp32 differs only by
# summation order.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 tolerance: float | None = None) -> None:
    """Fails on NaN/inf and on differences above the dtype's tolerance relative to the reference's scale."""
    assert actual.shape == expected.shape, f"shape {list(actual.shape)} != expected {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != expected {expected.dtype}"
    assert torch.isfinite(actual).all(), f"{(~torch.isfinite(actual)).sum().item()} non-finite (unwritten?) values"
    tol = tolerance if tolerance is not None else TOLERANCE[dtype or expected.dtype]
    scale = max(expected.float().abs().max().item(), 1e-6)
    worst = (actual.float() - expected.float()).abs().max().item()
    assert worst <= tol * scale, f"max |diff| {worst:.3g} > {tol:g} x scale {scale:.3g}"
