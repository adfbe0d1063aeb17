"""4/8-bit matmul for tens to hundreds of rows on tensor cores, as a CUDA kernel.

Decode steps of a big batch multiply ~10-128 activation rows by every quantized weight. MLX's
CUDA quantized matmul is slow there, so without this kernel the engine dequantizes each weight
to bf16 and runs a dense GEMM (engine/model.py's project()); on an H200 the dequantizing alone
took 14.7 ms of a 20.2 ms 4-bit step at batch 64 (loadtest/RESULTS.md, sixth session). This
kernel never writes the float weights out. Each block owns 128 output features of up to 64
rows: a cp.async pipeline (STAGES deep) copies the block's activation tile, packed weights,
scales and biases for the next K steps into shared memory while its four warps work on the
current one; each warp unpacks its own 32 features' weights straight into mma.sync (m16n8k16)
fragments in registers and accumulates in float. Weights are read once, at 4 or 8 bits.

Its first version (a dequantized 64 x 64 tile in shared memory, one step of register prefetch)
made the 4-bit batch-64 step 1.85x faster on an H200 but stayed latency-bound, ~2x slower
than the bf16 GEMMs (RESULTS.md, seventh session). Used only after qgemm_matches_layers has
shown it equal to dequantize + matmul on the model's own layers (engine/runner.py). The CPU
emulation (tests/test_qgemm_emulated.py) runs this source with mma, cp.async and the bf16
pair arithmetic emulated; tests/test_qgemm.py runs the real one on a GPU.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from engine.gemv import chunked_affine, input_width
from engine.kernel_source import cuda_kernel
from engine.paged_decode import CP_ASYNC, VEC_HEADER

log = logging.getLogger(__name__)

MIN_ROWS = 9      # fewer rows go to engine/gemv.py's kernels
MAX_ROWS = 128    # more rows: dequantize + GEMM (H200, 4-bit b192 step: 18.4 ms busy vs 23.6)
BN = 128          # output features per block: four warps of WN
WN = 32           # output features per warp
BK = 128          # input features per pipeline step: 32 per lane of a quad
# Warp groups splitting each K step (their sums are added at the end): two where a block has
# 16 or 32 rows, whose few mma per step leave four warps waiting on latency (H200, 4-bit b16
# step: 5.72 vs 6.47 ms busy); one at 64 rows, where they slowed the b64 step (9.92 vs 8.66).
K_WARPS = 2
K_WARPS_64_ROWS = 1
# One 128-row block of eight 16-feature warps, unpacking each weight once, was slower on an
# H200 with the eighth session's kernel (b128 step 17.79 vs 16.42 ms).
MAX_BLOCK_ROWS = 64
STAGES = 3        # K steps in flight, ~25 KB each at 64 rows, 4-bit (H200 b64: beat 2 and 4)
FAST_DEQUANT = True  # 4-bit: unpack into bf16/fp16 pairs by bit tricks, not through float

# D (16x8, f32) += A (16x16, row-major) B (16x8, column-major): one warp-wide tensor-core op.
# Fragments (PTX ISA, mma.m16n8k16 for .bf16/.f16; g = lane / 4, t = lane % 4, two 16-bit
# values per register, the lower column / row in the low half):
#   a[0]: A[g][2t..2t+1]   a[1]: A[g+8][2t..2t+1]   a[2]: A[g][2t+8..]   a[3]: A[g+8][2t+8..]
#   b[0]: B[2t..2t+1][g]   b[1]: B[2t+8..2t+9][g]
#   c[0..1]: D[g][2t..2t+1]   c[2..3]: D[g+8][2t..2t+1]
# A sum over k does not care which k goes to which mma slot, so lane t of a quad takes 32
# consecutive input features of the step, 32t..32t+31, as 4 pieces of 8 = two mma each:
# logical k (2t, 2t+1, 2t+8, 2t+9) of a piece's first mma are its values 0-3, of the second
# 4-7. Then one 16-byte load of x and one packed word (4-bit) feed two mma.
DEVICE = r"""
template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b) {
  if (BF16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
// Two 16-bit floats in a register: a - b, a * b + c (one rounding), and two floats packed.
template <bool BF16> __device__ __forceinline__ unsigned sub2(unsigned a, unsigned b) {
  unsigned r;
  if (BF16) { __nv_bfloat162 v = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b)); r = *reinterpret_cast<unsigned*>(&v); }
  else { __half2 v = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b)); r = *reinterpret_cast<unsigned*>(&v); }
  return r;
}
template <bool BF16> __device__ __forceinline__ unsigned fma2(unsigned a, unsigned b, unsigned c) {
  unsigned r;
  if (BF16) { __nv_bfloat162 v = __hfma2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b), *reinterpret_cast<__nv_bfloat162*>(&c)); r = *reinterpret_cast<unsigned*>(&v); }
  else { __half2 v = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b), *reinterpret_cast<__half2*>(&c)); r = *reinterpret_cast<unsigned*>(&v); }
  return r;
}
template <bool BF16> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
  unsigned r;
  if (BF16) { __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); r = *reinterpret_cast<unsigned*>(&v); }
  else { __half2 v = __floats2half2_rn(lo, hi); r = *reinterpret_cast<unsigned*>(&v); }
  return r;
}
"""

# Eight consecutive packed values (one 4-bit word, or two 8-bit words) as four registers of
# dequantized pairs (v0,v1) (v2,v3) (v4,v5) (v6,v7); sb is the group's scale and bias as
# 16-bit bit patterns. The 4-bit fast path builds each pair as the 16-bit floats 128 + q
# (bf16) or 1024 + q (fp16), exact, by a byte permute and a mask: two values per three
# integer ops, then q * scale + bias in one paired fma; the other path goes through float.
UNPACK = r"""
template <int BITS, bool BF16, bool FAST>
__device__ __forceinline__ void unpack8(const unsigned* words, unsigned short s, unsigned short b,
                                        unsigned* out) {
  if (BITS == 4 && FAST) {
    const unsigned magic = BF16 ? 0x43004300u : 0x64006400u;
    const unsigned s2 = s | (unsigned(s) << 16), b2 = b | (unsigned(b) << 16);
    const unsigned w = words[0], w4 = w >> 4;
    const unsigned p[4] = {__byte_perm(w, w4, 0x5410), __byte_perm(w, w4, 0x7531),
                           __byte_perm(w, w4, 0x7632), __byte_perm(w, w4, 0x7733)};
    #pragma unroll
    for (int i = 0; i < 4; ++i)
      out[i] = fma2<BF16>(sub2<BF16>((p[i] & 0x000F000Fu) | magic, magic), s2, b2);
  } else {
    constexpr int PER_WORD = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    const float sf = half_bits_to_float<BF16>(s), bf = half_bits_to_float<BF16>(b);
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int v = 2 * i;
      const unsigned q0 = (words[v / PER_WORD] >> (BITS * (v % PER_WORD))) & MASK;
      const unsigned q1 = (words[(v + 1) / PER_WORD] >> (BITS * ((v + 1) % PER_WORD))) & MASK;
      out[i] = pack2<BF16>(sf * static_cast<float>(q0) + bf, sf * static_cast<float>(q1) + bf);
    }
  }
}
"""

HALF_BITS = r"""
template <bool BF16> __device__ __forceinline__ float half_bits_to_float(unsigned short h) {
  if (BF16) return __uint_as_float(unsigned(h) << 16);
  return __half2float(*reinterpret_cast<const __half*>(&h));
}
"""

HEADER = VEC_HEADER + CP_ASYNC + DEVICE + HALF_BITS + UNPACK

# y (M, N) = x (M, K) @ dequantize(w)^T. Block (x, y, z) computes output features
# n0..n0+BN-1 of rows m0..m0+BM-1 over split z's share of K, in BK-wide steps through a ring
# of STAGES shared-memory stages (dynamic shared memory). A stage holds the x tile (BM rows of
# BK values; 16-byte chunks XOR-swizzled so a quad's four loads and the next row's land in
# distinct banks), the packed weights (BN rows of BK * BITS / 8 bytes; 8-bit rows swizzled
# by row parity) and each row's scales and biases for the step (4 or 8 bytes, aligned down,
# so a 128-wide group's value may sit at offset 1). Rows past M / N are zero-filled.
# Warp w computes WN features from (w % WARPS_N) * WN of all BM rows. The features are the
# mma's M (FT = WN / 16 tiles; the lane unpacks features g and g + 8 of each straight into A)
# and the rows its N (XT = BM / 8 tiles; B is the lane's two words of one 16-byte x load), so
# no register is copied to build an operand. With KW = 2 warp groups, group w / WARPS_N takes
# half of each lane's pieces of a step and the groups' sums meet in shared memory at the end
# (twice the warps per SM, same tiles).
SOURCE = r"""
    constexpr int FT = WN / 16, XT = BM / 8, NT = WN / 8, WARPS_N = BN / WN;
    constexpr int PER_WORD = 32 / BITS;
    constexpr int W_ROW = BK * BITS / 8;                  // weight bytes per row and step
    constexpr int SB = BK / GS < 2 ? 2 : BK / GS;         // scale values per row and step
    constexpr int X_BYTES = BM * BK * 2, W_BYTES = BN * W_ROW, S_BYTES = BN * SB * 2;
    constexpr int STAGE = X_BYTES + W_BYTES + 2 * S_BYTES;
    extern __shared__ __align__(16) unsigned char smem[];
    const int M = x_shape[0];
    const int N = w_shape[0];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int k_len = K / gridDim.z, k_begin = blockIdx.z * k_len, steps = k_len / BK;
    const int wn = (warp % WARPS_N) * WN, kw = warp / WARPS_N;
    constexpr int PIECES = 4 / KW;  // of a lane's four 8-value pieces per step, this warp's
    float acc[FT][XT][4];
    #pragma unroll
    for (int i = 0; i < FT; ++i)
        #pragma unroll
        for (int j = 0; j < XT; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    // Each thread copies the same chunks at every step (THREADS is a multiple of a row's chunk
    // count, so a thread's column and row parity never change): their addresses are set up
    // once here, and a step adds only k0. (Working them out per step from a running index,
    // with its divisions, took about half the loop's instructions.)
    constexpr int X_CH = BK / 8, X_STEP = THREADS / X_CH, X_PER = BM / X_STEP;
    constexpr int W_CH = W_ROW / 16, W_STEP = THREADS / W_CH, W_PER = BN / W_STEP;
    static_assert(THREADS % X_CH == 0 && BM % X_STEP == 0 && X_STEP % 2 == 0, "x copy shape");
    static_assert(THREADS % W_CH == 0 && BN % W_STEP == 0 && W_STEP % 2 == 0, "w copy shape");
    const int xr = tid / X_CH, xch = tid % X_CH;
    const int x_at = xr * (BK * 2) + (xch ^ ((xch >> 3) << 1) ^ (xr & 1)) * 16;
    const T* x_src = x + (long)(m0 + xr) * K + xch * 8;
    const int wr = tid / W_CH, wch = tid % W_CH;
    const int w_at = X_BYTES + wr * W_ROW + (BITS == 8 ? wch ^ (wr & 1) : wch) * 16;
    const unsigned* w_src = w + (long)(n0 + wr) * (K / PER_WORD) + wch * 4;
    const long s_row = (long)(n0 + tid) * (K / GS);
    auto load = [&](int stage, int k0) {
        unsigned char* base = smem + stage * STAGE;
        #pragma unroll
        for (int i = 0; i < X_PER; ++i) {
            const bool ok = m0 + xr + i * X_STEP < M;
            cp_async<16>(base + x_at + i * X_STEP * (BK * 2), ok ? x_src + (long)i * X_STEP * K + k0 : x, ok);
        }
        #pragma unroll
        for (int i = 0; i < W_PER; ++i) {
            const bool ok = n0 + wr + i * W_STEP < N;
            cp_async<16>(base + w_at + i * W_STEP * W_ROW,
                         ok ? w_src + (long)i * W_STEP * (K / PER_WORD) + k0 / PER_WORD : w, ok);
        }
        if (tid < BN) {
            const bool ok = n0 + tid < N;
            const long at = (s_row + k0 / GS) & ~(long)(SB - 1);
            cp_async<SB * 2>(base + X_BYTES + W_BYTES + tid * SB * 2, ok ? scales + at : scales, ok);
            cp_async<SB * 2>(base + X_BYTES + W_BYTES + S_BYTES + tid * SB * 2, ok ? biases + at : biases, ok);
        }
    };
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < steps) load(s, k_begin + s * BK);
        cp_async_commit();
    }
    for (int i = 0; i < steps; ++i) {
        cp_async_wait<STAGES - 2>();  // this thread's copies for step i have landed
        __syncthreads();              // everyone's have; and step i - 1's stage is free
        const int next = i + STAGES - 1;
        if (next < steps) load(next % STAGES, k_begin + next * BK);
        cp_async_commit();
        const int k0 = k_begin + i * BK;
        const unsigned char* base = smem + (i % STAGES) * STAGE;
        unsigned wq[NT][BITS / KW];  // this warp's share of the lane's 32 values of each row
        unsigned short sv[NT], bv[NT];
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int r = wn + nt * 8 + g;
            const uint4* row = reinterpret_cast<const uint4*>(base + X_BYTES + r * W_ROW);
            unsigned all[BITS];  // 4 or 8 words: 32 values
            #pragma unroll
            for (int h = 0; h < BITS / 4; ++h) {
                const int ch = (BITS / 4) * t + h;
                const uint4 v = row[BITS == 8 ? ch ^ (r & 1) : ch];
                all[4 * h] = v.x; all[4 * h + 1] = v.y; all[4 * h + 2] = v.z; all[4 * h + 3] = v.w;
            }
            #pragma unroll
            for (int q = 0; q < BITS / KW; ++q)  // a select, not a runtime index (registers)
                wq[nt][q] = KW == 2 && kw ? all[(q + BITS / 2) % BITS] : all[q];
            const int at = (int)(((long)(n0 + r) * (K / GS) + k0 / GS) & (SB - 1)) + 32 * t / GS;
            sv[nt] = reinterpret_cast<const unsigned short*>(base + X_BYTES + W_BYTES)[r * SB + at];
            bv[nt] = reinterpret_cast<const unsigned short*>(base + X_BYTES + W_BYTES + S_BYTES)[r * SB + at];
        }
        #pragma unroll
        for (int jj = 0; jj < PIECES; ++jj) {  // piece j: values 32t + 8j .. +7 of the step
            const int j = kw * PIECES + jj;
            unsigned xb[XT][4];  // x row xt * 8 + g: the lane's 8 values, B of two mma
            #pragma unroll
            for (int xt = 0; xt < XT; ++xt) {
                const int r = xt * 8 + g, ch = 4 * t + j;
                const uint4 v = *reinterpret_cast<const uint4*>(
                    base + r * (BK * 2) + (ch ^ ((ch >> 3) << 1) ^ (r & 1)) * 16);
                xb[xt][0] = v.x; xb[xt][1] = v.y; xb[xt][2] = v.z; xb[xt][3] = v.w;
            }
            #pragma unroll
            for (int ft = 0; ft < FT; ++ft) {
                unsigned lo[4], hi[4];  // features g and g + 8 of the tile: A's rows
                unpack8<BITS, BF16, FAST>(&wq[2 * ft][(BITS / 4) * jj], sv[2 * ft], bv[2 * ft], lo);
                unpack8<BITS, BF16, FAST>(&wq[2 * ft + 1][(BITS / 4) * jj], sv[2 * ft + 1], bv[2 * ft + 1], hi);
                const unsigned a0[4] = {lo[0], hi[0], lo[1], hi[1]};
                const unsigned a1[4] = {lo[2], hi[2], lo[3], hi[3]};
                #pragma unroll
                for (int xt = 0; xt < XT; ++xt) {
                    mma16816<BF16>(acc[ft][xt], a0, xb[xt]);
                    mma16816<BF16>(acc[ft][xt], a1, xb[xt] + 2);
                }
            }
        }
    }
    if (KW == 2) {  // group 1 hands its sums to group 0 through the (now idle) stages
        cp_async_wait<0>();
        __syncthreads();
        float* red = reinterpret_cast<float*>(smem);
        if (kw == 1) {
            #pragma unroll
            for (int ft = 0; ft < FT; ++ft)
                #pragma unroll
                for (int xt = 0; xt < XT; ++xt)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) red[((ft * XT + xt) * 4 + e) * (32 * WARPS_N) + tid - 32 * WARPS_N] = acc[ft][xt][e];
        }
        __syncthreads();
        if (kw == 1) return;
        #pragma unroll
        for (int ft = 0; ft < FT; ++ft)
            #pragma unroll
            for (int xt = 0; xt < XT; ++xt)
                #pragma unroll
                for (int e = 0; e < 4; ++e) acc[ft][xt][e] += red[((ft * XT + xt) * 4 + e) * (32 * WARPS_N) + tid];
    }
    O* dst = y + (long)blockIdx.z * M * N;
    #pragma unroll
    for (int ft = 0; ft < FT; ++ft)
        #pragma unroll
        for (int xt = 0; xt < XT; ++xt)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {  // D[feature g (+8)][x row 2t (+1)] of the tile pair
                const int row = m0 + xt * 8 + 2 * t + (e & 1);
                const int col = n0 + wn + ft * 16 + g + (e >> 1) * 8;
                if (row < M && col < N) dst[(long)row * N + col] = static_cast<O>(acc[ft][xt][e]);
            }
"""

# Split K over more blocks when the output tiles alone would leave SMs idle (o and down of
# the 7B at 64 rows make 32 tiles for an H200's 132 SMs): up to TARGET_BLOCKS blocks (two
# per SM there), each split at least MIN_STEPS_PER_SPLIT steps long.
TARGET_BLOCKS = 264
MIN_STEPS_PER_SPLIT = 8


def block_rows(m: int) -> int:
    """Rows per block: the fewest of 16, 32, 64 (or 128, up to MAX_BLOCK_ROWS) that hold m."""
    return 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 or MAX_BLOCK_ROWS == 64 else 128


@dataclass(frozen=True)
class Launch:
    """How qgemm() runs m rows of an (n, k) layer; variant() is what makes it its own
    compiled kernel (n and m are runtime values)."""

    rows: int      # per block (BM)
    k_warps: int   # warp groups per K step (KW)
    splits: int    # K splits (float partial sums when > 1)

    @property
    def threads(self) -> int:
        return 32 * (BN // WN) * self.k_warps

    def variant(self) -> tuple:
        return (self.rows, self.k_warps, self.splits > 1)


def launch_for(m: int, n: int, k: int, splits: int = 0) -> Launch:
    """The block shape for m rows (see block_rows, K_WARPS) and num_splits() unless given."""
    bm = block_rows(m)
    return Launch(bm, K_WARPS if bm < 64 else K_WARPS_64_ROWS, splits or num_splits(m, n, k))


def num_splits(m: int, n: int, k: int) -> int:
    """A power of two dividing the K steps evenly (so every split has k_len = K / splits)."""
    return even_splits(-(-m // block_rows(m)) * -(-n // BN), k // BK, TARGET_BLOCKS,
                       MIN_STEPS_PER_SPLIT)


def even_splits(tiles: int, steps: int, target_blocks: int, min_steps: int) -> int:
    """K splits for a grid of `tiles` output tiles of `steps` K steps each: doubled while the
    grid stays within target_blocks, the splits divide the steps evenly and each keeps at
    least min_steps (engine/qgemm_wgmma.py's grid too)."""
    splits = 1
    while (tiles * splits * 2 <= target_blocks and steps % (2 * splits) == 0
           and steps // (2 * splits) >= min_steps):
        splits *= 2
    return splits


def shared_bytes(run: Launch, bits: int, group_size: int) -> int:
    """Dynamic shared memory of a launch: STAGES stages of x, weights, scales and biases (or,
    if more, the second warp group's sums)."""
    sb = max(2, BK // group_size)
    stages = STAGES * (run.rows * BK * 2 + BN * BK * bits // 8 + 2 * BN * sb * 2)
    sums = run.rows // 16 * WN // 8 * 4 * 4 * run.threads // run.k_warps
    return max(stages, sums if run.k_warps == 2 else 0)


@functools.lru_cache(maxsize=None)
def _kernel(smem: int):
    return cuda_kernel(name=f"qgemm_mma_{smem}", input_names=["x", "w", "scales", "biases"],
                       output_names=["y"], source=SOURCE, header=HEADER,
                       shared_memory=smem)


def applies(layer: nn.Module, x: mx.array) -> bool:
    """Whether qgemm() computes layer(x): MIN_ROWS..MAX_ROWS rows in a format tensor_core_format
    accepts."""
    return MIN_ROWS <= x.size // x.shape[-1] <= MAX_ROWS and tensor_core_format(layer, x)


def tensor_core_format(layer: nn.Module, x: mx.array) -> bool:
    """What this kernel and engine/qgemv.py's need, whatever the rows: bf16/fp16 x into an
    affine 4/8-bit QuantizedLinear without bias whose scales share x's dtype, with an input
    width of whole BK-wide steps and groups of at least 32 (a lane's 32 values share one)."""
    if x.dtype not in (mx.bfloat16, mx.float16):
        return False
    if "bias" in layer or not chunked_affine(layer) or layer.group_size < 32:
        return False
    k = input_width(layer)
    return x.shape[-1] == k and k % BK == 0 and layer.scales.dtype == x.dtype


def qgemm(layer: nn.QuantizedLinear, x: mx.array, splits: int = 0) -> mx.array:
    """layer(x) for x of MIN_ROWS..MAX_ROWS rows (see applies()); K split num_splits() ways
    unless `splits` (dividing the K steps) is given."""
    return from_partials(kernel_output(layer, x, splits), x)


def from_partials(y: mx.array, x: mx.array) -> mx.array:
    """A GEMM kernel's output (m, n), or (splits, m, n) float partials, as layer(x): the
    partials added up in x's dtype, x's leading shape."""
    if y.ndim == 3:
        y = y.sum(axis=0).astype(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def kernel_output(layer: nn.QuantizedLinear, x: mx.array, splits: int = 0,
                  build=None) -> mx.array:
    """The kernel's own output for x's rows as a matrix: (m, n) in x's dtype, or (splits, m, n)
    float partials that qgemm() adds up. `build` (shared bytes -> kernel) stands in for the
    kernel with the same launch (loadtest/kernel_ablate.py)."""
    k = x.shape[-1]
    m = x.size // k
    n = layer.weight.shape[0]
    run = launch_for(m, n, k, splits)
    out = x.dtype if run.splits == 1 else mx.float32
    return (build or _kernel)(shared_bytes(run, layer.bits, layer.group_size))(
        inputs=[x.reshape(m, k), layer.weight, layer.scales, layer.biases],
        template=[("T", x.dtype), ("O", out), ("K", k), ("BITS", layer.bits),
                  ("GS", layer.group_size), ("BF16", x.dtype == mx.bfloat16), ("BM", run.rows),
                  ("BN", BN), ("BK", BK), ("WN", WN), ("STAGES", STAGES),
                  ("KW", run.k_warps), ("THREADS", run.threads), ("FAST", FAST_DEQUANT)],
        grid=(-(-n // BN) * run.threads, -(-m // run.rows), run.splits),
        threadgroup=(run.threads, 1, 1),
        output_shapes=[(m, n) if run.splits == 1 else (run.splits, m, n)], output_dtypes=[out])[0]


def check_cases() -> list[tuple[int, int]]:
    """(rows, splits) the self-check runs: each block height, writing bf16 (one split) and
    float partials (two), and two row tiles (splits 0: num_splits's choice)."""
    return [(m, s) for m in (MIN_ROWS, 20, 64) for s in (1, 2)] + [(100, 0)]


def qgemm_matches_layers(layers: list[nn.Module], atol: float = 2e-2) -> bool:
    """The kernel against dequantize + matmul on the model's own quantized layers, at row
    counts of each block height (16, 32, 64), with and without a K split, and across two row
    tiles: the runner's start-up self-check, which also compiles every kernel variant a run
    can launch before the first request."""
    def usable(layer, x, splits):  # a forced split must divide the layer's K steps
        return applies(layer, x) and (input_width(layer) // BK) % max(splits, 1) == 0
    return matches_dequantize_matmul(layers, check_cases(), qgemm, usable,
                                     "4/8-bit GEMM kernel", seed=1, atol=atol)


def matches_dequantize_matmul(layers: list[nn.Module], cases: list[tuple], run, usable,
                              what: str, seed: int, atol: float, then=None) -> bool:
    """run(layer, x, *args) against dequantize + matmul (then `then` of it, if given) for each
    case (rows, *args) that usable(layer, x, *args) accepts, on each layer: the start-up
    self-check of this kernel and engine/qgemv.py's (running each case also compiles its
    kernel). False, with a warning naming `what`, if any case is off or a kernel fails to
    build or run; False if none ran."""
    if not mx.cuda.is_available():
        return False
    try:
        checked = 0
        # Explicit keys: a start-up check must not reseed the process's global generator.
        keys = mx.random.split(mx.random.key(seed), len(cases))
        for layer in layers:
            w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size,
                              layer.bits)
            for (m, *args), key in zip(cases, keys):
                x = mx.random.normal((m, input_width(layer)), key=key).astype(layer.scales.dtype)
                if not usable(layer, x, *args):
                    continue
                got = run(layer, x, *args)
                want = x @ w.T
                want = (then(want) if then else want).astype(mx.float32)
                err = mx.abs(got.astype(mx.float32) - want).max().item()
                if not err <= atol * max(mx.abs(want).max().item(), 1.0):
                    log.warning("%s off by %.3g (%s, %d rows, case %s); not used", what, err,
                                layer.weight.shape, m, args)
                    return False
                checked += 1
        return checked > 0
    except Exception as exc:  # a kernel that fails to build or run must not stop the server
        log.warning("%s unavailable (%s); not used", what, exc)
        return False
