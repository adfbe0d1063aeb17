"""MLX's affine 4/8-bit weights dequantized to a float matrix by a CUDA kernel.

A quantized layer fed more rows than engine/qgemm.py takes (prompt chunks) runs as dequantize +
dense GEMM (engine/model.py's project(); MLX's CUDA quantized matmul is slow there). On an
H200, `mx.dequantize` then took 14.7 ms of a 20.2 ms 4-bit decode step at batch 64: 130 calls
moving ~18 GB (4-bit in, bf16 out) at ~1.2 TB/s (loadtest/RESULTS.md, sixth session). This
kernel gives each thread one 16-byte chunk of packed weights (128 / BITS values of one
quantization group, the layout engine/gemv.py reads too) and writes its values with 16-byte
stores, so the whole copy is two streams of wide accesses.

On an H200 it beat `mx.dequantize` + GEMM by 5-20% at the 7B's shapes (loadtest/RESULTS.md,
seventh session), so it is on unless MISTRAL_SERVE_DEQUANT_KERNEL=0; used only after
dequantize_matches_layers has shown it equal to `mx.dequantize` on the model's own layers
(engine/runner.py).
"""

from __future__ import annotations

import functools
import logging

import mlx.core as mx
import mlx.nn as nn

from engine.gemv import chunked_affine, input_width
from engine.kernel_source import cuda_kernel
from engine.paged_decode import VEC_HEADER

log = logging.getLogger(__name__)

THREADS = 256

# out (N, K) = scales * q + biases, q unpacked low bits first from uint32 words; K is a
# multiple of VALS and GS a multiple of VALS (checked by applies()), so a chunk is one group.
SOURCE = r"""
    constexpr int VALS = 128 / BITS;
    constexpr int PER_WORD = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    constexpr int OUT_VEC = 16 / sizeof(T);  // values per 16-byte store
    constexpr long CHUNKS_PER_ROW = K / VALS;
    const long N = w_shape[0];
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;  // this thread's chunk
    if (i >= N * CHUNKS_PER_ROW) return;
    const long n = i / CHUNKS_PER_ROW;
    const int k = (int)(i % CHUNKS_PER_ROW) * VALS;
    const uint4 wv = reinterpret_cast<const uint4*>(w)[i];
    const unsigned words[4] = {wv.x, wv.y, wv.z, wv.w};
    const float s = static_cast<float>(scales[n * (K / GS) + k / GS]);
    const float c = static_cast<float>(biases[n * (K / GS) + k / GS]);
    T* dst = out + n * K + k;
    #pragma unroll
    for (int j0 = 0; j0 < VALS; j0 += OUT_VEC) {
        Vec<T, OUT_VEC> o;
        #pragma unroll
        for (int j = 0; j < OUT_VEC; ++j) {
            const int v = j0 + j;
            const unsigned q = (words[v / PER_WORD] >> (BITS * (v % PER_WORD))) & MASK;
            o.v[j] = static_cast<T>(s * static_cast<float>(q) + c);
        }
        *reinterpret_cast<Vec<T, OUT_VEC>*>(dst + j0) = o;
    }
"""


@functools.lru_cache(maxsize=1)
def _kernel():
    return cuda_kernel(name="dequantize_affine", input_names=["w", "scales", "biases"],
                       output_names=["out"], source=SOURCE, header=VEC_HEADER)


def applies(layer: nn.Module) -> bool:
    """Whether dequantize() handles this layer: an affine 4/8-bit QuantizedLinear in the
    kernels' chunk layout (gemv.chunked_affine), with float scales."""
    return chunked_affine(layer) and layer.scales.dtype in (mx.float32, mx.float16, mx.bfloat16)


def dequantize(layer: nn.QuantizedLinear) -> mx.array:
    """The layer's weight as an (out, in) matrix of its scales' dtype (see applies())."""
    w, scales = layer.weight, layer.scales
    n, k = w.shape[0], input_width(layer)
    chunks = n * k * layer.bits // 128
    return _kernel()(inputs=[w, scales, layer.biases],
                     template=[("T", scales.dtype), ("K", k), ("BITS", layer.bits),
                               ("GS", layer.group_size)],
                     grid=(-(-chunks // THREADS) * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                     output_shapes=[(n, k)], output_dtypes=[scales.dtype])[0]


def dequantize_matches_layers(layers: list[nn.Module]) -> bool:
    """The kernel against mx.dequantize on the model's own quantized layers: the runner's
    start-up self-check (it also compiles the kernels before the first request)."""
    if not mx.cuda.is_available():
        return False
    try:
        checked = 0
        for layer in layers:
            if not applies(layer):
                continue
            want = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size,
                                 layer.bits).astype(mx.float32)
            got = dequantize(layer).astype(mx.float32)
            err = mx.abs(got - want).max().item()
            if not err <= 1e-2 * max(mx.abs(want).max().item(), 1e-6):
                log.warning("dequantize kernel off by %.3g on %s; using mx.dequantize", err,
                            layer.weight.shape)
                return False
            checked += 1
        return checked > 0
    except Exception as exc:  # a kernel that fails to build or run must not stop the server
        log.warning("dequantize kernel unavailable (%s); using mx.dequantize", exc)
        return False
