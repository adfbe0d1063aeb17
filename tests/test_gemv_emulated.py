"""engine/gemv.py's CUDA kernels run on the CPU by thread emulation (tests/cuda_emulator.py).

tests/test_gemv.py runs the real kernels against MLX's matmul, but only on a GPU; here every
push checks their logic (lane and unroll tails, partial last warps, 4- and 8-bit unpacking,
group scales and biases, 1 to 8 rows) against a double-precision reference.
"""

import pytest

from tests import cuda_emulator

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ (C++20)")


@pytest.mark.parametrize("fast_unpack", [False, True])  # I2F / float bits made by shift and mask
def test_gemv_kernels_match_reference(tmp_path, fast_unpack):
    results = cuda_emulator.run_gemv(tmp_path, fast_unpack)
    assert len(results) == 9 and {c.split()[0] for c, _ in results} == {"dense", "quant4", "quant8"}
    bad = [r for r in results if not r[1] < 1e-5]
    assert not bad, bad


def test_emulation_catches_a_broken_unpacking(tmp_path, monkeypatch):
    # Reading the packed values high bits first gives wrong products.
    from engine import gemv
    broken = gemv._QUANT.replace("(BITS * (j % PER_WORD))", "(32 - BITS - BITS * (j % PER_WORD))")
    assert broken != gemv._QUANT
    monkeypatch.setattr(gemv, "_QUANT", broken)
    results = cuda_emulator.run_gemv(tmp_path)
    quant = [err for case, err in results if case.startswith("quant")]
    assert len(quant) == 4 and all(err > 1e-2 for err in quant)


def test_emulation_catches_a_broken_fast_unpack(tmp_path, monkeypatch):
    from engine import gemv
    # Taking off 2^(BITS-1) sum(x) instead of 2^BITS sum(x) for the offset the trick adds.
    broken = gemv._QUANT.replace("(1u << BITS) * xsum", "(1u << (BITS - 1)) * xsum")
    assert broken != gemv._QUANT
    monkeypatch.setattr(gemv, "_QUANT", broken)
    quant = [err for case, err in cuda_emulator.run_gemv(tmp_path, fast_unpack=True)
             if case.startswith("quant")]
    assert len(quant) == 4 and all(err > 1e-3 for err in quant)
