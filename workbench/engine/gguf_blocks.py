"""GGUF block codecs: GGML's quantized blocks to our weight formats and back, vectorized in torch.

Owns the byte layouts of the block types the engine reads and writes. Decoding turns a tensor's raw bytes
(uint8 [..., N, K / block * block_bytes], as the `gguf` reader maps them) into:

- `Int8Weight` exactly: Q8_0 (q, scale d), Q4_0 (q - 8), Q5_0 (q - 16) with groups of 32; Q6_K (q - 32, scale
  d * its signed 8-bit sub-scale, a product exact in fp32) with groups of 16;
- `Int4Weight` exactly: Q4_K (its fp16 d/dmin widened, its 6-bit sub-scales and minimums, the nibbles reordered
  from Q4_K's two-groups-per-32-bytes to our one-group-per-16-bytes);
- plain fp32 values for Q5_K (ours have no 5-bit format) and, through `gguf.quants`' own numpy decoders, for
  Q4_1, Q5_1, Q2_K and Q3_K.

"Exactly" means `blockquant.dequantize(ours)` equals gguf's dequantized values bit for bit: every format
computes the same fp32 products in the same order (d * sc first, then times q, then minus dmin * m).

Encoding (export) writes Q8_0 and Q5_0 through `gguf.quants` (bit-exact with ggml's reference quantizers) and
Q4_K with our own quantizer (`encode_q4_k`), documented there.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from glm_kernels.blockquant import Int4Weight, Int8Weight

QK_K = 256

# Block types imported into our quantized formats without a second rounding.
EXACT_TYPES = {T.Q8_0: "int8", T.Q4_0: "int8", T.Q5_0: "int8", T.Q6_K: "int8 (group 16)", T.Q4_K: "int4"}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# Block types read by dequantizing to the model's dtype (ours have no such format).
DEQUANTIZED_TYPES = (T.Q5_K, T.Q4_1, T.Q5_1, T.Q2_K, T.Q3_K)
SUPPORTED_TYPES = (*FLOAT_TYPES, *EXACT_TYPES, *DEQUANTIZED_TYPES)


def type_names(types=SUPPORTED_TYPES) -> str:
    return ", ".join(t.name for t in types)


def _blocks(raw: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """uint8 [..., N, nb * block_bytes] -> [..., N, nb, block_bytes] (a view)."""
    return raw.reshape(*raw.shape[:-1], raw.shape[-1] // block_bytes, block_bytes)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] little-endian fp16 -> fp32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles_lo_hi(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 16] -> [..., 32]: the 16 low nibbles, then the 16 high ones (Q4_0 / Q5_0 element order)."""
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> [..., 8n]: bit j of the little-endian bit string (byte j // 8, bit j % 8)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(*b.shape[:-1], -1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[..., N, nb, per_block] -> [..., N, nb * per_block]."""
    return x.reshape(*x.shape[:-2], -1)


def decode_q8_0(raw: torch.Tensor) -> Int8Weight:
    b = _blocks(raw, 34)
    q = b[..., 2:].contiguous().view(torch.int8)
    return Int8Weight(_flat(q).contiguous(), _f16(b[..., :2]).contiguous(), 32)


def decode_q4_0(raw: torch.Tensor) -> Int8Weight:
    b = _blocks(raw, 18)
    q = _nibbles_lo_hi(b[..., 2:]).to(torch.int8) - 8
    return Int8Weight(_flat(q).contiguous(), _f16(b[..., :2]).contiguous(), 32)


def decode_q5_0(raw: torch.Tensor) -> Int8Weight:
    b = _blocks(raw, 22)
    high = _bits(b[..., 2:6])  # [..., 32]: bit j is element j's fifth bit
    q = (_nibbles_lo_hi(b[..., 6:]) | (high << 4)).to(torch.int8) - 16
    return Int8Weight(_flat(q).contiguous(), _f16(b[..., :2]).contiguous(), 32)


def decode_q6_k(raw: torch.Tensor) -> Int8Weight:
    """Q6_K: ql[128] qh[64] scales int8[16] d fp16; 16 sub-blocks of 16 values, w = (d * scale) * (q - 32)."""
    b = _blocks(raw, 210)
    lead = b.shape[:-1]
    ql = b[..., :128].reshape(*lead, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(2, 1)
    ql = (ql & 0x0F).reshape(*lead, QK_K)
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)
    qh = (qh & 0x03).reshape(*lead, QK_K)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    scales = b[..., 192:208].contiguous().view(torch.int8).float() * _f16(b[..., 208:210]).unsqueeze(-1)
    return Int8Weight(_flat(q).contiguous(), _flat(scales).contiguous(), 16)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and minimums -> (sc, mn) uint8 [..., 8] each."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K's 128 bytes -> 256 values 0..15: each 32-byte chunk holds group 2c (low nibbles) and 2c + 1."""
    lead = qs.shape[:-1]
    chunks = qs.reshape(*lead, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(2, 1)
    return (chunks & 0x0F).reshape(*lead, QK_K)


def decode_q4_k(raw: torch.Tensor) -> Int4Weight:
    """Q4_K's 32-byte chunk c holds group 2c in its low nibbles and 2c + 1 in its high ones (element i in byte i);
    ours holds group g in bytes [16g, 16g + 16), element i in the low nibble of byte i and i + 16 in its high one.
    So the nibbles move between the chunk's two 16-byte halves without being unpacked: 4 byte ops a chunk (the
    unpack-to-256-values-and-repack way took 11 s/GB at 1 thread)."""
    b = _blocks(raw, 144)
    sc, mn = _k_scales(b[..., 4:16])
    chunks = b[..., 16:].reshape(*b.shape[:-1], 4, 32)
    low, high = chunks[..., :16], chunks[..., 16:]
    even = (low & 0x0F) | (high << 4)  # group 2c: elements 0..15 low, 16..31 high (uint8 shifts drop the top)
    odd = (low >> 4) | (high & 0xF0)  # group 2c + 1
    packed = torch.stack([even, odd], dim=-2)  # [..., nb, 4, 2, 16]
    return Int4Weight(_flat(packed.reshape(*b.shape[:-1], 128)).contiguous(), _f16(b[..., 0:2]).contiguous(),
                      _f16(b[..., 2:4]).contiguous(), _flat(sc).contiguous(), _flat(mn).contiguous())


def decode_q5_k(raw: torch.Tensor) -> torch.Tensor:
    """Q5_K to fp32: d dmin fp16, 12 bytes of scales, qh[32], qs[128]; w = (d * sc) * q - dmin * m, q 0..31."""
    b = _blocks(raw, 176)
    lead = b.shape[:-1]
    sc, mn = _k_scales(b[..., 4:16])
    low = _k_nibbles(b[..., 48:176])
    high = (b[..., 16:48].reshape(*lead, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(8, 1)) & 1
    q = (low | (high.reshape(*lead, QK_K) << 4)).float().reshape(*lead, 8, 32)
    scale = (_f16(b[..., 0:2]).unsqueeze(-1) * sc.float()).unsqueeze(-1)
    minimum = (_f16(b[..., 2:4]).unsqueeze(-1) * mn.float()).unsqueeze(-1)
    return _flat((scale * q - minimum).reshape(*lead, QK_K))


EXACT_DECODERS = {T.Q8_0: decode_q8_0, T.Q4_0: decode_q4_0, T.Q5_0: decode_q5_0, T.Q6_K: decode_q6_k,
                  T.Q4_K: decode_q4_k}


def decode(raw: torch.Tensor, qtype: T) -> torch.Tensor | Int8Weight | Int4Weight:
    """A tensor's bytes (or, for F32/F16, its values) in the form the engine takes: a float tensor (a view of
    `raw` for F32/F16/BF16), or an `Int8Weight` / `Int4Weight` for the exactly imported block types."""
    if qtype in (T.F32, T.F16):
        return raw
    if qtype == T.BF16:
        return raw.view(torch.bfloat16)
    if qtype in EXACT_DECODERS:
        return EXACT_DECODERS[qtype](raw)
    if qtype == T.Q5_K:
        return decode_q5_k(raw)
    if qtype in DEQUANTIZED_TYPES:
        values = gguf.quants.dequantize(raw.numpy(), qtype)  # numpy, vectorized over blocks; fp32
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    raise ValueError(f"GGML type {qtype.name} is not supported; supported: {type_names()}")


# --- encoding (export) ------------------------------------------------------------------------------------
def encode_with_gguf(values: torch.Tensor, qtype: T) -> np.ndarray:
    """Q8_0 / Q5_0 (and F16) bytes through gguf.quants, whose quantizers are bit-exact with ggml's reference."""
    return gguf.quants.quantize(values.float().numpy(), qtype)


def _pack_k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """The inverse of `_k_scales`: (sc, mn) uint8 [..., 8] of 6-bit values -> 12 bytes."""
    lo_sc, hi_sc, lo_mn, hi_mn = sc[..., :4], sc[..., 4:], mn[..., :4], mn[..., 4:]
    return torch.cat([lo_sc | ((hi_sc >> 4) << 6), lo_mn | ((hi_mn >> 4) << 6), (hi_sc & 0x0F) | ((hi_mn & 0x0F) << 4)],
                     dim=-1)


def encode_q4_k(values: torch.Tensor) -> np.ndarray:
    """Q4_K bytes of `values` [..., K] with K a multiple of 256 (rows of other lengths take llama.cpp's fallback,
    Q5_0: see gguf_export).

    Per group of 32: the range [min(w, 0), max(w, 0)] in 15 steps (step = range / 15, offset = -min >= 0). Per
    super-block of 256: d = max(step) / 63 and dmin = max(offset) / 63, rounded to fp16; each group's sc =
    round(step / d) and mn = round(offset / dmin), clamped to 0..63 (6 bits); then q = round((w + dmin * mn) /
    (d * sc)) clamped to 0..15, against the rounded scales, so that only the stored values carry rounding. This
    is round-to-nearest over the min/max range; llama.cpp's own quantizer (make_qkx2_quants) also searches the
    scale and minimum per group, so its Q4_K error is a little lower. Same format, readable by llama.cpp.
    """
    k = values.shape[-1]
    if k % QK_K:
        raise ValueError(f"Q4_K needs rows that are a multiple of {QK_K} values, got {k}")
    w = values.float().reshape(-1, k // QK_K, 8, 32)  # [rows, blocks, groups, 32]
    low = w.amin(dim=-1).clamp(max=0)
    step = (w.amax(dim=-1).clamp(min=0) - low) / 15
    offset = -low

    def two_level(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outer = (x.amax(dim=-1) / 63).half().float()  # [rows, blocks], as stored
        safe = torch.where(outer > 0, outer, torch.ones_like(outer)).unsqueeze(-1)
        inner = torch.where(outer.unsqueeze(-1) > 0, torch.round(x / safe), torch.zeros_like(x)).clamp(0, 63)
        return outer, inner.to(torch.uint8)

    d, sc = two_level(step)
    dmin, mn = two_level(offset)
    scale = (d.unsqueeze(-1) * sc.float()).unsqueeze(-1)
    minimum = (dmin.unsqueeze(-1) * mn.float()).unsqueeze(-1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, torch.round((w + minimum) / safe), torch.zeros_like(w)).clamp(0, 15).to(torch.uint8)
    q = q.reshape(*q.shape[:-2], 4, 64)  # chunk c holds groups 2c (low nibbles) and 2c + 1 (high nibbles)
    qs = (q[..., :32] | (q[..., 32:] << 4)).reshape(*q.shape[:-2], 128)
    head = torch.cat([d.half().unsqueeze(-1).view(torch.uint8), dmin.half().unsqueeze(-1).view(torch.uint8),
                      _pack_k_scales(sc, mn)], dim=-1)
    out = torch.cat([head, qs], dim=-1)  # [rows, blocks, 144]
    return out.reshape(*values.shape[:-1], k // QK_K * 144).numpy()
