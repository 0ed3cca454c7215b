"""The paged KV cache: one pool of fixed-size blocks per layer, shared by every sequence the engine runs.

Owns the pool tensors and the block allocator. Why paged: sequences of very different lengths come and go
(chat turns, tool calls, a 128K-token document next to a one-line question); a block pool wastes at most one
partly filled block per sequence, needs no copying when sequences end, and its block tables are exactly what
a paged decode-attention kernel reads. The engine takes blocks for a sequence as it grows, one at a time, and
preempts a sequence when none is left (see workbench.engine.scheduler).

Layout per layer: k, v [num_blocks, block_size, Hk, Dh].
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    pass


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, kv_heads, head_dim)
        # torch.empty: untouched pages cost no memory on the CPU until a sequence writes them.
        self.layers = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                       for _ in range(num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        needed = self.blocks_for(num_tokens)
        if needed > len(self._free):
            raise CacheFullError(f"KV cache full: {num_tokens} tokens need {needed} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(needed)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def slots(self, blocks: list[int], start: int, stop: int) -> list[int]:
        """Flat cache slots of positions [start, stop) of a sequence holding `blocks`."""
        size = self.block_size
        return [blocks[p // size] * size + p % size for p in range(start, stop)]
