"""The engine's CUDA kernels compiled on any machine, no GPU needed: registers, spills and the
SASS instruction mix of each, as MLX's CUDA backend would build it for an H100/H200 (sm_90a).

    pip install -e '.[kernels]'      # NVIDIA's nvrtc, runtime, crt and cccl wheels (+ cuobjdump,
                                     # nvdisasm for the SASS)
    python -m loadtest.kernel_sass [--kernels qgemm,qgemm_wgmma,...] [--sass DIR] [--arch sm_90a]

Each kernel is launched through its engine entry point with 7B shapes, with
`engine.kernel_source.cuda_kernel` replaced by a recorder, so what is compiled is exactly the
source, header and template arguments a run would hand MLX; the recorder wraps them the way
MLX's `mx.fast.cuda_kernel` does (mlx/backend/cuda/custom_kernel.cpp: MLX's own device header,
the kernel's signature with its inputs' and outputs' types and `_shape` arguments, the
template arguments as constants) and NVRTC compiles that with ptxas's resource report. One
header is a stand-in: MLX's `mlx/backend/cuda/device/utils.cuh` (compiled into libmlx, not
shipped as a file), of which the kernels use only the `Shape` type.

This is how the seventeenth session found that engine/qgemm.py's K step was ~1,450
instructions for 128 HMMA, a third of them register moves (loadtest/RESULTS.md).
tests/test_kernel_build.py compiles the kernels the same way in CI: a source that does not
build, or spills, fails there before it reaches a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import re
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

ARCH = "sm_90a"  # what MLX asks NVRTC for on a compute-capability 9.0 GPU

_TYPES = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float",
          mx.uint32: "uint32_t", mx.int32: "int32_t", mx.uint8: "uint8_t", mx.bool_: "bool",
          mx.int64: "int64_t", mx.uint16: "uint16_t", mx.int8: "int8_t", mx.int16: "int16_t"}
# MLX's custom-kernel preamble (custom_kernel.cpp's default_header) and the stand-in for the
# one MLX header the engine's kernels draw on.
_MLX_HEADER = ('\n#include "mlx/backend/cuda/device/utils.cuh"\n\n'
               "#include <cooperative_groups.h>\n\n")
_UTILS_STUB = """#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/cstdint>
using cuda::std::int8_t; using cuda::std::int16_t; using cuda::std::int32_t; using cuda::std::int64_t;
using cuda::std::uint8_t; using cuda::std::uint16_t; using cuda::std::uint32_t; using cuda::std::uint64_t;
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
"""


@dataclass
class Build:
    """One compiled kernel: its launch, ptxas's report and its SASS (if cuobjdump is there)."""

    name: str
    template: dict
    threads: int
    registers: int
    spill_bytes: int
    log: str
    sass: str = ""

    def instruction_mix(self) -> Counter:
        """SASS opcodes (without modifiers) over the whole kernel."""
        ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", self.sass, re.M)
        return Counter(ops)


def _toolkit() -> Path:
    """The root of NVIDIA's CUDA 13 wheels (nvidia/cu13: lib, include, bin)."""
    try:
        import nvidia  # namespace package of NVIDIA's wheels
    except ImportError as exc:
        raise RuntimeError("needs NVIDIA's nvrtc wheels: pip install -e '.[kernels]'") from exc
    for base in nvidia.__path__:
        root = Path(base) / "cu13"
        if (root / "lib" / "libnvrtc.so.13").exists():
            return root
    raise RuntimeError("libnvrtc.so.13 not found: pip install -e '.[kernels]'")


def available() -> bool:
    """Whether NVRTC and the CUDA headers this needs are installed."""
    try:
        root = _toolkit()
    except RuntimeError:
        return False
    inc = root / "include"
    return all((inc / h).exists() for h in ("cuda_bf16.h", "crt/host_defines.h", "cooperative_groups.h")) \
        and _cccl(root) is not None


def _cccl(root: Path) -> Path | None:
    for cand in (root / "include" / "cccl", root / "include"):
        if (cand / "cuda" / "std" / "array").exists():
            return cand
    return None


@functools.lru_cache(maxsize=1)
def _nvrtc():
    return ctypes.CDLL(str(_toolkit() / "lib" / "libnvrtc.so.13"))


@functools.lru_cache(maxsize=1)
def _stub_dir() -> str:
    d = Path(tempfile.mkdtemp(prefix="kernel_sass_"))
    (d / "mlx/backend/cuda/device").mkdir(parents=True)
    (d / "mlx/backend/cuda/device/utils.cuh").write_text(_UTILS_STUB)
    return str(d)


def mlx_source(name: str, input_names, output_names, source: str, header: str, inputs,
               output_dtypes, template) -> str:
    """The CUDA source MLX builds for a custom kernel (custom_kernel.cpp, build_kernel)."""
    s = _MLX_HEADER + header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    s += f"__global__ void {name}(\n"
    for n, a in zip(input_names, inputs):
        s += f"    const {_TYPES[a.dtype]}* {n},\n"
        if a.ndim > 0:
            for suffix, kind in (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")):
                if n + suffix in source:
                    s += f"    const __grid_constant__ {kind} {n}{suffix},\n"
    for i, (n, d) in enumerate(zip(output_names, output_dtypes)):
        s += f"    {_TYPES[d]}* {n}" + (",\n" if i < len(output_names) - 1 else ") {\n")
    for k, v in template:
        if isinstance(v, bool):
            s += f"  constexpr bool {k} = {'true' if v else 'false'};\n"
        elif isinstance(v, int):
            s += f"  constexpr int {k} = {v};\n"
        else:
            s += f"  using {k} = {_TYPES[v]};\n"
    return s + "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n"


def compile_source(src: str, kernel: str, arch: str = ARCH) -> tuple[str, bytes | None]:
    """NVRTC's log (with ptxas's -v report) and the CUBIN, None if it did not compile."""
    lib, root = _nvrtc(), _toolkit()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{kernel}.cu".encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        args = [b"--device-as-default-execution-space", f"--gpu-architecture={arch}".encode(),
                f"--include-path={_stub_dir()}".encode(),
                f"--include-path={_cccl(root)}".encode(),
                f"--include-path={root / 'include'}".encode(), b"--ptxas-options=-v"]
        ok = lib.nvrtcCompileProgram(prog, len(args), (ctypes.c_char_p * len(args))(*args)) == 0
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if not ok:
            return log.value.decode(errors="replace"), None
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return log.value.decode(errors="replace"), cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _sass(cubin: bytes) -> str:
    tool = _toolkit() / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        # cuobjdump runs nvdisasm (the nvidia-cuda-nvdisasm wheel) from its own folder
        return subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                              env={"PATH": str(tool.parent)}).stdout


class _Recorder:
    """Stands in for mx.fast.cuda_kernel: keeps each launch, returns zeros."""

    def __init__(self, **kwargs):
        self.kwargs, self.launches = kwargs, []

    def __call__(self, *, inputs, output_shapes, output_dtypes, template=(), threadgroup=(1, 1, 1),
                 **_):
        self.launches.append((list(inputs), list(template), list(output_dtypes), threadgroup[0]))
        return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]


@contextmanager
def recording():
    """Every engine kernel built inside the block is a recorder (a list of them is yielded)."""
    from engine import (dequant, fused_ops, gemv, kernel_source, paged_decode, paged_prefill,
                        qgemm, qgemm_wgmma, qgemv)
    from loadtest import wgmma_phases
    modules = (kernel_source, dequant, fused_ops, gemv, paged_decode, paged_prefill, qgemm,
               qgemm_wgmma, qgemv, wgmma_phases)
    recorders = []

    def fake(*, source, header="", **kwargs):
        from engine.kernel_source import compact
        r = _Recorder(source=compact(source), header=compact(header), **kwargs)
        recorders.append(r)
        return r

    saved = {m: m.cuda_kernel for m in modules if hasattr(m, "cuda_kernel")}
    caches = [v for m in modules for v in vars(m).values() if hasattr(v, "cache_clear")]
    for c in caches:
        c.cache_clear()
    try:
        for m in saved:
            m.cuda_kernel = fake
        yield recorders
    finally:
        for m, f in saved.items():
            m.cuda_kernel = f
        for c in caches:
            c.cache_clear()


def _quantized(k: int, n: int, bits: int, dtype=mx.bfloat16) -> nn.QuantizedLinear:
    layer = nn.QuantizedLinear(k, n, bias=False, group_size=64, bits=bits)
    layer.scales = layer.scales.astype(dtype)
    layer.biases = layer.biases.astype(dtype)
    return layer


def _launch_qgemm():
    from engine import qgemm
    layer = _quantized(4096, 512, 4)
    for m in (16, 32, 64):
        qgemm.kernel_output(layer, mx.zeros((m, 4096), mx.bfloat16), splits=1)


def _launch_qgemm_wgmma():
    from engine import qgemm_wgmma
    layer = _quantized(4096, 512, 4)
    saved = qgemm_wgmma.WIDE_MIN_FEATURES, qgemm_wgmma.FUSED_SPLITS, qgemm_wgmma.PRODUCER_WARP
    try:  # both block widths (four warpgroups at 128 rows only, here on a narrow layer), the
        # form that adds up its K splits itself, and the one with a producer warp
        for qgemm_wgmma.FUSED_SPLITS, qgemm_wgmma.PRODUCER_WARP, splits in (
                (False, False, 1), (True, False, 2), (False, True, 1)):
            for qgemm_wgmma.WIDE_MIN_FEATURES in (saved[0], 512):
                for m in (64, 128):
                    qgemm_wgmma.kernel_output(layer, mx.zeros((m, 4096), mx.bfloat16), splits=splits)
    finally:
        qgemm_wgmma.WIDE_MIN_FEATURES, qgemm_wgmma.FUSED_SPLITS, qgemm_wgmma.PRODUCER_WARP = saved


def _launch_wgmma_phases():  # loadtest/wgmma_phases.py's marked copy of the wgmma kernel
    from engine import qgemm_wgmma
    from loadtest import wgmma_phases
    layer = _quantized(4096, 512, 4)
    saved = qgemm_wgmma.WIDE_MIN_FEATURES, qgemm_wgmma.PRODUCER_WARP
    try:
        for qgemm_wgmma.PRODUCER_WARP in (False, True):
            for qgemm_wgmma.WIDE_MIN_FEATURES in (saved[0], 512):
                for m in (64, 128):
                    wgmma_phases.run(layer, mx.zeros((m, 4096), mx.bfloat16), [])
    finally:
        qgemm_wgmma.WIDE_MIN_FEATURES, qgemm_wgmma.PRODUCER_WARP = saved


def _launch_qgemv():
    from engine import qgemv
    layer = _quantized(4096, 512, 4)
    for m in (1, 8):
        qgemv.qgemv(layer, mx.zeros((m, 4096), mx.bfloat16))


def _launch_decode():
    from engine import paged_decode
    g, kvh, d, bs = 64, 8, 128, 16
    pool = mx.zeros((64 * bs, kvh, d), mx.bfloat16)
    tables = mx.zeros((g, 64), mx.int32)
    q = mx.zeros((g, 32, d), mx.bfloat16)
    start, pos = mx.zeros((g,), mx.int32), mx.zeros((g,), mx.int32)
    for version in ("v2", "v3", "v4"):
        paged_decode.paged_decode_attention(q, pool, pool, tables, start, pos, bs, None,
                                            splits=2, version=version)


def _launch_decode_rope():
    from engine import paged_decode
    g, kvh, d, bs = 64, 8, 128, 16
    pool = mx.zeros((64 * bs, kvh, d), mx.bfloat16)
    qkv = mx.zeros((g, (32 + 2 * kvh) * d), mx.bfloat16)
    z = mx.zeros((g,), mx.int32)
    paged_decode.rope_store_decode_attention(qkv, pool, pool, mx.zeros((g, 64), mx.int32), z, z,
                                             z, 32, 1e6, bs, None)


def _launch_prefill():
    from engine import paged_prefill
    seqs, tiles = paged_prefill.chunk_layout([256], [0], [0])
    pool = mx.zeros((64 * 16, 8, 128), mx.bfloat16)
    paged_prefill.paged_prefill_attention(mx.zeros((256, 32, 128), mx.bfloat16), pool, pool,
                                          mx.zeros((1, 16), mx.int32), mx.array(seqs, mx.int32),
                                          mx.array(tiles, mx.int32), 16, None)


def _launch_fused():
    from engine import fused_ops
    x = mx.zeros((64, 4096), mx.bfloat16)
    norm = nn.RMSNorm(4096)
    norm.weight = norm.weight.astype(mx.bfloat16)
    fused_ops.add_rms_norm(x, x, norm, kernel=True)
    pos = mx.zeros((64,), mx.int32)
    fused_ops.qkv_rope(mx.zeros((64, 6144), mx.bfloat16), pos, 32, 8, 128, 1e6, kernel=True)
    fused_ops.swiglu(mx.zeros((64, 28672), mx.bfloat16), kernel=True)


def _launch_quant_other():
    from engine import dequant, gemv
    layer = _quantized(4096, 512, 4)
    dequant.dequantize(layer)
    gemv.gemv(layer, mx.zeros((2, 4096), mx.bfloat16))


LAUNCHES = {"qgemm": _launch_qgemm, "qgemm_wgmma": _launch_qgemm_wgmma, "qgemv": _launch_qgemv,
            "decode": _launch_decode, "decode_rope": _launch_decode_rope,
            "prefill": _launch_prefill, "fused": _launch_fused, "dequant_gemv": _launch_quant_other,
            "wgmma_phases": _launch_wgmma_phases}


def builds(kernels=tuple(LAUNCHES), arch: str = ARCH, sass: bool = True) -> list[Build]:
    """Compile every launch the named entry points make; a kernel that fails to build raises
    with NVRTC's log."""
    with recording() as recorders:
        for name in kernels:
            LAUNCHES[name]()
    jobs, seen = [], set()
    for r in recorders:
        kw = r.kwargs
        for inputs, template, dtypes, threads in r.launches:
            key = (kw["name"], repr(template), tuple(map(str, dtypes)),
                   tuple((str(a.dtype), a.ndim) for a in inputs))
            if key not in seen:
                seen.add(key)
                jobs.append((kw, inputs, template, dtypes, threads))

    def build(job) -> Build:
        kw, inputs, template, dtypes, threads = job
        src = mlx_source("k", kw["input_names"], kw["output_names"], kw["source"], kw["header"],
                         inputs, dtypes, template)
        log, cubin = compile_source(src, "k", arch)
        if cubin is None:
            raise RuntimeError(f"{kw['name']} {dict(template)} does not build:\n{log[-4000:]}")
        regs = re.search(r"Used (\d+) registers", log)
        spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        return Build(kw["name"], {k: v for k, v in template if isinstance(v, (int, bool))},
                     threads, int(regs.group(1)) if regs else -1, sum(spills), log,
                     _sass(cubin) if sass else "")
    # NVRTC runs outside the GIL (ctypes releases it), so the compiles share the cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(build, jobs))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default=",".join(LAUNCHES))
    ap.add_argument("--arch", default=ARCH)
    ap.add_argument("--sass", help="write each kernel's SASS to this folder")
    ap.add_argument("--top", type=int, default=12, help="opcodes shown per kernel")
    a = ap.parse_args(argv)
    for i, b in enumerate(builds(a.kernels.split(","), a.arch)):
        mix = b.instruction_mix()
        print(f"{b.name} {b.template} threads {b.threads}: {b.registers} registers, "
              f"{b.spill_bytes} spill bytes, {sum(mix.values())} instructions")
        print("   " + ", ".join(f"{op} {n}" for op, n in mix.most_common(a.top)))
        if a.sass:
            Path(a.sass).mkdir(parents=True, exist_ok=True)
            (Path(a.sass) / f"{i:02d}-{b.name}.sass").write_text(b.sass)


if __name__ == "__main__":
    main()
