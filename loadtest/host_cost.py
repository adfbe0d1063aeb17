"""What one op costs the host on MLX's CUDA backend, by kind: a compiled chain of N ops is
replayed and timed on the host (build + mx.async_eval) and end to end (with the device).

    python -m loadtest.host_cost [--ops 128] [--rows 64]

A decode step at batch 1 is ~300 kernels. When the host's cost per step passes the GPU's, the
host sets the pace whatever the kernels do; this says which kind of op costs the host most
(a built-in elementwise op, a cuBLAS matmul, an `mx.fast.cuda_kernel` such as the fused
SwiGLU, or the 4-bit qgemv kernel), so fusing can aim at the right ones.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn

from engine import fused_ops, qgemm, qgemv
from loadtest.kernel_ablate import setting
from loadtest.quant_kernels import layer_4bit


def chain(step, n: int):
    """A compiled function applying `step` n times to its input."""
    def fn(x):
        for _ in range(n):
            x = step(x)
        return x
    return mx.compile(fn)


def time_chain(fn, x, reps: int = 30) -> tuple[float, float]:
    """(host ms per call: build + async_eval, wall ms per call with the device)."""
    for _ in range(3):
        mx.eval(fn(x))
    host = 0.0
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        y = fn(x)
        mx.async_eval(y)
        host += time.perf_counter() - t
    mx.eval(y)
    wall = time.perf_counter() - t0
    return 1e3 * host / reps, 1e3 * wall / reps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=128)
    ap.add_argument("--rows", type=int, default=1,
                    help="activation rows: 1 takes MLX's own gemv; more take cuBLAS, whose "
                         "host cost per call (descriptors, heuristic query) is what this shows")
    a = ap.parse_args(argv)
    n = a.ops
    x = mx.random.normal((a.rows, 4096)).astype(mx.bfloat16)
    w = (mx.random.normal((4096, 4096)) * 0.01).astype(mx.bfloat16)
    layer = layer_4bit(4096, 4096)
    gu = mx.random.normal((a.rows, 2 * 4096)).astype(mx.bfloat16)
    mx.eval(x, w, layer.parameters(), gu)
    cases = {
        "elementwise (x * 1.001)": (lambda v: v * 1.001, x),
        "reshape pair (no kernel)": (lambda v: v.reshape(-1, 4096, 1).reshape(-1, 4096), x),
        f"matmul 4096x4096 bf16 ({'gemv' if a.rows == 1 else 'cuBLAS'})": (lambda v: v @ w.T, x),
        "fused SwiGLU + concatenate (2 ops)": (lambda v: mx.concatenate(
            [fused_ops.swiglu(v, True)] * 2, axis=-1), gu),
    }
    if a.rows <= qgemv.MAX_ROWS:  # the few-row kernels; qgemm (tensor cores) takes more rows
        cases["qgemv 4-bit 4096x4096 (cuda_kernel)"] = (lambda v: qgemv.qgemv(layer, v), x)
        cases["qgemv direct (cuda_kernel)"] = (_direct(layer), x)
    else:
        cases["qgemm 4-bit 4096x4096 (cuda_kernel)"] = (lambda v: qgemm.qgemm(layer, v), x)
    print(f"{n} ops per compiled call, {a.rows} rows; per op: host us (build + queue), "
          f"wall us (with device)")
    for name, (step, inp) in cases.items():
        try:
            host, wall = time_chain(chain(step, n), inp)
            print(f"{name:40s} host {1e3 * host / n:6.2f} us   wall {1e3 * wall / n:6.2f} us",
                  flush=True)
        except Exception as exc:  # a case that cannot run here is reported, not fatal
            print(f"{name:40s} failed: {exc}", flush=True)


def _direct(layer: nn.Module):
    """One step: qgemv's direct kernel (its staged one switched off while the graph is built)."""
    def step(v: mx.array) -> mx.array:
        with setting(qgemv, {"STAGED_MAX_ROWS": 0}):
            return qgemv.qgemv(layer, v)
    return step


if __name__ == "__main__":
    main()
