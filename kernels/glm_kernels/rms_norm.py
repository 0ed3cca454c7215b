"""RMSNorm with an optional fused residual add: torch reference and Triton kernel (one row a program)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_kernels.triton_support import check, new_output, next_power_of_2, require_triton, tl, triton


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


def rms_norm_cpu(x, weight, eps: float, residual=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_reference` (same arguments, same result), the engine's torch path: torch's fused `rms_norm`
    instead of five elementwise ops (statistics in fp32, cast back, then the weight)."""
    hidden = x if residual is None else x + residual
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype), hidden


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    sum_ptr,
    num_cols,
    eps,
    stride_x,
    stride_residual,
    stride_out,
    stride_sum,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    hidden = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        # Rounded to x's dtype before the statistics, exactly like the unfused `x + residual`.
        rounded = (hidden + res).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, rounded, mask=mask)
        hidden = rounded.to(tl.float32)
    mean_square = tl.sum(hidden * hidden, axis=0) / num_cols
    normed = (hidden * tl.rsqrt(mean_square + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `rms_norm_reference`; x [..., D], weight [D], residual like x."""
    require_triton(x.device)
    dim = x.shape[-1]
    check(
        weight.shape == (dim,),
        f"rms_norm: weight has shape {list(weight.shape)}, expected [{dim}] (x's last dim)",
    )
    if residual is not None:
        check(
            residual.shape == x.shape,
            f"rms_norm: residual shape {list(residual.shape)} != x shape {list(x.shape)}",
        )
        check(residual.dtype == x.dtype, f"rms_norm: residual dtype {residual.dtype} != x dtype {x.dtype}")
    rows = x.reshape(-1, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    res_rows = None if residual is None else residual.reshape(-1, dim).contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)  # `weight * normed` promotes like this in the reference
    out = new_output(rows.shape, out_dtype, x.device)
    summed = new_output(rows.shape, x.dtype, x.device) if residual is not None else None
    if rows.shape[0] > 0:
        _rms_norm_kernel[(rows.shape[0],)](
            rows,
            res_rows if res_rows is not None else rows,
            weight,
            out,
            summed if summed is not None else out,
            dim,
            eps,
            rows.stride(0),
            res_rows.stride(0) if res_rows is not None else 0,
            out.stride(0),
            summed.stride(0) if summed is not None else 0,
            HAS_RESIDUAL=residual is not None,
            BLOCK=next_power_of_2(dim),
            num_warps=min(16, max(1, next_power_of_2(dim) // 256)),
        )
    out = out.view(x.shape)
    return out, (x if summed is None else summed.view(x.shape))
