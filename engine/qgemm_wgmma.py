"""4-bit matmul for 33-128 rows on Hopper's warpgroup tensor cores (wgmma), as a CUDA kernel.

engine/qgemm.py's kernel runs on mma.sync, whose rate an H200 caps well below its wgmma rate:
at 128 rows its gate|up took 132 us against cuBLAS's 65 us for the same product in bf16, and
taking the mma out of it did not make it faster, nor did taking the unpacking out make it much
faster (RESULTS.md, seventeenth session). This kernel feeds the dequantized weights to
`wgmma.mma_async` as its A operand, straight from registers, and x as its B operand from
shared memory, so the tensor cores read x themselves and the warps only unpack weights.

A block is WG = 2 or 4 warpgroups (128 threads each) and owns 64 WG output features (64, the
wgmma's M, a warpgroup) of BM = 64 or 128 rows (its N); its warpgroups read the block's one
copy of x. A cp.async ring (STAGES deep, as in qgemm.py) stages each BK = 128-wide K step:
x in wgmma's K-major 128-byte swizzle (rows of 64 values, their 16-byte chunks XOR-ed with the
row mod 8, so the copies are whole 256-byte row runs and their shared-memory stores hit 8
distinct bank groups), the packed weights row by row, and their scales and biases. Warp w
unpacks features 16w + g and 16w + g + 8 (g = lane / 4) for the lane's A fragment: wgmma's A
layout is mma.m16n8k16's, so lane t needs values 2t, 2t + 1 (and 2t + 8, 2t + 9) of each
16-value slab, which is byte t of each packed word: one 16-byte load gives four words, three
byte permutes gather byte t of each, and engine/qgemm.py's unpack8 turns them into the A
registers of two slabs. A warpgroup unpacks each 32-value chunk while the wgmmas of the chunks
before it run (one wgmma group a chunk; see SOURCE).

4-bit, group size 32-128, bf16/fp16 only; used only after qgemm_wgmma_matches_layers has
shown it equal to dequantize + matmul on the model's own layers (engine/runner.py), so on a
GPU without wgmma (before sm_90a) the engine keeps qgemm.py's kernel. The CPU emulation
(tests/test_qgemm_emulated.py) runs this source with wgmma, its descriptors and cp.async
emulated; tests/test_qgemm.py runs the real one on a GPU.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import mlx.nn as nn

from engine import qgemm
from engine.kernel_source import cuda_kernel

MIN_ROWS = 33     # fewer rows: qgemm.py's mma.sync kernel (as fast as bf16's GEMM there)
MAX_ROWS = 128
# Output features per block: warpgroups of the wgmma's M = 64. Four for 128-row blocks of the
# widest layers (gate|up), so each copy of x in shared memory serves 256 features rather than
# 128: x is most of what a block reads (a 128-row step: 32 KB of x against 8 KB of weights a
# 128 features), and at 128 features gate|up's blocks read 224 MB of x from L2 for 66 MB of
# weights. H200 (eighteenth session), gate|up at 128 rows: 81.3 us against 96.5 with two; at
# 64 rows four were slower (67.2 against 62.2), and so were they for narrower layers.
WIDE_MIN_FEATURES = 16384
SMS = 132         # an H100's / H200's SMs: K splits aim at whole waves of blocks
BK = qgemm.BK     # input features per pipeline step: 8 slabs of 16
# The ring's depth by (block rows, warpgroups): a step being read, one landing, the rest in
# flight (see SOURCE). H200, gate|up (eighteenth session): 64 rows 61.6 us at 3 against 73.5
# at 4 (more blocks fit an SM); 128 rows, two warpgroups, 95.7 at 4 against 97.9 at 3 and
# 96.2 at 5; four warpgroups, 81.3 at 3 against 90.4 at 4.
STAGES = {(64, 2): 3, (128, 2): 4, (128, 4): 3}
TARGET_BLOCKS = 0     # K splits until the grid has about this many blocks (0: a wave, see target_blocks)
MIN_STEPS_PER_SPLIT = 8
# K splits added up by the kernel's last block of each tile (SOURCE_FUSED) rather than by an
# MLX sum and cast after it (two more kernels a split layer, and their launches on the host).
# Off: on an H200 (nineteenth session) it took 1-5 us off a split layer's 17-52 us, but whole w1
# runs showed no difference within their noise; MISTRAL_SERVE_WGMMA_FUSED_SPLITS=1 turns it on.
FUSED_SPLITS = os.environ.get("MISTRAL_SERVE_WGMMA_FUSED_SPLITS", "0") == "1"
# A producer warp per block makes all the copies and mbarriers hand the stages over (WS in
# SOURCE), so the warpgroups no longer meet at a barrier every K step: the cut without that
# barrier was 10% faster on gate|up at 128 rows (H200, nineteenth session). Off: not yet run on
# a GPU; MISTRAL_SERVE_WGMMA_PRODUCER=1 turns it on (not with FUSED_SPLITS, whose sums need
# every thread of the block).
PRODUCER_WARP = os.environ.get("MISTRAL_SERVE_WGMMA_PRODUCER", "0") == "1"


def _wgmma(n: int, bf16: bool) -> str:
    """D (64 x n, f32, n / 2 registers a thread) += A (64 x 16, registers) B (16 x n, shared
    memory, by descriptor), issued by the whole warpgroup; it runs asynchronously until
    wgmma_wait."""
    ab = "bf16" if bf16 else "f16"
    d = ",".join(f"%{i}" for i in range(n // 2))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n // 2))
    a = n // 2
    return (f"__device__ __forceinline__ void wgmma_{n}_{ab}(float* d, const unsigned* a, "
            f"unsigned long long desc) {{\n"
            f'  asm volatile("wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ab}.{ab} '
            f'{{{d}}}, {{%{a},%{a + 1},%{a + 2},%{a + 3}}}, %{a + 4}, 1, 1, 1, 0;"\n'
            f'    : {outs}\n'
            f'    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));\n}}\n')


DEVICE = r"""
template <int N, bool BF16> __device__ __forceinline__ void wgmma(float* d, const unsigned* a,
                                                               unsigned long long desc) {
  if (N == 64 && BF16) wgmma_64_bf16(d, a, desc);
  else if (N == 64) wgmma_64_f16(d, a, desc);
  else if (BF16) wgmma_128_bf16(d, a, desc);
  else wgmma_128_f16(d, a, desc);
}
// Orders the warpgroup's register writes before the wgmma that reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory");
}
// Keeps the compiler from moving an accumulator across the asynchronous wgmma.
template <int N> __device__ __forceinline__ void acc_fence(float* d) {
  #pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}
// mbarriers in shared memory (WS): `count` arrivals complete a phase; a wait names the parity
// of the phase it waits for; cp_async_mbar_arrive arrives once the thread's copies so far land.
__device__ __forceinline__ unsigned smem_u32(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void cp_async_mbar_arrive(unsigned long long* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(smem_u32(bar)) : "memory");
}
// cp.async writes through the generic proxy and wgmma reads through the async one.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
"""

# A K-major operand in the 128-byte swizzle: rows of 64 values (128 bytes) whose 16-byte chunks
# sit XOR-ed with the row's index mod 8, in 8-row atoms of 1,024 bytes (aligned to 1,024);
# sbo bytes from one 8-row atom to the next. The leading offset is unused there (encoded 1),
# and a start inside an atom (a later 16-value slab) keeps base offset 0 (PTX ISA, "Matrix
# Descriptor Format").
DESC = r"""
__device__ __forceinline__ unsigned long long smem_desc(const void* p, unsigned sbo) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  return (unsigned long long)((a & 0x3FFFF) >> 4) | (1ull << 16)
         | ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}
"""

HEADER = qgemm.HEADER + "".join(_wgmma(n, b) for n in (64, 128) for b in (True, False)) + DEVICE + DESC

# y (M, N) = x (M, K) @ dequantize(w)^T. Block (x, y, z): features n0..n0+FEAT-1 (FEAT = 64 WG;
# warpgroup wg the 64 from n0 + 64 wg), rows m0..m0+BM-1, K split z. A stage (1,024-byte aligned): x in two
# atoms-columns of BM rows x 64 values (128-byte swizzle, see DESC), the packed weights
# (FEAT rows of BK / 2 bytes), their scales and biases (SB a row, aligned down as in
# qgemm.py). Rows past M read row 0 with zero-fill; features past N, the weights' first row.
SOURCE = r"""
    constexpr int FEAT = 64 * WG, THREADS = 128 * WG, W_ROW = BK / 2;
    // Chunks whose A registers are held: all four of a step (two warpgroups) or two (four
    // warpgroups, whose registers would not fit an SM otherwise; the other warpgroups' wgmmas
    // keep the tensor cores busy while one waits).
    constexpr int CB = WG == 2 ? 4 : 2;
    constexpr int SB = BK / GS < 2 ? 2 : BK / GS;
    constexpr int X_BYTES = BM * BK * 2, W_BYTES = FEAT * W_ROW, S_BYTES = FEAT * SB * 2;
    constexpr int STAGE = (X_BYTES + W_BYTES + 2 * S_BYTES + 1023) / 1024 * 1024;
    extern __shared__ __align__(1024) unsigned char smem[];
    const int M = x_shape[0];
    const int N = w_shape[0];
    const int tid = threadIdx.x, warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * FEAT;
    const int k_len = K / gridDim.z, k_begin = blockIdx.z * k_len, steps = k_len / BK;
    float acc[BM / 2];
    #pragma unroll
    for (int i = 0; i < BM / 2; ++i) acc[i] = 0.f;

    // A thread copies the same chunks at every step: 16-byte chunk xc of x rows xr, xr + 16..
    // (16 threads read a row's 256 bytes: whole sectors; 8 of them write 8 distinct bank
    // groups), chunk wch of weight rows wr, wr + 64, and feature tid's scales.
    constexpr int X_CH = BK / 8, X_RSTEP = THREADS / X_CH, X_PER = BM / X_RSTEP;
    constexpr int W_CH = W_ROW / 16, W_STEP = THREADS / W_CH, W_PER = FEAT / W_STEP;
    const int xr = tid / X_CH, xc = tid % X_CH;
    // where x's 16-byte chunk c of block row r goes in a stage: its atom-column, row, swizzle
    auto x_place = [](int r, int c) { return (c / 8) * (BM * 128) + r * 128 + (((c % 8) ^ (r % 8)) * 16); };
    const int x_at = x_place(xr, xc);
    const T* x_src = x + xc * 8;
    bool x_ok[X_PER];
    long x_row[X_PER];
    #pragma unroll
    for (int i = 0; i < X_PER; ++i) {
        x_ok[i] = m0 + xr + i * X_RSTEP < M;
        x_row[i] = (long)(x_ok[i] ? m0 + xr + i * X_RSTEP : 0) * K;
    }
    const int wr = tid / W_CH, wch = tid % W_CH;
    const unsigned* w_src = w + (long)(n0 + wr) * (K / 8) + wch * 4;
    const int w_at = X_BYTES + wr * W_ROW + wch * 16;
    // feature r's scales and biases for the step at k0 (SB values, aligned down as in
    // qgemm.py); its row of groups starts at `groups`, (n0 + r) K / GS
    const long s_row = (long)(n0 + tid) * (K / GS);
    auto copy_scales = [&](unsigned char* base, int r, long groups, int k0) {
        const bool ok = n0 + r < N;
        const long at = (groups + k0 / GS) & ~(long)(SB - 1);
        cp_async<SB * 2>(base + X_BYTES + W_BYTES + r * SB * 2, ok ? scales + at : scales, ok);
        cp_async<SB * 2>(base + X_BYTES + W_BYTES + S_BYTES + r * SB * 2, ok ? biases + at : biases, ok);
    };
    auto load = [&](int stage, int k0) {
        unsigned char* base = smem + stage * STAGE;
        #pragma unroll
        for (int i = 0; i < X_PER; ++i)
            cp_async<16>(base + x_at + i * X_RSTEP * 128, x_src + x_row[i] + k0, x_ok[i]);
        #pragma unroll
        for (int i = 0; i < W_PER; ++i) {
            const bool ok = n0 + wr + i * W_STEP < N;
            cp_async<16>(base + w_at + i * W_STEP * W_ROW,
                         ok ? w_src + (long)i * W_STEP * (K / 8) + k0 / 8 : w, ok);
        }
        if (tid < FEAT) copy_scales(base, tid, s_row, k0);
    };
    // WS: lane `lane` of the producer warp's share of a step's copies (the same chunks as
    // load's, in a loop: one warp cannot keep every address of a stage in registers).
    auto produce = [&](int stage, int k0, int lane) {
        unsigned char* base = smem + stage * STAGE;
        #pragma unroll 4
        for (int c = lane; c < BM * X_CH; c += 32) {
            const int r = c / X_CH;
            const bool ok = m0 + r < M;
            cp_async<16>(base + x_place(r, c % X_CH), x + (long)(ok ? m0 + r : 0) * K + k0 + (c % X_CH) * 8, ok);
        }
        #pragma unroll 4
        for (int c = lane; c < FEAT * W_CH; c += 32) {
            const int r = c / W_CH;
            const bool ok = n0 + r < N;
            cp_async<16>(base + X_BYTES + r * W_ROW + (c % W_CH) * 16,
                         ok ? w + (long)(n0 + r) * (K / 8) + k0 / 8 + (c % W_CH) * 4 : w, ok);
        }
        for (int r = lane; r < FEAT; r += 32) copy_scales(base, r, (long)(n0 + r) * (K / GS), k0);
    };
    const int r0 = 16 * warp + g;               // the lane's features: A's rows g and g + 8
    const unsigned sel = t | ((t + 4) << 4);    // byte t of two words
    unsigned a[2 * CB][4];  // A of 16-value slabs: chunk q's two in a[2 (q % CB)], a[2 (q % CB) + 1]
    // Chunk q (32 values, one 16-byte piece of each weight row) of the step in `base` into the
    // A registers of its slabs 2q and 2q + 1.
    auto unpack = [&](const unsigned char* base, int q, int k0) {
        unsigned lo[4], hi[4];
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = r0 + 8 * h;
            const uint4 v = *reinterpret_cast<const uint4*>(base + X_BYTES + r * W_ROW + q * 16);
            const unsigned p = __byte_perm(__byte_perm(v.x, v.y, sel), __byte_perm(v.z, v.w, sel), 0x5410);
            const int at = (int)(((long)(n0 + r) * (K / GS) + k0 / GS) & (SB - 1)) + 32 * q / GS;
            const unsigned short s = reinterpret_cast<const unsigned short*>(base + X_BYTES + W_BYTES)[r * SB + at];
            const unsigned short b = reinterpret_cast<const unsigned short*>(base + X_BYTES + W_BYTES + S_BYTES)[r * SB + at];
            unpack8<4, BF16, FAST>(&p, s, b, h ? hi : lo);
        }
        // byte j of p holds values 8j + 2t, 8j + 2t + 1 of the chunk: slab 2q's (2t, 2t + 8)
        // pairs are bytes 0 and 1, slab 2q + 1's bytes 2 and 3
        unsigned* a0 = a[2 * (q % CB)];
        unsigned* a1 = a[2 * (q % CB) + 1];
        a0[0] = lo[0]; a0[1] = hi[0]; a0[2] = lo[1]; a0[3] = hi[1];
        a1[0] = lo[2]; a1[1] = hi[2]; a1[2] = lo[3]; a1[3] = hi[3];
    };
    // Step i's data is waited for (cp.async), made visible to the tensor cores, and shared by
    // the barrier, which also frees the stage of step i - 2 (every thread has waited for its
    // wgmmas by then), so the copy of step i + STAGES - 2 goes there.
    // WS: a thread frees step i - 2's stage on its `empty` mbarrier (its wgmmas of that step are
    // done) and waits on step i's `full` one for the producer's copies, so no barrier lines
    // the warpgroups up at each step: one may run ahead while another unpacks.
    static_assert(STAGES >= 3, "a step read, one landing");
    unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + STAGES * STAGE);
    unsigned long long* empty = full + STAGES;
    auto arrive = [&](int i) {
        if constexpr (WS) {
            if (i >= 2) mbar_arrive(empty + (i - 2) % STAGES);
            mbar_wait(full + i % STAGES, (i / STAGES) & 1);
            fence_async_smem();
        } else {
            cp_async_wait<STAGES - 3>();
            fence_async_smem();
            __syncthreads();
            const int next = i + STAGES - 2;
            if (next < steps) load(next % STAGES, k_begin + next * BK);
            cp_async_commit();
        }
    };
    if constexpr (WS) {
        if (tid == 0)
            for (int s = 0; s < STAGES; ++s) {
                mbar_init(full + s, 32);
                mbar_init(empty + s, THREADS);
            }
        __syncthreads();
        if (tid >= THREADS) {  // the producer warp: a stage is refilled once every thread freed it
            for (int j = 0; j < steps; ++j) {
                if (j >= STAGES) mbar_wait(empty + j % STAGES, (j / STAGES - 1) & 1);
                produce(j % STAGES, k_begin + j * BK, tid - THREADS);
                cp_async_mbar_arrive(full + j % STAGES);
            }
            cp_async_commit();  // wait_group covers committed copies only
            cp_async_wait<0>();
            return;
        }
    } else {
        for (int s = 0; s < STAGES - 2; ++s) {
            if (s < steps) load(s, k_begin + s * BK);
            cp_async_commit();
        }
    }
    if (steps > 0) {
        arrive(0);
        unpack(smem, 0, k_begin);
    }
    acc_fence<BM / 2>(acc);
    // The unpacking of each chunk overlaps the wgmmas of the ones before: chunk q's two slabs
    // are one wgmma group, and before chunk q + 1's registers are written again, the group that
    // last read them (CB chunks back) has finished (wait_group CB - 1), as CUTLASS's
    // register-A mainloops do. (Unpacking a whole step before its wgmmas and waiting
    // for them all left the tensor cores idle through the unpacking: seventeenth session.)
    for (int i = 0; i < steps; ++i) {
        const int k0 = k_begin + i * BK;
        const unsigned char* base = smem + (i % STAGES) * STAGE;
        #pragma unroll
        for (int q = 0; q < BK / 32; ++q) {
            wgmma_fence();
            #pragma unroll
            for (int kk = 2 * q; kk < 2 * q + 2; ++kk)  // slab kk: 32 bytes into its atom-column's rows
                wgmma<BM, BF16>(acc, a[kk % (2 * CB)], smem_desc(base + (kk / 4) * (BM * 128) + (kk % 4) * 32, 1024));
            wgmma_commit();
            if (q + 1 < BK / 32) {
                wgmma_wait<CB - 1>();
                unpack(base, q + 1, k0);
            } else if (i + 1 < steps) {
                wgmma_wait<CB - 1>();  // this step's first chunks and the whole previous step are done
                arrive(i + 1);
                unpack(smem + ((i + 1) % STAGES) * STAGE, 0, k0 + BK);
            }
        }
    }
    wgmma_wait<0>();
    acc_fence<BM / 2>(acc);
    // f(offset in an M x N output, index in acc) for each result the lane holds inside M x N:
    // D[feature 16w + g (+8)][x row 8j + 2t (+1)].
    auto each_result = [&](auto f) {
        #pragma unroll
        for (int j = 0; j < BM / 8; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + 8 * j + 2 * t + (e & 1);
                const int col = n0 + r0 + (e >> 1) * 8;
                if (row < M && col < N) f((long)row * N + col, 4 * j + e);
            }
    };
    STORE
"""

# The block's results: y, or split z's float partials in y[z].
_STORE = r"""
    O* dst = y + (long)blockIdx.z * M * N;
    each_result([&](long at, int i) { dst[at] = static_cast<O>(acc[i]); });
"""
# With K splits, the partials added up in the kernel (FUSED_SPLITS): each block stores its
# float partial in parts[z] and counts itself in its tile's counter; the tile's last block
# adds up all the tile's partials (read from L2: other SMs wrote them) and writes y,
# then sets the counter back to 0 for the next launch. The counters belong to one layer
# (counters_for), whose launches run one after another on the stream. The threadfences order
# a block's partial before its count, and the count before the last block's reads (CUDA
# Programming Guide, "Memory Fence Functions": the sum-of-blocks example).
_STORE_FUSED = r"""
    float* part = parts + (long)blockIdx.z * M * N;
    each_result([&](long at, int i) { part[at] = acc[i]; });
    __threadfence();
    __syncthreads();  // every wgmma has retired: the ring is free (a static __shared__ here
                      // could shift the dynamic ring off its 1,024-byte alignment)
    int& last = *reinterpret_cast<int*>(smem);
    if (tid == 0) {
        int* count = const_cast<int*>(counters) + blockIdx.y * gridDim.x + blockIdx.x;
        last = atomicAdd(count, 1) == (int)gridDim.z - 1;
        if (last) *count = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // The whole tile, its own partial too (so acc need not stay live): four consecutive
    // features a thread at a time, U of those quads at once, so that U loads from L2 are in
    // flight together. (One value at a time, the loop's serial round trips to L2 made this
    // slower than the MLX sum it replaces: H200, nineteenth session.)
    constexpr int QUADS = FEAT / 4, ITEMS = BM * QUADS / THREADS, U = WG == 2 ? 8 : 4;
    static_assert(BM * QUADS % THREADS == 0 && ITEMS % U == 0, "whole batches");
    #pragma unroll 1
    for (int i0 = 0; i0 < ITEMS; i0 += U) {
        float4 sum[U];
        long at[U];
        bool ok[U];
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int idx = (i0 + u) * THREADS + tid;
            const int row = m0 + idx / QUADS, col = n0 + 4 * (idx % QUADS);
            ok[u] = row < M && col < N;  // N % 4 == 0: a quad is inside N or past it
            at[u] = ok[u] ? (long)row * N + col : 0;
            sum[u] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
        for (int z = 0; z < (int)gridDim.z; ++z)
            #pragma unroll
            for (int u = 0; u < U; ++u) {
                const float4 v = __ldcg(reinterpret_cast<const float4*>(parts + z * (long)M * N + at[u]));
                sum[u].x += v.x; sum[u].y += v.y; sum[u].z += v.z; sum[u].w += v.w;
            }
        #pragma unroll
        for (int u = 0; u < U; ++u)
            if (ok[u]) {
                y[at[u]] = static_cast<O>(sum[u].x);
                y[at[u] + 1] = static_cast<O>(sum[u].y);
                y[at[u] + 2] = static_cast<O>(sum[u].z);
                y[at[u] + 3] = static_cast<O>(sum[u].w);
            }
    }
"""
SOURCE_FUSED = SOURCE.replace("STORE", _STORE_FUSED)
SOURCE = SOURCE.replace("STORE", _STORE)


def block_rows(m: int) -> int:
    """Rows per block (the wgmma's N): 64 or 128."""
    return 64 if m <= 64 else 128


def warpgroups(m: int, n: int) -> int:
    """Warpgroups a block (64 features each) for m rows of a layer of n output features."""
    return 4 if block_rows(m) == 128 and n >= WIDE_MIN_FEATURES else 2


def target_blocks(smem: int) -> int:
    """Blocks in one wave: an SM holds one or two of these blocks, as their shared memory
    allows (228 KB an SM, 1 KB of it reserved a block)."""
    return TARGET_BLOCKS or SMS * max(1, min(2, 228 * 1024 // (smem + 1024)))


def num_splits(m: int, n: int, k: int, group_size: int = 64) -> int:
    """A power of two dividing the K steps evenly, as qgemm.num_splits for this block shape."""
    bm = block_rows(m)
    tiles = -(-m // bm) * -(-n // (64 * warpgroups(m, n)))
    return qgemm.even_splits(tiles, k // BK, target_blocks(shared_bytes(m, n, group_size)),
                             MIN_STEPS_PER_SPLIT)


def shared_bytes(m: int, n: int, group_size: int) -> int:
    """Dynamic shared memory for m rows of a layer of n features: the ring's stages of x,
    weights, scales and biases, each rounded up to 1,024 bytes (the swizzle atoms' alignment)."""
    rows, wg = block_rows(m), warpgroups(m, n)
    sb, feat = max(2, BK // group_size), 64 * wg
    stages = STAGES[rows, wg]
    ring = stages * (-(-(rows * BK * 2 + feat * BK // 2 + 2 * feat * sb * 2) // 1024) * 1024)
    return ring + (16 * stages if PRODUCER_WARP else 0)  # WS: a full and an empty mbarrier a stage


@functools.lru_cache(maxsize=None)
def _kernel(smem: int):
    return cuda_kernel(name=f"qgemm_wgmma_{smem}", input_names=["x", "w", "scales", "biases"],
                       output_names=["y"], source=SOURCE, header=HEADER, shared_memory=smem)


@functools.lru_cache(maxsize=None)
def _fused_kernel(smem: int):
    return cuda_kernel(name=f"qgemm_wgmma_fused_{smem}",
                       input_names=["x", "w", "scales", "biases", "counters"],
                       output_names=["y", "parts"], source=SOURCE_FUSED, header=HEADER,
                       shared_memory=smem)


_COUNTERS: dict[int, mx.array] = {}
MAX_TILES = 1024  # a layer's tiles: up to 128 rows of 65,536 features


def counters_for(layer: nn.Module) -> mx.array:
    """The layer's own tile counters for FUSED_SPLITS (zeros; each launch leaves them so).
    One set a layer, so that only launches that follow one another share them."""
    if id(layer) not in _COUNTERS:
        _COUNTERS[id(layer)] = mx.zeros((MAX_TILES,), mx.int32)
        mx.eval(_COUNTERS[id(layer)])
    return _COUNTERS[id(layer)]


def applies(layer: nn.Module, x: mx.array) -> bool:
    """Whether qgemm_wgmma() computes layer(x): MIN_ROWS..MAX_ROWS rows of a 4-bit layer in
    the format qgemm.tensor_core_format accepts."""
    return (MIN_ROWS <= x.size // x.shape[-1] <= MAX_ROWS and qgemm.tensor_core_format(layer, x)
            and layer.bits == 4)


def qgemm_wgmma(layer: nn.QuantizedLinear, x: mx.array, splits: int = 0) -> mx.array:
    """layer(x) for x of MIN_ROWS..MAX_ROWS rows (see applies()); K split num_splits() ways
    unless `splits` (dividing the K steps) is given."""
    return qgemm.from_partials(kernel_output(layer, x, splits), x)


def kernel_output(layer: nn.QuantizedLinear, x: mx.array, splits: int = 0,
                  build=None) -> mx.array:
    """The kernel's own output: (m, n) in x's dtype, or (splits, m, n) float partials (unless
    FUSED_SPLITS adds them up; `build`, another kernel of SOURCE's signature, never does)."""
    k = x.shape[-1]
    m = x.size // k
    n = layer.weight.shape[0]
    bm, wg = block_rows(m), warpgroups(m, n)
    threads = 128 * wg + (32 if PRODUCER_WARP else 0)  # WS: the producer warp
    splits = splits or num_splits(m, n, k, layer.group_size)
    fused = FUSED_SPLITS and splits > 1 and build is None and n % 4 == 0 and not PRODUCER_WARP  # whole quads
    out = x.dtype if splits == 1 or fused else mx.float32
    inputs = [x.reshape(m, k), layer.weight, layer.scales, layer.biases]
    shapes, dtypes = [(m, n) if splits == 1 or fused else (splits, m, n)], [out]
    if fused:
        assert -(-n // (64 * wg)) * -(-m // bm) <= MAX_TILES
        inputs.append(counters_for(layer))
        shapes.append((splits, m, n))
        dtypes.append(mx.float32)
    kernel = _fused_kernel if fused else build or _kernel
    return kernel(shared_bytes(m, n, layer.group_size))(
        inputs=inputs,
        template=[("T", x.dtype), ("O", out), ("K", k), ("GS", layer.group_size),
                  ("BF16", x.dtype == mx.bfloat16), ("BM", bm), ("BK", BK),
                  ("STAGES", STAGES[bm, wg]), ("FAST", qgemm.FAST_DEQUANT), ("WG", wg),
                  ("WS", PRODUCER_WARP)],
        grid=(-(-n // (64 * wg)) * threads, -(-m // bm), splits), threadgroup=(threads, 1, 1),
        output_shapes=shapes, output_dtypes=dtypes)[0]


def check_cases() -> list[tuple[int, int]]:
    """(rows, splits) the self-check runs: both block heights, one split (bf16 out) and two
    (float partials), and rows that part-fill a block."""
    return [(m, s) for m in (MIN_ROWS, 64, 100, MAX_ROWS) for s in (1, 2)]


def qgemm_wgmma_matches_layers(layers: list[nn.Module], atol: float = 2e-2) -> bool:
    """The kernel against dequantize + matmul on the model's own quantized layers (the
    runner's start-up self-check; it also compiles every variant a run launches)."""
    def usable(layer, x, splits):
        return applies(layer, x) and (qgemm.input_width(layer) // BK) % max(splits, 1) == 0
    return qgemm.matches_dequantize_matmul(layers, check_cases(), qgemm_wgmma, usable,
                                           "4-bit wgmma GEMM kernel", seed=2, atol=atol)
