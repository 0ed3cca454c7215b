"""MoE alignment: the (token, slot) pairs of a routed batch sorted by expert, each expert's run padded to a
multiple of the GEMM tile (BLOCK_M), so that every tile of the grouped GEMMs (fused_moe.py) belongs to one expert.

Shape legend: T = tokens, K = experts per token, P = T * K pairs, E = experts.
`moe_align_reference` is the torch twin; `moe_align_block_size` computes it on the device in one launch (a few
chunks of pairs) or three (count per chunk, plan the runs, scatter), with no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_kernels.triton_support import cdiv, check, new_output, next_power_of_2, require_triton, tl, triton


def moe_align_reference(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What `moe_align_block_size` computes, in torch: (sorted pair ids, expert id per tile, padded length).

    Pairs of one expert keep their original order here; the kernel may order them differently within a run.
    """
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    sorted_ids, expert_ids = [], []
    for expert in range(num_experts):
        pairs = (flat == expert).nonzero().flatten()
        if pairs.numel() == 0:
            continue
        padded = cdiv(pairs.numel(), block_m) * block_m
        sorted_ids.append(F.pad(pairs, (0, padded - pairs.numel()), value=num_pairs))
        expert_ids += [expert] * (padded // block_m)
    ids = torch.cat(sorted_ids) if sorted_ids else flat.new_empty(0)
    return ids.int(), torch.tensor(expert_ids, dtype=torch.int32), ids.numel()


# --- Triton: alignment --------------------------------------------------------------------------------------
@triton.jit
def _count_chunk(topk_ids_ptr, counts_ptr, chunk, num_pairs, num_experts, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """counts[chunk, e] = how many of the pairs [chunk * CHUNK, (chunk + 1) * CHUNK) chose expert e."""
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    experts = tl.arange(0, BLOCK_E)
    ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
    one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(counts_ptr + chunk * BLOCK_E + experts, tl.sum(one_hot, axis=0), mask=experts < num_experts)


@triton.jit
def _plan_runs(
    counts_ptr,
    bases_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_chunks,
    num_pairs,
    num_experts,
    max_padded,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
):
    """From the per-chunk counts: each expert's padded run, each chunk's first slot in every run, the expert of
    every tile, and the sentinel in every slot no pair will fill."""
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < num_experts
    totals = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, num_chunks, CHUNK_TILE):
        chunks = c0 + tl.arange(0, CHUNK_TILE)
        tile = tl.load(
            counts_ptr + chunks[:, None] * BLOCK_E + experts[None, :],
            mask=(chunks < num_chunks)[:, None] & expert_mask[None, :],
            other=0,
        )
        totals += tl.sum(tile, axis=0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    num_padded = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, num_padded)
    running = starts
    for c0 in range(0, num_chunks, CHUNK_TILE):  # bases[c, e] = starts[e] + pairs of e in chunks before c
        chunks = c0 + tl.arange(0, CHUNK_TILE)
        tile_mask = (chunks < num_chunks)[:, None] & expert_mask[None, :]
        tile = tl.load(counts_ptr + chunks[:, None] * BLOCK_E + experts[None, :], mask=tile_mask, other=0)
        tl.store(
            bases_ptr + chunks[:, None] * BLOCK_E + experts[None, :],
            running[None, :] + tl.cumsum(tile, axis=0) - tile,
            mask=tile_mask,
        )
        running += tl.sum(tile, axis=0)
    # The expert of slot s is the number of runs that end at or before s (runs of unused experts are empty).
    real_ends = starts + totals
    for b0 in range(0, max_blocks, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        slot = blocks * BLOCK_M
        owner = tl.sum((ends[None, :] <= slot[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.where(slot < num_padded, owner, -1), mask=blocks < max_blocks)
    for s0 in range(0, max_padded, CHUNK):
        slots = s0 + tl.arange(0, CHUNK)
        owner = tl.sum((ends[None, :] <= slots[:, None]).to(tl.int32), axis=1)
        owner_end = tl.sum(tl.where(experts[None, :] == owner[:, None], real_ends[None, :], 0), axis=1)
        tl.store(
            sorted_ids_ptr + slots,
            tl.full([CHUNK], 0, tl.int32) + num_pairs,
            mask=(slots < max_padded) & (slots >= owner_end),
        )


@triton.jit
def _scatter_chunk(
    topk_ids_ptr,
    bases_ptr,
    sorted_ids_ptr,
    chunk,
    num_pairs,
    num_experts,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Write each pair of the chunk into its expert's run, after the chunk's predecessors' pairs."""
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    experts = tl.arange(0, BLOCK_E)
    ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
    # An id outside [0, E) (not something the router produces) is dropped rather than written out of bounds.
    valid = (pairs < num_pairs) & (ids >= 0) & (ids < num_experts)
    one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
    rank = tl.cumsum(one_hot, axis=0) - 1  # the pair's place among the chunk's pairs of its expert
    base = tl.load(bases_ptr + chunk * BLOCK_E + experts)
    slot = tl.sum(one_hot * (rank + base[None, :]), axis=1)
    tl.store(sorted_ids_ptr + slot, pairs, mask=valid)


@triton.jit
def _align_fused_kernel(
    topk_ids_ptr,
    counts_ptr,
    bases_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_chunks,
    num_pairs,
    num_experts,
    max_padded,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
):
    # Few pairs (decode): the three phases in one program, barriers between them (one launch, not three).
    for chunk in range(0, num_chunks):
        _count_chunk(topk_ids_ptr, counts_ptr, chunk, num_pairs, num_experts, CHUNK, BLOCK_E)
    tl.debug_barrier()
    _plan_runs(
        counts_ptr,
        bases_ptr,
        sorted_ids_ptr,
        expert_ids_ptr,
        num_padded_ptr,
        num_chunks,
        num_pairs,
        num_experts,
        max_padded,
        max_blocks,
        BLOCK_M,
        BLOCK_E,
        CHUNK,
        CHUNK_TILE,
    )
    tl.debug_barrier()
    for chunk in range(0, num_chunks):
        _scatter_chunk(topk_ids_ptr, bases_ptr, sorted_ids_ptr, chunk, num_pairs, num_experts, CHUNK, BLOCK_E)


@triton.jit
def _count_kernel(topk_ids_ptr, counts_ptr, num_pairs, num_experts, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    _count_chunk(topk_ids_ptr, counts_ptr, tl.program_id(0), num_pairs, num_experts, CHUNK, BLOCK_E)


@triton.jit
def _plan_kernel(
    counts_ptr,
    bases_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    num_chunks,
    num_pairs,
    num_experts,
    max_padded,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
):
    _plan_runs(
        counts_ptr,
        bases_ptr,
        sorted_ids_ptr,
        expert_ids_ptr,
        num_padded_ptr,
        num_chunks,
        num_pairs,
        num_experts,
        max_padded,
        max_blocks,
        BLOCK_M,
        BLOCK_E,
        CHUNK,
        CHUNK_TILE,
    )


@triton.jit
def _scatter_kernel(
    topk_ids_ptr,
    bases_ptr,
    sorted_ids_ptr,
    num_pairs,
    num_experts,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    _scatter_chunk(topk_ids_ptr, bases_ptr, sorted_ids_ptr, tl.program_id(0), num_pairs, num_experts, CHUNK, BLOCK_E)


def padded_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Most slots the padded runs can need: every pair, plus up to BLOCK_M - 1 padding per used expert."""
    return num_pairs + min(num_experts, num_pairs) * (block_m - 1)


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int, *, single_program_chunks: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs by expert and pad each expert's run to a multiple of `block_m`.

    topk_ids [T, K] -> (sorted_ids [max_blocks * block_m] int32: pair indices in expert runs, P = T*K in padding
    and after the end; expert_ids [max_blocks] int32: the expert of each tile, -1 past the end; num_padded [1]
    int32: the padded length). Sizes are upper bounds known on the host, so nothing waits for the device.
    Up to `single_program_chunks` chunks of pairs are aligned by one program (one launch), more by three
    parallel launches.
    """
    require_triton(topk_ids.device)
    check(topk_ids.dim() == 2, f"moe_align: topk_ids must be [T, K]; got {list(topk_ids.shape)}")
    check(
        block_m >= 1 and block_m & (block_m - 1) == 0,
        f"moe_align: block_m = {block_m} must be a power of two",
    )
    check(num_experts <= 1024, f"moe_align: {num_experts} experts exceed the kernel's 1024")
    device = topk_ids.device
    flat = topk_ids.reshape(-1)
    flat = flat if flat.dtype == torch.int32 else flat.to(torch.int32)
    num_pairs = flat.numel()
    max_blocks = max(1, cdiv(padded_capacity(num_pairs, num_experts, block_m), block_m))
    max_padded = max_blocks * block_m
    sorted_ids = new_output((max_padded,), torch.int32, device)
    expert_ids = new_output((max_blocks,), torch.int32, device)
    num_padded = new_output((1,), torch.int32, device)
    block_e = max(16, next_power_of_2(num_experts))
    chunk = max(16, min(128, 8192 // block_e))  # a [CHUNK, BLOCK_E] one-hot tile stays small
    num_chunks = max(1, cdiv(num_pairs, chunk))
    counts = torch.empty((num_chunks, block_e), dtype=torch.int32, device=device)
    bases = torch.empty((num_chunks, block_e), dtype=torch.int32, device=device)
    common = dict(BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=chunk, CHUNK_TILE=16)
    plan_args = (
        counts,
        bases,
        sorted_ids,
        expert_ids,
        num_padded,
        num_chunks,
        num_pairs,
        num_experts,
        max_padded,
        max_blocks,
    )
    if num_chunks <= single_program_chunks:
        _align_fused_kernel[(1,)](flat, *plan_args, **common, num_warps=4)
    else:
        _count_kernel[(num_chunks,)](flat, counts, num_pairs, num_experts, CHUNK=chunk, BLOCK_E=block_e)
        _plan_kernel[(1,)](*plan_args, **common, num_warps=8)
        _scatter_kernel[(num_chunks,)](flat, bases, sorted_ids, num_pairs, num_experts, CHUNK=chunk, BLOCK_E=block_e)
    return sorted_ids, expert_ids, num_padded
