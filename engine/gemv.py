"""Matrix-vector products for decode steps with few rows, as CUDA kernels (mx.fast.cuda_kernel).

A decode step with a small batch multiplies a few activation rows by every weight matrix, so
its time is the time to read the weights once. On an H200, MLX's CUDA matmul read them at
31-78% of peak bandwidth for one row (o_proj lowest, gate|up highest; loadtest/RESULTS.md),
and its 4-bit quantized matmul at 8-17%. A first version of these kernels (a warp per output
feature) was no faster: a 4,096-row matrix gave too few warps to keep enough loads in
flight. Now a thread block per ROWS output features splits the input dimension over its
warps; threads stream the weights with 16-byte loads, multiply them by every activation row
(at most MAX_ROWS) and reduce across the warp, then the block. The quantized kernel unpacks
MLX's 4- and 8-bit format (values packed low bits first in uint32 words, a scale and a bias
per group along the input dimension) in registers.

Used only on MLX's CUDA backend and only after gemv_matches_layers has shown the kernels
to match MLX's own matmul on this model's layers (engine/runner.py); elsewhere MLX's matmul runs.
"""

from __future__ import annotations

import functools
import logging

import mlx.core as mx
import mlx.nn as nn

from engine.kernel_source import cuda_kernel
from engine.paged_decode import VEC_HEADER

log = logging.getLogger(__name__)

MAX_ROWS = 8      # activation rows; above this MLX's GEMM is used
# Launch shapes (ROWS, UNROLL, WARPS): a thread block computes ROWS output features (each
# activation load serves ROWS of them); its WARPS warps split the input dimension, so even
# a 4,096-row matrix fills the GPU; each thread keeps UNROLL 16-byte loads per row in flight.
# H200, 7B, 4-bit, one row, inside decode steps (`gpu_trace --bits 4 --set
# gemv.QUANT_LAUNCH=...`, sixth session): gate|up + lm_head 1.03 ms a step with 8x1x2, 1.14
# with 4x2x2, 1.22 with 4x1x2 (the earlier default), 1.31 with 2x1x4.
DENSE_LAUNCH = (1, 2, 8)
QUANT_LAUNCH = (8, 1, 2)
# Matrices with fewer than WIDE_N output features (q|k|v, o, down: 4,096-6,144) get their own
# launch: at 4 features per block they make only ~1,000-1,500 blocks, and on an H200 they
# read at a third of the bandwidth gate|up reads at. Same trace: q|k|v + o 0.575 ms a step
# and down 0.597 with 2x1x4, against 0.63 and 0.652 with 4x1x2; 1x1x4, 1x2x4, 2x2x2, 4x2x2 and
# 1x1x8 were slower.
WIDE_N = 16384
QUANT_LAUNCH_NARROW = (2, 1, 4)
# Quantized kernel: q read as the float 2^BITS + q, its bits made by a shift and an and-or
# (two integer ops), not by an int -> float conversion (quarter rate on sm_90); the 2^BITS
# sum(x) this adds is taken off once per chunk. Off, as measured (H200, sixth session): the
# 4-bit single-stream step's GPU time went from 3.14 to 3.07 ms in a trace, but the
# benchmark in the same call ran 289.8 tok/s with it against 304.6 without.
FAST_UNPACK = False

# Both kernels: the block's first output feature n0 and its accumulators, (feature, row).
_PROLOGUE = r"""
    const int N = w_shape[0];
    const int lane = threadIdx.x & 31;
    const long n0 = (long)blockIdx.x * ROWS;
    float acc[ROWS][M];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r)
        #pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
"""

# y (M, N) = x (M, K) @ w (N, K)^T. Thread t of a block takes the chunks t, t + 32 * NW, ...
# of VEC consecutive input features; K must be a multiple of VEC.
_DENSE = r"""
    constexpr int VEC = 16 / sizeof(T);
    constexpr int STEP = NW * 32 * VEC;
    PROLOGUE
    const T* wrow[ROWS];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) wrow[r] = w + min(n0 + r, (long)N - 1) * K;

    for (int k0 = threadIdx.x * VEC; k0 < K; k0 += UNROLL * STEP) {
        Vec<T, VEC> wv[UNROLL][ROWS];
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            #pragma unroll
            for (int r = 0; r < ROWS; ++r)
                if (k0 + u * STEP < K)
                    wv[u][r] = *reinterpret_cast<const Vec<T, VEC>*>(wrow[r] + k0 + u * STEP);
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (k0 + u * STEP >= K) break;
            #pragma unroll
            for (int m = 0; m < M; ++m) {
                const Vec<T, VEC> xv = *reinterpret_cast<const Vec<T, VEC>*>(x + (long)m * K + k0 + u * STEP);
                #pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const float xf = static_cast<float>(xv.v[i]);
                    #pragma unroll
                    for (int r = 0; r < ROWS; ++r) acc[r][m] += static_cast<float>(wv[u][r].v[i]) * xf;
                }
            }
        }
    }
    EPILOGUE
"""

# The same with w packed: uint32 words of 32 / BITS values, low bits first, and per group of
# GS input features a scale s and bias c, weight = s * q + c. A lane's 16-byte chunk holds
# VALS = 128 / BITS consecutive values, all in one group (GS is a multiple of VALS), so
# sum(w * x) = s * sum(q * x) + c * sum(x) over the chunk.
_QUANT = r"""
    constexpr int VALS = 128 / BITS;
    constexpr int PER_WORD = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    constexpr int STEP = NW * 32 * VALS;
    constexpr int XV = 16 / sizeof(T);  // activations per 16-byte load
    PROLOGUE
    long row[ROWS];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) row[r] = min(n0 + r, (long)N - 1);

    for (int k0 = threadIdx.x * VALS; k0 < K; k0 += UNROLL * STEP) {
        uint4 wv[UNROLL][ROWS];
        float sv[UNROLL][ROWS], cv[UNROLL][ROWS];
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            #pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int k = k0 + u * STEP;
                if (k < K) {
                    wv[u][r] = *reinterpret_cast<const uint4*>(w + row[r] * (K / PER_WORD) + k / PER_WORD);
                    sv[u][r] = static_cast<float>(scales[row[r] * (K / GS) + k / GS]);
                    cv[u][r] = static_cast<float>(biases[row[r] * (K / GS) + k / GS]);
                }
            }
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int k = k0 + u * STEP;
            if (k >= K) break;
            #pragma unroll
            for (int m = 0; m < M; ++m) {
                float xf[VALS];
                #pragma unroll
                for (int j = 0; j < VALS; j += XV) {
                    const Vec<T, XV> xv = *reinterpret_cast<const Vec<T, XV>*>(x + (long)m * K + k + j);
                    #pragma unroll
                    for (int i = 0; i < XV; ++i) xf[j + i] = static_cast<float>(xv.v[i]);
                }
                float xsum = 0.f;
                #pragma unroll
                for (int j = 0; j < VALS; ++j) xsum += xf[j];
                #pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const unsigned words[4] = {wv[u][r].x, wv[u][r].y, wv[u][r].z, wv[u][r].w};
                    float dot = 0.f;
                    #pragma unroll
                    for (int j = 0; j < VALS; ++j) {
                        const unsigned word = words[j / PER_WORD];
                        float qf;
                        if (FAST_UNPACK) {
                            // q's bits moved to the top of the mantissa of 2^BITS (a constant
                            // shift once unrolled): the float 2^BITS + q, exactly.
                            constexpr unsigned ONE = (127u + BITS) << 23;
                            constexpr unsigned QMASK = MASK << (23 - BITS);
                            const int sh = 23 - BITS - BITS * (j % PER_WORD);
                            const unsigned t = sh >= 0 ? word << sh : word >> -sh;
                            qf = __uint_as_float((t & QMASK) | ONE);
                        } else {
                            qf = static_cast<float>((word >> (BITS * (j % PER_WORD))) & MASK);
                        }
                        dot += qf * xf[j];
                    }
                    if (FAST_UNPACK) dot -= static_cast<float>(1u << BITS) * xsum;
                    acc[r][m] += sv[u][r] * dot + cv[u][r] * xsum;
                }
            }
        }
    }
    EPILOGUE
"""

# Reduce each (feature, row) sum across the warp, then across the block's warps in shared
# memory; thread i writes sums i, i + NW * 32, ... (sum i = feature i / M, row i % M).
_EPILOGUE = r"""
    __shared__ float red[NW][ROWS * M];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r)
        #pragma unroll
        for (int m = 0; m < M; ++m) {
            float s = acc[r][m];
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
            if (lane == 0) red[threadIdx.x >> 5][r * M + m] = s;
        }
    __syncthreads();
    for (int i = threadIdx.x; i < ROWS * M; i += NW * 32) {
        const int r = i / M, m = i % M;
        float s = 0.f;
        #pragma unroll
        for (int w = 0; w < NW; ++w) s += red[w][i];
        if (n0 + r < N) y[(long)m * N + n0 + r] = static_cast<T>(s);
    }
"""


def kernel_source(body: str) -> str:
    """A kernel's full source (also run on the CPU by tests/cuda_emulator.py)."""
    return body.replace("PROLOGUE", _PROLOGUE).replace("EPILOGUE", _EPILOGUE)


@functools.lru_cache(maxsize=None)
def _dense_kernel():
    return cuda_kernel(name="gemv_dense", input_names=["x", "w"], output_names=["y"],
                       source=kernel_source(_DENSE), header=VEC_HEADER)


@functools.lru_cache(maxsize=None)
def _quant_kernel():
    return cuda_kernel(name="gemv_quantized", input_names=["x", "w", "scales", "biases"],
                       output_names=["y"], source=kernel_source(_QUANT),
                       header=VEC_HEADER)


def applies(layer: nn.Module, x: mx.array, dense: bool = True) -> bool:
    """Whether gemv() computes layer(x): few rows, a plain Linear (if `dense`) or affine
    4/8-bit QuantizedLinear without bias, of x's width and dtype, with widths the 16-byte
    chunks and the groups tile. (x must also start 16-byte aligned; every caller passes a
    freshly computed array.)"""
    rows = x.size // x.shape[-1]
    if not 1 <= rows <= MAX_ROWS or x.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        return False
    if "bias" in layer:
        return False
    k = x.shape[-1]
    if type(layer) is nn.QuantizedLinear:
        return chunked_affine(layer) and input_width(layer) == k and layer.scales.dtype == x.dtype
    if type(layer) is nn.Linear and dense:
        return (input_width(layer) == k and k % (16 // x.itemsize) == 0
                and layer.weight.dtype == x.dtype)
    return False


def gemv(layer: nn.Module, x: mx.array) -> mx.array:
    """layer(x) for a few rows of x (see applies())."""
    if type(layer) is nn.QuantizedLinear:
        return matvec(x, layer.weight, layer.scales, layer.biases, layer.bits, layer.group_size)
    return matvec(x, layer.weight)


def matvec(x: mx.array, w: mx.array, scales: mx.array | None = None,
           biases: mx.array | None = None, bits: int = 0, group_size: int = 0,
           launch: tuple[int, int, int] | None = None, kernel=None) -> mx.array:
    """x @ w.T with w (N, K) dense, or packed MLX-style with scales/biases when bits is set;
    launch (ROWS, UNROLL, WARPS) is exposed for loadtest/op_profile.py's sweep, and `kernel`
    (standing in for the dense or quantized one, same launch) for loadtest/kernel_ablate.py."""
    k = x.shape[-1]
    m = x.size // k
    n = w.shape[0]
    rows, unroll, warps = launch or (DENSE_LAUNCH if not bits else
                                     QUANT_LAUNCH if n >= WIDE_N else QUANT_LAUNCH_NARROW)
    template = [("T", x.dtype), ("K", k), ("M", m), ("ROWS", rows), ("UNROLL", unroll),
                ("NW", warps)]
    shape = dict(grid=(-(-n // rows) * warps * 32, 1, 1), threadgroup=(warps * 32, 1, 1),
                 output_shapes=[(m, n)], output_dtypes=[x.dtype])
    if bits:
        y = (kernel or _quant_kernel())(inputs=[x.reshape(m, k), w, scales, biases],
                            template=template + [("BITS", bits), ("GS", group_size),
                                                 ("FAST_UNPACK", FAST_UNPACK)], **shape)[0]
    else:
        y = (kernel or _dense_kernel())(inputs=[x.reshape(m, k), w], template=template, **shape)[0]
    return y.reshape(*x.shape[:-1], n)


def chunked_affine(layer: nn.Module) -> bool:
    """An affine 4/8-bit QuantizedLinear in the layout the CUDA kernels unpack (here and in
    engine/dequant.py, engine/qgemm.py): 16-byte chunks of 128 / bits values, each inside one
    group, groups tiling the input width, biases in the scales' dtype."""
    return (type(layer) is nn.QuantizedLinear and getattr(layer, "mode", "affine") == "affine"
            and layer.bits in (4, 8) and layer.group_size % (128 // layer.bits) == 0
            and input_width(layer) % layer.group_size == 0
            and layer.biases.dtype == layer.scales.dtype)


def input_width(layer: nn.Module) -> int:
    """A linear layer's input features (a packed weight holds 32 / bits per word)."""
    w = layer.weight.shape[1]
    return w * 32 // layer.bits if type(layer) is nn.QuantizedLinear else w


def activation_dtype(layer: nn.Module):
    """The dtype a layer's inputs come in: its scales' for a quantized layer."""
    return layer.scales.dtype if type(layer) is nn.QuantizedLinear else layer.weight.dtype


def gemv_matches_layers(layers: list[nn.Module], atol: float = 2e-2) -> bool:
    """Run the kernels on `layers` (the model's own: its widths, dtype, bits and group size)
    for 1..MAX_ROWS rows against layer(x): the runner's start-up self-check, which also
    compiles every one of those kernels before the first request. Layers applies() rejects are skipped
    (they keep MLX's matmul at run time too)."""
    if not mx.cuda.is_available():
        return False
    try:
        # Explicit keys: a start-up check must not reseed the process's global generator.
        # Every row count: each is its own compiled kernel, and one first compiled mid-run
        # stalled a 4-bit H200 benchmark's step for 4.9 s (loadtest/RESULTS.md, seventh session).
        keys = mx.random.split(mx.random.key(0), MAX_ROWS)
        for layer in layers:
            for m, key in zip(range(1, MAX_ROWS + 1), keys):
                x = mx.random.normal((m, input_width(layer)), key=key).astype(activation_dtype(layer))
                if not applies(layer, x):
                    continue
                got, want = gemv(layer, x).astype(mx.float32), layer(x).astype(mx.float32)
                err = mx.abs(got - want).max().item()
                if not err <= atol * max(mx.abs(want).max().item(), 1.0):
                    log.warning("small-batch matmul kernel off by %.3g (%s %s, %d rows); using "
                                "MLX's matmul", err, type(layer).__name__, layer.weight.shape, m)
                    return False
        return True
    except Exception as exc:  # a kernel that fails to build or run must not stop the server
        log.warning("small-batch matmul kernel unavailable (%s); using MLX's matmul", exc)
        return False
