"""What the GPU does during decode steps: kernel time, idle time, kernels per step.

    python -m loadtest.gpu_trace --shape 7b --dtype bfloat16 [--bits 4] --batch 1 --context 128

Runs the engine's own step loop (async, as served) under torch.profiler, whose CUPTI tracing
records every CUDA kernel in the process, MLX's included (the GPU machines ship torch; it is
not a dependency of the project). Per step it reports the wall time, the time the GPU was
busy (the union of kernel intervals), the number of kernels, and the kernels that took the
most time. Busy time well below wall time means the host, not the GPU, sets the pace.
Each variant (as chosen; without the compiled decode step; without the fused small ops;
without either; without the gemv kernels) runs in the same process on the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from collections import defaultdict

import mlx.core as mx

from engine.engine import DTYPES, LLMEngine
from loadtest.offline_bench import SHAPES
from loadtest.profile_step import decode_engine, start_decoding, stop_all


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, -1.0
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _short(name: str) -> str:
    name = re.sub(r"<.*", "", name.replace("void ", ""))
    return name[:60]


def trace(engine: LLMEngine, batch: int, context: int, steps: int, label: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    start_decoding(engine, label, batch, context, 2 * steps + 32)
    for _ in range(steps // 2 + 8):  # prefill, compile, warm
        engine.step()
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        mx.synchronize()
        wall = time.perf_counter() - t0
    stop_all(engine)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        per_name[_short(e.name)][0] += e.time_range.elapsed_us()
        per_name[_short(e.name)][1] += 1
    busy = _busy([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e3
    result = dict(label=label, batch=batch, context=context, wall_ms=wall / steps * 1e3,
                  gpu_busy_ms=busy / steps, kernels_per_step=len(kernels) / steps,
                  top=sorted(((n, t / 1e3 / steps, c / steps) for n, (t, c) in per_name.items()),
                             key=lambda x: -x[1])[:12])
    print(f"\n-- {label}: batch {batch}, context ~{context}: {result['wall_ms']:.2f} ms/step wall, "
          f"GPU busy {result['gpu_busy_ms']:.2f} ms ({100 * busy / steps / result['wall_ms']:.0f}%), "
          f"{result['kernels_per_step']:.0f} kernels/step")
    for n, t, c in result["top"]:
        print(f"   {t:7.3f} ms  {c:6.1f}x  {n}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--bits", type=int, choices=[4, 8])
    ap.add_argument("--batch", default="1")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batch.split(",")]
    engine = decode_engine(a.shape, a.dtype, a.bits, max(batches), a.context + 2 * a.steps + 64)
    model = engine.model
    chosen, compiled = model.plan, engine.runner.compile_decode
    variants = [("as chosen", chosen, compiled)]
    if compiled:
        variants.append(("not compiled", chosen, False))
    if chosen.fused:
        variants.append(("no fused ops", dataclasses.replace(chosen, fused=False), compiled))
    if chosen.fused and compiled:
        variants.append(("neither", dataclasses.replace(chosen, fused=False), False))
    if chosen.gemv:
        variants.append(("no gemv", dataclasses.replace(chosen, gemv=False, gemv_dense=False),
                         compiled))
    print(f"plan: {chosen}, compiled decode: {compiled}")
    for b in batches:
        for label, plan, comp in variants:
            model.plan, engine.runner.compile_decode = plan, comp
            trace(engine, b, a.context, a.steps, label)
    model.plan, engine.runner.compile_decode = chosen, compiled


if __name__ == "__main__":
    main()
