"""KV block bookkeeping: the block pool, per-request block tables, window freeing, prefix cache.

Block ids index the engine's physical pools; this file only decides who owns which block.
A block whose every position fell out of the sliding window goes back to the pool at once.
Full blocks are keyed by a hash chain over their tokens so a later request with the same
prefix reuses them (reference-counted). A freed block keeps its hash in an LRU list of
cached-free blocks until a fresh block is needed.

Prefix cache counters are in tokens, counted once per first allocation of a request
(a request that waits for blocks across several steps is counted when it finally starts):
prefix_cache_queries += its token count, prefix_cache_hits += the tokens served from cache.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Optional, Sequence

from scheduler.request import Request


def hash_block(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Prefix-cache key of one full block, chained over every block before it."""
    # sha256, not hash(): users share the cache, so one must not forge another's key.
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


@dataclass
class _Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: Optional[bytes] = None  # set once full and registered in the prefix cache


@dataclass
class _Seq:
    """One request's live blocks: table[i] holds logical block first_block_index + i.

    A tuple, replaced whenever it changes: block_table() hands it out as is, every step,
    for every running request (copying it each time was a measurable share of a step)."""

    table: tuple[int, ...] = ()
    first_block_index: int = 0
    num_hashed: int = 0  # leading logical blocks whose hash chain is known
    last_hash: bytes = b""  # hash of logical block num_hashed - 1 (the chain's parent)


class KVCacheManager:
    """Hands out KV blocks to requests; answers whether tokens can get slots."""

    def __init__(self, num_blocks: int, block_size: int = 16,
                 sliding_window: Optional[int] = None, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # no hash: reused first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # hashed, ref 0; LRU first
        self._hash_to_block: dict[bytes, int] = {}
        self._seqs: dict[str, _Seq] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # -- stats -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def max_num_tokens(self, max_chunk: int) -> Optional[int]:
        """Longest sequence one request alone can hold, fed max_chunk tokens a step at most.

        None means unbounded: with a window, a sequence holds a fixed number of blocks.
        """
        if self.sliding_window is not None:
            # During a step, keys from first_query - window + 1 to the chunk's last position.
            span = self.sliding_window - 1 + max_chunk
            if -(-(span + self.block_size - 1) // self.block_size) <= self.num_blocks:
                return None
        return self.num_blocks * self.block_size

    # -- per request -------------------------------------------------------------------------
    def block_table(self, request_id: str) -> tuple[int, ...]:
        """Physical ids of the request's live blocks, from first_block_index on."""
        seq = self._seqs.get(request_id)
        return seq.table if seq else ()

    def first_block_index(self, request_id: str) -> int:
        """Logical index of the first live block (earlier ones fell out of the window)."""
        seq = self._seqs.get(request_id)
        return seq.first_block_index if seq else 0

    def get_computed_blocks(self, request: Request) -> int:
        """Number of leading tokens whose full blocks are cached; never all of them.

        The last token is always left to compute so that the step yields logits.
        """
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks, _ = self._lookup(request.all_token_ids, max_blocks)
        return len(blocks) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       num_computed_from_cache: int = 0) -> bool:
        """Give slots to positions [start, start + num_new_tokens), start = num_computed_tokens
        + num_computed_from_cache; False (nothing changed) if the pool can't cover it.

        num_computed_from_cache (first allocation only) is get_computed_blocks' answer: those
        cached blocks join the request's table. The caller then advances num_computed_tokens.
        """
        bs = self.block_size
        seq = self._seqs.get(request.request_id)
        is_new = seq is None
        start = request.num_computed_tokens + num_computed_from_cache
        first = self._num_invisible_blocks(start)
        if (not is_new and not num_computed_from_cache and first <= seq.first_block_index
                and -(-(start + num_new_tokens) // bs) - seq.first_block_index <= len(seq.table)):
            return True  # the common decode step: its slots are in blocks it holds already
        if is_new:
            hits, last_hash = self._lookup(request.all_token_ids, num_computed_from_cache // bs)
            if num_computed_from_cache % bs or len(hits) * bs != num_computed_from_cache:
                raise ValueError(f"{num_computed_from_cache} cached tokens is not what "
                                 "get_computed_blocks returned just before")
            seq = _Seq(first_block_index=first, num_hashed=len(hits), last_hash=last_hash)
            drop, keep = [], hits[first:]  # hits outside the window are never taken
        else:
            if num_computed_from_cache:
                raise ValueError("num_computed_from_cache applies to a request's first allocation")
            first = max(first, seq.first_block_index)
            num_drop = min(first - seq.first_block_index, len(seq.table))
            drop, keep = seq.table[:num_drop], seq.table[num_drop:]

        num_fresh = max(0, -(-(start + num_new_tokens) // bs) - first - len(keep))
        freed = sum(1 for b in drop if self._blocks[b].ref_cnt == 1)
        taken = sum(1 for b in keep if self._blocks[b].ref_cnt == 0) if is_new else 0
        if num_fresh > self.num_free_blocks + freed - taken:
            return False

        if is_new:
            for b in keep:  # before allocating fresh ones, so they cannot be evicted
                self._take(b)
            if self.enable_prefix_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += num_computed_from_cache
            self._seqs[request.request_id] = seq
        for b in drop:
            self._release(b)
        seq.table = tuple(keep) + tuple(self._allocate_fresh() for _ in range(num_fresh))
        seq.first_block_index = first
        return True

    def free_outside_window(self, request: Request) -> None:
        """Free blocks no query from num_computed_tokens on can see."""
        seq = self._seqs.get(request.request_id)
        if seq is None or self.sliding_window is None:
            return
        first = max(seq.first_block_index, self._num_invisible_blocks(request.num_computed_tokens))
        num_drop = min(first - seq.first_block_index, len(seq.table))
        if num_drop:
            for b in seq.table[:num_drop]:
                self._release(b)
            seq.table = seq.table[num_drop:]
        seq.first_block_index = first

    def cache_full_blocks(self, request: Request) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        seq = self._seqs.get(request.request_id)
        num_full = request.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or seq is None or num_full <= seq.num_hashed:
            return
        tokens, bs = request.all_token_ids, self.block_size
        for k in range(seq.num_hashed, num_full):
            # The chain goes on through blocks already freed by the window.
            seq.last_hash = hash_block(seq.last_hash, tokens[k * bs:(k + 1) * bs])
            i = k - seq.first_block_index
            if 0 <= i < len(seq.table) and seq.last_hash not in self._hash_to_block:
                block = self._blocks[seq.table[i]]
                block.block_hash = seq.last_hash
                self._hash_to_block[block.block_hash] = block.block_id
        seq.num_hashed = num_full

    def free(self, request: Request) -> None:
        """Return all the request's blocks. Idempotent."""
        seq = self._seqs.pop(request.request_id, None)
        if seq is None:
            return
        # Tail first: the LRU evicts a sequence's last blocks before the prefix others share.
        for b in reversed(seq.table):
            self._release(b)

    # -- pool --------------------------------------------------------------------------------
    def _num_invisible_blocks(self, first_query_pos: int) -> int:
        # Block k's last position (k+1)*bs - 1 is invisible once <= first_query_pos - window.
        if self.sliding_window is None:
            return 0
        return max(0, (first_query_pos - self.sliding_window + 1) // self.block_size)

    def _lookup(self, tokens: Sequence[int], max_blocks: int) -> tuple[list[int], bytes]:
        blocks: list[int] = []
        parent = b""
        for k in range(max_blocks):
            h = hash_block(parent, tokens[k * self.block_size:(k + 1) * self.block_size])
            b = self._hash_to_block.get(h)
            if b is None:
                break
            blocks.append(b)
            parent = h
        return blocks, parent

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_cnt == 0:
            del self._cached_free[block_id]
        block.ref_cnt += 1

    def _allocate_fresh(self) -> int:
        if self._free:
            block = self._blocks[self._free.popleft()]
        else:
            block_id, _ = self._cached_free.popitem(last=False)
            block = self._blocks[block_id]
            del self._hash_to_block[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block.block_id

    def _release(self, block_id: int) -> None:
        block = self._blocks[block_id]
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            if block.block_hash is not None:
                self._cached_free[block_id] = None
            else:
                self._free.append(block_id)
