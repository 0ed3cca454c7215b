"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (normed, pre-norm sum).

    With `residual`, the input is `x + residual` (summed in x's dtype, as the unfused model does) and the sum
    is returned second so the caller carries it as the next residual; without, the second value is `x`.
    Statistics in fp32, result cast back before the weight multiply (Glm4MoeRMSNorm's order).
    """
    hidden = x if residual is None else x + residual
    h32 = hidden.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), hidden
