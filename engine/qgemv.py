"""4/8-bit matrix times 1-8 activation rows on tensor cores, as a CUDA kernel.

A decode step of a small batch reads every quantized weight once, so its matmuls should run
at the memory bandwidth. engine/gemv.py's quantized kernel does not: it unpacks each value
with an int-to-float conversion and does one float multiply-add per value and row. On an
H200 it read gate|up at 2.1 TB/s for one row, taking 31.7 us, and its time grew with the
rows (96.3 us at 4 rows, slower than the bf16 GEMM's 61.9). Removing only the conversion
made it 21.1 us, and removing the multiply-adds 8.6 us, so the arithmetic bound it
(loadtest/kernel_ablate.py, RESULTS.md, eighth session).

This kernel does the products on tensor cores with the operands swapped: the weights are
mma.sync's A operand (16 output features by 16 inputs) and the activation rows its B
operand (16 inputs by 8 rows, rows past M are ignored), so one mma serves up to 8 rows at
no extra cost. A warp owns 16 output features. Each lane reads 32 consecutive packed values
of features g and g + 8 (one 16-byte load each at 4 bits) and unpacks them with
engine/qgemm.py's bit tricks (about two integer or paired-float ops per value) straight
into A fragments; the k-to-slot mapping is qgemm's, so one 16-byte load of x is the B
fragment of two mma. A block's NW warps take interleaved 128-wide K steps of the same
features (so narrow layers still fill the GPU) and add their sums in shared memory.

For one row (STAGED_MAX_ROWS) a staged form (SOURCE_STAGED) feeds the same fragments from
per-warp cp.async rings in shared memory. (Two fused staged forms, SwiGLU applied on the way
into the down projection and residual add + RMSNorm on the way into q|k|v and gate|up, cut
kernels from the host-paced single stream but were slower on an H200: RESULTS.md, tenth
session. They were removed.) Both forms can instead end in SwiGLU on gate|up, whose rows the
model interleaves so that a lane already holds each gate and its up (EPILOGUE): that costs
the kernel nothing and saves the layer a kernel launch.

Used only after qgemv_matches_layers has shown it equal to dequantize + matmul on the
model's own layers at every row count (engine/runner.py). tests/test_qgemv_emulated.py runs
this source on a CPU; tests/test_qgemv.py runs the real one on a GPU.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from engine import fused_ops
from engine.gemv import input_width
from engine.kernel_source import cuda_kernel
from engine.qgemm import BK, FAST_DEQUANT, HEADER, matches_dequantize_matmul, tensor_core_format

MAX_ROWS = 8         # B's width in mma.m16n8k16
FEATURES = 16        # output features per warp (and block): A's height
UNROLL = 4           # K steps whose weights a warp loads before using them (H200: beat 8)
# Warps per block split K: the fewest (power of two, at most MAX_WARPS) that give about
# WARPS_TARGET warps in all, ~31 per SM of an H200, so a 4,096-feature layer fills the GPU.
WARPS_TARGET = 4096
MAX_WARPS = 8
# The staged kernel (SOURCE_STAGED) where it applies: chunk slots in each warp's ring, and
# whether x is staged too (else read from global memory in the inner loop).
# It serves up to STAGED_MAX_ROWS rows (0: never). H200, ninth session: the 4-bit single
# stream measured 335.7 tok/s with these settings. Per kernel (loadtest/kernel_ablate.py), at
# one row STAGES 2 ran down 15.7 us and q|k|v 9.4 against 18.2 and 10.2 here (gate|up 27.7 vs
# 27.3), but its end-to-end run, on another machine, gave 314.9: not yet shown better. At 8
# rows the direct kernel beat every staged setting on q|k|v and down, so it keeps 2-8 rows.
STAGED_MAX_ROWS = 1
# The SwiGLU epilogue pairs feature g of a tile with feature g + 8: gate|up runs of half a tile.
assert 2 * fused_ops.GATE_UP_RUN == FEATURES
STAGES = 3
X_SMEM = True
SMEM_BUDGET = 112 * 1024   # a block's ring at most: two blocks fit an H100's / H200's SM
SMEM_LIMIT = 227 * 1024    # the most dynamic shared memory a block can have (sm_90)

# Both kernels end alike: the block's warps add their sums (each took its own K steps) and
# warp 0 stores D: c[0..1] are feature g's rows 2t, 2t + 1, c[2..3] feature g + 8's. With
# SWIGLU the layer is gate|up with its rows interleaved in runs of 8 (engine/model.py's
# GATE_UP_RUN), so a block's 16 features are 8 gates and their 8 ups, and one lane holds
# both of a pair: it stores silu(gate) * up, and the layer's separate SwiGLU kernel (a
# launch, ~7 us of host encoding, on a host-paced single stream) is not needed.
EPILOGUE = r"""
    if (NW > 1) {  // the other warps' sums to warp 0
        __shared__ float red[NW][32][4];
        #pragma unroll
        for (int e = 0; e < 4; ++e) red[warp][lane][e] = acc[e];
        __syncthreads();
        if (warp != 0) return;
        for (int v = 1; v < NW; ++v)
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[e] += red[v][lane][e];
    }
    if (!SWIGLU) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = 2 * t + (e & 1);
            const long col = n0 + g + 8 * (e >> 1);
            if (row < M && col < N) y[(long)row * N + col] = static_cast<T>(acc[e]);
        }
    } else {  // gate|up in runs of 8: feature g is gate n0 / 2 + g, feature g + 8 its up
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int row = 2 * t + e;
            const long col = n0 / 2 + g;
            // rounded to T first, as the separate SwiGLU kernel reads them
            const float gf = static_cast<float>(static_cast<T>(acc[e]));
            const float uf = static_cast<float>(static_cast<T>(acc[e + 2]));
            if (row < M && col < N / 2)
                y[(long)row * (N / 2) + col] = static_cast<T>(gf / (1.f + __expf(-gf)) * uf);
        }
    }"""

# y (M, N) = x (M, K) @ dequantize(w)^T. Block b computes features 16b..16b+15 for every row;
# warp w takes K steps w, w + NW, ... in batches of U (loads first, then arithmetic). In a
# step, lane (g, t) holds input features 32t..32t+31 of features 16b + g and 16b + g + 8,
# as four pieces of 8; a piece's values 0-3 are the logical k 2t, 2t+1, 2t+8, 2t+9 of one
# mma and 4-7 of the next (engine/qgemm.py's mapping, here on A's side: a[0] / a[2] are
# feature g's pairs, a[1] / a[3] feature g + 8's). B's column g is x's row g; lanes of rows
# past M read row M - 1 (their output columns are dropped).
SOURCE = r"""
    constexpr int PER_WORD = 32 / BITS;
    constexpr int STEPS = K / 128;
    constexpr int CH = BITS / 4;  // 16-byte chunks per lane, feature and step
    const int M = x_shape[0], N = w_shape[0];  // runtime: one compiled kernel serves 1-8 rows
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const long n0 = (long)blockIdx.x * 16;
    const long f0 = min(n0 + g, (long)N - 1), f1 = min(n0 + g + 8, (long)N - 1);
    const uint4* w0 = reinterpret_cast<const uint4*>(w + f0 * (K / PER_WORD));
    const uint4* w1 = reinterpret_cast<const uint4*>(w + f1 * (K / PER_WORD));
    const unsigned short* sc = reinterpret_cast<const unsigned short*>(scales);
    const unsigned short* bi = reinterpret_cast<const unsigned short*>(biases);
    const T* xr = x + (long)min(g, M - 1) * K;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // U steps of weights, scales and biases from K step s0 on (every NW-th step).
    auto load = [&](uint4 (&wv)[U][2][CH], unsigned short (&sv)[U][2], unsigned short (&bv)[U][2],
                    int s0) {
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int s = s0 + u * NW;
            if (s < STEPS) {
                const int k = s * 128 + 32 * t;
                #pragma unroll
                for (int h = 0; h < CH; ++h) {
                    wv[u][0][h] = w0[k / 32 * CH + h];
                    wv[u][1][h] = w1[k / 32 * CH + h];
                }
                sv[u][0] = sc[f0 * (K / GS) + k / GS]; bv[u][0] = bi[f0 * (K / GS) + k / GS];
                sv[u][1] = sc[f1 * (K / GS) + k / GS]; bv[u][1] = bi[f1 * (K / GS) + k / GS];
            }
        }
    };
    auto compute = [&](const uint4 (&wv)[U][2][CH], const unsigned short (&sv)[U][2],
                       const unsigned short (&bv)[U][2], int s0) {
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int s = s0 + u * NW;
            if (s >= STEPS) break;
            const int k = s * 128 + 32 * t;
            unsigned q[2][BITS];  // the lane's 32 values of each feature, as words
            #pragma unroll
            for (int f = 0; f < 2; ++f)
                #pragma unroll
                for (int h = 0; h < CH; ++h) {
                    q[f][4 * h] = wv[u][f][h].x; q[f][4 * h + 1] = wv[u][f][h].y;
                    q[f][4 * h + 2] = wv[u][f][h].z; q[f][4 * h + 3] = wv[u][f][h].w;
                }
            #pragma unroll
            for (int j = 0; j < 4; ++j) {  // piece j: values 8j..8j+7 of the lane's 32
                const uint4 xv = *reinterpret_cast<const uint4*>(xr + k + 8 * j);
                unsigned p0[4], p1[4];
                unpack8<BITS, BF16, FAST>(&q[0][CH * j], sv[u][0], bv[u][0], p0);
                unpack8<BITS, BF16, FAST>(&q[1][CH * j], sv[u][1], bv[u][1], p1);
                const unsigned a0[4] = {p0[0], p1[0], p0[1], p1[1]};
                const unsigned a1[4] = {p0[2], p1[2], p0[3], p1[3]};
                const unsigned b0[2] = {xv.x, xv.y}, b1[2] = {xv.z, xv.w};
                mma16816<BF16>(acc, a0, b0);
                mma16816<BF16>(acc, a1, b1);
            }
        }
    };
    uint4 wv[U][2][CH];
    unsigned short sv[U][2], bv[U][2];
    // (Loading the next U steps into a second register set while computing these was slower
    // on an H200: gate|up 30.0 vs 28.7 us, down 25.7 vs 16.3, eighth session.)
    for (int s0 = warp; s0 < STEPS; s0 += NW * U) {
        load(wv, sv, bv, s0);
        compute(wv, sv, bv, s0);
    }
""" + EPILOGUE


# Staged variant (SOURCE_STAGED): the same products, but the weights reach the warp through
# shared memory. On an H200 the direct-load kernel above read gate|up at 2.3 TB/s whether or not it
# unpacked or multiplied (cuts no-unpack 28.2 us, no-mma 27.5, as written 28.9) and took 4 us
# more to fetch x (no-x-loads 24.8); more warps or deeper unrolls did not help (ninth
# session). Its loads are 64-byte runs of 8 features at a time. Here each warp copies whole
# chunks with cp.async: a chunk is C = GS / 16 K steps (exactly 8 groups) of the block's 16
# features, 16 x W_ROW bytes of weights in 512-byte runs, their scales and biases (16 bytes
# a feature each) and, when XR > 0, the XR activation rows of the chunk; a warp's chunks are
# warp, warp + NW, ..., through a ring of S slots of its own (so only __syncwarp is needed).
# Lanes then read the same fragments as above from shared memory: weight rows swizzled by row
# parity and x chunks by their own bits and row parity, so a quarter warp's 16-byte reads hit
# distinct banks. Needs K a multiple of 8 groups (staged_applies()).
SOURCE_STAGED = r"""
    constexpr int C = GS / 16;                 // K steps per chunk: 8 groups
    constexpr int CHUNKS = K / (128 * C);
    constexpr int CH = BITS / 4;               // 16-byte pieces per lane, feature and step
    constexpr int W_ROW = C * 16 * BITS;       // weight bytes per feature and chunk
    constexpr int W_BYTES = 16 * W_ROW;
    constexpr int X_ROW = C * 256;             // activation bytes per row and chunk
    constexpr int SLOT = W_BYTES + 512 + XR * X_ROW;
    extern __shared__ __align__(16) unsigned char smem[];
    const int M = x_shape[0], N = w_shape[0];  // runtime: one compiled kernel serves 1-XR rows
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const long n0 = (long)blockIdx.x * 16;
    const int xrow = min(g, M - 1);           // B's column g is x's row g (rows past M repeat)
    unsigned char* ring = smem + warp * (S * SLOT);
    const unsigned char* wb = reinterpret_cast<const unsigned char*>(w);
    const int mine = (CHUNKS - warp + NW - 1) / NW;  // this warp's chunks: warp, warp + NW, ...
    auto wswz = [](int ch, int r) { return ch ^ ((r & 1) * (CH == 1 ? 4 : 1)); };
    auto xswz = [](int ch, int r) { return ch ^ ((ch >> 3) & 1) ^ ((r & 1) << 1); };
    auto issue = [&](int i) {  // the warp's i-th chunk into slot i % S
        unsigned char* slot = ring + (i % S) * SLOT;
        const int c = warp + i * NW;
        #pragma unroll
        for (int q = lane; q < W_BYTES / 16; q += 32) {
            const int r = q / (W_ROW / 16), ch = q % (W_ROW / 16);
            const long f = min(n0 + r, (long)N - 1);
            cp_async<16>(slot + r * W_ROW + wswz(ch, r) * 16,
                         wb + f * (K * BITS / 8) + (long)c * W_ROW + ch * 16, true);
        }
        {   // lane l < 16: feature l's 8 scales; lane 16 + l: its 8 biases
            const long f = min(n0 + (lane & 15), (long)N - 1);
            cp_async<16>(slot + W_BYTES + lane * 16, (lane < 16 ? scales : biases) + f * (K / GS) + c * 8, true);
        }
        #pragma unroll
        for (int q = lane; q < XR * X_ROW / 16; q += 32) {
            const int r = q / (X_ROW / 16), ch = q % (X_ROW / 16);
            const bool ok = r < M;
            cp_async<16>(slot + W_BYTES + 512 + r * X_ROW + xswz(ch, r) * 16,
                         ok ? x + r * K + (long)c * (C * 128) + ch * 8 : x, ok);
        }
    };
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < S - 1; ++i) {
        if (i < mine) issue(i);
        cp_async_commit();
    }
    for (int i = 0; i < mine; ++i) {
        cp_async_wait<S - 2>();  // this lane's copies of chunk i have landed
        __syncwarp();            // every lane's have; and chunk i - 1's slot is free
        if (i + S - 1 < mine) issue(i + S - 1);
        cp_async_commit();
        unsigned char* slot = ring + (i % S) * SLOT;
        const unsigned short* sb = reinterpret_cast<const unsigned short*>(slot + W_BYTES);
        const int k0 = (warp + i * NW) * (C * 128);
        #pragma unroll
        for (int sc = 0; sc < C; ++sc) {
            const int gi = (sc * 128 + 32 * t) / GS;  // the lane's group within the chunk
            const unsigned short s0 = sb[g * 8 + gi], s1 = sb[(g + 8) * 8 + gi];
            const unsigned short b0 = sb[128 + g * 8 + gi], b1 = sb[128 + (g + 8) * 8 + gi];
            unsigned q[2][BITS];
            #pragma unroll
            for (int f = 0; f < 2; ++f)
                #pragma unroll
                for (int h = 0; h < CH; ++h) {
                    const int r = g + 8 * f;
                    const uint4 v = *reinterpret_cast<const uint4*>(
                        slot + r * W_ROW + wswz((sc * 4 + t) * CH + h, r) * 16);
                    q[f][4 * h] = v.x; q[f][4 * h + 1] = v.y; q[f][4 * h + 2] = v.z; q[f][4 * h + 3] = v.w;
                }
            #pragma unroll
            for (int j = 0; j < 4; ++j) {  // piece j: values 8j..8j+7 of the lane's 32
                uint4 xv;
                if (XR > 0)
                    xv = *reinterpret_cast<const uint4*>(slot + W_BYTES + 512 + xrow * X_ROW +
                                                         xswz(sc * 16 + 4 * t + j, xrow) * 16);
                else
                    xv = *reinterpret_cast<const uint4*>(x + (long)xrow * K + k0 + sc * 128 + 32 * t + 8 * j);
                unsigned p0[4], p1[4];
                unpack8<BITS, BF16, FAST>(&q[0][CH * j], s0, b0, p0);
                unpack8<BITS, BF16, FAST>(&q[1][CH * j], s1, b1, p1);
                const unsigned a0[4] = {p0[0], p1[0], p0[1], p1[1]};
                const unsigned a1[4] = {p0[2], p1[2], p0[3], p1[3]};
                const unsigned b0v[2] = {xv.x, xv.y}, b1v[2] = {xv.z, xv.w};
                mma16816<BF16>(acc, a0, b0v);
                mma16816<BF16>(acc, a1, b1v);
            }
        }
    }
""" + EPILOGUE


def warps_per_block(n: int, k: int, units: int = 0) -> int:
    """Warps splitting K in each block (see WARPS_TARGET): never more than the K steps (or
    the `units` of K the warps take turns on: the staged kernel's chunks)."""
    tiles, warps, units = -(-n // FEATURES), 1, units or k // BK
    while tiles * warps < WARPS_TARGET and warps < MAX_WARPS and 2 * warps <= units:
        warps *= 2
    return warps


def staged_applies(layer: nn.Module, rows: int) -> bool:
    """Whether the staged kernel serves `rows` rows of layer (applies() must hold too): at
    most STAGED_MAX_ROWS, and K in whole chunks of 8 groups (so a chunk's scales are one
    aligned 16-byte run a feature)."""
    gs = layer.group_size
    return rows <= STAGED_MAX_ROWS and gs in (32, 64, 128) and input_width(layer) % (8 * gs) == 0


def staged_shared_bytes(bits: int, group_size: int, warps: int, x_rows: int) -> int:
    """Dynamic shared memory of a staged launch: each warp's ring of STAGES chunk slots."""
    c = group_size // 16
    return warps * STAGES * (16 * c * 16 * bits + 512 + x_rows * c * 256)


def staged_launch(layer: nn.Module, m: int, warps: int = 0) -> tuple[int, int, int] | None:
    """(warps, x rows staged, shared bytes) of a staged launch for m rows, or None if it cannot
    fit a block's shared memory. x rows: the next power of two above m (a kernel each), dropped
    to 0 (x from global memory) when the ring would pass SMEM_BUDGET, or when X_SMEM is off;
    then fewer warps (unless `warps` is given)."""
    k, n = input_width(layer), layer.weight.shape[0]
    nw = warps or warps_per_block(n, k, k // (8 * layer.group_size))

    def size(nw: int, xr: int) -> int:
        return staged_shared_bytes(layer.bits, layer.group_size, nw, xr)
    xr = 1 << (m - 1).bit_length() if X_SMEM else 0
    if size(nw, xr) > SMEM_BUDGET:
        xr = 0
    while size(nw, xr) > SMEM_BUDGET and nw > 1 and not warps:
        nw //= 2
    return (nw, xr, size(nw, xr)) if size(nw, xr) <= SMEM_LIMIT else None


@functools.lru_cache(maxsize=None)
def _kernel():
    return cuda_kernel(name="qgemv_mma", input_names=["x", "w", "scales", "biases"],
                       output_names=["y"], source=SOURCE, header=HEADER)


@functools.lru_cache(maxsize=None)
def _staged_kernel(smem: int):
    return cuda_kernel(name=f"qgemv_staged_{smem}",
                       input_names=["x", "w", "scales", "biases"], output_names=["y"],
                       source=SOURCE_STAGED, header=HEADER, shared_memory=smem)


def _launch(layer: nn.QuantizedLinear, dtype: mx.Dtype, nw: int, swiglu: bool,
            **template) -> dict:
    """The launch arguments every form shares: its template (the layer's format, x's type,
    warps per block, then the form's own `template` values) and one block of nw warps per
    FEATURES output features."""
    n = layer.weight.shape[0]
    return dict(template=[("T", dtype), ("K", input_width(layer)), ("BITS", layer.bits),
                          ("GS", layer.group_size), ("BF16", dtype == mx.bfloat16), ("NW", nw),
                          *template.items(), ("FAST", FAST_DEQUANT), ("SWIGLU", swiglu)],
                grid=(-(-n // FEATURES) * nw * 32, 1, 1), threadgroup=(nw * 32, 1, 1))


def applies(layer: nn.Module, x: mx.array) -> bool:
    """Whether qgemv() computes layer(x): 1..MAX_ROWS rows in the format engine/qgemm.py's
    tensor_core_format accepts (the same unpacking and k steps of BK = 128)."""
    return 1 <= x.size // x.shape[-1] <= MAX_ROWS and tensor_core_format(layer, x)


def swiglu_applies(layer: nn.Module, x: mx.array) -> bool:
    """Whether qgemv(layer, x, swiglu=True) can run: applies(), and whole 16-feature tiles
    (each 8 gates and their 8 ups)."""
    return applies(layer, x) and layer.weight.shape[0] % FEATURES == 0


def qgemv(layer: nn.QuantizedLinear, x: mx.array, warps: int = 0, build=None,
          swiglu: bool = False) -> mx.array:
    """layer(x) for x of 1..MAX_ROWS rows (see applies()): the staged kernel where
    staged_applies(), else the direct one. `warps` per block overrides warps_per_block(), and
    `build` (shared bytes -> kernel) stands in for the kernel with the same launch (both for
    loadtest sweeps). swiglu: layer is gate|up in runs of 8 (see EPILOGUE; swiglu_applies());
    returns silu(gate) * up, half as wide."""
    k = input_width(layer)
    m = x.size // x.shape[-1]
    n = layer.weight.shape[0]
    out = (m, n // 2 if swiglu else n)
    staged = staged_launch(layer, m, warps) if staged_applies(layer, m) else None
    if staged:
        nw, xr, smem = staged
        y = (build or _staged_kernel)(smem)(
            inputs=[x.reshape(m, x.shape[-1]), layer.weight, layer.scales, layer.biases],
            **_launch(layer, x.dtype, nw, swiglu, S=STAGES, XR=xr),
            output_shapes=[out], output_dtypes=[x.dtype])[0]
        return y.reshape(*x.shape[:-1], out[1])
    nw = warps or warps_per_block(n, k)
    y = (build or (lambda smem: _kernel()))(0)(
        inputs=[x.reshape(m, k), layer.weight, layer.scales, layer.biases],
        **_launch(layer, x.dtype, nw, swiglu, U=UNROLL), output_shapes=[out],
        output_dtypes=[x.dtype])[0]
    return y.reshape(*x.shape[:-1], out[1])


def qgemv_matches_layers(layers: list[nn.Module], atol: float = 2e-2) -> bool:
    """The kernel against dequantize + matmul on the model's own quantized layers at every row
    count 1..MAX_ROWS: the runner's start-up self-check, which also compiles every variant a
    run can launch (one per input width and warp count; the row count is a runtime value)
    before the first request."""
    return matches_dequantize_matmul(layers, [(m,) for m in range(1, MAX_ROWS + 1)],
                                     qgemv, applies,
                                     "few-row 4/8-bit tensor-core kernel", seed=2, atol=atol)


def swiglu_matches_layers(layers: list[nn.Module], atol: float = 2e-2) -> bool:
    """qgemv's SwiGLU epilogue against dequantize + matmul + SwiGLU (runs of 8) on the model's
    gate|up layers at every row count: its start-up self-check (which compiles it too)."""
    return matches_dequantize_matmul(
        layers, [(m,) for m in range(1, MAX_ROWS + 1)],
        lambda layer, x: qgemv(layer, x, swiglu=True), swiglu_applies,
        "few-row 4/8-bit tensor-core kernel's SwiGLU epilogue", seed=3, atol=atol,
        then=lambda y: fused_ops.swiglu(y, run=fused_ops.GATE_UP_RUN))
