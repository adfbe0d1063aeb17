"""The CUDA decode kernels' logic, run on the CPU by thread emulation (tests/cuda_emulator.py).

Complements tests/test_paged_kernel.py, which runs the real kernels but only on a GPU: here
every push runs the same kernel source against a double-precision reference, for windows
(none, shorter than a block, longer), sequences starting mid-table, and 1, 3 and 8 key splits,
for each version (v3: the staged kernel, its ring of STAGES slots wrapping).
"""

import pytest

from tests import cuda_emulator

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ (C++20)")


@pytest.mark.parametrize("v_batch", [0, 8, 16])  # v2's V rows: unrolled loop / loaded in batches
def test_decode_kernel_logic_matches_reference(tmp_path, v_batch):
    results = cuda_emulator.run(tmp_path, ("v1", "v2", "v3"), v_batch)
    assert {(v, w, s) for v, w, s, _ in results} == {
        (v, w, s) for v in ("v1", "v2", "v3") for w in (0, 7, 50) for s in (1, 3, 8)} | {
        (r, w, 1) for r in ("rope", "ropev3") for w in (0, 7, 50)}  # RoPE + K/V write forms
    bad = [r for r in results if not r[3] < 1e-4]
    assert not bad, bad


def test_emulation_catches_a_broken_kernel(tmp_path, monkeypatch):
    # Without rescaling the accumulator when the running max grows, the output is wrong.
    from engine import paged_decode
    broken = paged_decode._BODY.replace("acc[h][i] = acc[h][i] * corr + e", "acc[h][i] = acc[h][i] + e")
    assert broken != paged_decode._BODY
    monkeypatch.setattr(paged_decode, "_BODY", broken)
    results = cuda_emulator.run(tmp_path, ("v1",))
    assert any(err > 1e-2 for _, _, _, err in results)


def test_emulation_catches_broken_rope_forms(tmp_path):
    from engine import paged_decode
    broken = [
        ("if (h <= GQA) {", "if (h < GQA) {"),                       # K written without RoPE
        ("KVH * GQA + (h - GQA) * KVH + g", "KVH * GQA + g"),        # V written from K's head
        ("((long)slots[b] * KVH + g) * D", "((long)slots[b] * KVH) * D"),  # every head to head 0
    ]
    programs = cuda_emulator.mutants(paged_decode, "_Q_ROPE_STORE", broken,
                                     lambda: cuda_emulator.source(("v2",), 8))
    for pair, results in zip(broken, cuda_emulator.run_all(tmp_path, programs, cuda_emulator.decode_errs)):
        rope = [r for r in results if r[0] == "rope"]
        assert rope and max(err for *_, err in rope) > 1e-2, pair


def test_emulation_catches_broken_staged_kernels_and_tile_copies(tmp_path):
    from engine import paged_decode
    broken = [
        ("for (int c = half; c < CH; c += 2)", "for (int c = 0; c < CH; c += 2)"),  # odd chunks unscored
        ("const bool valid = first + it * STEP + j <= hi;", "const bool valid = true;"),  # keys past hi
        ("const T* ks = ring + (it % STAGES) * SLOT;", "const T* ks = ring;"),  # always slot 0
        # the ring copy v3 and v4 share (_RING_ISSUE, filled into both bodies)
        ("(TILE + 32 / CH * i) * RS, v_pool", "(32 / CH * i) * RS, v_pool"),  # V rows over K rows
        ("__shfl_sync(0xffffffff, row, r)", "__shfl_sync(0xffffffff, row, i)"),  # another key's row
        ("(KVH * D) + copy_from", "(KVH * D)"),                     # every lane copies chunk 0 of head 0
    ]
    programs = cuda_emulator.mutants(paged_decode, "_BODY_V3", broken,
                                     lambda: cuda_emulator.source(("v3",)))
    for pair, results in zip(broken, cuda_emulator.run_all(tmp_path, programs, cuda_emulator.decode_errs)):
        assert results and max(err for *_, err in results) > 1e-3, pair


def test_staged_launch_fits_shared_memory():
    # v3's rings are dynamic shared memory: at the engine's warps and slots they must fit a
    # block on sm_90 (227 KB) for every head size and dtype the engine serves, with room
    # for the static q_s / p_s (GQA 4: 2 KB + 0.5 KB a warp at most here).
    import mlx.core as mx

    from engine import paged_decode
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        for head_dim in (64, 128, 256):
            ring = paged_decode.staged_smem(paged_decode.STAGED_WARPS, head_dim, dtype)
            static = 4 * head_dim * 4 + paged_decode.STAGED_WARPS * 4 * 16 * 4
            assert ring + static <= 227 * 1024, (dtype, head_dim, ring)
    # bf16, 7B: four blocks an SM (228 KB, 1 KB reserved a block), so 512 blocks in one wave
    ring = paged_decode.staged_smem(paged_decode.STAGED_WARPS, 128, mx.bfloat16)
    assert 4 * (ring + 2048 + 512 + 1024) <= 228 * 1024


# v4 (tensor cores) runs on bf16 data, so it is held to bf16's precision: its outputs are
# rounded to bf16 (half an ulp is 2e-3 at 0.5) and P to bf16 for its mma. Correct runs
# stay under 8e-3; each broken form below misses by more than 3e-2.
TC_TOL = 1.5e-2


def test_tensor_core_kernel_matches_reference(tmp_path):
    results = cuda_emulator.run_decode_tc(tmp_path)
    assert len(results) == 24  # 6 shapes x (splits 1, 3, 8 and the ROPE form)
    bad = [r for r in results if not r[1] < TC_TOL]
    assert not bad, bad


def test_emulation_catches_broken_tensor_core_kernels(tmp_path):
    from engine import paged_decode
    broken = [
        ("for (int n = 0; n < NO; ++n) { o[n][0] *= corr; o[n][1] *= corr; }", ""),  # no rescale
        ("t0 + 8 * n + 2 * fc + e <= hi ?", "true ?"),  # keys past hi scored
        ("const T* st = ring + (it % STAGES) * SLOT;", "const T* st = ring;"),  # always slot 0
        ("m_run * 0.6931471805599453f", "m_run"),  # base-2 maxima merged as natural ones
        ("ldsm_x4_t(vb, st + v_row + n * 8);", "ldsm_x4(vb, st + v_row + n * 8);"),  # V not transposed
    ]
    programs = cuda_emulator.mutants(paged_decode, "_BODY_V4", broken, cuda_emulator.decode_tc_source)
    for pair, results in zip(broken, cuda_emulator.run_all(tmp_path, programs, cuda_emulator.max_errs)):
        assert results and max(err for _, err in results) > 2 * TC_TOL, pair
