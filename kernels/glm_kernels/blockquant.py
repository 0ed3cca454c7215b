"""Block-quantized weights for the CPU: the 8- and 4-bit formats, their quantizers and their torch references.

Owns the number formats every quantized CPU path shares: the engine quantizing a checkpoint at load, the GGUF
importer, the compiled kernels (csrc/) and their tests. Groups run along the input dimension K of a weight
[N, K], as llama.cpp's blocks do, and are chosen so that the common GGUF block types import exactly (no second
rounding):

- `Int8Weight` ("int8"): symmetric 8-bit, one fp32 scale per group of 32 (or 16).
  w[n, k] = scales[n, k // group] * q[n, k]. GGUF Q8_0 (scale = its fp16 d), Q4_0 (q - 8) and Q5_0 (q - 16)
  import with group 32; Q6_K (q - 32, scale = d * its 8-bit sub-scale, exact in fp32) with group 16.
- `Int4Weight` ("int4"): asymmetric 4-bit in groups of 32 with two-level scales, as Q4_K: per super-block of 8
  groups an fp32 `d` and `dmin`, per group an 8-bit `sc` and `mn`;
  w[k] = (d[k // 256] * sc[k // 32]) * q[k] - (dmin[k // 256] * mn[k // 32]) with q in 0..15, each product
  rounded to fp32 first, as llama.cpp's dequantize_row_q4_K computes it. Q4_K imports exactly (its 6-bit sc/mn,
  its fp16 d/dmin widened); our own quantizer uses the full 8 bits. 4.75 bits per weight. Rows need not be a
  multiple of 256 (GLM-4.5-Air's expert width is 1408): the last super-block of a row may hold fewer groups.
  The nibbles are in llama.cpp's order: group j of a row is bytes [16j, 16j + 16), byte i holding element
  32j + i in its low nibble and 32j + i + 16 in its high one, so a SIMD kernel splits 32 values with one mask
  and one shift.

Integer kernels also quantize activations, per block of 32 along K to 8 bits (`quantize_activations`), and take
integer dot products: `linear_q8a_reference` is their exact model (the error of quantizing activations
included), `linear_reference` the plain one (dequantize, then matmul).

Leading dimensions are allowed everywhere (stacked experts [E, N, K]); `weight[e]` is one expert's weight.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

QUANTIZE_FORMATS = ("int8", "int4")
GROUP = 32  # values per group along K (int4 always; int8 by default)
SUPER_GROUPS = 8  # int4: groups per super-block (256 values), each super-block with its own d and dmin
ACT_BLOCK = 32  # activations are quantized per block of this many values along K
INT4_MAX = 15
SUB_SCALE_MAX = 255  # int4's per-group sc / mn: 8 bits (Q4_K stores 6, which fit)


class QuantFormatError(ValueError):
    """A tensor the quantized formats cannot hold; the message says which dimension and what it must be."""


def _check_groups(k: int, group: int, what: str) -> None:
    if k % group:
        raise QuantFormatError(f"{what}: the input dimension K={k} must be a multiple of {group} (the group size)")


class _Quantized:
    """What both formats share: indexing leading dimensions, moving, size."""

    def _map(self, fn):
        return type(self)(**{f.name: fn(getattr(self, f.name)) if isinstance(getattr(self, f.name), torch.Tensor)
                             else getattr(self, f.name) for f in fields(self)})  # type: ignore[arg-type]

    def __getitem__(self, index) -> _Quantized:
        """One slice of the leading dimensions (an expert of a stacked weight); the last two stay whole."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> _Quantized:
        return self._map(lambda t: t.to(device))

    def contiguous(self) -> _Quantized:
        return self._map(lambda t: t.contiguous())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    @property
    def bits_per_weight(self) -> float:
        numel = 1
        for size in self.shape:
            numel *= size
        return 8 * self.nbytes / numel

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Int8Weight(_Quantized):
    """Symmetric 8-bit: q int8 [..., N, K], scales fp32 [..., N, K // group]; w = scales * q per group."""

    q: torch.Tensor
    scales: torch.Tensor
    group: int = GROUP
    format: Literal["int8"] = "int8"

    def __post_init__(self) -> None:
        if self.q.dtype != torch.int8 or self.scales.dtype != torch.float32:
            raise QuantFormatError(f"Int8Weight holds int8 q and float32 scales, got {self.q.dtype} and "
                                   f"{self.scales.dtype}")
        _check_groups(self.q.shape[-1], self.group, "Int8Weight")
        if self.scales.shape != (*self.q.shape[:-1], self.q.shape[-1] // self.group):
            raise QuantFormatError(f"Int8Weight scales {tuple(self.scales.shape)} do not match q "
                                   f"{tuple(self.q.shape)} in groups of {self.group}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)


@dataclass(frozen=True, eq=False)
class Int4Weight(_Quantized):
    """Asymmetric 4-bit with two-level scales (see the module docstring for the layout and the formula)."""

    packed: torch.Tensor  # uint8 [..., N, K // 2]
    d: torch.Tensor  # fp32 [..., N, ceil(K / 256)]
    dmin: torch.Tensor  # fp32 [..., N, ceil(K / 256)]
    sc: torch.Tensor  # uint8 [..., N, K // 32]
    mn: torch.Tensor  # uint8 [..., N, K // 32]
    format: Literal["int4"] = "int4"

    def __post_init__(self) -> None:
        k = self.packed.shape[-1] * 2
        _check_groups(k, GROUP, "Int4Weight")
        lead = tuple(self.packed.shape[:-1])
        expected = {"packed": (torch.uint8, (*lead, k // 2)), "sc": (torch.uint8, (*lead, k // GROUP)),
                    "mn": (torch.uint8, (*lead, k // GROUP)),
                    "d": (torch.float32, (*lead, _super_blocks(k))), "dmin": (torch.float32, (*lead, _super_blocks(k)))}
        for name, (dtype, shape) in expected.items():
            tensor = getattr(self, name)
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise QuantFormatError(f"Int4Weight.{name} must be {dtype} {shape} for K={k}, got {tensor.dtype} "
                                       f"{tuple(tensor.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)


QuantizedWeight = Int8Weight | Int4Weight


def _super_blocks(k: int) -> int:
    return -(-k // (GROUP * SUPER_GROUPS))


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[..., N, K] -> [..., N, K // group, group], fp32."""
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // group, group)


def _safe_div(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale where scale is nonzero, else 0 (an all-zero group quantizes to zeros, not NaN). The masks and the
    safe divisor are built on the (32x smaller) scales and the quotient is zeroed in place: the same values as
    two full-size `where`s and a `zeros_like`, which took half of quantize-at-load's time."""
    positive = scale > 0
    quotient = x / torch.where(positive, scale, 1.0)
    return quotient.masked_fill_(~positive, 0.0)


def quantize_int8(w: torch.Tensor, group: int = GROUP) -> Int8Weight:
    """Round-to-nearest symmetric 8-bit: scale = amax / 127 per group, q = round(w / scale)."""
    _check_groups(w.shape[-1], group, "quantize_int8")
    grouped = _grouped(w, group)
    scales = grouped.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.round(_safe_div(grouped, scales)).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q.reshape(w.shape), scales.squeeze(-1).contiguous(), group)


def quantize_int4(w: torch.Tensor) -> Int4Weight:
    """Asymmetric 4-bit in groups of 32 with 8-bit sub-scales under an fp32 scale per 256.

    Per group: the range [min(w, 0), max(w, 0)] in 15 steps (the minimum clamped to <= 0 so that `mn` is a
    non-negative offset, as Q4_K does); the group scales and offsets are then quantized to 8 bits against their
    super-block's largest, and q is recomputed against the rounded ones, so only the final values are rounded."""
    k = w.shape[-1]
    _check_groups(k, GROUP, "quantize_int4")
    grouped = _grouped(w, GROUP)  # [..., N, G, 32]
    low = grouped.amin(dim=-1).clamp(max=0)
    high = grouped.amax(dim=-1).clamp(min=0)
    step = (high - low) / INT4_MAX  # [..., N, G]
    offset = -low
    groups = k // GROUP
    pad = _super_blocks(k) * SUPER_GROUPS - groups

    def two_level(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padded = torch.nn.functional.pad(values, (0, pad)).reshape(*values.shape[:-1], -1, SUPER_GROUPS)
        outer = padded.amax(dim=-1) / SUB_SCALE_MAX  # [..., N, S]
        inner = torch.round(_safe_div(padded, outer.unsqueeze(-1))).clamp_(0, SUB_SCALE_MAX)
        return outer.contiguous(), inner.reshape(*values.shape[:-1], -1)[..., :groups].to(torch.uint8).contiguous()

    d, sc = two_level(step)
    dmin, mn = two_level(offset)
    scale, minimum = _group_scale_and_min(d, dmin, sc, mn)
    q = torch.round(_safe_div(grouped + minimum.unsqueeze(-1), scale.unsqueeze(-1))).clamp_(0, INT4_MAX)
    return Int4Weight(_pack_nibbles(q.to(torch.uint8)), d, dmin, sc, mn)


def _group_scale_and_min(d, dmin, sc, mn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (d * sc, dmin * mn) in fp32: [..., N, K // 32] each."""
    groups = sc.shape[-1]
    d_per_group = d.repeat_interleave(SUPER_GROUPS, dim=-1)[..., :groups]
    dmin_per_group = dmin.repeat_interleave(SUPER_GROUPS, dim=-1)[..., :groups]
    return d_per_group * sc.float(), dmin_per_group * mn.float()


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [..., N, G, 32] values 0..15 -> [..., N, G * 16]: byte i = q[i] | q[i + 16] << 4."""
    packed = q[..., :16] | (q[..., 16:] << 4)
    return packed.reshape(*q.shape[:-2], -1).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of the packing: uint8 [..., N, K // 2] -> values 0..15, uint8 [..., N, K]."""
    grouped = packed.reshape(*packed.shape[:-1], -1, 16)
    q = torch.cat([grouped & 0x0F, grouped >> 4], dim=-1)
    return q.reshape(*packed.shape[:-1], -1)


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight's values, [..., N, K], computed in fp32 as the formula says, then cast to `dtype`."""
    if isinstance(weight, Int8Weight):
        values = weight.scales.unsqueeze(-1) * _grouped(weight.q, weight.group)
        return values.reshape(weight.shape).to(dtype)
    if isinstance(weight, Int4Weight):
        scale, minimum = _group_scale_and_min(weight.d, weight.dmin, weight.sc, weight.mn)
        q = _grouped(unpack_nibbles(weight.packed), GROUP)
        return (scale.unsqueeze(-1) * q - minimum.unsqueeze(-1)).reshape(weight.shape).to(dtype)
    raise TypeError(f"not a quantized weight: {type(weight).__name__}")


def quantize(w: torch.Tensor, format: str) -> QuantizedWeight:
    """`w` in the named format ("int8" or "int4")."""
    if format == "int8":
        return quantize_int8(w)
    if format == "int4":
        return quantize_int4(w)
    raise QuantFormatError(f"unknown quantized format {format!r}: use one of {', '.join(QUANTIZE_FORMATS)}")


def quantize_activations(x: torch.Tensor, block: int = ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q int8 [..., K], scales fp32 [..., K // block], sums int32 [..., K // block]).

    scale = amax / 127 per block; q = x / scale rounded half to even, clamped to [-127, 127]; sums are the
    blocks' sums of q (int4's offset term needs them)."""
    _check_groups(x.shape[-1], block, "quantize_activations")
    grouped = _grouped(x, block)
    scales = grouped.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.round(_safe_div(grouped, scales)).clamp_(-127, 127)
    sums = q.sum(dim=-1).to(torch.int32)
    return q.to(torch.int8).reshape(x.shape), scales.squeeze(-1).contiguous(), sums


def dequantize_activations(q: torch.Tensor, scales: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    return (scales.unsqueeze(-1) * _grouped(q, block)).reshape(q.shape)


def linear_reference(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [..., K] @ weight.T -> [..., N] in fp32: dequantize, then matmul."""
    return x.float() @ dequantize(weight).transpose(-1, -2)


def linear_bf16_reference(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """What the bf16-GEMM prefill path computes (quant_linear's `bf16_gemm`): x in bf16 (not quantized) times the
    weight dequantized in fp32 and rounded to bf16, fp32 accumulation, rounded once to bf16."""
    return (x.bfloat16().float() @ dequantize(weight, torch.bfloat16).float().transpose(-1, -2)).bfloat16()


def linear_q8a_reference(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """What an integer kernel computes: the activations quantized per block of 32 (and dequantized), times the
    dequantized weight, in fp32. A kernel matches it up to the order of its fp32 accumulation."""
    q, scales, _ = quantize_activations(x.float())
    return dequantize_activations(q, scales) @ dequantize(weight).transpose(-1, -2)
