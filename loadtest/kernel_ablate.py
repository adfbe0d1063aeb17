"""What bounds the 4-bit kernels: each one timed as written and with one part of its work taken
out, on the device, at the 7B's shapes (a profile by ablation, for a GPU without ncu).

    python -m loadtest.kernel_ablate [--rows 1,64,128] [--shapes gate|up,down,qkv,o] [--brief]
                                     [--sweep qgemm|wgmma|both] [--against OLD_QGEMM.py]
                                     [--against-wgmma OLD_QGEMM_WGMMA.py]
                                     (gpu_profile.sh: `ablate`)

Each variant is engine/qgemm.py's, engine/qgemm_wgmma.py's, engine/qgemv.py's or
engine/gemv.py's source with a line or two replaced (its results are wrong on purpose; only
its time counts): `no-unpack` feeds the packed words to the arithmetic as they are, `no-mma`
/ `no-dot` replaces the tensor-core op / the float dot product by one integer op,
`no-convert` skips gemv's int-to-float conversion, `no-loads` stops the GEMMs' copies from
global memory after the first stages (`no-loads-no-sync` also drops qgemm's per-step
barrier), `no-fence` drops the wgmma kernel's proxy fence, `serial` makes it wait for each
chunk's wgmmas before unpacking the next, `no-x-loads` gives qgemv constants for x. If taking a part out barely changes the time, that part is not what bounds it. qgemv
is timed at the settings of QGEMV_SWEEP, and its cuts apply to its direct kernel; `--sweep`
adds QGEMM_SWEEP's and WGMMA_SWEEP's settings. The wgmma kernel is also timed as the whole
layer, with its K-split partials added up after it ("+ sums") or by itself ("fused sums"). Kernel times come from CUPTI through
torch.profiler (the GPU machines ship torch), so host launch costs do not count.
"""

from __future__ import annotations

import argparse
import functools
import sys

import mlx.core as mx
import mlx.nn as nn

from engine import gemv, qgemm, qgemm_wgmma, qgemv
from engine.kernel_source import cuda_kernel
from loadtest import settings
from loadtest.quant_kernels import layer_4bit

# Calls cycle through this many copies of a layer, so that its weights are read from memory
# as in a decode step (a 4-bit 4,096 x 6,144 layer fits an H200's 50 MB L2 several times).
COPIES = 6
SHAPES = {"gate|up": (4096, 28672), "down": (14336, 4096), "qkv": (4096, 6144), "o": (4096, 4096)}

QGEMM_CUTS = {
    "no-unpack": ("unpack8<BITS, BF16, FAST>(&wq[2 * ft][(BITS / 4) * jj], sv[2 * ft], bv[2 * ft], lo);\n"
                  "                unpack8<BITS, BF16, FAST>(&wq[2 * ft + 1][(BITS / 4) * jj], sv[2 * ft + 1], bv[2 * ft + 1], hi);",
                  "lo[0] = wq[2 * ft][(BITS / 4) * jj]; lo[1] = lo[0] ^ sv[2 * ft]; lo[2] = lo[0] ^ bv[2 * ft]; "
                  "lo[3] = lo[0] + 1u; hi[0] = wq[2 * ft + 1][(BITS / 4) * jj]; hi[1] = hi[0] ^ sv[2 * ft + 1]; "
                  "hi[2] = hi[0] ^ bv[2 * ft + 1]; hi[3] = hi[0] + 1u;"),
    "no-mma": ("mma16816<BF16>(acc[ft][xt], a0, xb[xt]);\n"
               "                    mma16816<BF16>(acc[ft][xt], a1, xb[xt] + 2);",
               "acc[ft][xt][0] += __uint_as_float((a0[0] ^ a0[1] ^ a0[2] ^ a0[3]) & xb[xt][0]);\n"
               "                    acc[ft][xt][1] += __uint_as_float((a1[0] ^ a1[1] ^ a1[2] ^ a1[3]) & xb[xt][2] & xb[xt][1] & xb[xt][3]);"),
    "no-loads": ("if (next < steps) load(", "if (next < STAGES - 1) load("),
    # compute alone, without the per-step barrier either: what the warps' own loop costs
    "no-loads-no-sync": ("if (next < steps) load(", "if (next < STAGES - 1) load(",
                         "__syncthreads();              // everyone's have", "// (no barrier)"),
}
QGEMV_CUTS = {
    "no-unpack": ("unpack8<BITS, BF16, FAST>(&q[0][CH * j], sv[u][0], bv[u][0], p0);\n"
                  "                unpack8<BITS, BF16, FAST>(&q[1][CH * j], sv[u][1], bv[u][1], p1);",
                  "p0[0] = q[0][CH * j] ^ sv[u][0]; p0[1] = p0[0] + 1u; p0[2] = p0[0] ^ bv[u][0]; "
                  "p0[3] = p0[0] + 3u; p1[0] = q[1][CH * j] ^ sv[u][1]; p1[1] = p1[0] + 1u; "
                  "p1[2] = p1[0] ^ bv[u][1]; p1[3] = p1[0] + 3u;"),
    "no-mma": ("mma16816<BF16>(acc, a0, b0);\n                mma16816<BF16>(acc, a1, b1);",
               "acc[0] += __uint_as_float((a0[0] ^ a0[1] ^ a0[2] ^ a0[3]) & b0[0] & b0[1]);\n"
               "                acc[1] += __uint_as_float((a1[0] ^ a1[1] ^ a1[2] ^ a1[3]) & b1[0] & b1[1]);"),
    "no-x-loads": ("const uint4 xv = *reinterpret_cast<const uint4*>(xr + k + 8 * j);",
                   "const uint4 xv = make_uint4(k, j, t, g);"),
}
GEMV_CUTS = {
    "no-dot": ("dot += qf * xf[j];", "dot = __uint_as_float(__float_as_uint(dot) ^ word);"),
    "no-convert": ("qf = static_cast<float>((word >> (BITS * (j % PER_WORD))) & MASK);",
                   "qf = __uint_as_float(word);"),
}


WGMMA_CUTS = {
    "no-fence": ("fence_async_smem();", ""),
    "serial": ("wgmma_wait<CB - 1>();", "wgmma_wait<0>();"),  # no unpacking under the wgmmas
    "no-unpack": ("unpack8<4, BF16, FAST>(&p, s, b, h ? hi : lo);",
                  "(h ? hi : lo)[0] = p; (h ? hi : lo)[1] = p ^ s; (h ? hi : lo)[2] = p ^ b; (h ? hi : lo)[3] = p + 1u;"),
    "no-loads": ("if (next < steps) load(", "if (next < STAGES - 1) load("),
    # the per-step barrier left out (wrong sums): what the warpgroups' lockstep costs
    "no-sync": ("            __syncthreads();\n            const int next", "            const int next"),
    # the tensor cores left out: each would-be wgmma folds its A registers into acc instead
    "no-mma": ("wgmma<BM, BF16>(acc, a[kk % (2 * CB)], smem_desc(",
               "no_wgmma(acc, a[kk % (2 * CB)], smem_desc(",
               "    for (int i = 0; i < steps; ++i) {",
               "    auto no_wgmma = [](float* d, const unsigned* r, unsigned long long) {\n"
               "        d[0] += __uint_as_float(r[0] ^ r[1] ^ r[2] ^ r[3]); };\n"
               "    for (int i = 0; i < steps; ++i) {"),
}


def _cut(source: str, *pairs: str) -> str:
    """source with each (old, new) pair of `pairs` replaced."""
    for old, new in zip(pairs[::2], pairs[1::2]):
        if old not in source:
            raise SystemExit(f"kernel_ablate: the source no longer has {old!r}; update the cut")
        source = source.replace(old, new)
    return source


# kind -> (source, header, cuts); gemv's body gets its prologue and epilogue when built.
def _sources(kind: str):
    return {"qgemm": (qgemm.SOURCE, qgemm.HEADER, QGEMM_CUTS),
            "qgemv": (qgemv.SOURCE, qgemm.HEADER, QGEMV_CUTS),
            "gemv": (gemv._QUANT, gemv.VEC_HEADER, GEMV_CUTS),
            "wgmma": (qgemm_wgmma.SOURCE, qgemm_wgmma.HEADER, WGMMA_CUTS)}[kind]


@functools.lru_cache(maxsize=None)
def _kernel(kind: str, variant: str, smem: int = 0):
    """The kind's kernel as written or with a variant's cut, under a name of its own (MLX
    tells compiled kernels apart by name)."""
    source, header, cuts = _sources(kind)
    if variant != "as written":
        source = _cut(source, *cuts[variant])
    if kind == "gemv":
        source = gemv.kernel_source(source)
    return cuda_kernel(name=f"abl_{kind}_{variant.replace('-', '_').replace(' ', '_')}",
                       input_names=["x", "w", "scales", "biases"], output_names=["y"],
                       source=source, header=header, shared_memory=smem)


def _call(kind: str, variant: str, layer, x):
    """The engine's own launch of the kind's kernel, with the variant's kernel in its place.
    qgemm's K-split partials are not added up: only its kernel is timed."""
    if kind == "qgemm":
        return qgemm.kernel_output(layer, x, build=lambda smem: _kernel(kind, variant, smem))
    if kind == "qgemv":
        return qgemv.qgemv(layer, x, build=lambda smem: _kernel(kind, variant, smem))
    return gemv.matvec(x, layer.weight, layer.scales, layer.biases, layer.bits,
                       layer.group_size, kernel=_kernel(kind, variant))


@functools.lru_cache(maxsize=None)
def _module(path: str, name: str):
    """Another copy of an engine module (say, the last commit's), loaded under its own name."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # its dataclasses look their module up
    spec.loader.exec_module(old)
    return old


@functools.lru_cache(maxsize=None)
def _previous_kernel(path: str, module: str, smem: int):
    """The kernel of another copy of engine/<module>.py (qgemm or qgemm_wgmma), under a name of
    its own, for timing a rewrite against what it replaces in one process. It is launched as
    the current one is (qgemm: the same template arguments and grid, so the file's SOURCE must
    take them) or by that copy itself (qgemm_wgmma: its own stages, shared memory, splits)."""
    old = _module(path, f"previous_{module}")
    return cuda_kernel(name=f"prev_{module}_{smem}", input_names=["x", "w", "scales", "biases"],
                       output_names=["y"], source=old.SOURCE, header=old.HEADER,
                       shared_memory=smem)


def _previous_wgmma(path: str, layer, x):
    """layer(x)'s kernel output by another copy of engine/qgemm_wgmma.py."""
    return _module(path, "previous_qgemm_wgmma").kernel_output(
        layer, x, build=lambda smem: _previous_kernel(path, "qgemm_wgmma", smem))


def kernel_us(fn, reps: int = 21) -> float:
    """Mean GPU time (us) of the kernels fn(i) launches, over `reps` calls in one eval each."""
    from torch.profiler import ProfilerActivity, profile

    from loadtest.gpu_trace import _kernel_events
    for i in range(COPIES):
        mx.eval(fn(i))
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            mx.eval(fn(i))
        mx.synchronize()
    return sum(e.time_range.elapsed_us() for e in _kernel_events(prof)) / reps


# engine/qgemv.py settings timed against its defaults (label, module attributes, warps per
# block or 0 for its choice): the direct kernel, and the staged one's ring depth, x in shared
# or global memory, and warps.
QGEMV_SWEEP = (
    ("direct", {"STAGED_MAX_ROWS": 0}, 0),
    ("staged S2", {"STAGES": 2, "STAGED_MAX_ROWS": 8}, 0),
    ("staged S3", {"STAGES": 3, "STAGED_MAX_ROWS": 8}, 0),
    ("staged S4", {"STAGES": 4, "STAGED_MAX_ROWS": 8}, 0),
    ("staged S3 x-global", {"X_SMEM": False, "STAGED_MAX_ROWS": 8}, 0),
    ("staged S2 x-global", {"STAGES": 2, "X_SMEM": False, "STAGED_MAX_ROWS": 8}, 0),
    ("staged S2 NW2", {"STAGES": 2, "STAGED_MAX_ROWS": 8}, 2),
    ("staged S2 NW4", {"STAGES": 2, "STAGED_MAX_ROWS": 8}, 4),
    ("staged S2 NW8", {"STAGES": 2, "STAGED_MAX_ROWS": 8}, 8),
)


# engine/qgemm.py settings timed against its defaults (label, module attributes): 16 features
# a warp (twice the warps, fewer registers each), 128-row blocks, ring depth, two warp groups.
QGEMM_SWEEP = (
    ("WN16", {"WN": 16}),
    ("WN16 BM128", {"WN": 16, "MAX_BLOCK_ROWS": 128}),
    ("S2", {"STAGES": 2}),
    ("WN16 S2", {"WN": 16, "STAGES": 2}),
    ("WN16 BM128 S2", {"WN": 16, "MAX_BLOCK_ROWS": 128, "STAGES": 2}),
    ("KW2", {"K_WARPS_64_ROWS": 2}),
)


# engine/qgemm_wgmma.py settings: ring depth, and K splits aimed at more blocks.
WGMMA_SWEEP = (
    ("WG2", {"WIDE_MIN_FEATURES": 1 << 30}),
    ("S4", {"STAGES": {(64, 2): 3, (128, 2): 4, (128, 4): 4}}),
    ("T264", {"TARGET_BLOCKS": 264}),
    ("WS", {"PRODUCER_WARP": True}),  # a producer warp, stages handed over by mbarrier
)


def layer_copies(shapes: str):
    """(name, k, n, COPIES random 4-bit k -> n layers) for each comma-separated SHAPES name."""
    for name in shapes.split(","):
        k, n = SHAPES[name]
        yield name, k, n, [layer_4bit(k, n) for _ in range(COPIES)]


def setting(module, attrs: dict):
    """module's attributes set to attrs inside the block, restored after."""
    return settings.constants({(module, name): value for name, value in attrs.items()})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,64,128")
    ap.add_argument("--shapes", default="gate|up,down,qkv")
    ap.add_argument("--brief", action="store_true", help="no cuts: the kernels as written only")
    ap.add_argument("--sweep", choices=("qgemm", "wgmma", "both"),
                    help="also the settings of QGEMM_SWEEP and/or WGMMA_SWEEP")
    ap.add_argument("--against", help="another engine/qgemm.py whose kernel is timed beside this one's")
    ap.add_argument("--against-wgmma", help="another engine/qgemm_wgmma.py, timed beside this one")
    a = ap.parse_args(argv)
    for name, k, n, layers in layer_copies(a.shapes):
        layer = layers[0]
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 4)
        dense = nn.Linear(k, n, bias=False)
        dense.weight = w
        mx.eval(w)
        mb = (layer.weight.nbytes + layer.scales.nbytes + layer.biases.nbytes) / 1e6
        for rows in [int(r) for r in a.rows.split(",")]:
            x = mx.random.normal((rows, k)).astype(mx.bfloat16)
            mx.eval(x)
            line = [f"bf16 GEMM {kernel_us(lambda i: x @ w.T):7.1f}"]
            if rows <= gemv.MAX_ROWS:
                if not a.brief:
                    line.append(f"bf16 gemv {kernel_us(lambda i: gemv.gemv(dense, x)):7.1f}")
                for v in ("as written",) + (() if a.brief else tuple(GEMV_CUTS)):
                    us = kernel_us(lambda i: _call("gemv", v, layers[i % COPIES], x))
                    line.append(f"gemv {v} {us:7.1f} ({mb / us:.2f} TB/s)")
                launch = qgemv.staged_launch(layer, rows) if qgemv.staged_applies(layer, rows) else "direct"
                us = kernel_us(lambda i: qgemv.qgemv(layers[i % COPIES], x))
                line.append(f"qgemv {launch} {us:7.1f} ({mb / us:.2f} TB/s)")
                for label, attrs, nw in () if a.brief else QGEMV_SWEEP:
                    with setting(qgemv, attrs):
                        us = kernel_us(lambda i: qgemv.qgemv(layers[i % COPIES], x, warps=nw))
                    line.append(f"qgemv {label} {us:7.1f}")
                with setting(qgemv, {"STAGED_MAX_ROWS": 0}):  # the cuts are the direct kernel's
                    for v in () if a.brief else tuple(QGEMV_CUTS):
                        us = kernel_us(lambda i: _call("qgemv", v, layers[i % COPIES], x))
                        line.append(f"qgemv direct {v} {us:7.1f}")
            elif qgemm.MIN_ROWS <= rows <= qgemm.MAX_ROWS:
                if a.against:
                    us = kernel_us(lambda i: qgemm.kernel_output(
                        layers[i % COPIES], x, build=lambda smem: _previous_kernel(a.against, "qgemm", smem)))
                    line.append(f"qgemm {a.against} {us:7.1f}")
                for v in ("as written",) + (() if a.brief else tuple(QGEMM_CUTS)):
                    us = kernel_us(lambda i: _call("qgemm", v, layers[i % COPIES], x))
                    line.append(f"qgemm {v} {us:7.1f}")
                for label, attrs in QGEMM_SWEEP if a.sweep in ("qgemm", "both") else ():
                    with setting(qgemm, attrs):
                        us = kernel_us(lambda i: qgemm.kernel_output(layers[i % COPIES], x))
                    line.append(f"qgemm {label} {us:7.1f}")
            if qgemm_wgmma.MIN_ROWS <= rows <= qgemm_wgmma.MAX_ROWS:
                for label, attrs in (("", {}),) + (WGMMA_SWEEP if a.sweep in ("wgmma", "both") else ()):
                    with setting(qgemm_wgmma, attrs):
                        us = kernel_us(lambda i: qgemm_wgmma.kernel_output(layers[i % COPIES], x))
                    line.append(f"wgmma{' ' + label if label else ''} {us:7.1f} ({mb / us:.2f} TB/s)")
                # the whole layer: the kernel and, with K splits, the sum of its partials (an
                # MLX sum and cast, or the kernel's own with FUSED_SPLITS)
                for label, fused in (("+ sums", False), ("fused sums", True)):
                    with setting(qgemm_wgmma, {"FUSED_SPLITS": fused}):
                        us = kernel_us(lambda i: qgemm_wgmma.qgemm_wgmma(layers[i % COPIES], x))
                    line.append(f"wgmma {label} {us:7.1f}")
                if a.against_wgmma:
                    us = kernel_us(lambda i: _previous_wgmma(a.against_wgmma, layers[i % COPIES], x))
                    line.append(f"wgmma {a.against_wgmma} {us:7.1f}")
                for v in () if a.brief else tuple(WGMMA_CUTS):
                    us = kernel_us(lambda i: qgemm_wgmma.kernel_output(
                        layers[i % COPIES], x, build=lambda smem: _kernel("wgmma", v, smem)))
                    line.append(f"wgmma {v} {us:7.1f}")
            print(f"{name} ({k} -> {n}, {mb:.0f} MB at 4 bits), {rows} rows, us: " + " | ".join(line),
                  flush=True)


if __name__ == "__main__":
    main()
