"""engine/dequant.py's CUDA kernel run on the CPU by thread emulation (tests/cuda_emulator.py):
4- and 8-bit unpacking, group scales and biases, 16-byte stores and a part-idle last block,
against a double-precision reference. tests/test_dequant.py runs the real kernel on a GPU."""

import pytest

from tests import cuda_emulator

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ (C++20)")


def test_dequantize_kernel_matches_reference(tmp_path):
    results = cuda_emulator.run_dequant(tmp_path)
    assert len(results) == 4 and {c.split()[0] for c, _ in results} == {"dequant4", "dequant8"}
    bad = [r for r in results if not r[1] < 1e-6]
    assert not bad, bad


def test_emulation_catches_a_wrong_group(tmp_path, monkeypatch):
    # Every chunk reading its row's first group's scale and bias gives wrong values.
    from engine import dequant
    broken = dequant.SOURCE.replace("n * (K / GS) + k / GS", "n * (K / GS)")
    assert broken != dequant.SOURCE
    monkeypatch.setattr(dequant, "SOURCE", broken)
    results = cuda_emulator.run_dequant(tmp_path)
    assert len(results) == 4 and all(err > 1e-2 for _, err in results)
