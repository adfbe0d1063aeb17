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
    assert len(results) == 6 and {c.split()[0] for c, _ in results} == {"qgemm4", "qgemm8"}
    assert {c.split("splits ")[1] for c, _ in results} == {"1", "2", "4"}
    bad = [r for r in results if not r[1] < BF16_OUT]
    assert not bad, bad


@pytest.mark.parametrize("wrong, right", [
    ("p + 8 * LD + 8)", "p + 8 * LD)"),           # A's last register from the wrong row
    ("bf[nt][1] = *reinterpret_cast<const unsigned*>(p + 8)",
     "bf[nt][1] = *reinterpret_cast<const unsigned*>(p + 4)"),   # B's second k half misplaced
    ("x + (long)(m0 + row) * K", "x + (long)row * K"),  # a second row tile re-reads the first
    ("k_begin = blockIdx.z * k_len", "k_begin = 0 * k_len"),  # every split sums the first part
    ("if (k0 + BK < k_end) load(k0 + BK);", "if (k0 + BK < k_end) load(k0);"),  # no next step
])
def test_emulation_catches_broken_bookkeeping(tmp_path, monkeypatch, wrong, right):
    from engine import qgemm
    broken = qgemm.SOURCE.replace(wrong, right, 1)
    assert broken != qgemm.SOURCE
    monkeypatch.setattr(qgemm, "SOURCE", broken)
    results = cuda_emulator.run_qgemm(tmp_path)
    assert results and max(err for _, err in results) > 5e-2
