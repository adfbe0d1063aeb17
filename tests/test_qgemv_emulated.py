"""engine/qgemv.py's CUDA kernel run on the CPU by thread emulation (tests/cuda_emulator.py),
with mma.sync emulated per the PTX fragment layout: 1-8 rows, 4- and 8-bit unpacking, group
scales, warps splitting K with steps left over, features past N, against a double-precision
reference. tests/test_qgemv.py checks the real kernel against MLX on a GPU."""

import pytest

from tests import cuda_emulator

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ (C++20)")

BF16_OUT = 5e-3  # outputs are stored as bf16: 2^-8 relative rounding, plus float accumulation


def test_qgemv_kernel_matches_reference(tmp_path):
    results = cuda_emulator.run_qgemv(tmp_path)
    direct = [r for r in results if r[0].startswith("qgemv")]
    staged = [r for r in results if r[0].startswith("staged")]
    assert len(direct) == 8 and {c.split()[0] for c, _ in direct} == {"qgemv4", "qgemv8"}
    assert len(staged) == 7 and {c.split()[0] for c, _ in staged} == {"staged4", "staged8"}
    for cases in (direct, staged):
        assert {int(c.split(" M ")[1].split()[0]) for c, _ in cases} >= {1, 8}
        assert {c.split(" NW ")[1].split()[0] for c, _ in cases} >= {"1", "2", "4"}
    # staged: x in shared memory for 1-8 rows and read from global memory (XR 0)
    assert {c.split(" XR ")[1].split()[0] for c, _ in staged} == {"0", "1", "2", "4", "8"}
    # the SwiGLU epilogue: staged at one row (x staged or global), direct at 3 and 8 rows
    swiglu = [c for c, _ in results if c.startswith("swiglu")]
    assert len(swiglu) == 4 and {c.split()[1] for c in swiglu} == {"staged4", "staged8", "qgemv4"}
    bad = [r for r in results if not r[1] < BF16_OUT]
    assert not bad, bad


@pytest.mark.parametrize("wrong, right", [
    ("const float uf = static_cast<float>(static_cast<T>(acc[e + 2]));",
     "const float uf = static_cast<float>(static_cast<T>(acc[e]));"),  # up read from the gate
    ("const long col = n0 / 2 + g;", "const long col = n0 + g;"),  # gate|up tile to the wrong outputs
    ("const int row = 2 * t + e;", "const int row = 2 * t;"),      # odd rows overwrite even
])
def test_emulation_catches_broken_swiglu_epilogue(tmp_path, monkeypatch, wrong, right):
    from engine import qgemv
    for name in ("SOURCE", "SOURCE_STAGED"):
        source = getattr(qgemv, name)
        assert wrong in source
        monkeypatch.setattr(qgemv, name, source.replace(wrong, right, 1))
    results = [r for r in cuda_emulator.run_qgemv(tmp_path) if r[0].startswith("swiglu")]
    assert results and max(err for _, err in results) > 5e-2


BROKEN_DIRECT = [
    ("{p0[0], p1[0], p0[1], p1[1]}", "{p1[0], p0[0], p0[1], p1[1]}"),  # A's feature rows swapped
    ("b1[2] = {xv.z, xv.w}", "b1[2] = {xv.x, xv.y}"),          # second mma on the first's x
    ("s0 += NW * U", "s0 += U"),                               # warps redo each other's steps
    ("const int s = s0 + u * NW;", "const int s = s0 + u;"),   # loads and arithmetic disagree
    ("acc[e] += red[v][lane][e]", "acc[e] = red[v][lane][e]"),  # warp 0's own sums dropped
    ("const int row = 2 * t + (e & 1);", "const int row = 2 * t;"),  # odd rows overwrite even
    ("sc[f0 * (K / GS) + k / GS]", "sc[f0 * (K / GS)]"),       # every step uses group 0's scale
    ("x + (long)min(g, M - 1) * K", "x + (long)min(t, M - 1) * K"),  # B's column from t
]


def test_emulation_catches_broken_bookkeeping(tmp_path):
    from engine import qgemv
    programs = cuda_emulator.mutants(qgemv, "SOURCE", BROKEN_DIRECT, cuda_emulator.qgemv_source)
    for pair, results in zip(BROKEN_DIRECT, cuda_emulator.run_all(tmp_path, programs, cuda_emulator.rel_errs)):
        assert results and max(err for _, err in results) > 5e-2, pair


BROKEN_STAGED = [
    ("cp_async<16>(slot + r * W_ROW + wswz(ch, r) * 16", "cp_async<16>(slot + r * W_ROW + ch * 16"),  # writer unswizzled
    ("const int c = warp + i * NW;", "const int c = warp + i;"),  # chunks of other warps
    ("unsigned char* slot = ring + (i % S) * SLOT;", "unsigned char* slot = ring + ((i + 1) % S) * SLOT;"),  # copy to the wrong slot
    ("sb[g * 8 + gi], s1", "sb[g * 8], s1"),                        # every step uses group 0's scale
    ("(lane < 16 ? scales : biases)", "(lane < 16 ? biases : scales)"),  # scales and biases swapped
    ("xswz(sc * 16 + 4 * t + j, xrow) * 16", "xswz(sc * 16 + 4 * t, xrow) * 16"),  # one x piece for all four
    ("const int xrow = min(g, M - 1);", "const int xrow = min(t, M - 1);"),  # B's column from t
    ("ok ? x + r * K + (long)c * (C * 128)", "ok ? x + (long)c * (C * 128)"),  # every row staged from row 0
    ("x + (long)xrow * K + k0 + sc * 128", "x + k0 + sc * 128"),  # global path: every row reads row 0
]


def test_emulation_catches_broken_staging(tmp_path):
    # a broken kernel may also crash the emulation (reads out of bounds): fewer results
    from engine import qgemv
    programs = cuda_emulator.mutants(qgemv, "SOURCE_STAGED", BROKEN_STAGED, cuda_emulator.qgemv_source)
    for pair, results in zip(BROKEN_STAGED, cuda_emulator.run_all(tmp_path, programs, cuda_emulator.rel_errs)):
        staged = [r for r in results if r[0].startswith("staged")]
        assert len(staged) < 7 or max(err for _, err in staged) > 5e-2, pair
