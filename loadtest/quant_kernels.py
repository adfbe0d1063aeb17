"""The 4-bit kernels for many rows on the device, alone: engine/qgemm.py's tensor-core GEMM and
engine/dequant.py's dequantize + GEMM against MLX's dequantize + GEMM, the bf16 GEMM and MLX's
quantized matmul, at the 7B's gate|up and down shapes: error against a float32 reference, and
microseconds per call. Needs MLX's CUDA build:

    python -m loadtest.quant_kernels        (loadtest/gpu_profile.sh step `qkern`)
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn

from engine import dequant, qgemm

SHAPES = ((4096, 28672), (14336, 4096))  # gate|up, down: (input, output) features
ROWS = (9, 64, 128)


def layer_4bit(k: int, n: int) -> nn.QuantizedLinear:
    """A random k -> n layer, 4-bit in groups of 64 (the 7B checkpoints' format), bf16 scales."""
    layer = nn.QuantizedLinear.from_linear(nn.Linear(k, n, bias=False), group_size=64, bits=4)
    layer.set_dtype(mx.bfloat16)
    mx.eval(layer.parameters())
    return layer


def _us(fn, reps: int = 20) -> float:
    mx.eval(fn())
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    for k, n in SHAPES:
        layer = layer_4bit(k, n)
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 4)
        mx.eval(w)
        for rows in ROWS:
            x = mx.random.normal((rows, k)).astype(mx.bfloat16)
            ref = x.astype(mx.float32) @ w.astype(mx.float32).T

            def err(y: mx.array) -> float:
                return (mx.abs(y.astype(mx.float32) - ref).max() / mx.abs(ref).max()).item()

            paths = {
                "qgemm": lambda: qgemm.qgemm(layer, x),
                "mx.dequantize+GEMM": lambda: x @ mx.dequantize(
                    layer.weight, layer.scales, layer.biases, 64, 4).T,
                "dequant kernel+GEMM": lambda: x @ dequant.dequantize(layer).T,
                "bf16 GEMM": lambda: x @ w.T,
                "mx.quantized_matmul": lambda: layer(x),
            }
            print(f"{k} -> {n}, {rows} rows: error qgemm {err(paths['qgemm']()):.2e}, "
                  f"dequant kernel {err(paths['dequant kernel+GEMM']()):.2e}", flush=True)
            print("   us per call: " + " | ".join(f"{name} {_us(fn):.0f}"
                                                   for name, fn in paths.items()), flush=True)


if __name__ == "__main__":
    main()
