"""Partial rotary position embedding (rotate-half style) on the first `rotary_dim` dims of q and k."""

from __future__ import annotations

import torch


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [T, rotary_dim] for integer positions [T] (fp32 math, as transformers does)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, Dh], k [T, Hk, Dh], cos/sin [T, R] with R <= Dh even -> rotated (q, k), new tensors.

    Dims [0, R) are rotated, dims [R, Dh) pass through untouched.
    """
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]

    def apply(x: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)

    return apply(q), apply(k)
