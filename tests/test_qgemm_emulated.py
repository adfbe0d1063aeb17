"""engine/qgemm.py's CUDA kernel run on the CPU by thread emulation (tests/cuda_emulator.py),
with mma.sync emulated per the PTX fragment layout: tiles, zero-filled rows past M, features
past N, 4- and 8-bit unpacking, group scales, against a double-precision reference. The
emulation checks the kernel's bookkeeping, not the layout itself, which is transcribed into
both; tests/test_qgemm.py checks the real kernel against MLX on a GPU."""

import pytest

from tests import cuda_emulator

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ (C++20)")

BF16_OUT = 5e-3  # outputs are stored as bf16: 2^-8 relative rounding, plus float accumulation


def test_qgemm_kernel_matches_reference(tmp_path):
    results = cuda_emulator.run_qgemm(tmp_path)
    assert len(results) == 13 and {c.split()[0] for c, _ in results} == {"qgemm4", "qgemm8"}
    assert {c.split("splits ")[1] for c, _ in results} == {"1", "2", "4"}
    assert {c.split("BM ")[1].split()[0] for c, _ in results} == {"16", "32", "64", "128"}
    assert {c.split("WN ")[1].split()[0] for c, _ in results} == {"16", "32"}
    assert {c.split("kw ")[1].split()[0] for c, _ in results} == {"1", "2"}
    bad = [r for r in results if not r[1] < BF16_OUT]
    assert not bad, bad


# Each pair breaks qgemm's SOURCE or, where SOURCE lacks it, its UNPACK.
QGEMM_BROKEN = [
    ("const int r = xt * 8 + g, ch", "const int r = g, ch"),   # every row tile reads rows 0-7
    ("{lo[0], hi[0], lo[1], hi[1]}", "{lo[0], lo[0], lo[1], lo[1]}"),  # features g+8 from g
    ("mma16816<BF16>(acc[ft][xt], a1, xb[xt] + 2)", "mma16816<BF16>(acc[ft][xt], a1, xb[xt])"),
    ("g + (e >> 1) * 8;", "g;"),                              # tile's features g+8 stored as g
    ("x + (long)(m0 + xr) * K", "x + (long)xr * K"),        # a second row tile re-reads the first
    ("(long)i * W_STEP * (K / PER_WORD)", "(long)i * W_STEP"),  # a thread's later weight rows
    ("k_begin = blockIdx.z * k_len", "k_begin = 0 * k_len"),  # every split sums the first part
    ("load(next % STAGES", "load(i % STAGES"),                # the ring overwrites the live stage
    ("(xch ^ ((xch >> 3) << 1) ^ (xr & 1)) * 16", "xch * 16"),  # x's swizzle mismatch
    ("__byte_perm(w, w4, 0x7531)", "__byte_perm(w, w4, 0x5410)"),  # 4-bit pair (q2, q3) misbuilt
    ("+ 32 * t / GS;", ";"),                                   # every lane reads group 0's scale
    ("& (SB - 1)) + 32 * t / GS", "& 0) + 32 * t / GS"),   # 128-wide groups at odd offsets
    ("const int j = kw * PIECES + jj;", "const int j = jj;"),   # both warp groups on one half
    ("acc[ft][xt][e] += red[", "acc[ft][xt][e] = red["),        # group 0's own sums dropped
]


def test_emulation_catches_broken_bookkeeping(tmp_path):
    from engine import qgemm
    in_source = [p for p in QGEMM_BROKEN if p[0] in qgemm.SOURCE]
    in_unpack = [p for p in QGEMM_BROKEN if p[0] not in qgemm.SOURCE]
    programs = cuda_emulator.mutants(qgemm, "SOURCE", in_source, cuda_emulator.qgemm_source) \
        + cuda_emulator.mutants(qgemm, "UNPACK", in_unpack, cuda_emulator.qgemm_source)
    runs = cuda_emulator.run_all(tmp_path, programs, cuda_emulator.rel_errs)
    for pair, results in zip(in_source + in_unpack, runs):
        assert results and max(err for _, err in results) > 5e-2, pair


def test_wgmma_kernel_matches_reference(tmp_path):
    results = cuda_emulator.run_qgemm_wgmma(tmp_path)
    producer = [r for r in results if "producer" in r[0]]
    plain = [r for r in results if "fused" not in r[0] and "producer" not in r[0]]
    assert len(producer) == 3 and {c.split("WG ")[1].split()[0] for c, _ in producer} == {"2", "4"}
    assert {c.split("BM ")[1].split()[0] for c, _ in producer} == {"64", "128"}
    assert len(plain) == 9 and {c.split("BM ")[1].split()[0] for c, _ in plain} == {"64", "128"}
    assert {c.split("WG ")[1].split()[0] for c, _ in plain} == {"2", "4"}
    assert {c.split("splits ")[1] for c, _ in plain} == {"1", "2", "4"}
    # the fused form: every split case, launched twice on the same counters
    assert len(results) - len(plain) - len(producer) == 2 * sum(c.split("splits ")[1] != "1" for c, _ in plain)
    bad = [r for r in results if not r[1] < BF16_OUT]
    assert not bad, bad


WGMMA_FUSED_BROKEN = [
    ("if (last) *count = 0;", ""),                               # counters left set: the next launch never sums
    ("== (int)gridDim.z - 1;", "== (int)gridDim.z;"),            # no block ever the last: y never written
    ("for (int z = 0; z < (int)gridDim.z; ++z)", "for (int z = 1; z < (int)gridDim.z; ++z)"),  # split 0 left out
    ("const int row = m0 + idx / QUADS", "const int row = idx / QUADS"),  # the second row tile sums the first
    ("y[at[u] + 3] = static_cast<O>(sum[u].w);", ""),                   # a quad's last feature never written
]


# Blocks run one after another in the emulation, so a block that sums a tile's partials
# before the other splits have written them is not caught here (the device tests run it).
def test_wgmma_emulation_catches_broken_fused_sums(tmp_path):
    from engine import qgemm_wgmma
    programs = cuda_emulator.mutants(qgemm_wgmma, "SOURCE_FUSED", WGMMA_FUSED_BROKEN,
                                     cuda_emulator.qgemm_wgmma_source)
    runs = cuda_emulator.run_all(tmp_path, programs, cuda_emulator.rel_errs, ("fused",))
    for pair, results in zip(WGMMA_FUSED_BROKEN, runs):
        fused = [err for case, err in results if "fused" in case]
        assert fused and not all(err < 5e-2 for err in fused), pair  # NaN (y never written) fails too


WGMMA_BROKEN = [
    ("(((c % 8) ^ (r % 8)) * 16)", "((c % 8) * 16)"),        # x stored unswizzled
    ("(kk % 4) * 32, 1024)", "(kk % 4) * 16, 1024)"),           # slabs 16 bytes apart, not 32
    ("(kk / 4) * (BM * 128)", "(kk % 2) * (BM * 128)"),         # the wrong atom-column
    ("const int r0 = 16 * warp + g;", "const int r0 = 16 * (warp % 4) + g;"),  # both warpgroups on features 0-63
    ("const unsigned sel = t | ((t + 4) << 4);", "const unsigned sel = 0x40;"),  # every lane takes byte 0
    ("a0[1] = hi[0];", "a0[1] = lo[0];"),                      # features g + 8 from g
    ("a1[0] = lo[2];", "a1[0] = lo[0];"),                      # slab 2q + 1 from slab 2q
    ("+ 32 * q / GS;", ";"),                                   # one scale for the whole step
    ("const int col = n0 + r0 + (e >> 1) * 8;", "const int col = n0 + r0;"),  # rows g + 8 stored as g
    ("(x_ok[i] ? m0 + xr + i * X_RSTEP : 0)", "(x_ok[i] ? xr + i * X_RSTEP : 0)"),  # second row tile re-reads the first
    ("k_begin = blockIdx.z * k_len", "k_begin = 0 * k_len"),  # every split sums the first part
    ("load(next % STAGES", "load(i % STAGES"),                # the ring overwrites the live stage
    # the pipelining: a pending wgmma's A registers or stage rewritten, the last group not waited for
    ("wgmma_wait<CB - 1>();\n                unpack(", "wgmma_wait<CB>();\n                unpack("),
    ("wgmma_wait<CB - 1>();  // this step's", "wgmma_wait<CB>();  // this step's"),
    ("    wgmma_wait<0>();\n    acc_fence", "    wgmma_wait<1>();\n    acc_fence"),
]


def test_wgmma_emulation_catches_broken_kernels(tmp_path):
    from engine import qgemm_wgmma
    programs = cuda_emulator.mutants(qgemm_wgmma, "SOURCE", WGMMA_BROKEN,
                                     cuda_emulator.qgemm_wgmma_source)
    # the descriptor's fields as the PTX ISA lays them out: SBO from bit 32
    programs += cuda_emulator.mutants(qgemm_wgmma, "DESC", [("<< 32)", "<< 30)")],
                                      cuda_emulator.qgemm_wgmma_source)
    runs = cuda_emulator.run_all(tmp_path, programs, cuda_emulator.rel_errs, ("plain",))
    for pair, results in zip(WGMMA_BROKEN + [("<< 32)", "<< 30)")], runs):
        assert results and max(err for _, err in results) > 5e-2, pair


# The producer warp's copies (WS; PRODUCER_WARP), run on the cases that have one. A broken
# hand-over (a wait skipped, a phase's parity wrong) hangs here rather than miscomputing, as it
# may on the GPU, so it is left to the device test.
WGMMA_WS_BROKEN = [
    ("produce(j % STAGES, k_begin + j * BK, tid - THREADS);",
     "produce(j % STAGES, k_begin + j * BK, 0);"),                         # every lane copies lane 0's chunks
    ("x + (long)(ok ? m0 + r : 0) * K + k0", "x + (long)(ok ? r : 0) * K + k0"),  # second row tile reads the first's x
    ("copy_scales(base, r, (long)(n0 + r) * (K / GS), k0);", "copy_scales(base, r, (long)(n0 + r) * (K / GS), 0);"),  # step 0's scales
]


def test_wgmma_emulation_catches_broken_producer_warp(tmp_path):
    from engine import qgemm_wgmma
    programs = cuda_emulator.mutants(qgemm_wgmma, "SOURCE", WGMMA_WS_BROKEN,
                                     cuda_emulator.qgemm_wgmma_source)
    runs = cuda_emulator.run_all(tmp_path, programs, cuda_emulator.rel_errs, ("ws",))
    for pair, results in zip(WGMMA_WS_BROKEN, runs):
        assert results and all("producer" in case for case, _ in results), pair
        assert max(err for _, err in results) > 5e-2, pair
