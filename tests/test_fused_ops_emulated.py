"""engine/fused_ops.py's CUDA kernels run on the CPU by thread emulation (tests/cuda_emulator.py).

tests/test_fused_ops.py runs the real kernels against MLX's ops, but only on a GPU; here every
push checks their logic (row and head indexing, RoPE pairing, the block-wide sum of squares,
idle threads of the last block) against a double-precision reference.
"""

import pytest

from tests import cuda_emulator

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ (C++20)")


def test_fused_kernels_match_reference(tmp_path):
    results = cuda_emulator.run_fused(tmp_path)
    assert [c.split()[0] for c, _ in results] == ["add_rms_norm"] * 3 + ["qkv_rope", "qkv_rope_store"] * 4 + ["swiglu"] * 4
    bad = [r for r in results if not r[1] < 1e-4]
    assert not bad, bad


def test_emulation_catches_wrong_rope_pairing(tmp_path, monkeypatch):
    # Pairing dim i with i + 2 instead of i + D/2 (its partner in this layout) is wrong here.
    from engine import fused_ops
    for name in ("qkv_rope", "qkv_rope_store"):
        src = fused_ops.SOURCES[name]
        broken = src.replace("src + i0 + P)", "src + i0 + 2)")
        assert broken != src
        monkeypatch.setitem(fused_ops.SOURCES, name, broken)
    results = dict(cuda_emulator.run_fused(tmp_path))
    rope = [err for case, err in results.items() if case.startswith("qkv_rope")]
    assert len(rope) == 8 and all(err > 1e-2 for err in rope)


def test_emulation_catches_a_wrong_pool_row(tmp_path, monkeypatch):
    # Writing K/V by token index instead of slot corrupts other sequences' rows.
    from engine import fused_ops
    src = fused_ops.SOURCES["qkv_rope_store"]
    broken = src.replace("(long)slots[t] * KVH", "t * KVH")
    assert broken != src
    monkeypatch.setitem(fused_ops.SOURCES, "qkv_rope_store", broken)
    results = dict(cuda_emulator.run_fused(tmp_path))
    store = [err for case, err in results.items() if case.startswith("qkv_rope_store")]
    assert len(store) == 4 and all(err > 1e-2 for err in store)
