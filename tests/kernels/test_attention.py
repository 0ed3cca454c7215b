"""Decode attention over the paged cache and causal prefill attention, against the torch references."""

from __future__ import annotations

import pytest
import torch
from glm_kernels.attention import (
    decode_attention_reference,
    decode_attention_triton,
    prefill_attention_reference,
    prefill_attention_triton,
)
from kernel_testing import DTYPE_IDS, DTYPES

DECODE_CASES = [
    # (q heads, kv heads, head dim, cache block size, sequence lengths, keys per split)
    pytest.param(4, 2, 16, 4, [1], None, id="one sequence, one cached token"),
    pytest.param(6, 2, 24, 4, [5, 9, 17], 8, id="GQA 3, positions crossing cache blocks, several splits"),
    pytest.param(5, 5, 16, 8, [30, 3], 8, id="no grouping (Hq == Hk), a sequence shorter than one split"),
    pytest.param(5, 1, 32, 16, [40, 16, 1], None, id="odd GQA ratio 5, a sequence ending on a block edge"),
    pytest.param(12, 1, 128, 16, [70], 32, id="Air head group (96/8 = 12) and head dim 128"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("q_heads, kv_heads, head_dim, block_size, lens, split_len", DECODE_CASES)
def test_decode_attention_matches_reference(q_heads, kv_heads, head_dim, block_size, lens, split_len, dtype, device,
                                            gen, poison, close):
    num_blocks = 24
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen, device=device).to(dtype)
    max_blocks = max(-(-n // block_size) for n in lens) + 1  # a spare column: tables are wider than needed
    # Blocks scattered over the cache in random order, as a paged allocator leaves them.
    tables = torch.stack([torch.randperm(num_blocks, generator=torch.Generator().manual_seed(i))[:max_blocks]
                          for i in range(len(lens))]).to(device=device, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(len(lens), q_heads, head_dim, generator=gen, device=device).to(dtype)
    with poison():
        out = decode_attention_triton(q, k_cache, v_cache, tables, seq_lens, head_dim**-0.5, split_len=split_len)
    close(out, decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, head_dim**-0.5))


PREFILL_CASES = [
    # (queries, keys, q heads, kv heads, head dim)
    pytest.param(1, 1, 2, 1, 16, id="one token"),
    pytest.param(37, 37, 4, 2, 16, id="more queries than a tile, not a multiple of it"),
    pytest.param(20, 53, 6, 3, 24, id="continuing after a cached prefix, head dim not a power of two"),
    pytest.param(17, 17, 3, 1, 32, id="odd head count, GQA 3"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_q, num_k, q_heads, kv_heads, head_dim", PREFILL_CASES)
def test_prefill_attention_matches_reference(num_q, num_k, q_heads, kv_heads, head_dim, dtype, device, gen, poison,
                                             close):
    q = torch.randn(num_q, q_heads, head_dim, generator=gen, device=device).to(dtype)
    k = torch.randn(num_k, kv_heads, head_dim, generator=gen, device=device).to(dtype)
    v = torch.randn(num_k, kv_heads, head_dim, generator=gen, device=device).to(dtype)
    with poison():
        out = prefill_attention_triton(q, k, v, head_dim**-0.5)
    close(out, prefill_attention_reference(q, k, v, head_dim**-0.5))


def test_decode_attention_explains_bad_tables(device):
    q = torch.ones(2, 4, 16, device=device)
    cache = torch.ones(8, 4, 2, 16, device=device)
    with pytest.raises(ValueError, match=r"block_tables must be \[B=2, max_blocks\]"):
        decode_attention_triton(q, cache, cache, torch.zeros(3, 2, dtype=torch.int32, device=device),
                                torch.ones(2, dtype=torch.int32, device=device), 0.25)
