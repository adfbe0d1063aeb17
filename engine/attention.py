"""Paged attention: the portable path (gather by block table, SDPA) and the CUDA kernels'
entry. The model writes the step's K/V first.

A step's tokens are laid out decodes first (one query each), then prompt chunks. Decodes form
one attention group with query length 1; prompt chunks form a second group. On the portable
path the chunks are padded to the longest; each group gathers its sequences' live KV blocks
and runs one masked mx.fast.scaled_dot_product_attention, so there is no per-request loop
inside a layer. On CUDA, decodes go to engine/paged_decode.py's kernel and (bf16/fp16) prompt
chunks to engine/paged_prefill.py's, which read the pools through the block tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from engine import paged_decode
from engine.paged_decode import paged_decode_attention
from engine.paged_prefill import chunk_layout, paged_prefill_attention


@dataclass
class AttentionGroup:
    """Sequences that share a (padded) query length within one step."""

    token_start: int  # the group's tokens are [token_start, token_start + num_tokens) of the step
    num_tokens: int
    query_index: Optional[mx.array]  # (G * Lq,) step token index of each padded query; None: no padding
    output_index: Optional[mx.array]  # (num_tokens,) row of G * Lq where each real query lands
    block_tables: mx.array  # (G, max_blocks) physical block ids, padding points at block 0
    # (G, 1, Lq, max_blocks * block_size): additive (0 / -inf) as the runner builds it (SDPA
    # also takes bool); None with the kernel
    mask: Optional[mx.array]
    num_seqs: int
    query_len: int
    # Decode groups on the CUDA kernel path only (the kernel masks by position itself):
    key_start: Optional[mx.array] = None  # (G,) position of the first live key
    query_positions: Optional[mx.array] = None  # (G,)
    splits: int = 1  # thread blocks per (sequence, KV head) on the kernel (flash-decoding)
    # Prompt groups on the CUDA prefill kernel only (unpadded; paged_prefill.chunk_layout):
    seqs: Optional[mx.array] = None  # (G, 4) first row, length, first position, first live key
    tiles: Optional[mx.array] = None  # (n, 2) chunk and first row of each 64-query tile


@dataclass
class AttentionMetadata:
    """Everything a layer needs to write and read the paged KV cache for one step."""

    slot_mapping: mx.array  # (T,) flat slot (block * block_size + offset) of each token
    groups: list[AttentionGroup]
    sliding_window: Optional[int] = None

    @property
    def only_kernels(self) -> bool:
        """Every group is read by a CUDA attention kernel (decode or prompt), each of which
        takes q and so runs after q's producer: the condition for writing K/V into the pools
        in place (MLX orders a CUDA graph's kernels by the buffers they write, and the K/V
        write reaches the pools through an input; the portable path's gathers do not read q)."""
        return all(g.key_start is not None or g.tiles is not None for g in self.groups)


def paged_attention(
    q: mx.array,  # (T, H, D), RoPE applied
    k_pool: mx.array,  # (num_blocks * block_size, KVH, D), this step's K/V already written
    v_pool: mx.array,
    meta: AttentionMetadata,
    block_size: int,
    scale: float,
) -> mx.array:
    """Attend every query to its sequence's keys in the pools; returns (T, H*D)."""
    num_slots, kv_heads, head_dim = k_pool.shape
    k_blocks = k_pool.reshape(num_slots // block_size, block_size, kv_heads, head_dim)
    v_blocks = v_pool.reshape(num_slots // block_size, block_size, kv_heads, head_dim)

    outputs = []
    for g in meta.groups:
        if g.query_index is None:
            q_g = q[g.token_start:g.token_start + g.num_tokens]
        else:
            q_g = q[g.query_index]
        if g.tiles is not None:  # prompt chunks on the CUDA kernel, as they lie in the step
            outputs.append(paged_prefill_attention(q_g, k_pool, v_pool, g.block_tables, g.seqs,
                                                   g.tiles, block_size, meta.sliding_window))
            continue
        if g.key_start is not None:  # decode group on the CUDA kernel
            out = paged_decode_attention(q_g, k_pool, v_pool, g.block_tables, g.key_start,
                                         g.query_positions, block_size, meta.sliding_window,
                                         g.splits)
            outputs.append(out.reshape(g.num_seqs, -1))
            continue
        # (G, Lq, H, D) -> (G, H, Lq, D)
        q_g = q_g.reshape(g.num_seqs, g.query_len, *q.shape[1:]).transpose(0, 2, 1, 3)
        keys = _gather(k_blocks, g.block_tables)
        values = _gather(v_blocks, g.block_tables)
        out = mx.fast.scaled_dot_product_attention(q_g, keys, values, scale=scale, mask=g.mask)
        out = out.transpose(0, 2, 1, 3).reshape(g.num_seqs * g.query_len, -1)  # (G*Lq, H*D)
        if g.output_index is not None:
            out = out[g.output_index]
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)


def _gather(blocks: mx.array, block_tables: mx.array) -> mx.array:
    g, n = block_tables.shape
    _, block_size, kv_heads, head_dim = blocks.shape
    x = blocks[block_tables]  # (G, n, block_size, KVH, D)
    return x.reshape(g, n * block_size, kv_heads, head_dim).transpose(0, 2, 1, 3)  # (G, KVH, L, D)


def _scrambled_tables(lengths: list[int], block_size: int, window: Optional[int],
                      rng: np.random.Generator, first: Optional[np.ndarray] = None
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """The self-checks' paged cache layout for sequences of `lengths`: (block tables over a
    random permutation of blocks 1.., each sequence's first live block (`first`, else after
    window freeing for a query at its last position), the pool's block count)."""
    max_blocks = -(-max(lengths) // block_size) + 1
    num_blocks = len(lengths) * max_blocks + 1
    perm = rng.permutation(num_blocks - 1) + 1
    if first is None:
        first = np.array([(max(0, n - window) // block_size) if window else 0 for n in lengths])
    tables = np.zeros((len(lengths), max_blocks), np.int32)
    for i, n in enumerate(lengths):
        nb = -(-n // block_size) - first[i]
        tables[i, :nb] = perm[i * max_blocks:i * max_blocks + nb]
    return tables, first, num_blocks


def decode_kernel_matches_portable(n_heads: int, kv_heads: int, head_dim: int, block_size: int,
                                   window: Optional[int], dtype: mx.Dtype, seed: int = 0,
                                   splits: tuple[int, ...] = (1, 4)) -> bool:
    """Run the CUDA decode kernel and the portable path on the same random paged cache.

    Sequences of assorted lengths (some past the window, some starting mid-table as after
    window freeing, some shorter than the number of splits) over scrambled blocks; True when
    every output agrees, for each number of key splits and of warps per thread block.
    """
    rng = np.random.default_rng(seed)
    lengths = [1, 5, block_size, 3 * block_size + 7, 40 * block_size + 3]
    tables, first, num_blocks = _scrambled_tables(lengths, block_size, window, rng)
    key_pos = np.full((len(lengths), tables.shape[1] * block_size), -1, np.int64)
    q_pos = np.array([n - 1 for n in lengths])
    for i, n in enumerate(lengths):
        nb = -(-n // block_size) - first[i]
        key_pos[i, :nb * block_size] = first[i] * block_size + np.arange(nb * block_size)
    visible = (key_pos >= 0) & (key_pos <= q_pos[:, None])
    if window:
        visible &= key_pos > q_pos[:, None] - window
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    v_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    q = mx.array(rng.standard_normal((len(lengths), n_heads, head_dim)).astype(np.float32)).astype(dtype)
    bt = mx.array(tables)
    keys = _gather(k_pool.reshape(num_blocks, block_size, kv_heads, head_dim), bt)
    values = _gather(v_pool.reshape(num_blocks, block_size, kv_heads, head_dim), bt)
    ref = mx.fast.scaled_dot_product_attention(q[:, :, None], keys, values, scale=head_dim ** -0.5,
                                               mask=mx.array(visible[:, None, None, :]))[:, :, 0]
    tol = 1e-4 if dtype == mx.float32 else 2e-2
    key_start = mx.array((first * block_size).astype(np.int32))
    query_positions = mx.array(q_pos.astype(np.int32))
    # Every (splits, warps) pair the engine may launch, so that each kernel is also compiled
    # here at start-up, not mid-run (NVRTC takes seconds on the first launch of a variant).
    for n in splits:
        for warps in paged_decode.launch_warps():
            got = paged_decode_attention(q, k_pool, v_pool, bt, key_start, query_positions,
                                         block_size, window, n, warps=warps)
            if not mx.allclose(got.astype(mx.float32), ref.astype(mx.float32), atol=tol, rtol=tol):
                return False
    return True


def rope_store_kernel_matches(n_heads: int, kv_heads: int, head_dim: int, block_size: int,
                              window: Optional[int], base: float, dtype: mx.Dtype,
                              seed: int = 0) -> bool:
    """paged_decode.rope_store_decode_attention against the two kernels it replaces,
    fused_ops.qkv_rope_store (in place) then paged_decode_attention, on a random paged cache:
    the same outputs and the same pools afterwards. Every warp count the engine may launch
    runs, so each variant compiles here at start-up."""
    from engine.fused_ops import qkv_rope_store
    rng = np.random.default_rng(seed)
    lengths = [1, 5, 3 * block_size + 7, 40 * block_size + 3]
    tables, first, num_blocks = _scrambled_tables(lengths, block_size, window, rng)
    pos = np.array(lengths) - 1
    slots = tables[np.arange(len(lengths)), pos // block_size - first] * block_size + pos % block_size
    pools = [rng.standard_normal((num_blocks * block_size, kv_heads, head_dim)).astype(np.float32)
             for _ in range(2)]
    qkv = mx.array(rng.standard_normal((len(lengths), (n_heads + 2 * kv_heads) * head_dim))
                   .astype(np.float32)).astype(dtype)
    bt, key_start = mx.array(tables), mx.array((first * block_size).astype(np.int32))
    q_pos, slot = mx.array(pos.astype(np.int32)), mx.array(slots.astype(np.int32))
    tol = 1e-4 if dtype == mx.float32 else 2e-2
    for warps in paged_decode.launch_warps():
        two, one = ([mx.array(p).astype(dtype) for p in pools] for _ in range(2))
        mx.eval(two, one)
        q, k2, v2 = qkv_rope_store(qkv, q_pos, slot, *two, n_heads, kv_heads, head_dim, base,
                                   kernel=True, in_place=True)
        want = paged_decode_attention(q, k2, v2, bt, key_start, q_pos, block_size, window,
                                      warps=warps)
        got = paged_decode.rope_store_decode_attention(qkv, *one, bt, key_start, q_pos, slot,
                                                       n_heads, base, block_size, window, warps)
        mx.eval(want, got)
        if not mx.allclose(got.astype(mx.float32), want.astype(mx.float32), atol=tol, rtol=tol):
            return False
        for a, b in zip(one, two):
            # The two kernels rotate K with the same formula, but the compiler may contract
            # it into FMAs differently in each: float32 rows then differ in the last bit
            # (H200: 2.4e-7 at most), 16-bit ones round to the same values.
            a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
            if not (np.allclose(a, b, rtol=1e-6, atol=1e-6) if dtype == mx.float32 else np.array_equal(a, b)):
                return False
    return True


def prefill_kernel_matches_portable(n_heads: int, kv_heads: int, head_dim: int, block_size: int,
                                    window: Optional[int], dtype: mx.Dtype, seed: int = 0) -> bool:
    """Run the CUDA prompt-chunk kernel and the portable path (gather + SDPA with a mask) on
    the same random paged cache: chunks of 1 to 150 queries, with and without a cached past
    (one past the window, its live blocks starting mid-table), over scrambled blocks. True
    when every real query's output agrees. Also compiles the kernel, at start-up."""
    rng = np.random.default_rng(seed)
    q_lens = [1, 20, 150, 64]
    past = [7, 0, 3 * block_size + 5, (window or 40 * block_size) + 2 * block_size + 3]
    ends = [p + n for p, n in zip(past, q_lens)]
    # A chunk's live keys start at the block of its first query's window, not of its last.
    first = np.array([(max(0, p + 1 - window) // block_size) if window else 0 for p in past])
    tables, _, num_blocks = _scrambled_tables(ends, block_size, window, rng, first)
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    v_pool = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    t = sum(q_lens)
    q = mx.array(rng.standard_normal((t, n_heads, head_dim)).astype(np.float32)).astype(dtype)
    seqs, tiles = chunk_layout(q_lens, past, first * block_size, window)
    got = paged_prefill_attention(q, k_pool, v_pool, mx.array(tables), mx.array(seqs.astype(np.int32)),
                                  mx.array(tiles.astype(np.int32)), block_size, window)
    # The portable path: chunks padded to the longest, keys gathered, a bool mask.
    lq, width = max(q_lens), tables.shape[1] * block_size
    rows = np.concatenate([np.minimum(np.arange(lq), n - 1) + s for n, s in zip(q_lens, seqs[:, 0])])
    q_pos = np.stack([p + np.minimum(np.arange(lq), n - 1) for p, n in zip(past, q_lens)])
    key_pos = np.stack([f * block_size + np.arange(width) for f in first])
    for i, e in enumerate(ends):  # keys past the chunk's blocks do not exist
        key_pos[i, key_pos[i] >= -(-e // block_size) * block_size] = -1
    visible = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= q_pos[:, :, None])
    if window:
        visible &= key_pos[:, None, :] > q_pos[:, :, None] - window
    q_g = q[mx.array(rows)].reshape(len(q_lens), lq, n_heads, head_dim).transpose(0, 2, 1, 3)
    bt = mx.array(tables)
    keys = _gather(k_pool.reshape(num_blocks, block_size, kv_heads, head_dim), bt)
    values = _gather(v_pool.reshape(num_blocks, block_size, kv_heads, head_dim), bt)
    ref = mx.fast.scaled_dot_product_attention(q_g, keys, values, scale=head_dim ** -0.5,
                                               mask=mx.array(visible[:, None]))
    ref = ref.transpose(0, 2, 1, 3).reshape(len(q_lens) * lq, -1)
    keep = np.concatenate([i * lq + np.arange(n) for i, n in enumerate(q_lens)])
    ref = ref[mx.array(keep)]
    tol = 2e-2
    return bool(mx.allclose(got.astype(mx.float32), ref.astype(mx.float32), atol=tol, rtol=tol))

