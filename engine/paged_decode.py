"""Paged decode attention as one CUDA kernel (mx.fast.cuda_kernel), for MLX's CUDA backend.

The portable path (engine/attention.py) gathers every sequence's live KV blocks into a
contiguous copy before SDPA, so each step reads the KV cache three times and builds a mask
on the host. This kernel reads K and V straight from the pools through the block table,
once: a thread block per (sequence, KV head) serves that head's whole GQA group of query
heads, warps split the keys, and an online softmax merges them. When the batch is small or
the contexts long, each sequence's keys are also split over several blocks (flash-decoding)
and a second kernel merges the splits, so a few long sequences still fill the GPU. Versions:
v2 for few blocks, v3 (a cp.async ring a warp) for many, v4 (v3 on tensor cores) for many
blocks over a bf16/fp16 cache; v1, the first, stays for comparison. It is
used only where engine.attention.decode_kernel_matches_portable has shown it to match the
portable path on this machine; everywhere else the portable path runs.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import mlx.core as mx

from engine.kernel_source import cuda_kernel

log = logging.getLogger(__name__)

NUM_WARPS = 4
FEW_BLOCKS, FEW_BLOCKS_WARPS = 64, 16  # up to 64 blocks (8 sequences x 8 KV heads): 16 warps
UNROLL = 4  # keys each warp loads before using them
# v2: V rows of a full tile loaded in batches of V_BATCH before use (0: the unrolled loop).
# H200, 7B, 32 layers (`gpu_trace --set paged_decode.V_BATCH=...`, sixth session): batch 64 x
# 1,024 keys 3.60 ms with 8 against 4.44 with 0 and 4.64 with 16; batch 1 x 1,024 keys 1.12
# against 1.39. 16 and 32 failed to launch with 16 warps (too many registers: v_batch()).
V_BATCH = 8
V_BATCH_FEW = 8  # the same with more than 4 warps (v_batch)
MAX_SPLITS = 32
# v3, the staged kernel (see _BODY_V3), for the launches of more than FEW_BLOCKS blocks
# (MISTRAL_SERVE_DECODE_STAGED=0: v2 there too). H200, 7B, batch 64 x 1,024 keys, GPU time a
# layer (`gpu_trace --set paged_decode.STAGED=...`, twelfth session, calls B-D): v2 116 us;
# v3 with STAGED_WARPS x STAGES = 2 x 3: 78.4, 2 x 2: 77.0, 4 x 3: 83.4-84.1, 4 x 2: 82.5
# (static merge) / 99.3 (merge in the rings, three blocks an SM: 1.3 waves), 8 x 2: 90-91.
STAGED = os.environ.get("MISTRAL_SERVE_DECODE_STAGED", "1") == "1"
STAGED_WARPS = 2
STAGES = 3  # tiles in a warp's ring: STAGES - 1 in flight while it computes on one
# v4: v3 on tensor cores (_BODY_V4), for bf16/fp16 caches (MISTRAL_SERVE_DECODE_TC=0: v3).
TENSOR_CORES = os.environ.get("MISTRAL_SERVE_DECODE_TC", "1") == "1"
# Splitting costs a partial write per split and a merge kernel, and at 1,024 keys it lost
# at every batch size (H200, 32 layers, `op_profile --splits`: v2 at batch 1 0.63 ms with
# 1 split vs 1.13 ms with 16; batch 8 1.03 vs 2.13; batch 64 3.92 vs 5.38 with 8). So a
# split gets at least MIN_KEYS_PER_SPLIT keys and splits stop at ~TARGET_BLOCKS blocks:
# only long contexts at small batches split.
MIN_KEYS_PER_SPLIT = 1024
TARGET_BLOCKS = 512

# An aligned vector of N values, for 16-byte loads (engine/gemv.py's kernels use it too).
VEC_HEADER = r"""
template <typename T, int N> struct __align__(sizeof(T) * N) Vec { T v[N]; };
"""
# Asynchronous copies from global to shared memory (sm_80+), for the kernels that stage their
# reads through a ring of shared-memory slots (the staged decode kernel, qgemm, qgemv).
CP_ASYNC = r"""
// BYTES (4, 8 or 16) from global to shared memory, asynchronously; zeros when !ok.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool ok) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(src), "r"(ok ? 16 : 0));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;"
                 :: "r"(d), "l"(src), "n"(BYTES), "r"(ok ? BYTES : 0));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" :: "n"(N));
}
"""

# One thread block per (sequence, KV head, split). Each split walks its share of the keys
# with NUM_WARPS warps (lanes split the head dims) and an online softmax per query head.
# Each warp loads UNROLL keys before using any of them, so several loads are in flight at
# once rather than one key's.
# Shared by both kernel versions: the (sequence, KV head, split) a block serves, its keys.
_PROLOGUE = r"""
    constexpr int DPL = D / 32;  // head dims per lane
    const float NEG_INF = -__int_as_float(0x7f800000);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int groups = q_pos_shape[0] * KVH;  // (sequence, KV head) pairs
    const int splits = gridDim.x / groups;
    const int split = blockIdx.x % splits;
    const int b = blockIdx.x / (splits * KVH);
    const int g = (blockIdx.x / splits) % KVH;
    const int qpos = q_pos[b];
    const int kstart = key_start[b];
    int lo = kstart;
    if (WINDOW > 0) lo = max(lo, qpos - WINDOW + 1);
    const int first_block = kstart / BS;
    // This split's keys: [lo + split * per, min(qpos, lo + (split + 1) * per - 1)].
    const int per = (qpos - lo + splits) / splits;
    const int hi = min(qpos, lo + (split + 1) * per - 1);
    lo += split * per;
    const float scale = rsqrtf((float)D);
"""
_BODY = r"""

    float qv[GQA][DPL], acc[GQA][DPL], m[GQA], l[GQA];
    #pragma unroll
    for (int h = 0; h < GQA; ++h) {
        const T* qrow = queries + ((long)b * (KVH * GQA) + g * GQA + h) * D + lane * DPL;
        #pragma unroll
        for (int i = 0; i < DPL; ++i) { qv[h][i] = static_cast<float>(qrow[i]) * scale; acc[h][i] = 0.f; }
        m[h] = NEG_INF;
        l[h] = 0.f;
    }

    const int* table = block_tables + (long)b * block_tables_shape[1];
    for (int p0 = lo + warp * UNROLL; p0 <= hi; p0 += NUM_WARPS * UNROLL) {
        Vec<T, DPL> kv[UNROLL], vv[UNROLL];
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int p = min(p0 + u, hi);  // past hi: a duplicate load, never used
            const long base = (((long)table[p / BS - first_block] * BS + p % BS) * KVH + g) * D
                              + lane * DPL;
            kv[u] = *reinterpret_cast<const Vec<T, DPL>*>(k_pool + base);
            vv[u] = *reinterpret_cast<const Vec<T, DPL>*>(v_pool + base);
        }
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (p0 + u > hi) break;  // the same for every lane of the warp
            #pragma unroll
            for (int h = 0; h < GQA; ++h) {
                float s = 0.f;
                #pragma unroll
                for (int i = 0; i < DPL; ++i) s += qv[h][i] * static_cast<float>(kv[u].v[i]);
                #pragma unroll
                for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
                const float m_new = fmaxf(m[h], s);
                const float corr = __expf(m[h] - m_new);
                const float e = __expf(s - m_new);
                l[h] = l[h] * corr + e;
                #pragma unroll
                for (int i = 0; i < DPL; ++i)
                    acc[h][i] = acc[h][i] * corr + e * static_cast<float>(vv[u].v[i]);
                m[h] = m_new;
            }
        }
    }

    // Merge the warps' partial softmaxes.
    __shared__ float sm_m[NUM_WARPS][GQA];
    __shared__ float sm_l[NUM_WARPS][GQA];
    __shared__ float sm_acc[NUM_WARPS][GQA][D];
    #pragma unroll
    for (int h = 0; h < GQA; ++h) {
        if (lane == 0) { sm_m[warp][h] = m[h]; sm_l[warp][h] = l[h]; }
        #pragma unroll
        for (int i = 0; i < DPL; ++i) sm_acc[warp][h][lane * DPL + i] = acc[h][i];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < GQA * D; idx += blockDim.x) {
        const int h = idx / D;
        const int d = idx % D;
        float mx_ = NEG_INF;
        #pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) mx_ = fmaxf(mx_, sm_m[w][h]);
        float num = 0.f, den = 0.f;
        #pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) {
            const float c = (sm_m[w][h] == NEG_INF) ? 0.f : __expf(sm_m[w][h] - mx_);
            num += sm_acc[w][h][d] * c;
            den += sm_l[w][h] * c;
        }
        EPILOGUE
    }
"""
# One split: normalize and write the output. Several: write this split's unnormalized
# numerator, its max and its denominator for _MERGE (an empty split has den == 0).
_FINAL = "out[((long)b * (KVH * GQA) + g * GQA + h) * D + d] = static_cast<T>(num / den);"
_PARTIAL = """const long row = (long)blockIdx.x * GQA + h;
        part_acc[row * D + d] = num;
        if (d == 0) { part_m[row] = mx_; part_l[row] = den; }"""

# Merge the splits of one (sequence, query head): one thread per head dim.
_MERGE = r"""
    const float NEG_INF = -__int_as_float(0x7f800000);
    const int splits = part_m_shape[0] / gridDim.x;
    const int bg = blockIdx.x / GQA;  // sequence * KVH + kv head
    const int h = blockIdx.x % GQA;
    const int d = threadIdx.x;
    float mx_ = NEG_INF;
    for (int s = 0; s < splits; ++s) mx_ = fmaxf(mx_, part_m[((long)bg * splits + s) * GQA + h]);
    float num = 0.f, den = 0.f;
    for (int s = 0; s < splits; ++s) {
        const long row = ((long)bg * splits + s) * GQA + h;
        const float ms = part_m[row];
        const float c = (ms == NEG_INF) ? 0.f : __expf(ms - mx_);
        num += part_acc[row * D + d] * c;
        den += part_l[row] * c;
    }
    out[(long)blockIdx.x * D + d] = static_cast<T>(num / den);
"""

def _tile_softmax(keys: int, store_p: str) -> str:
    """v2's and v3's online-softmax update over a tile of `keys` keys, one score s[h] per
    lane (valid: the key is one of the warp's), the tile's weights stored by `store_p`."""
    return r"""
        #pragma unroll
        for (int h = 0; h < GQA; ++h) {
            const float sh = valid ? s[h] : NEG_INF;
            float tmax = sh;
            #pragma unroll
            for (int off = KEYS / 2; off > 0; off >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, off));
            const float m_new = fmaxf(m[h], tmax);
            const float corr = __expf(m[h] - m_new);
            const float e = valid ? __expf(sh - m_new) : 0.f;
            float tsum = e;
            #pragma unroll
            for (int off = KEYS / 2; off > 0; off >>= 1) tsum += __shfl_xor_sync(0xffffffff, tsum, off);
            l[h] = l[h] * corr + tsum;
            #pragma unroll
            for (int i = 0; i < DPL; ++i) acc[h][i] *= corr;
            m[h] = m_new;
            STORE_P
        }
        __syncwarp();""".replace("KEYS / 2", str(keys // 2)).replace("STORE_P", store_p)


# Version 2 (the default; MISTRAL_SERVE_DECODE_KERNEL=v1 selects the first one): a warp
# scores a tile of 32 keys at once, one key per lane (q in shared memory), so the softmax
# reductions run once per tile instead of once per key; then lanes split the head dims to
# accumulate V. H200, 32 layers, 1,024 keys, best split count each: batch 64 3.92 ms vs
# v1's 5.58, batch 1 0.63 vs 0.74 (loadtest/RESULTS.md).
_BODY_V2 = r"""
    constexpr int TILE = 32;
    constexpr int VEC = 16 / sizeof(T) < D ? 16 / sizeof(T) : D;  // elements per 16-byte load

    WARP_STATE
    for (int t0 = lo + warp * TILE; t0 <= hi; t0 += NUM_WARPS * TILE) {
        // Scores: lane j takes key t0 + j (lanes past hi repeat key hi and are masked).
        const int p = min(t0 + lane, hi);
        const bool valid = t0 + lane <= hi;
        const long koff = (((long)table[p / BS - first_block] * BS + p % BS) * KVH + g) * D;
        const T* krow = k_pool + koff;
        float s[GQA];
        #pragma unroll
        for (int h = 0; h < GQA; ++h) s[h] = 0.f;
        #pragma unroll
        for (int c = 0; c < D; c += VEC) {
            const Vec<T, VEC> kv = *reinterpret_cast<const Vec<T, VEC>*>(krow + c);
            #pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float kf = static_cast<float>(kv.v[i]);
                #pragma unroll
                for (int h = 0; h < GQA; ++h) s[h] += q_s[h][c + i] * kf;
            }
        }
        // Online softmax over the tile, per query head (lane 0's key is always valid).
        TILE_SOFTMAX
        // Values: lanes split the head dims; the tile's keys one after another. Key j's row
        // offset comes from lane j's register (a shuffle), not from the block table again, so
        // the loads of the unrolled keys do not each wait on a table load first.
        const int n = min(TILE, hi - t0 + 1);
        if (V_BATCH > 0 && n == TILE) {
            // A full tile: VB keys' V rows loaded before any is used, so a warp has VB loads
            // in flight rather than 8; at batch 64 the kernel is bound by bytes in flight.
            constexpr int VB = V_BATCH > 0 ? V_BATCH : 1;
            static_assert(TILE % VB == 0, "V_BATCH must divide the 32-key tile");
            #pragma unroll
            for (int j0 = 0; j0 < TILE; j0 += VB) {
                Vec<T, DPL> vb[VB];
                #pragma unroll
                for (int j = 0; j < VB; ++j)
                    vb[j] = *reinterpret_cast<const Vec<T, DPL>*>(
                        v_pool + __shfl_sync(0xffffffff, koff, j0 + j) + lane * DPL);
                #pragma unroll
                for (int j = 0; j < VB; ++j) {
                    #pragma unroll
                    for (int h = 0; h < GQA; ++h) {
                        const float w = p_s[warp][h][j0 + j];
                        #pragma unroll
                        for (int i = 0; i < DPL; ++i) acc[h][i] += w * static_cast<float>(vb[j].v[i]);
                    }
                }
            }
            __syncwarp();
            continue;
        }
        #pragma unroll 8
        for (int j = 0; j < n; ++j) {
            const long voff = __shfl_sync(0xffffffff, koff, j);
            const Vec<T, DPL> vv = *reinterpret_cast<const Vec<T, DPL>*>(v_pool + voff + lane * DPL);
            #pragma unroll
            for (int h = 0; h < GQA; ++h) {
                const float w = p_s[warp][h][j];
                #pragma unroll
                for (int i = 0; i < DPL; ++i) acc[h][i] += w * static_cast<float>(vv.v[i]);
            }
        }
        __syncwarp();
    }
""".replace("TILE_SOFTMAX", _tile_softmax(32, "p_s[warp][h][lane] = e;"))

# v3's and v4's ring: its shape (tiles of TILE keys' K rows, then their V rows, a padded
# row apiece) and each warp's slots in dynamic shared memory and share of the tiles.
_RING_SHAPE = r"""    constexpr int TILE = 16;
    constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte chunk
    constexpr int CH = D / VEC;           // chunks per row
    constexpr int RS = D + VEC;           // a row in shared memory, padded by one chunk
    constexpr int SLOT = 2 * TILE * RS;   // a tile's K rows, then its V rows
    constexpr int STEP = NUM_WARPS * TILE;
"""
_RING_SLOTS = r"""    extern __shared__ __align__(16) unsigned char smem[];
    T* ring = reinterpret_cast<T*>(smem) + warp * (STAGES * SLOT);
    const int first = lo + warp * TILE;  // the warp's tiles: first + it * STEP, while <= hi
    const int tiles = first <= hi ? (hi - first) / STEP + 1 : 0;
"""
# v3's and v4's copy of a warp's tile `it` (16 keys' K rows, then their V rows) into its ring
# slot, and the first STAGES - 1 tiles started. Each key's pool row is shuffled to the lanes
# that copy it once, as a 32-bit index, for both its K and V rows (it was a 64-bit offset per
# 16-byte copy: 32 shuffles a tile instead of 8; sm_90a SASS, seventeenth session).
_RING_ISSUE = r"""    // Copy the warp's tile `it` into its ring slot (keys past hi: zeros); one commit group
    // per call, a tile or not, so that waiting for "all but the last STAGES - 1" is exact.
    // Lane j (and j + 16) looks up key j's pool row; a lane copies chunk lane % CH of keys
    // lane / CH, + 32 / CH, ...: each key's K row and V row from one shuffled row index.
    static_assert(32 % CH == 0, "a warp copies whole rows at a time");
    const int copy_at = (lane / CH) * RS + (lane % CH) * VEC;  // in a slot, for key lane / CH
    const long copy_from = (long)g * D + (lane % CH) * VEC;     // in a pool row
    auto issue = [&](int it) {
        const int t0 = first + it * STEP;
        if (it < tiles) {
            const int p = min(t0 + j, hi);
            const int row = table[p / BS - first_block] * BS + p % BS;
            T* slot = ring + (it % STAGES) * SLOT + copy_at;
            #pragma unroll
            for (int i = 0; i < TILE * CH / 32; ++i) {
                const int r = lane / CH + 32 / CH * i;  // the key, < TILE
                const long src = (long)__shfl_sync(0xffffffff, row, r) * (KVH * D) + copy_from;
                const bool ok = t0 + r <= hi;
                cp_async<16>(slot + 32 / CH * i * RS, k_pool + src, ok);
                cp_async<16>(slot + (TILE + 32 / CH * i) * RS, v_pool + src, ok);
            }
        }
        cp_async_commit();
    };
    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s);
"""



def _with_ring(body: str) -> str:
    """body with its RING_SHAPE, RING_SLOTS and RING_ISSUE lines filled in."""
    for name, text in (("RING_SHAPE", _RING_SHAPE), ("RING_SLOTS", _RING_SLOTS),
                       ("RING_ISSUE", _RING_ISSUE)):
        body = body.replace(f"    {name}\n", text)
    return body


# Version 3, "staged" (STAGED; for many blocks, STAGED_WARPS a block): v2's scoring with
# the key rows read from shared memory. Each warp streams its tiles of TILE keys (their K rows,
# then their V rows) through a ring of STAGES slots with cp.async, so the next tiles' bytes
# are in flight while the warp computes on this one; v2 waits for each tile's K, then its V.
# A key's score is split over two lanes (lane j and j + 16 take alternate 16-byte chunks of
# key j's row), and rows are padded by 16 bytes, so shared-memory reads are conflict-free.
_BODY_V3 = r"""
    RING_SHAPE
    static_assert(CH % 2 == 0 && (2 * TILE * CH) % 32 == 0, "a row splits into pairs of chunks");

    WARP_STATE
    RING_SLOTS
    const int j = lane & (TILE - 1), half = lane >> 4;
    RING_ISSUE
    for (int it = 0; it < tiles; ++it) {
        issue(it + STAGES - 1);  // into the slot the warp finished with last iteration
        cp_async_wait<STAGES - 1>();
        __syncwarp();  // every lane's copies of tile `it` have landed
        const T* ks = ring + (it % STAGES) * SLOT;
        const T* vs = ks + TILE * RS;
        const bool valid = first + it * STEP + j <= hi;
        float s[GQA];
        #pragma unroll
        for (int h = 0; h < GQA; ++h) s[h] = 0.f;
        #pragma unroll
        for (int c = half; c < CH; c += 2) {
            const Vec<T, VEC> kv = *reinterpret_cast<const Vec<T, VEC>*>(ks + j * RS + c * VEC);
            #pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float kf = static_cast<float>(kv.v[i]);
                #pragma unroll
                for (int h = 0; h < GQA; ++h) s[h] += q_s[h][c * VEC + i] * kf;
            }
        }
        // Online softmax over the tile (lanes j and j + 16 then hold key j's score; key 0 is
        // valid).
        #pragma unroll
        for (int h = 0; h < GQA; ++h) s[h] += __shfl_xor_sync(0xffffffff, s[h], 16);
        TILE_SOFTMAX
        // Values: lanes split the head dims; keys past hi have weight 0 and zero rows.
        #pragma unroll
        for (int k = 0; k < TILE; ++k) {
            const Vec<T, DPL> vv = *reinterpret_cast<const Vec<T, DPL>*>(vs + k * RS + lane * DPL);
            #pragma unroll
            for (int h = 0; h < GQA; ++h) {
                const float w = p_s[warp][h][k];
                #pragma unroll
                for (int i = 0; i < DPL; ++i) acc[h][i] += w * static_cast<float>(vv.v[i]);
            }
        }
        __syncwarp();  // done with the slot and p_s before the next iteration refills them
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is past its loop: the merge below reuses the rings
"""
_BODY_V3 = _with_ring(_BODY_V3).replace(
    "TILE_SOFTMAX", _tile_softmax(16, "if (half == 0) p_s[warp][h][j] = e;"))
# v3's merge keeps its partial softmaxes in the rings rather than in static shared memory, so
# a block's static part is only q_s and p_s: four blocks of the default 2 warps x 3 slots fit
# an SM (52 KB of ring each), enough for batch 64's 512 blocks in one wave on 132 SMs.
_MERGE_IN_RING = r"""
    static_assert(NUM_WARPS * GQA * (D + 2) * 4 <= NUM_WARPS * STAGES * SLOT * sizeof(T), "merge fits");
    float (&sm_acc)[NUM_WARPS][GQA][D] = *reinterpret_cast<float (*)[NUM_WARPS][GQA][D]>(smem);
    float (&sm_m)[NUM_WARPS][GQA] = *reinterpret_cast<float (*)[NUM_WARPS][GQA]>(smem + sizeof(sm_acc));
    float (&sm_l)[NUM_WARPS][GQA] =
        *reinterpret_cast<float (*)[NUM_WARPS][GQA]>(smem + sizeof(sm_acc) + sizeof(sm_m));
"""
_MERGE_STATIC = r"""    __shared__ float sm_m[NUM_WARPS][GQA];
    __shared__ float sm_l[NUM_WARPS][GQA];
    __shared__ float sm_acc[NUM_WARPS][GQA][D];
"""

# Version 4, "tensor cores" (TENSOR_CORES; bf16/fp16 where v3 would run): v3's ring of
# 16-key tiles per warp, with the arithmetic on mma.sync (qgemm.DEVICE's m16n8k16) instead
# of CUDA-core FMAs. v3 spends ~900 instructions a lane on a tile (every FMA, bf16 -> float
# conversion and q read from shared memory), which looked like what held it at 3.36 TB/s at
# batch 64 x 1,024 keys; on an H200 v4 took 75.8 us a layer there against v3's 79.8
# (sixteenth session): the arithmetic was only a small part of what bounds it. Here the
# block's query heads are the rows of an A fragment (rows GQA..15 zero: GQA <= 8), a tile's
# K rows the B fragments of the scores (ldmatrix), and its V rows, transposed on the way
# (ldmatrix.trans), the B fragments of P V, with P re-packed from the score fragments as in
# engine/paged_prefill.py. Scores are exact products summed in float, as before; P is
# rounded to T for its mma, as FlashAttention does. Softmax in base 2; the merge below
# takes natural-log maxima, so the warps store m * ln 2.
_BODY_V4 = r"""
    RING_SHAPE
    constexpr int KSTEPS = D / 16, NO = D / 8;
    static_assert(GQA <= 8 && D % 32 == 0 && VEC == 8, "query heads fit the mma rows 0..7");
    __shared__ float q_s[GQA][D];
    Q_LOAD
    __syncthreads();
    const int fr = lane >> 2, fc = lane & 3;  // fragment row (query head if < GQA), column pair
    unsigned qf[KSTEPS][4];
    #pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        const int c0 = kk * 16 + 2 * fc;
        qf[kk][0] = fr < GQA ? pack2<BF16>(q_s[fr][c0], q_s[fr][c0 + 1]) : 0u;
        qf[kk][2] = fr < GQA ? pack2<BF16>(q_s[fr][c0 + 8], q_s[fr][c0 + 9]) : 0u;
        qf[kk][1] = qf[kk][3] = 0u;
    }
    float o[NO][4];
    #pragma unroll
    for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_run = NEG_INF, l_run = 0.f;  // row fr's running max (base 2) and this lane's sum
    const float sl2 = scale * 1.4426950408889634f;
    const int* table = block_tables + (long)b * block_tables_shape[1];

    RING_SLOTS
    const int j = lane & (TILE - 1);
    // ldmatrix rows: K x4, dims 16kk..16kk+31 of keys 0..7 (+8 n); V x4.trans, keys 0..15 of
    // dims 8n..8n+15.
    const int k_row = (lane & 7) * RS + (lane >> 3) * 8;
    const int v_row = TILE * RS + ((lane & 7) + ((lane >> 3) & 1) * 8) * RS + (lane >> 4) * 8;
    RING_ISSUE
    for (int it = 0; it < tiles; ++it) {
        issue(it + STAGES - 1);
        cp_async_wait<STAGES - 1>();
        __syncwarp();
        const T* st = ring + (it % STAGES) * SLOT;
        const int t0 = first + it * STEP;
        // Scores of row fr: sc[n][e] is key t0 + 8n + 2fc + e (e < 2; e >= 2: zero rows).
        float sc[2][4];
        #pragma unroll
        for (int n = 0; n < 2; ++n) {
            sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
            #pragma unroll
            for (int kk = 0; kk < KSTEPS; kk += 2) {
                unsigned kb[4];
                ldsm_x4(kb, st + k_row + n * 8 * RS + kk * 16);
                mma16816<BF16>(sc[n], qf[kk], kb);
                mma16816<BF16>(sc[n], qf[kk + 1], kb + 2);
            }
        }
        float tmax = NEG_INF;
        #pragma unroll
        for (int n = 0; n < 2; ++n) {
            #pragma unroll
            for (int e = 0; e < 2; ++e) {
                sc[n][e] = t0 + 8 * n + 2 * fc + e <= hi ? sc[n][e] * sl2 : NEG_INF;
                tmax = fmaxf(tmax, sc[n][e]);
            }
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, 2));
        const float m_new = fmaxf(m_run, tmax);  // finite: key t0 is valid
        const float corr = exp2f(m_run - m_new);
        m_run = m_new;
        l_run *= corr;
        #pragma unroll
        for (int n = 0; n < NO; ++n) { o[n][0] *= corr; o[n][1] *= corr; }
        #pragma unroll
        for (int n = 0; n < 2; ++n) {
            sc[n][0] = exp2f(sc[n][0] - m_new);
            sc[n][1] = exp2f(sc[n][1] - m_new);
            l_run += sc[n][0] + sc[n][1];
        }
        unsigned pa[4];
        pa[0] = pack2<BF16>(sc[0][0], sc[0][1]);
        pa[1] = 0u;
        pa[2] = pack2<BF16>(sc[1][0], sc[1][1]);
        pa[3] = 0u;
        #pragma unroll
        for (int n = 0; n < NO; n += 2) {
            unsigned vb[4];
            ldsm_x4_t(vb, st + v_row + n * 8);
            mma16816<BF16>(o[n], pa, vb);
            mma16816<BF16>(o[n + 1], pa, vb + 2);
        }
        __syncwarp();  // done with the slot before the next iteration refills it
    }
    l_run += __shfl_xor_sync(0xffffffff, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffff, l_run, 2);
    cp_async_wait<0>();
    __syncthreads();  // every warp is past its loop: the merge below reuses the rings
    MERGE_IN_RING
    if (fr < GQA) {
        if (fc == 0) { sm_m[warp][fr] = m_run * 0.6931471805599453f; sm_l[warp][fr] = l_run; }
        #pragma unroll
        for (int n = 0; n < NO; ++n) {
            sm_acc[warp][fr][8 * n + 2 * fc] = o[n][0];
            sm_acc[warp][fr][8 * n + 2 * fc + 1] = o[n][1];
        }
    }
    __syncthreads();
"""
_BODY_V4 = _with_ring(_BODY_V4)


# v2's and v3's start: the block's query rows (scaled) in shared memory, each warp's weights
# of a tile's keys, and each lane's running softmax state for its head dims.
_WARP_STATE = r"""
    __shared__ float q_s[GQA][D];
    __shared__ float p_s[NUM_WARPS][GQA][TILE];
    Q_LOAD
    __syncthreads();

    float acc[GQA][DPL], m[GQA], l[GQA];
    #pragma unroll
    for (int h = 0; h < GQA; ++h) {
        #pragma unroll
        for (int i = 0; i < DPL; ++i) acc[h][i] = 0.f;
        m[h] = NEG_INF;
        l[h] = 0.f;
    }

    const int* table = block_tables + (long)b * block_tables_shape[1];
"""
_Q_LOAD = r"""
    for (int idx = threadIdx.x; idx < GQA * D; idx += blockDim.x) {
        q_s[idx / D][idx % D] =
            static_cast<float>(queries[((long)b * (KVH * GQA) + g * GQA) * D + idx]) * scale;
    }"""
# The ROPE form (rope_store_decode_attention) reads the q|k|v projection before RoPE: the
# block rotates its query heads into q_s and writes its KV head's new K (rotated) and V
# into the pools at the sequence's slot, as fused_ops.qkv_rope_store does, before
# __syncthreads; after it every warp of the block sees them (one split only: a second
# split's block could read the key before the first wrote it). Values are rounded to T
# where the separate kernels store them, so both forms compute the same numbers.
_Q_ROPE_STORE = r"""
    {
        constexpr int P = D / 2;
        const T* src = qkv + (long)b * (KVH * GQA + 2 * KVH) * D;
        for (int idx = threadIdx.x; idx < (GQA + 2) * P; idx += blockDim.x) {
            const int h = idx / P, i = idx % P;  // h < GQA: query head g * GQA + h; then K, V
            const int hs = h < GQA ? g * GQA + h : KVH * GQA + (h - GQA) * KVH + g;
            float x1 = static_cast<float>(src[hs * D + i]), x2 = static_cast<float>(src[hs * D + i + P]);
            if (h <= GQA) {ROPE_ROTATE}
            if (h < GQA) {
                q_s[h][i] = static_cast<float>(static_cast<T>(x1)) * scale;
                q_s[h][i + P] = static_cast<float>(static_cast<T>(x2)) * scale;
            } else {
                T* dst = const_cast<T*>(h == GQA ? k_pool : v_pool) + ((long)slots[b] * KVH + g) * D;
                dst[i] = static_cast<T>(x1);
                dst[i + P] = static_cast<T>(x2);
            }
        }
    }"""

_INPUTS = ["queries", "k_pool", "v_pool", "block_tables", "key_start", "q_pos"]
_ROPE_INPUTS = ["qkv", "k_pool", "v_pool", "block_tables", "key_start", "q_pos", "slots"]


VERSION = os.environ.get("MISTRAL_SERVE_DECODE_KERNEL", "v2")


def kernel_source(epilogue: str, version: str = "v1", rope: bool = False) -> str:
    """A decode kernel's body with its epilogue (_FINAL or _PARTIAL); also run on the CPU
    by tests/cuda_emulator.py. v2, v3 and v4 share v1's warp-merge epilogue (v4 stores its
    fragments first); rope: their ROPE form."""
    from engine.fused_ops import ROPE_ROTATE
    assert version != "v1" or not rope, "only v2, v3 and v4 apply RoPE themselves"
    merge_at = _BODY.index("    // Merge the warps' partial softmaxes.")
    q_load = _Q_ROPE_STORE.replace("ROPE_ROTATE", ROPE_ROTATE.replace("ROPE_POS", "qpos")) \
        if rope else _Q_LOAD
    if version == "v4":  # q_s unscaled: the mma takes q as stored (T); scores scale after
        merge_loop = _BODY.index("    for (int idx = threadIdx.x; idx < GQA * D; idx += blockDim.x) {")
        body = _BODY_V4.replace("Q_LOAD", q_load.replace(" * scale;", ";")).replace(
            "MERGE_IN_RING", _MERGE_IN_RING) + _BODY[merge_loop:]
        return (_PROLOGUE + body).replace("EPILOGUE", epilogue)
    body = {"v1": _BODY, "v2": _BODY_V2, "v3": _BODY_V3}[version]
    if version != "v1":
        body = body.replace("WARP_STATE", _WARP_STATE).replace("Q_LOAD", q_load) + _BODY[merge_at:]
    if version == "v3":
        assert _MERGE_STATIC in body
        body = body.replace(_MERGE_STATIC, _MERGE_IN_RING)
    return (_PROLOGUE + body).replace("EPILOGUE", epilogue)


@functools.lru_cache(maxsize=None)
def _kernel(split: bool, version: str = "v1", rope: bool = False, smem: int = 0):
    """The decode kernel; v3 and v4 (staged) take `smem` bytes of dynamic shared memory."""
    if version == "v4":  # at call time: qgemm and paged_prefill import this module
        from engine.paged_prefill import LDMATRIX
        from engine.qgemm import DEVICE as MMA
        extra = dict(header=VEC_HEADER + CP_ASYNC + MMA + LDMATRIX, shared_memory=smem)
    elif version == "v3":
        extra = dict(header=VEC_HEADER + CP_ASYNC, shared_memory=smem)
    else:
        extra = dict(header=VEC_HEADER)
    if rope:
        return cuda_kernel(name=f"paged_decode_attention_rope{'' if version == 'v2' else '_' + version}",
                           input_names=_ROPE_INPUTS, output_names=["out"],
                           source=kernel_source(_FINAL, version, True), **extra)
    if split:
        return cuda_kernel(name=f"paged_decode_attention_split_{version}",
                           input_names=_INPUTS,
                           output_names=["part_acc", "part_m", "part_l"],
                           source=kernel_source(_PARTIAL, version), **extra)
    return cuda_kernel(name=f"paged_decode_attention_{version}", input_names=_INPUTS,
                       output_names=["out"], source=kernel_source(_FINAL, version), **extra)


@functools.lru_cache(maxsize=1)
def _merge_kernel():
    return cuda_kernel(name="paged_decode_merge", input_names=["part_acc", "part_m", "part_l"],
                       output_names=["out"], source=_MERGE)


def supported(head_dim: int, dtype: mx.Dtype) -> bool:
    """True where the kernel can run: MLX's CUDA backend, a head_dim that splits over a warp."""
    return (mx.cuda.is_available() and mx.default_device() == mx.gpu and head_dim % 32 == 0
            and dtype in (mx.float32, mx.float16, mx.bfloat16))


def num_warps(blocks: int) -> int:
    """Warps per thread block: more when there are few blocks, so a small batch's keys are
    walked by more warps at once (H200, 7B, batch 1, 256 keys: 20 us a layer with 16 warps,
    30 with 8, 44 with 4; at batch 64 x 1,024 keys 8 warps lost to 4, `gpu_trace --warps`);
    STAGED_WARPS where the staged kernel serves the many-block launches."""
    if blocks <= FEW_BLOCKS:
        return FEW_BLOCKS_WARPS
    return STAGED_WARPS if _staged_on() else NUM_WARPS


def _staged_on() -> bool:
    """v3 serves the many-block launches: STAGED, and v2 the version asked for."""
    return STAGED and VERSION == "v2"


def launch_warps() -> list[int]:
    """Every warp count num_warps() can return: the self-checks run (so compile) each."""
    return sorted({num_warps(FEW_BLOCKS), num_warps(FEW_BLOCKS + 1)})


def staged(warps: int) -> bool:
    """Whether a launch with this many warps per block runs the staged kernel (v3, or v4
    where tensor_cores()): STAGED on, the default version v2, and the many-block launch's
    warps (STAGED_WARPS), where v2 reads at 2.3 TB/s (H200, batch 64 x 1,024 keys);
    few-block launches stay on v2."""
    return _staged_on() and warps == STAGED_WARPS != FEW_BLOCKS_WARPS


def staged_smem(warps: int, head_dim: int, dtype: mx.Dtype) -> int:
    """Dynamic shared memory of a v3 or v4 block: each warp's ring of STAGES slots of 16
    keys' K and V rows, padded by 16 bytes each."""
    return warps * STAGES * 2 * 16 * (head_dim * dtype.size + 16)


def tensor_cores(gqa: int, head_dim: int, dtype: mx.Dtype) -> bool:
    """Whether a staged launch runs v4 (mma.sync) rather than v3: TENSOR_CORES on, a 16-bit
    cache, at most 8 query heads a KV head (the mma's rows 0..7) and whole 32-dim steps."""
    return TENSOR_CORES and dtype in (mx.bfloat16, mx.float16) and gqa <= 8 and head_dim % 32 == 0


def v_batch(warps: int) -> int:
    """V rows loaded at once: V_BATCH, or V_BATCH_FEW with more than 4 warps (16 warps of
    16 or 32 V rows each asked for more registers than an SM has: the launch failed)."""
    return V_BATCH if warps <= 4 else V_BATCH_FEW


def num_splits(num_seqs: int, kv_heads: int, max_keys: int) -> int:
    """How many thread blocks share one (sequence, KV head)'s keys (flash-decoding).

    One block per (sequence, KV head) leaves most of the GPU idle when the batch is small
    and walks long contexts serially; splitting the keys fills ~TARGET_BLOCKS blocks while
    giving each split at least MIN_KEYS_PER_SPLIT keys. Powers of two keep shapes few.
    """
    splits = 1
    while (splits < MAX_SPLITS and num_seqs * kv_heads * splits * 2 <= TARGET_BLOCKS
           and max_keys >= 2 * splits * MIN_KEYS_PER_SPLIT):
        splits *= 2
    return splits


def paged_decode_attention(q: mx.array, k_pool: mx.array, v_pool: mx.array,
                           block_tables: mx.array, key_start: mx.array, q_pos: mx.array,
                           block_size: int, window: int | None, splits: int = 1,
                           version: str | None = None, warps: int | None = None) -> mx.array:
    """One query per sequence: q (G, H, D) -> (G, H, D), reading K/V through block tables.

    block_tables (G, max_blocks) hold the live blocks from logical block key_start // block_size;
    q_pos (G,) is each query's position, and its own K/V must already be in the pools.
    splits > 1 divides each sequence's keys over that many thread blocks, merged after.
    """
    g, h, d = q.shape
    launch = _launch(g, h, k_pool, block_size, window, splits, q.dtype, warps,
                     [q, k_pool, v_pool, block_tables, key_start, q_pos], version)
    version, smem = launch.pop("version"), launch.pop("smem")
    if splits == 1:
        return _kernel(False, version, False, smem)(**launch, output_shapes=[q.shape],
                                                    output_dtypes=[q.dtype])[0]
    rows = g * h * splits  # (sequence, KV head, split, query head of the group)
    gqa = h // k_pool.shape[1]
    parts = _kernel(True, version, False, smem)(**launch, output_shapes=[(rows, d), (rows,), (rows,)],
                                                output_dtypes=[mx.float32] * 3)
    return _merge_kernel()(
        inputs=parts, template=[("T", q.dtype), ("D", d), ("GQA", gqa)],
        grid=(g * h * d, 1, 1), threadgroup=(d, 1, 1),
        output_shapes=[q.shape], output_dtypes=[q.dtype])[0]


def rope_store_decode_attention(qkv: mx.array, k_pool: mx.array, v_pool: mx.array,
                                block_tables: mx.array, key_start: mx.array, q_pos: mx.array,
                                slots: mx.array, n_heads: int, base: float, block_size: int,
                                window: int | None, warps: int | None = None) -> mx.array:
    """paged_decode_attention (v2, or v3 where staged(); one split) from the q|k|v
    projection (G, (H + 2 KVH) * D) before RoPE: each sequence's K (with RoPE at q_pos) and
    V are written into the pools at its slot, in place, as fused_ops.qkv_rope_store(in_place
    =True) does, and its query heads attend. One kernel instead of two; the same conditions
    for writing in place hold."""
    from engine.fused_ops import float_bits
    g, d = qkv.shape[0], k_pool.shape[2]
    launch = _launch(g, n_heads, k_pool, block_size, window, 1, qkv.dtype, warps,
                     [qkv, k_pool, v_pool, block_tables, key_start, q_pos, slots])
    launch["template"].append(("LOG2_BASE_BITS", float_bits(math.log2(base))))
    version, smem = launch.pop("version"), launch.pop("smem")
    return _kernel(False, version if version in ("v3", "v4") else "v2", True, smem)(
        **launch, output_shapes=[(g, n_heads, d)], output_dtypes=[qkv.dtype])[0]


def rope_store_applies(meta_groups: list, slots: mx.array, qkv: mx.array, k_pool: mx.array,
                       v_pool: mx.array) -> bool:
    """Whether a step's attention can run as rope_store_decode_attention: one decode group
    on the kernel (so the step is decode-only and may write the pools in place), in one
    split, int32 slots, and pools of q|k|v's dtype (the kernel stores K/V as that type)."""
    return (len(meta_groups) == 1 and meta_groups[0].key_start is not None
            and meta_groups[0].splits == 1 and slots.dtype == mx.int32
            and k_pool.dtype == v_pool.dtype == qkv.dtype)


def _launch(g: int, h: int, k_pool: mx.array, block_size: int, window: int | None, splits: int,
            dtype: mx.Dtype, warps: int | None, inputs: list, version: str | None = None) -> dict:
    """Launch arguments of a decode kernel over g sequences of h query heads, with "version"
    (as given, else v3 where staged(), else VERSION) and "smem", v3's shared memory (else 0)."""
    kvh, d = k_pool.shape[1], k_pool.shape[2]
    # v3 asked for by name (op_profile) runs its own warp count: 16 warps' rings would not fit.
    warps = warps or (STAGED_WARPS if version in ("v3", "v4") else num_warps(g * kvh * splits))
    version = version or (("v4" if tensor_cores(h // kvh, d, dtype) else "v3") if staged(warps)
                          else VERSION)
    smem = staged_smem(warps, d, dtype) if version in ("v3", "v4") else 0
    # The window is a template argument, not an input: a one-int input array would live in
    # CUDA managed memory on the host, read across PCIe by every warp (see fused_ops.float_bits).
    template = [("T", dtype), ("D", d), ("BS", block_size), ("KVH", kvh), ("GQA", h // kvh),
                ("NUM_WARPS", warps), ("UNROLL", UNROLL), ("WINDOW", window or 0),
                ("V_BATCH", v_batch(warps))] + ([("STAGES", STAGES)] if smem else []) \
        + ([("BF16", dtype == mx.bfloat16)] if version == "v4" else [])
    return dict(inputs=inputs, template=template, grid=(g * kvh * splits * 32 * warps, 1, 1),
                threadgroup=(32 * warps, 1, 1), version=version, smem=smem)
