"""4/8-bit matmul for tens to hundreds of rows on tensor cores, as a CUDA kernel.

Decode steps of a big batch multiply ~10-256 activation rows by every quantized weight. MLX's
CUDA quantized matmul is slow there, so the engine dequantizes each weight to bf16 and runs a
dense GEMM (engine/model.py's project()); on an H200 the dequantizing alone took 14.7 ms of a
20.2 ms 4-bit step at batch 64, and a 4-bit batched run reached 0.28x of bf16's throughput
(loadtest/RESULTS.md, sixth session). This kernel never writes the float weights out: each
thread block dequantizes a 64 x 64 tile of the packed weights into shared memory, next to a
64 x 64 tile of the activations, and its four warps multiply them with `mma.sync` (m16n8k16,
float accumulators), so the weights are read once, at 4 or 8 bits.

Opt-in (MISTRAL_SERVE_QGEMM=1) until timed on a GPU; used only after qgemm_matches_layers has
shown it equal to dequantize + matmul on the model's own layers (engine/runner.py). The CPU
emulation (tests/test_qgemm_emulated.py) runs this source with mma16816 emulated per the PTX
fragment layout; tests/test_qgemm.py runs the real one on a GPU.
"""

from __future__ import annotations

import functools
import logging

import mlx.core as mx
import mlx.nn as nn

from engine.gemv import chunked_affine, input_width
from engine.paged_decode import VEC_HEADER

log = logging.getLogger(__name__)

MIN_ROWS = 9      # fewer rows go to engine/gemv.py's kernels
MAX_ROWS = 256    # more rows (prompt chunks) keep dequantize + GEMM
TILE = 64         # rows, output features and input features of a block's tile
THREADS = 128     # four warps, each a 32 x 32 quarter of the output tile

# D (16x8, f32) += A (16x16, row-major) B (16x8, column-major): one warp-wide tensor-core op.
# Fragments (PTX ISA, mma.m16n8k16 for .bf16/.f16; g = lane / 4, t = lane % 4, two 16-bit
# values per register, the lower column / row in the low half):
#   a[0]: A[g][2t..2t+1]   a[1]: A[g+8][2t..2t+1]   a[2]: A[g][2t+8..]   a[3]: A[g+8][2t+8..]
#   b[0]: B[2t..2t+1][g]   b[1]: B[2t+8..2t+9][g]
#   c[0..1]: D[g][2t..2t+1]   c[2..3]: D[g+8][2t..2t+1]
HEADER = VEC_HEADER + r"""
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
"""

# y (M, N) = x (M, K) @ dequantize(w)^T. Block (x, y, z) computes output features n0..n0+63
# of rows m0..m0+63 over split z's share of K. Each 64-wide step along K stores a tile of x
# and a dequantized tile of w (16-byte chunks of VALS values, each in one group) in shared
# memory, rows padded by 8 values so the warps' fragment loads hit 32 banks; the next step's
# global loads are issued into registers before this step's mma, so they are in flight
# while it runs. With one split the block writes y (T); with several, float partial sums
# (split, M, N) that qgemm() adds up.
SOURCE = r"""
    constexpr int BM = 64, BN = 64, BK = 64, LD = BK + 8;
    constexpr int VALS = 128 / BITS;
    constexpr int PER_WORD = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    constexpr int XV = 8;  // 16-bit values per 16-byte load
    constexpr int XL = BM * BK / XV / 128;    // x chunks per thread and step
    constexpr int WL = BN * BK / VALS / 128;  // w chunks per thread and step
    __align__(16) __shared__ T xs[BM * LD];
    __align__(16) __shared__ T ws[BN * LD];
    const int M = x_shape[0];
    const int N = w_shape[0];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int k_len = K / gridDim.z, k_begin = blockIdx.z * k_len, k_end = k_begin + k_len;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;  // this warp's quarter
    float acc[2][4][4];
    #pragma unroll
    for (int i = 0; i < 2; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    // One step's global data, in registers: x chunks (rows past M as zeros), and packed w
    // chunks with their group's scale and bias (features past N repeat the last one).
    Vec<T, XV> xr[XL];
    uint4 wr[WL];
    float sr[WL], br[WL];
    auto load = [&](int k0) {
        #pragma unroll
        for (int i = 0; i < XL; ++i) {
            const int c = tid + i * 128;
            const int row = c / (BK / XV), col = (c % (BK / XV)) * XV;
            if (m0 + row < M) {
                xr[i] = *reinterpret_cast<const Vec<T, XV>*>(x + (long)(m0 + row) * K + k0 + col);
            } else {
                #pragma unroll
                for (int j = 0; j < XV; ++j) xr[i].v[j] = static_cast<T>(0.f);
            }
        }
        #pragma unroll
        for (int i = 0; i < WL; ++i) {
            const int c = tid + i * 128;
            const int row = c / (BK / VALS), col = (c % (BK / VALS)) * VALS;
            const long n = min(n0 + row, N - 1);
            const int k = k0 + col;
            wr[i] = *reinterpret_cast<const uint4*>(w + n * (K / PER_WORD) + k / PER_WORD);
            sr[i] = static_cast<float>(scales[n * (K / GS) + k / GS]);
            br[i] = static_cast<float>(biases[n * (K / GS) + k / GS]);
        }
    };
    load(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        #pragma unroll
        for (int i = 0; i < XL; ++i) {
            const int c = tid + i * 128;
            *reinterpret_cast<Vec<T, XV>*>(xs + (c / (BK / XV)) * LD + (c % (BK / XV)) * XV) = xr[i];
        }
        #pragma unroll
        for (int i = 0; i < WL; ++i) {
            const int c = tid + i * 128;
            const int row = c / (BK / VALS), col = (c % (BK / VALS)) * VALS;
            const unsigned words[4] = {wr[i].x, wr[i].y, wr[i].z, wr[i].w};
            #pragma unroll
            for (int j0 = 0; j0 < VALS; j0 += XV) {
                Vec<T, XV> o;
                #pragma unroll
                for (int j = 0; j < XV; ++j) {
                    const int v = j0 + j;
                    const unsigned q = (words[v / PER_WORD] >> (BITS * (v % PER_WORD))) & MASK;
                    o.v[j] = static_cast<T>(sr[i] * static_cast<float>(q) + br[i]);
                }
                *reinterpret_cast<Vec<T, XV>*>(ws + row * LD + col + j0) = o;
            }
        }
        __syncthreads();
        if (k0 + BK < k_end) load(k0 + BK);  // in flight during this step's mma
        #pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned a[2][4], bf[4][2];
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const T* p = xs + (wm + mt * 16 + g) * LD + kk + 2 * t;
                a[mt][0] = *reinterpret_cast<const unsigned*>(p);
                a[mt][1] = *reinterpret_cast<const unsigned*>(p + 8 * LD);
                a[mt][2] = *reinterpret_cast<const unsigned*>(p + 8);
                a[mt][3] = *reinterpret_cast<const unsigned*>(p + 8 * LD + 8);
            }
            #pragma unroll
            for (int nt = 0; nt < 4; ++nt) {  // B[k][n] = w[n][k]: a row of ws is a column of B
                const T* p = ws + (wn + nt * 8 + g) * LD + kk + 2 * t;
                bf[nt][0] = *reinterpret_cast<const unsigned*>(p);
                bf[nt][1] = *reinterpret_cast<const unsigned*>(p + 8);
            }
            #pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                #pragma unroll
                for (int nt = 0; nt < 4; ++nt) mma16816<BF16>(acc[mt][nt], a[mt], bf[nt]);
        }
        __syncthreads();
    }
    O* dst = y + (long)blockIdx.z * M * N;
    #pragma unroll
    for (int mt = 0; mt < 2; ++mt)
        #pragma unroll
        for (int nt = 0; nt < 4; ++nt)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + wm + mt * 16 + g + (e >> 1) * 8;
                const int col = n0 + wn + nt * 8 + 2 * t + (e & 1);
                if (row < M && col < N) dst[(long)row * N + col] = static_cast<O>(acc[mt][nt][e]);
            }
"""

# Split K over more blocks when the output tiles alone would leave SMs idle (down and o of
# the 7B at 64 rows make 64 tiles for 132 SMs): up to TARGET_BLOCKS blocks, each split at
# least MIN_STEPS_PER_SPLIT 64-wide steps long.
TARGET_BLOCKS = 256
MIN_STEPS_PER_SPLIT = 8


def num_splits(m: int, n: int, k: int) -> int:
    """A power of two dividing the K steps evenly (so every split has k_len = K / splits)."""
    tiles, steps, splits = -(-m // TILE) * -(-n // TILE), k // TILE, 1
    while (tiles * splits * 2 <= TARGET_BLOCKS and steps % (2 * splits) == 0
           and steps // (2 * splits) >= MIN_STEPS_PER_SPLIT):
        splits *= 2
    return splits


@functools.lru_cache(maxsize=1)
def _kernel():
    return mx.fast.cuda_kernel(name="qgemm_mma", input_names=["x", "w", "scales", "biases"],
                               output_names=["y"], source=SOURCE, header=HEADER)


def applies(layer: nn.Module, x: mx.array) -> bool:
    """Whether qgemm() computes layer(x): MIN_ROWS..MAX_ROWS rows of bf16/fp16 x into an
    affine 4/8-bit QuantizedLinear without bias whose scales share x's dtype, with an input
    width of whole 64-wide tiles and groups of whole 16-byte chunks."""
    rows = x.size // x.shape[-1]
    if not MIN_ROWS <= rows <= MAX_ROWS or x.dtype not in (mx.bfloat16, mx.float16):
        return False
    if "bias" in layer or not chunked_affine(layer):
        return False
    k = input_width(layer)
    return x.shape[-1] == k and k % TILE == 0 and layer.scales.dtype == x.dtype


def qgemm(layer: nn.QuantizedLinear, x: mx.array) -> mx.array:
    """layer(x) for x of MIN_ROWS..MAX_ROWS rows (see applies())."""
    k = x.shape[-1]
    m = x.size // k
    n = layer.weight.shape[0]
    splits = num_splits(m, n, k)
    out = x.dtype if splits == 1 else mx.float32
    y = _kernel()(inputs=[x.reshape(m, k), layer.weight, layer.scales, layer.biases],
                  template=[("T", x.dtype), ("O", out), ("K", k), ("BITS", layer.bits),
                            ("GS", layer.group_size), ("BF16", x.dtype == mx.bfloat16)],
                  grid=(-(-n // TILE) * THREADS, -(-m // TILE), splits),
                  threadgroup=(THREADS, 1, 1),
                  output_shapes=[(splits, m, n)], output_dtypes=[out])[0]
    y = y[0] if splits == 1 else y.sum(axis=0).astype(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def qgemm_matches_layers(layers: list[nn.Module], atol: float = 2e-2) -> bool:
    """The kernel against dequantize + matmul on the model's own quantized layers, at row
    counts that fill one tile, leave one part empty and span several: the runner's start-up
    self-check (which also compiles the kernels before the first request)."""
    if not mx.cuda.is_available():
        return False
    try:
        checked = 0
        for layer in layers:
            for m, key in zip((MIN_ROWS, 64, 100), mx.random.split(mx.random.key(1), 3)):
                x = mx.random.normal((m, input_width(layer)), key=key)
                x = x.astype(layer.scales.dtype)
                if not applies(layer, x):
                    continue
                w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size,
                                  layer.bits)
                want = (x @ w.T).astype(mx.float32)
                err = mx.abs(qgemm(layer, x).astype(mx.float32) - want).max().item()
                if not err <= atol * max(mx.abs(want).max().item(), 1.0):
                    log.warning("4/8-bit GEMM kernel off by %.3g (%s, %d rows); using "
                                "dequantize + GEMM", err, layer.weight.shape, m)
                    return False
                checked += 1
        return checked > 0
    except Exception as exc:  # a kernel that fails to build or run must not stop the server
        log.warning("4/8-bit GEMM kernel unavailable (%s); using dequantize + GEMM", exc)
        return False
