"""Device time of each kind of op in a decode step, summed over all layers.

    python -m loadtest.op_profile --shape 7b --dtype bfloat16 --batch 1,64,128 --context 1024

Each op kind (the q/k/v projections, the MLP matmuls, norms, RoPE, KV writes, attention,
the LM head) runs once per layer on that layer's own weights, so weights stream from
memory as in a real step, and is timed as one evaluated batch after a warm-up. The rows
show what a step spends where, and what fused variants (one q|k|v matmul, one gate|up
matmul, dequantize + GEMM for 4-bit) would save. Also prints the memory-traffic floor of
the step: (weight bytes + KV bytes read) / --bandwidth.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.config import ModelArgs
from engine.engine import DTYPES
from engine import paged_prefill
from engine.paged_decode import num_splits, paged_decode_attention, supported
from engine.runner import _additive_mask
from loadtest.offline_bench import SHAPES


def _time(fn, reps: int = 5) -> float:
    """Median seconds of fn() with everything it builds evaluated."""
    mx.eval(fn())
    times = []
    for _ in range(reps):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _weights(n_layers: int, shape: tuple[int, int], dtype, bits):
    ws = [(mx.random.normal(shape) * shape[1] ** -0.5).astype(dtype) for _ in range(n_layers)]
    if bits:
        ws = [mx.quantize(w, group_size=64, bits=bits) for w in ws]
    mx.eval(ws)
    return ws


def _matmul(x, w, bits, dequant: bool):
    if not bits:
        return x @ w.T
    wq, scales, biases = w
    if dequant:
        return x @ mx.dequantize(wq, scales, biases, 64, bits).astype(x.dtype).T
    return mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=bits)


def profile(args: ModelArgs, dtype, bits, batch: int, context: int, bandwidth: float,
            block_size: int = 16) -> None:
    L, hid, inter = args.num_hidden_layers, args.hidden_size, args.intermediate_size
    h, kvh, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    x = mx.random.normal((batch, hid)).astype(dtype)
    w = {name: _weights(L, shape, dtype, bits) for name, shape in [
        ("q", (h * d, hid)), ("k", (kvh * d, hid)), ("v", (kvh * d, hid)), ("o", (hid, h * d)),
        ("gate", (inter, hid)), ("up", (inter, hid)), ("down", (hid, inter)),
        ("qkv", ((h + 2 * kvh) * d, hid)), ("gate_up", (2 * inter, hid))]}
    head = _weights(1, (args.vocab_size, hid), dtype, bits)[0]
    norm_w = mx.ones((hid,), dtype)
    nblk = -(-(context + 1) // block_size)
    pools = [mx.random.normal((batch * nblk * block_size, kvh, d)).astype(dtype) for _ in range(2)]
    tables = mx.arange(batch * nblk).reshape(batch, nblk).astype(mx.int32)
    slots = tables[:, -1] * block_size
    qd = mx.random.normal((batch, h, d)).astype(dtype)
    kd = mx.random.normal((batch, kvh, d)).astype(dtype)
    inter_act = mx.random.normal((batch, inter)).astype(dtype)
    attn_out = mx.random.normal((batch, h * d)).astype(dtype)
    pos = mx.full((batch,), context, mx.int32)
    mx.eval(x, norm_w, pools, tables, qd, kd, inter_act, attn_out, pos)

    def per_layer(op):
        return lambda: [op(i) for i in range(L)]

    rows = []
    for dq in ([False, True] if bits else [False]):
        tag = " (dequant+GEMM)" if dq else ""
        mm = lambda n, inp, dq=dq: per_layer(lambda i: _matmul(inp, w[n][i], bits, dq))
        rows += [(f"q+k+v separate{tag}", lambda mm=mm: [mm(n, x)() for n in "qkv"]),
                 (f"qkv fused{tag}", mm("qkv", x)),
                 (f"o_proj{tag}", mm("o", attn_out)),
                 (f"gate+up separate{tag}", lambda mm=mm: [mm(n, x)() for n in ("gate", "up")]),
                 (f"gate_up fused{tag}", mm("gate_up", x)),
                 (f"down{tag}", mm("down", inter_act))]
    rows += [
        ("rms_norm x2", per_layer(lambda i: [mx.fast.rms_norm(x, norm_w, 1e-5) for _ in range(2)])),
        ("rope q,k", per_layer(lambda i: [
            mx.fast.rope(t.reshape(batch, -1, 1, d), d, traditional=False, base=1e6, scale=1.0,
                         offset=pos) for t in (qd, kd)])),
        ("silu(gate)*up", per_layer(lambda i: nn.silu(inter_act) * inter_act)),
        ("residual adds x2", per_layer(lambda i: [x + x for _ in range(2)])),
        ("lm_head (once)", lambda: _matmul(x, head, bits, False)),
    ]
    if supported(d, dtype):
        for version in ("v1", "v2", "v3"):
            rows.append((f"paged decode attention {version}", per_layer(
                lambda i, version=version: paged_decode_attention(
                    qd, pools[0], pools[1], tables, mx.zeros((batch,), mx.int32), pos,
                    block_size, args.sliding_window, num_splits(batch, kvh, context + 1),
                    version=version))))

    def scatter():
        for p in pools:
            p[slots] = kd
        return pools
    rows.append(("KV scatter x2 (per layer)", lambda: [scatter() for _ in range(L)]))

    print(f"\n-- batch {batch}, context {context}, {dtype}{f', {bits}-bit' if bits else ''}"
          f" (sum over {L} layers)")
    for name, fn in rows:
        print(f"   {name:<34} {_time(fn) * 1e3:8.3f} ms")
    weight_bytes = sum(p.nbytes for ws in (w[n] for n in ("q", "k", "v", "o", "gate", "up", "down"))
                       for p in (ws if not bits else [a for t in ws for a in t]))
    weight_bytes += sum(a.nbytes for a in (head if bits else [head]))
    kv_bytes = 2 * L * batch * (context + 1) * kvh * d * pools[0].itemsize
    floor = (weight_bytes + kv_bytes) / bandwidth
    print(f"   memory floor: ({weight_bytes / 1e9:.2f} GB weights + {kv_bytes / 1e9:.2f} GB KV) "
          f"/ {bandwidth / 1e12:.2f} TB/s = {floor * 1e3:.2f} ms")


def qmm_sweep(args: ModelArgs, dtype, bits: int, rows: list[int]) -> None:
    """gate|up of every layer at M rows: quantized matmul vs dequantize + dense GEMM."""
    L, hid, inter = args.num_hidden_layers, args.hidden_size, args.intermediate_size
    w = _weights(L, (2 * inter, hid), dtype, bits)
    dense = _weights(L, (2 * inter, hid), dtype, None)
    print(f"\n-- gate|up over {L} layers, {bits}-bit vs {dtype} (ms)")
    print(f"   {'rows':>6} {'quantized mm':>13} {'dequant+GEMM':>13} {'dense':>9}")
    for m in rows:
        x = mx.random.normal((m, hid)).astype(dtype)
        t = [_time(lambda dq=dq: [_matmul(x, w[i], bits, dq) for i in range(L)]) for dq in (False, True)]
        t.append(_time(lambda: [x @ dense[i].T for i in range(L)]))
        print(f"   {m:>6} {t[0] * 1e3:>13.3f} {t[1] * 1e3:>13.3f} {t[2] * 1e3:>9.3f}")


def gemv_sweep(args: ModelArgs, dtype, bits, rows: list[int], bandwidth: float) -> None:
    """Each projection over all layers at M rows: MLX's matmul vs engine/gemv.py's kernel for
    several (ROWS, UNROLL, WARPS) launches; % of the memory floor in brackets."""
    from engine.gemv import matvec
    L, hid, inter = args.num_hidden_layers, args.hidden_size, args.intermediate_size
    h, kvh, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    shapes = {"qkv": ((h + 2 * kvh) * d, hid), "o": (hid, h * d), "gate_up": (2 * inter, hid),
              "down": (hid, inter), "lm_head": (args.vocab_size, hid)}
    variants = ([(1, 1, 4), (2, 1, 4), (4, 1, 2), (1, 2, 8)] if bits else
                [(1, 2, 8), (1, 4, 4), (2, 2, 4), (1, 1, 16)])
    print(f"\n-- projections over {L} layers (lm_head once), {dtype}"
          f"{f', {bits}-bit' if bits else ''}: ms (% of floor at {bandwidth / 1e12:.2f} TB/s)")
    print(f"   {'matrix':<8} {'M':>2} {'MLX':>14}" + "".join(f"{f'gemv {r}x{u}x{nw}':>15}" for r, u, nw in variants))
    for name, shape in shapes.items():
        ws = _weights(1 if name == "lm_head" else L, shape, dtype, bits)
        nbytes = sum(a.nbytes for w in ws for a in (w if bits else [w]))
        for m in rows:
            x = mx.random.normal((m, shape[1])).astype(dtype)
            cells = [_time(lambda: [_matmul(x, w, bits, False) for w in ws])]
            for v in variants:
                if bits:
                    fn = lambda v=v: [matvec(x, *w, bits, 64, launch=v) for w in ws]
                else:
                    fn = lambda v=v: [matvec(x, w, launch=v) for w in ws]
                cells.append(_time(fn))
            floor = nbytes / bandwidth
            print(f"   {name:<8} {m:>2}" + "".join(f"{t * 1e3:>8.3f} ({floor / t:>3.0%})" for t in cells))


def splits_sweep(args: ModelArgs, dtype, batches: list[int], context: int,
                 block_size: int = 16) -> None:
    """Paged decode attention over all layers, per kernel version and split count."""
    L, h, kvh, d = args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads, args.head_dim
    print(f"\n-- paged decode attention over {L} layers, context {context}, {dtype} (ms)")
    for batch in batches:
        nblk = -(-(context + 1) // block_size)
        pools = [mx.random.normal((batch * nblk * block_size, kvh, d)).astype(dtype) for _ in range(2)]
        tables = mx.arange(batch * nblk).reshape(batch, nblk).astype(mx.int32)
        qd = mx.random.normal((batch, h, d)).astype(dtype)
        pos = mx.full((batch,), context, mx.int32)
        start = mx.zeros((batch,), mx.int32)
        mx.eval(pools, tables, qd, pos, start)
        chosen = num_splits(batch, kvh, context + 1)
        for version in ("v1", "v2", "v3"):
            cells = []
            for splits in (1, 2, 4, 8, 16, 32):
                t = _time(lambda: [paged_decode_attention(qd, pools[0], pools[1], tables, start, pos,
                                                          block_size, args.sliding_window, splits,
                                                          version=version) for _ in range(L)])
                cells.append(f"{splits}:{t * 1e3:.3f}{'*' if splits == chosen else ''}")
            print(f"   batch {batch:>3} {version}  " + "  ".join(cells))


def prompt_shapes_sweep(args: ModelArgs, dtype: mx.Dtype, shapes: list[tuple[int, int, int]]) -> None:
    """A prompt group's attention at each (G, Lq, L): its first call, which on CUDA builds a
    cuDNN graph for the new shape, against the same call warm; where it runs, the same
    attention through the paged prompt kernel (engine/paged_prefill.py), first call and warm
    (it compiles once, for the first shape). Serving meets a new (G, Lq, L) whenever prompt
    lengths change."""
    h, kvh, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    kernel = paged_prefill.supported(d, dtype)
    print(f"\n-- prompt-group attention, first call vs warm (ms), {h} heads / {kvh} KV heads, D {d}"
          f"{'; then the prompt kernel' if kernel else ''}")
    for g, lq, kl in shapes:
        q = mx.random.normal((g, h, lq, d)).astype(dtype)
        k, v = (mx.random.normal((g, kvh, kl, d)).astype(dtype) for _ in range(2))
        # Each sequence's last lq of kl tokens, masked as the runner masks a prompt group.
        mask = _additive_mask(np.tile(np.arange(kl), (g, 1)), np.tile(np.arange(kl - lq, kl), (g, 1)),
                              None, dtype)
        mx.eval(q, k, v, mask)
        mx.synchronize()

        def run():
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=d ** -0.5, mask=mask)
        t0 = time.perf_counter()
        mx.eval(run())
        mx.synchronize()
        first = time.perf_counter() - t0
        line = f"   G {g:3d} Lq {lq:5d} L {kl:5d}: first {1e3 * first:8.2f}  warm {1e3 * _time(run):7.3f}"
        if kernel:
            line += "   kernel: first %8.2f  warm %7.3f" % _prompt_kernel_times(g, lq, kl, h, kvh, d, dtype)
        print(line)


def _prompt_kernel_times(g: int, lq: int, kl: int, h: int, kvh: int, d: int, dtype: mx.Dtype,
                         block_size: int = 16) -> tuple[float, float]:
    """(first call, warm) ms of the prompt kernel for g chunks of the last lq of kl tokens,
    each sequence's blocks in a row of the pools."""
    blocks = -(-kl // block_size)
    pools = [mx.random.normal((g * blocks * block_size, kvh, d)).astype(dtype) for _ in range(2)]
    tables = mx.array(np.arange(g * blocks, dtype=np.int32).reshape(g, blocks))
    seqs, tiles = (mx.array(a.astype(np.int32)) for a in paged_prefill.chunk_layout(
        [lq] * g, [kl - lq] * g, [0] * g))
    q = mx.random.normal((g * lq, h, d)).astype(dtype)
    mx.eval(q, pools, tables, seqs, tiles)
    mx.synchronize()

    def run():
        return paged_prefill.paged_prefill_attention(q, *pools, tables, seqs, tiles, block_size, None)
    t0 = time.perf_counter()
    mx.eval(run())
    mx.synchronize()
    return 1e3 * (time.perf_counter() - t0), 1e3 * _time(run)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--bits", type=int, choices=[4, 8])
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s (H100: 3.35e12)")
    ap.add_argument("--qmm-rows", help="only the quantized-matmul sweep over these row counts")
    ap.add_argument("--gemv-rows", help="only the few-row matmul sweep over these row counts")
    ap.add_argument("--splits", action="store_true", help="only the attention split-count sweep")
    ap.add_argument("--prompt-shapes", help="only prompt-group attention, first call vs warm, at "
                                            "these G:Lq:L (e.g. 4:1024:1024,5:1000:1024)")
    a = ap.parse_args(argv)
    args = ModelArgs.from_dict(SHAPES[a.shape])
    if a.prompt_shapes:
        prompt_shapes_sweep(args, DTYPES[a.dtype], [tuple(int(x) for x in s.split(":"))
                                                    for s in a.prompt_shapes.split(",")])
        return
    if a.gemv_rows:
        gemv_sweep(args, DTYPES[a.dtype], a.bits, [int(m) for m in a.gemv_rows.split(",")], a.bandwidth)
        return
    if a.splits:
        splits_sweep(args, DTYPES[a.dtype], [int(x) for x in a.batch.split(",")], a.context)
        return
    if a.qmm_rows:
        qmm_sweep(args, DTYPES[a.dtype], a.bits or 4, [int(m) for m in a.qmm_rows.split(",")])
        return
    for b in (int(x) for x in a.batch.split(",")):
        profile(args, DTYPES[a.dtype], a.bits, b, a.context, a.bandwidth)


if __name__ == "__main__":
    main()
