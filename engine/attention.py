"""Paged attention, portable path: scatter new K/V by slot, gather by block table, SDPA.

A step's tokens are laid out decodes first (one query each), then prompt chunks. Decodes form
one attention group with query length 1; prompt chunks form a second group padded to the
longest chunk. Each group gathers its sequences' live KV blocks and runs one masked
mx.fast.scaled_dot_product_attention, so there is no per-request loop inside a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx


@dataclass
class AttentionGroup:
    """Sequences that share a (padded) query length within one step."""

    token_start: int  # the group's tokens are [token_start, token_start + num_tokens) of the step
    num_tokens: int
    query_index: Optional[mx.array]  # (G * Lq,) step token index of each padded query; None: no padding
    output_index: Optional[mx.array]  # (num_tokens,) row of G * Lq where each real query lands
    block_tables: mx.array  # (G, max_blocks) physical block ids, padding points at block 0
    mask: mx.array  # (G, 1, Lq, max_blocks * block_size) bool: key visible to query
    num_seqs: int
    query_len: int


@dataclass
class AttentionMetadata:
    """Everything a layer needs to write and read the paged KV cache for one step."""

    slot_mapping: mx.array  # (T,) flat slot (block * block_size + offset) of each token
    groups: list[AttentionGroup]


def paged_attention(
    q: mx.array,  # (T, H, D), RoPE applied
    k: mx.array,  # (T, KVH, D), RoPE applied
    v: mx.array,  # (T, KVH, D)
    k_pool: mx.array,  # (num_blocks * block_size, KVH, D)
    v_pool: mx.array,
    meta: AttentionMetadata,
    block_size: int,
    scale: float,
) -> tuple[mx.array, mx.array, mx.array]:
    """Write this step's K/V into the pools, attend, return (output (T, H*D), k_pool, v_pool)."""
    k_pool[meta.slot_mapping] = k
    v_pool[meta.slot_mapping] = v
    num_slots, kv_heads, head_dim = k_pool.shape
    k_blocks = k_pool.reshape(num_slots // block_size, block_size, kv_heads, head_dim)
    v_blocks = v_pool.reshape(num_slots // block_size, block_size, kv_heads, head_dim)

    outputs = []
    for g in meta.groups:
        if g.query_index is None:
            q_g = q[g.token_start:g.token_start + g.num_tokens]
        else:
            q_g = q[g.query_index]
        # (G, Lq, H, D) -> (G, H, Lq, D)
        q_g = q_g.reshape(g.num_seqs, g.query_len, *q.shape[1:]).transpose(0, 2, 1, 3)
        keys = _gather(k_blocks, g.block_tables)
        values = _gather(v_blocks, g.block_tables)
        out = mx.fast.scaled_dot_product_attention(q_g, keys, values, scale=scale, mask=g.mask)
        out = out.transpose(0, 2, 1, 3).reshape(g.num_seqs * g.query_len, -1)  # (G*Lq, H*D)
        if g.output_index is not None:
            out = out[g.output_index]
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
    return out, k_pool, v_pool


def _gather(blocks: mx.array, block_tables: mx.array) -> mx.array:
    g, n = block_tables.shape
    _, block_size, kv_heads, head_dim = blocks.shape
    x = blocks[block_tables]  # (G, n, block_size, KVH, D)
    return x.reshape(g, n * block_size, kv_heads, head_dim).transpose(0, 2, 1, 3)  # (G, KVH, L, D)
