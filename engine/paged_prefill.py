"""Prompt-chunk attention over the paged KV cache as one CUDA kernel (bf16/fp16, tensor cores).

The portable path (engine/attention.py) gathers each chunk's blocks into a padded
(G, KVH, L, D) copy and calls MLX's SDPA with an additive (G, 1, Lq, L) mask. On CUDA that
SDPA is cuDNN, which builds a graph for every new (G, Lq, L): on an H200 the first call of a
shape took 65 ms (Lq 256) to 1.1 s (Lq 700-1,024) against 0.2-0.6 ms warm
(`loadtest/op_profile --prompt-shapes`, fourteenth session), and a server meets new prompt
lengths all the time. This kernel takes the chunks as they lie in the step (no padding to the
longest), reads K/V through the block tables (no gather), masks by position (causal, window,
live keys: no mask array) and skips key tiles none of a warp's queries can see. It compiles
once per model (dtype, head size, heads, block size, window); the step's shape is only the
launch grid.

One thread block per (64-query tile of one chunk, query head): four warps of 16 query rows.
The block walks its keys 64 at a time through two shared-memory stages: each tile's K and V
are copied (cp.async, 16-byte pieces through the block table) while the tile before is in
use. (BQ, STAGES and HEAVY_FIRST are there to be measured: `gpu_trace --prefill --set
paged_prefill.STAGES=1`.) Each warp holds its Q rows as mma.sync A fragments, reads K and V as B fragments with
ldmatrix (V transposed on the way), computes its 16 x 64 scores on tensor cores
(qgemm.DEVICE's m16n8k16), applies the mask (on tiles some of its rows see only in part) and
an online softmax in registers (base 2), and
multiplies P, re-packed from the score fragments into A fragments, by V into its 16 x D
float accumulators. The output rows keep the queries' order: (T, H, D), as q. The scale is
1 / sqrt(D), Mistral's.

Its first version (one stage, 16-bit shared-memory reads for V) took 378 us a layer of a
4,096-token step of 16 x 1,024-token prompts on an H200, against cuDNN's 246 plus 111 of
gathers: the same step time, without cuDNN's per-shape graph builds; this one 372 us
(fourteenth session). What bounds it is not yet known.

tests/test_paged_prefill_emulated.py runs this source on the CPU (tests/cuda_emulator.py);
prefill_kernel_matches_portable() checks the real kernel against the portable path on a GPU,
at start-up before the engine uses it (engine/runner.py) and in tests/test_paged_prefill.py.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from engine.kernel_source import cuda_kernel
from engine.paged_decode import CP_ASYNC
from engine.qgemm import DEVICE as MMA

BQ = 64   # queries per thread block: a warp per 16 rows (64: four warps; 128: eight)
BKV = 64  # keys per tile
STAGES = 2  # shared-memory stages of K and V tiles: 2 streams the next tile in, 1 does not
# Tiles with the most keys to read first (their blocks start first, so fewer long ones are
# left alone at the end of the grid) instead of in chunk order. Off until measured.
HEAVY_FIRST = False

# Four 8x8 16-bit matrices from shared memory, one per 8 lanes' row addresses; lane l gets
# row l / 4, columns 2 (l % 4) and +1 of each (x4), or with .trans column l / 4, rows
# 2 (l % 4) and +1: exactly mma's B fragments for K rows (x4) and for V rows (x4.trans).
LDMATRIX = r"""
__device__ __forceinline__ void ldsm_x4(unsigned* r, const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
"""

HEADER = CP_ASYNC + MMA + LDMATRIX

# Inputs: q (T, H, D); k_pool, v_pool (slots, KVH, D); tables (G, W) block ids; seqs (G, 4):
# the chunk's first row in q, its length, the position of its first query, the position of
# its first live key (a block boundary: live blocks start the table); tiles (n, 2): the
# chunk and first row of each 64-query tile. Grid: (tiles, H).
# Score fragment of n-tile j (8 keys): c[0..1] rows g, keys 8j+2t..+1; c[2..3] row g+8.
SOURCE = r"""
    constexpr int H = KVH * GQA, PITCH = D + 8;  // padded rows: conflict-free ldmatrix
    constexpr int KSTEPS = D / 16, NS = BKV / 8, NO = D / 8, CH = D / 8, STAGE = 2 * BKV * PITCH;
    constexpr int THREADS = BQ * 2;  // a warp per 16 queries
    const float NEG_INF = -__int_as_float(0x7f800000);
    extern __shared__ __align__(16) unsigned char smem[];
    T* const sbase = reinterpret_cast<T*>(smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int h = blockIdx.y, kvh = h / GQA;
    const int s = tiles[2 * blockIdx.x], row0 = tiles[2 * blockIdx.x + 1];
    const int q_start = seqs[4 * s], q_len = seqs[4 * s + 1];
    const int pos0 = seqs[4 * s + 2], key_start = seqs[4 * s + 3];
    const int* table = tables + (long)s * tables_shape[1];
    const int first_block = key_start / BS;
    // The block's keys: from the first its first query sees to its last query's own.
    int k_lo = key_start;
    if (WINDOW > 0) k_lo = max(k_lo, pos0 + row0 - WINDOW + 1);
    const int k_hi = pos0 + min(row0 + BQ, q_len) - 1;
    // This warp's rows g and g + 8; rows past the chunk repeat its last, never stored.
    const int wr0 = row0 + warp * 16;
    const int ra = min(wr0 + g, q_len - 1), rb = min(wr0 + g + 8, q_len - 1);
    const int pa = pos0 + ra, pb = pos0 + rb;
    int w_lo = key_start;
    if (WINDOW > 0) w_lo = max(w_lo, pos0 + min(wr0, q_len - 1) - WINDOW + 1);
    const int w_hi = pos0 + min(wr0 + 15, q_len - 1);
    // This lane's ldmatrix row within a stage. K, x4: two k-steps of one 8-key n-tile (key
    // 8j + lane % 8, dims 16kk + 8 (lane / 8)). V, x4.trans: two 8-dim n-tiles of one
    // 16-key step (key 16kk + lane % 8 + 8 (lane / 8 % 2), dims 8j + 8 (lane / 16)).
    const int k_row = (lane & 7) * PITCH + (lane >> 3) * 8;
    const int v_row = BKV * PITCH + ((lane & 7) + ((lane >> 3) & 1) * 8) * PITCH + (lane >> 4) * 8;

    unsigned qf[KSTEPS][4];
    {
        const T* qa = q + ((long)(q_start + ra) * H + h) * D + 2 * t;
        const T* qb = q + ((long)(q_start + rb) * H + h) * D + 2 * t;
        #pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            qf[kk][0] = *reinterpret_cast<const unsigned*>(qa + kk * 16);
            qf[kk][1] = *reinterpret_cast<const unsigned*>(qb + kk * 16);
            qf[kk][2] = *reinterpret_cast<const unsigned*>(qa + kk * 16 + 8);
            qf[kk][3] = *reinterpret_cast<const unsigned*>(qb + kk * 16 + 8);
        }
    }
    float o[NO][4];
    #pragma unroll
    for (int j = 0; j < NO; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float ma = NEG_INF, mb = NEG_INF, la = 0.f, lb = 0.f;
    const float sl2 = rsqrtf((float)D) * 1.4426950408889634f;  // softmax scale, base 2

    // K and V of keys kb..kb+BKV-1 into a stage, one cp.async group; keys past k_hi read as 0.
    auto load = [&](int stage, int kb) {
        T* dst = sbase + stage * STAGE;
        for (int i = threadIdx.x; i < 2 * BKV * CH; i += THREADS) {
            const int kv = i / (BKV * CH), key = i / CH % BKV, c = i % CH, p = kb + key;
            const bool ok = p <= k_hi;
            long src = 0;
            if (ok) src = (((long)table[p / BS - first_block] * BS + p % BS) * KVH + kvh) * D + c * 8;
            cp_async<16>(dst + (kv * BKV + key) * PITCH + c * 8, (kv ? v_pool : k_pool) + src, ok);
        }
        cp_async_commit();
    };
    load(0, k_lo);
    int stage = 0;
    for (int kb = k_lo; kb <= k_hi; kb += BKV, stage = (stage + 1) % STAGES) {
        if (STAGES > 1) {  // the next tile streams into the other stage while this one is used
            if (kb + BKV <= k_hi) load(stage ^ 1, kb + BKV);
            else cp_async_commit();
            cp_async_wait<1>();
        } else {
            if (kb > k_lo) load(0, kb);
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* st = sbase + stage * STAGE;
        if (kb <= w_hi && kb + BKV - 1 >= w_lo) {  // the same for the whole warp
            float sc[NS][4];
            #pragma unroll
            for (int j = 0; j < NS; ++j) {
                sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
                #pragma unroll
                for (int kk = 0; kk < KSTEPS; kk += 2) {
                    unsigned b[4];
                    ldsm_x4(b, st + k_row + j * 8 * PITCH + kk * 16);
                    mma16816<BF16>(sc[j], qf[kk], b);
                    mma16816<BF16>(sc[j], qf[kk + 1], b + 2);
                }
            }
            // A tile every row of the warp sees whole (it ends at or before the warp's first
            // query and, with a window, starts inside its last query's) needs no mask: the
            // per-score test is a large share of a tile's non-mma work.
            if (kb + BKV - 1 <= pos0 + min(wr0, q_len - 1) && (WINDOW == 0 || kb > w_hi - WINDOW)) {
                #pragma unroll
                for (int j = 0; j < NS; ++j) {
                    sc[j][0] *= sl2; sc[j][1] *= sl2; sc[j][2] *= sl2; sc[j][3] *= sl2;
                }
            } else {
                #pragma unroll
                for (int j = 0; j < NS; ++j) {
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int p = kb + j * 8 + 2 * t + (e & 1), qp = e < 2 ? pa : pb;
                        const bool vis = p <= qp && (WINDOW == 0 || p > qp - WINDOW);
                        sc[j][e] = vis ? sc[j][e] * sl2 : NEG_INF;
                    }
                }
            }
            float mxa = NEG_INF, mxb = NEG_INF;
            #pragma unroll
            for (int j = 0; j < NS; ++j) {
                mxa = fmaxf(mxa, fmaxf(sc[j][0], sc[j][1]));
                mxb = fmaxf(mxb, fmaxf(sc[j][2], sc[j][3]));
            }
            #pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
                mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffff, mxa, off));
                mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffff, mxb, off));
            }
            const float na = fmaxf(ma, mxa), nb = fmaxf(mb, mxb);
            // A row with no visible key yet keeps max -inf: subtract 0 there, not -inf.
            const float sa = na == NEG_INF ? 0.f : na, sb = nb == NEG_INF ? 0.f : nb;
            const float ca = exp2f(ma - sa), cb = exp2f(mb - sb);
            ma = na; mb = nb;
            la *= ca; lb *= cb;
            #pragma unroll
            for (int j = 0; j < NO; ++j) { o[j][0] *= ca; o[j][1] *= ca; o[j][2] *= cb; o[j][3] *= cb; }
            #pragma unroll
            for (int j = 0; j < NS; ++j) {
                sc[j][0] = exp2f(sc[j][0] - sa); sc[j][1] = exp2f(sc[j][1] - sa);
                sc[j][2] = exp2f(sc[j][2] - sb); sc[j][3] = exp2f(sc[j][3] - sb);
                la += sc[j][0] + sc[j][1];
                lb += sc[j][2] + sc[j][3];
            }
            // P (16 x BKV) times V (BKV x D): key step kk takes score n-tiles 2kk and 2kk+1.
            #pragma unroll
            for (int kk = 0; kk < BKV / 16; ++kk) {
                unsigned a[4];
                a[0] = pack2<BF16>(sc[2 * kk][0], sc[2 * kk][1]);
                a[1] = pack2<BF16>(sc[2 * kk][2], sc[2 * kk][3]);
                a[2] = pack2<BF16>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
                a[3] = pack2<BF16>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
                #pragma unroll
                for (int j = 0; j < NO; j += 2) {
                    unsigned b[4];
                    ldsm_x4_t(b, st + v_row + kk * 16 * PITCH + j * 8);
                    mma16816<BF16>(o[j], a, b);
                    mma16816<BF16>(o[j + 1], a, b + 2);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    #pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        la += __shfl_xor_sync(0xffffffff, la, off);
        lb += __shfl_xor_sync(0xffffffff, lb, off);
    }
    const float ia = la > 0.f ? 1.f / la : 0.f, ib = lb > 0.f ? 1.f / lb : 0.f;
    if (wr0 + g < q_len) {
        T* dst = out + ((long)(q_start + wr0 + g) * H + h) * D + 2 * t;
        #pragma unroll
        for (int j = 0; j < NO; ++j)
            *reinterpret_cast<unsigned*>(dst + j * 8) = pack2<BF16>(o[j][0] * ia, o[j][1] * ia);
    }
    if (wr0 + g + 8 < q_len) {
        T* dst = out + ((long)(q_start + wr0 + g + 8) * H + h) * D + 2 * t;
        #pragma unroll
        for (int j = 0; j < NO; ++j)
            *reinterpret_cast<unsigned*>(dst + j * 8) = pack2<BF16>(o[j][2] * ib, o[j][3] * ib);
    }
"""



def supported(head_dim: int, dtype: mx.Dtype) -> bool:
    """The kernel runs on MLX's CUDA backend for bf16/fp16 caches and head sizes of whole
    pairs of 16-wide mma steps (one ldmatrix x4 of K feeds two)."""
    return (mx.cuda.is_available() and mx.default_device() == mx.gpu
            and dtype in (mx.bfloat16, mx.float16) and head_dim % 32 == 0)


def shared_bytes(head_dim: int) -> int:
    """STAGES stages of a K and a V tile, rows padded by 8 values of 2 bytes."""
    return STAGES * 2 * BKV * (head_dim + 8) * 2


@functools.lru_cache(maxsize=None)
def _kernel(smem: int):
    return cuda_kernel(name=f"paged_prefill_{smem}",
                       input_names=["q", "k_pool", "v_pool", "tables", "seqs", "tiles"],
                       output_names=["out"], source=SOURCE, header=HEADER, shared_memory=smem)


def chunk_layout(q_lens: Sequence[int], positions: Sequence[int], key_starts: Sequence[int],
                 window: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(seqs (G, 4), tiles (n, 2)) for chunks of q_lens queries laid out back to back, whose
    first queries sit at `positions` and first live keys at `key_starts` (block-aligned);
    tiles in chunk order, or with HEAVY_FIRST by the keys they read, most first."""
    q_lens = np.asarray(q_lens, np.int64)
    positions, key_starts = np.asarray(positions, np.int64), np.asarray(key_starts, np.int64)
    starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    seqs = np.stack([starts, q_lens, positions, key_starts], axis=1)
    per = -(-q_lens // BQ)
    chunk = np.repeat(np.arange(len(q_lens)), per)
    first = (np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)) * BQ
    tiles = np.stack([chunk, first], axis=1)
    if HEAVY_FIRST:
        last = positions[chunk] + np.minimum(first + BQ, q_lens[chunk]) - 1
        lo = key_starts[chunk]
        if window:
            lo = np.maximum(lo, positions[chunk] + first - window + 1)
        tiles = tiles[np.argsort(lo - last, kind="stable")]
    return seqs, tiles


def paged_prefill_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array,
                            block_tables: mx.array, seqs: mx.array, tiles: mx.array,
                            block_size: int, window: Optional[int]) -> mx.array:
    """Attention of prompt chunks q (T, H, D), RoPE applied, their K/V already in the pools,
    to their sequences' keys; (T, H * D). seqs and tiles as chunk_layout() builds them."""
    t, n_heads, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    out = _kernel(shared_bytes(head_dim))(
        inputs=[q, k_pool, v_pool, block_tables, seqs, tiles],
        template=[("T", q.dtype), ("BF16", q.dtype == mx.bfloat16), ("D", head_dim),
                  ("KVH", kv_heads), ("GQA", n_heads // kv_heads), ("BS", block_size),
                  ("WINDOW", window or 0), ("BKV", BKV), ("BQ", BQ), ("STAGES", STAGES)],
        grid=(tiles.shape[0] * 2 * BQ, n_heads, 1), threadgroup=(2 * BQ, 1, 1),
        output_shapes=[q.shape], output_dtypes=[q.dtype])[0]
    return out.reshape(t, n_heads * head_dim)
