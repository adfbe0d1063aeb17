"""What the GPU does during decode steps: kernel time, idle time, kernels per step.

    python -m loadtest.gpu_trace --shape 7b --dtype bfloat16 [--bits 4] --batch 1 --context 128
    python -m loadtest.gpu_trace ... --prefill --batch 16 --context 1024   # prompt steps instead

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

from engine import paged_decode, runner
from engine.dequant import dequantize_matches_layers
from engine.gemv import gemv_matches_layers
from engine.qgemm import qgemm_matches_layers
from engine.engine import DTYPES, LLMEngine
from loadtest import settings
from loadtest.offline_bench import SHAPES
from loadtest.profile_step import decode_engine, start_decoding, stop_all


def _busy(events) -> float:
    """Length (us) of the union of the kernel events' [start, end) intervals."""
    total, end = 0.0, -1.0
    for s, e in sorted((k.time_range.start, k.time_range.end) for k in events):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _short(name: str) -> str:
    name = re.sub(r"<.*", "", name.replace("void ", "")).replace("mlx::core::cu::custom_kernel_", "")
    return name[:72]


def _kernel_events(prof):
    import torch
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def gaps(kernels, top: int = 8, min_us: float = 20.0) -> list[tuple]:
    """Where the GPU sat idle: gaps of at least min_us between one kernel's end and the next
    kernel's start (kernels in start order), summed by the kernel before and after the gap,
    largest total first: (total us, count, kernel before, kernel after)."""
    spans = sorted((k.time_range.start, k.time_range.end, _short(k.name)) for k in kernels)
    by_pair = defaultdict(lambda: [0.0, 0])
    end, before = None, None
    for s, e, name in spans:
        if end is not None and s - end >= min_us:
            by_pair[(before, name)][0] += s - end
            by_pair[(before, name)][1] += 1
        if end is None or e > end:
            end, before = e, name
    return sorted(((t, c, b, a) for (b, a), (t, c) in by_pair.items()), reverse=True)[:top]


def _linear_params(a) -> int:
    """Weights a token passes through in the decoder layers' projections (not the LM head)."""
    d = a.head_dim
    per_layer = a.hidden_size * (a.num_attention_heads + 2 * a.num_key_value_heads) * d \
        + a.num_attention_heads * d * a.hidden_size + 3 * a.hidden_size * a.intermediate_size
    return a.num_hidden_layers * per_layer


def _prefill_all(engine: LLMEngine, prefix: str, batch: int, context: int) -> int:
    """Add `batch` one-token requests of `context`-token prompts, step until all are done:
    every step is prompt chunks only. Returns the number of steps launched (the last
    step() call only collects the last step, so it does not count)."""
    start_decoding(engine, prefix, batch, context, 1)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += engine._inflight is not None
    return steps


def trace(engine: LLMEngine, batch: int, context: int, steps: int, label: str,
          prefill: bool = False) -> dict:
    """Decode steps at `batch` x `context`; with `prefill`, instead the steps that compute
    `batch` prompts of `context` tokens (after one untraced round that compiles them)."""
    from torch.profiler import ProfilerActivity, profile
    if prefill:
        _prefill_all(engine, f"warm-{label}", batch, context)
    else:
        start_decoding(engine, label, batch, context, 2 * steps + 32)
        for _ in range(steps // 2 + 8):  # prefill, compile, warm
            engine.step()
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        if prefill:
            steps = _prefill_all(engine, label, batch, context)
        else:
            for _ in range(steps):
                engine.step()
        mx.synchronize()
        wall = time.perf_counter() - t0
    stop_all(engine)
    kernels = _kernel_events(prof)
    per_name = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        per_name[_short(e.name)][0] += e.time_range.elapsed_us()
        per_name[_short(e.name)][1] += 1
    busy = _busy(kernels) / 1e3
    result = dict(label=label, batch=batch, context=context, wall_ms=wall / steps * 1e3,
                  gpu_busy_ms=busy / steps, kernels_per_step=len(kernels) / steps,
                  top=sorted(((n, t / 1e3 / steps, c / steps) for n, (t, c) in per_name.items()),
                             key=lambda x: -x[1])[:14])
    if prefill:  # the linear layers' FLOPs over the wall time (attention adds a few %)
        flops = 2 * batch * context * _linear_params(engine.model_args) / wall
        label += (f" (prefill: {batch * context / steps:.0f} tokens/step, linear layers "
                  f"{flops / 1e12:.0f} TFLOP/s of wall time)")
    print(f"\n-- {label}: batch {batch}, context ~{context}: {result['wall_ms']:.2f} ms/step wall, "
          f"GPU busy {result['gpu_busy_ms']:.2f} ms ({100 * busy / steps / result['wall_ms']:.0f}%), "
          f"{result['kernels_per_step']:.0f} kernels/step")
    for n, t, c in result["top"]:
        print(f"   {t:7.3f} ms  {c:6.1f}x  {1e3 * t / c:7.1f} us/call  {n}")
    idle = gaps(kernels)
    if idle:
        print("   idle gaps of >= 20 us, by the kernels around them (ms a step, gaps a step):")
    for t, c, before, after in idle:
        print(f"   {t / 1e3 / steps:7.3f} ms  {c / steps:6.2f}x  after {before[:40]}  before {after[:40]}")
    return result


def fused_ops_trace(args, dtype: mx.Dtype, rows_list: list[int], reps: int = 32) -> None:
    """GPU time per call of each fused kernel against its portable MLX ops, alone (not inside
    a step), at the model's widths: `reps` independent calls per eval under the profiler."""
    import mlx.nn as nn
    from torch.profiler import ProfilerActivity, profile

    from engine import fused_ops as fo
    h, inter = args.hidden_size, args.intermediate_size
    nh, kvh, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    qkv_width = (nh + 2 * kvh) * d
    for rows in rows_list:
        x, y = mx.random.normal((rows, h)).astype(dtype), mx.random.normal((rows, h)).astype(dtype)
        norm = nn.RMSNorm(h)
        norm.weight = norm.weight.astype(dtype)
        qkv = mx.random.normal((rows, qkv_width)).astype(dtype)
        positions = mx.arange(rows, dtype=mx.int32) * 7 + 100
        slots = mx.arange(rows, dtype=mx.int32) * 3
        pools = [mx.zeros((4 * rows + 16, kvh, d), dtype) for _ in range(2)]
        gu = mx.random.normal((rows, 2 * inter)).astype(dtype)
        mx.eval(x, y, norm.weight, qkv, positions, slots, pools, gu)
        ops = {
            "add_rms_norm": lambda k: fo.add_rms_norm(x, y, norm, k),
            "qkv_rope": lambda k: fo.qkv_rope(qkv, positions, nh, kvh, d, args.rope_theta, k),
            "qkv_rope_store": lambda k: fo.qkv_rope_store(qkv, positions, slots, *pools, nh, kvh,
                                                          d, args.rope_theta, k, in_place=k)[0],
            "swiglu": lambda k: fo.swiglu(gu, k),
        }
        for name, fn in ops.items():
            line = []
            for k in ((True, False) if mx.cuda.is_available() else (False,)):
                mx.eval(fn(k))  # build, compile
                mx.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    mx.eval([fn(k) for _ in range(reps)])
                    mx.synchronize()
                ev = _kernel_events(prof)
                names = sorted({_short(e.name) for e in ev})
                us = sum(e.time_range.elapsed_us() for e in ev) / reps
                # The calls are independent, so the GPU may overlap them: busy time (the union
                # of the kernels' intervals) per call is the cost; summed durations overstate.
                busy = _busy(ev) / reps
                line.append(f"{'kernel' if k else 'portable'} {busy:6.1f} us/call busy, {us:6.1f} summed "
                            f"({len(ev) / reps:.1f} kernels: {', '.join(n[-28:] for n in names)[:90]})")
            print(f"   rows {rows:4d} {name:15s} " + " | ".join(line))


def _variants(engine, names: list[str], min_keys: list[int], warps: list[int],
              sets: list[str] = ()):
    """(label, plan, compiled, paged_decode overrides) of each variant asked for."""
    chosen, compiled = engine.model.plan, engine.runner.compile_decode
    table = {"chosen": ("as chosen", chosen, compiled, {}),
             "nocompile": ("not compiled", chosen, False, {}),
             "nofused": ("no fused ops", dataclasses.replace(chosen, fused=False), compiled, {}),
             "neither": ("neither", dataclasses.replace(chosen, fused=False), False, {}),
             "nogemv": ("no gemv", dataclasses.replace(chosen, gemv=False, gemv_dense=False),
                        compiled, {}),
             "unstaged": ("inputs not staged", chosen, compiled, {(runner, "STAGE_INPUTS"): False}),
             "dequant": (f"dequantize kernel {'off' if chosen.dequant_kernel else 'on'}",
                         dataclasses.replace(chosen, dequant_kernel=not chosen.dequant_kernel),
                         compiled, {}),
             "qgemm": (f"tensor-core 4/8-bit GEMM {'off' if chosen.qgemm else 'on'}",
                       dataclasses.replace(chosen, qgemm=not chosen.qgemm), compiled, {})}
    if "qgemv" in names:  # off: engine/gemv.py's kernels serve those rows (MISTRAL_SERVE_QGEMV=0)
        quantized = [l for l in runner.check_layers(engine.model) if hasattr(l, "scales")]
        table["qgemv"] = ("few-row tensor-core kernel off, gemv kernels", dataclasses.replace(
            chosen, qgemv=False, gemv=chosen.gemv or gemv_matches_layers(quantized)), compiled, {})
    out = [table[n] for n in names]
    out += [(f"splits from {k} keys", chosen, compiled, {(paged_decode, "MIN_KEYS_PER_SPLIT"): k})
            for k in min_keys]
    out += [(f"{w} warps per block", chosen, compiled,
             {(paged_decode, "NUM_WARPS"): w, (paged_decode, "STAGED_WARPS"): w,
              (paged_decode, "FEW_BLOCKS_WARPS"): w}) for w in warps]
    for spec in sets:
        constants, plan_fields = settings.parse(spec)
        out.append((spec, dataclasses.replace(chosen, **plan_fields), compiled, constants))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--bits", type=int, choices=[4, 8])
    ap.add_argument("--batch", default="1")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prefill", action="store_true",
                    help="trace the steps that compute --batch prompts of --context tokens instead")
    ap.add_argument("--variants", default="chosen,nocompile,nofused,neither,nogemv",
                    help="of chosen,nocompile,nofused,neither,nogemv,unstaged,dequant,qgemm,qgemv "
                         "(those that differ run; dequant / qgemm / qgemv: that kernel switched)")
    ap.add_argument("--min-keys-per-split", default="",
                    help="also run as chosen with paged_decode.MIN_KEYS_PER_SPLIT set to each")
    ap.add_argument("--warps", default="", help="also run as chosen with these decode-kernel warps")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.ATTR=VALUE,...",
                    help="also run as chosen with these settings (repeatable: one variant each): "
                         "engine module constants or plan fields, e.g. paged_decode.UNROLL=8 "
                         "(loadtest/settings.py)")
    ap.add_argument("--fused-ops", default="",
                    help="row counts: time each fused kernel against its MLX ops, alone")
    a = ap.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    batches = ints(a.batch)
    engine = decode_engine(a.shape, a.dtype, a.bits, max(batches), a.context + 2 * a.steps + 64)
    model = engine.model
    if a.fused_ops:
        fused_ops_trace(engine.model_args, DTYPES[a.dtype], ints(a.fused_ops))
    chosen, compiled = model.plan, engine.runner.compile_decode
    print(f"plan: {chosen}, compiled decode: {compiled}, "
          f"prompt kernel: {engine.runner.prefill_kernel}")
    names = [n for n in a.variants.split(",") if n]
    names = [n for n in names if n == "chosen" or (n == "nocompile" and compiled)
             or (n == "nofused" and chosen.fused) or (n == "neither" and chosen.fused and compiled)
             or (n == "nogemv" and chosen.gemv) or n == "unstaged"
             # switched on only where its self-check passes on this model's layers
             or (n == "dequant" and (chosen.dequant_kernel or
                                     dequantize_matches_layers(runner.check_layers(model))))
             or (n == "qgemm" and (chosen.qgemm or qgemm_matches_layers(runner.check_layers(model))))
             or (n == "qgemv" and chosen.qgemv)]
    variants = _variants(engine, names, ints(a.min_keys_per_split), ints(a.warps), a.set)
    for b in batches:
        for label, plan, comp, overrides in variants:
            with settings.constants(overrides):
                model.plan, engine.runner.compile_decode = plan, comp
                engine.runner._compiled.clear()  # the compiled step captured the kernel settings
                try:
                    trace(engine, b, a.context, a.steps, label, a.prefill)
                finally:
                    engine.runner._compiled.clear()
    model.plan, engine.runner.compile_decode = chosen, compiled


if __name__ == "__main__":
    main()
