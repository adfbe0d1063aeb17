"""Where the 4-bit wgmma GEMM's K steps spend their time, read from clock64() inside the kernel.

    python -m loadtest.wgmma_phases [--rows 64,128] [--shapes gate|up,down,qkv,o] [--producer]

engine/qgemm_wgmma.py's kernel with marks added: one lane of each warpgroup adds up the
cycles between consecutive marks, by what it did between them:
  data     waiting for its cp.async copies of the next step (cp.async.wait_group), or with
           --producer (PRODUCER_WARP) for the producer warp's, on the stage's mbarrier
  barrier  the proxy fence and the block's barrier (every warpgroup's copies have landed)
  loads    issuing the copies of a later step (none with --producer)
  unpack   turning a chunk's packed weights into wgmma's A registers
  issue    issuing a chunk's wgmmas
  wait     wgmma.wait_group: the tensor cores are behind
  other    the prologue before the first step and the store after the last
Printed per layer and row count: each phase's cycles per K step (mean over warpgroups), the
whole kernel's cycles per step, and the kernel's time (CUPTI) with and without the marks.
A mark is a clock read and an add; the compiler may move arithmetic across it (not the
asynchronous copies, barriers and wgmmas, which are volatile asm as the clock read is), so
the split is a guide to where a step waits. kernel_ablate's cuts time the kernel as written.
"""

from __future__ import annotations

import argparse
import functools

import mlx.core as mx
import numpy as np

from engine import qgemm_wgmma
from engine.kernel_source import cuda_kernel
from loadtest import settings
from loadtest.kernel_ablate import COPIES, _cut, kernel_us, layer_copies

PHASES = ("data", "barrier", "loads", "unpack", "issue", "wait", "other")
NP = len(PHASES) + 2  # the phases, the kernel's cycles from first mark to last, its K steps

# (old, new) pairs: each mark's place in qgemm_wgmma.SOURCE.
MARKS = (
    "    float acc[BM / 2];\n",
    "    float acc[BM / 2];\n"
    "    enum { DATA, BARRIER, LOADS, UNPACK, ISSUE, WAIT, OTHER };\n"
    "    long long phase[OTHER + 1] = {};\n"
    "    long long mark = clock64();\n"
    "    const long long begin = mark;\n"
    "    auto tick = [&](int p) { const long long now = clock64(); phase[p] += now - mark; mark = now; };\n",

    "    auto arrive = [&](int i) {\n",
    "    auto arrive = [&](int i) {\n        tick(OTHER);\n",

    "            mbar_wait(full + i % STAGES, (i / STAGES) & 1);\n",
    "            mbar_wait(full + i % STAGES, (i / STAGES) & 1);\n            tick(DATA);\n",

    "            cp_async_wait<STAGES - 3>();\n            fence_async_smem();\n            __syncthreads();\n",
    "            cp_async_wait<STAGES - 3>();\n            tick(DATA);\n"
    "            fence_async_smem();\n            __syncthreads();\n            tick(BARRIER);\n",

    "            cp_async_commit();\n        }\n    };\n",
    "            cp_async_commit();\n            tick(LOADS);\n        }\n    };\n",

    "        unpack(smem, 0, k_begin);\n",
    "        unpack(smem, 0, k_begin);\n        tick(UNPACK);\n",

    "            wgmma_commit();\n",
    "            wgmma_commit();\n            tick(ISSUE);\n",

    "                wgmma_wait<CB - 1>();\n                unpack(base, q + 1, k0);\n",
    "                wgmma_wait<CB - 1>();\n                tick(WAIT);\n"
    "                unpack(base, q + 1, k0);\n                tick(UNPACK);\n",

    "done\n                arrive(i + 1);\n                unpack(smem + ((i + 1) % STAGES) * STAGE, 0, k0 + BK);\n",
    "done\n                tick(WAIT);\n                arrive(i + 1);\n"
    "                unpack(smem + ((i + 1) % STAGES) * STAGE, 0, k0 + BK);\n                tick(UNPACK);\n",

    "    wgmma_wait<0>();\n    acc_fence<BM / 2>(acc);\n",
    "    wgmma_wait<0>();\n    tick(WAIT);\n    acc_fence<BM / 2>(acc);\n",
)

# After the store: lane 0 of each warpgroup writes its sums to prof[block][warpgroup].
_REPORT = r"""
    tick(OTHER);
    if ((tid & 127) == 0) {
        const long block = ((long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
        int* out = prof + (block * WG + (tid >> 7)) * NP;
        #pragma unroll
        for (int p = 0; p <= OTHER; ++p) out[p] = (int)phase[p];
        out[OTHER + 1] = (int)(mark - begin);
        out[OTHER + 2] = steps;
    }
"""


def instrumented_source() -> str:
    """qgemm_wgmma.SOURCE with the marks (it fails loudly if a mark no longer finds its line)."""
    return _cut(qgemm_wgmma.SOURCE, *MARKS) + _REPORT.replace("NP", str(NP))


@functools.lru_cache(maxsize=None)
def _kernel(smem: int):
    return cuda_kernel(name=f"wgmma_phases_{smem}", input_names=["x", "w", "scales", "biases"],
                       output_names=["y", "prof"], source=instrumented_source(),
                       header=qgemm_wgmma.HEADER, shared_memory=smem)


def run(layer, x, sink: list):
    """The instrumented kernel launched as the engine launches its own (kernel_output: the same
    template, grid and splits), its marks' sums appended to `sink`; returns the kernel's y."""
    def build(smem):
        def launch(*, grid, threadgroup, output_shapes, output_dtypes, **kw):
            blocks = grid[0] // threadgroup[0] * grid[1] * grid[2]
            out = _kernel(smem)(grid=grid, threadgroup=threadgroup,
                                output_shapes=list(output_shapes) + [(blocks, threadgroup[0] // 128, NP)],
                                output_dtypes=list(output_dtypes) + [mx.int32], **kw)
            sink.append(out[1])
            return out[:1]
        return launch
    return qgemm_wgmma.kernel_output(layer, x, build=build)


def summary(prof: np.ndarray) -> dict[str, float]:
    """Cycles per K step: each phase's and the whole kernel's ("total"), means over warpgroups."""
    prof = prof.reshape(-1, NP).astype(np.float64)
    steps = np.maximum(prof[:, -1], 1)
    out = {name: float(np.mean(prof[:, p] / steps)) for p, name in enumerate(PHASES)}
    out["total"] = float(np.mean(prof[:, -2] / steps))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64,128")
    ap.add_argument("--shapes", default="gate|up,down,qkv,o")
    ap.add_argument("--producer", action="store_true", help="the form with a producer warp (WS)")
    a = ap.parse_args(argv)
    with settings.constants({(qgemm_wgmma, "PRODUCER_WARP"): a.producer}):
        _profile(a)


def _profile(a) -> None:
    for name, k, n, layers in layer_copies(a.shapes):
        for rows in (int(r) for r in a.rows.split(",")):
            x = mx.random.normal((rows, k)).astype(mx.bfloat16)
            sink: list = []
            plain = kernel_us(lambda i: qgemm_wgmma.kernel_output(layers[i % COPIES], x))
            marked = kernel_us(lambda i: run(layers[i % COPIES], x, sink))
            cycles = summary(np.array(sink[-1]))
            split = " | ".join(f"{p} {cycles[p]:6.0f}" for p in PHASES)
            print(f"{name} ({k} -> {n}), {rows} rows, cycles a K step: {split} | total "
                  f"{cycles['total']:6.0f}; kernel {plain:.1f} us, with the marks {marked:.1f} us",
                  flush=True)


if __name__ == "__main__":
    main()
