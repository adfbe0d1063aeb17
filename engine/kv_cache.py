"""Physical paged KV storage: one K pool and one V pool per layer, sized from a memory budget."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from engine.config import ModelArgs


def kv_bytes_per_token(args: ModelArgs, dtype: mx.Dtype) -> int:
    return args.num_hidden_layers * args.num_key_value_heads * args.head_dim * 2 * dtype.size


def kv_cache_gib(args: ModelArgs, dtype: mx.Dtype, num_seqs: int, tokens_per_seq: int,
                 block_size: int = 16) -> float:
    """A pool just big enough for num_seqs sequences of tokens_per_seq (benchmarks size by it)."""
    per_seq = (tokens_per_seq + 2 * block_size) * kv_bytes_per_token(args, dtype)
    return max(num_seqs * per_seq * 1.1 / (1 << 30), 0.01)


def num_blocks_for_budget(args: ModelArgs, dtype: mx.Dtype, block_size: int,
                          memory_gib: Optional[float] = None,
                          memory_fraction: float = 0.5,
                          max_useful_tokens: Optional[int] = None) -> int:
    """How many blocks fit in memory_gib, or else in memory_fraction of what MLX can still use.

    Without an explicit memory_gib the pool is also capped at max_useful_tokens (what the
    batch limits let all sequences hold at once): more would only cost memory and start-up.
    """
    per_block = kv_bytes_per_token(args, dtype) * block_size
    if memory_gib is not None:
        budget = memory_gib * (1 << 30)
    else:
        limit = _device_memory_bytes()
        budget = max(0, limit - mx.get_active_memory()) * memory_fraction
        if max_useful_tokens is not None:
            budget = min(budget, (-(-max_useful_tokens // block_size) + 1) * per_block)
    num_blocks = int(budget // per_block)
    if num_blocks < 2:
        raise ValueError(f"KV cache budget of {budget / (1 << 30):.3f} GiB holds fewer than 2 blocks "
                         f"of {per_block / (1 << 20):.2f} MiB; raise --kv-cache-memory")
    return num_blocks


def _device_memory_bytes() -> int:
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class PagedKVCache:
    """K and V pools per layer, each (num_blocks * block_size, kv_heads, head_dim).

    Slot s lives in block s // block_size at offset s % block_size. The scheduler's
    KVCacheManager decides which blocks a request owns; this class only holds the memory.
    """

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: mx.Dtype):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        shape = (num_blocks * block_size, args.num_key_value_heads, args.head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(args.num_hidden_layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(args.num_hidden_layers)]
        mx.eval(self.keys, self.values)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def state(self) -> list[mx.array]:
        return self.keys + self.values
