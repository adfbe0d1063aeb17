"""engine/paged_prefill.py's CUDA kernel run on the CPU by thread emulation
(tests/cuda_emulator.py, mma.sync emulated per the PTX fragment layout): chunks over scrambled
blocks, part-filled tiles, a cached past, the sliding window and GQA, against a
double-precision softmax attention. tests/test_paged_prefill.py runs the real kernel on a GPU."""

import pytest

from tests import cuda_emulator

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ (C++20)")

# Outputs are bf16 (2^-8 relative) and so is P before it meets V; a key seen that should not
# be, or one missed, moves an output by ~0.1 or more.
BF16_OUT = 2e-2


def test_prefill_kernel_matches_reference(tmp_path):
    results = cuda_emulator.run_prefill(tmp_path)
    assert len(results) == 7
    assert {c.split("window ")[1].split()[0] for c, _ in results} == {"0", "24", "40", "200"}
    assert {c.split("BQ ")[1].split(" chunks")[0] for c, _ in results} == {
        "64 stages 2", "128 stages 2", "64 stages 1"}
    bad = [r for r in results if not r[1] < BF16_OUT]
    assert not bad, bad


BROKEN = [
    ("p > qp - WINDOW", "p >= qp - WINDOW"),                   # one key past the window seen
    ("const bool vis = p <= qp &&", "const bool vis = p <= qp + 1 &&"),  # the next token seen
    ("a[1] = pack2<BF16>(sc[2 * kk][2]", "a[1] = pack2<BF16>(sc[2 * kk][0]"),  # P rows mixed
    ("(lane & 7) * PITCH + (lane >> 3) * 8;", "(lane & 7) * PITCH + (lane >> 4) * 8;"),  # K dims
    ("((lane >> 3) & 1) * 8) * PITCH", "((lane >> 4) & 1) * 8) * PITCH"),  # V's keys 8-15 misread
    ("mma16816<BF16>(sc[j], qf[kk + 1], b + 2);", "mma16816<BF16>(sc[j], qf[kk + 1], b);"),
    ("load(stage ^ 1, kb + BKV)", "load(stage, kb + BKV)"),     # the next tile over the live one
    ("if (kb > k_lo) load(0, kb);", ";"),                       # one stage: never refilled
    ("if (kb + BKV - 1 <= pos0 + min(wr0", "if (kb <= pos0 + min(wr0"),  # a diagonal tile unmasked
    ("(WINDOW == 0 || kb > w_hi - WINDOW)) {", "(WINDOW == 0 || kb > w_lo - WINDOW)) {"),  # window too
    ("kb + BKV - 1 >= w_lo", "kb >= w_lo"),                     # a partly visible tile skipped
    ("o[j][2] *= cb; o[j][3] *= cb;", "o[j][2] *= ca; o[j][3] *= ca;"),  # row g+8 rescaled by g's max
    ("kvh = h / GQA", "kvh = h % KVH"),                         # query heads on the wrong KV head
    ("const int k_hi = pos0 + min(row0 + BQ, q_len) - 1;",
     "const int k_hi = pos0 + min(row0 + BQ / 2, q_len) - 1;"),  # a tile's last keys never loaded
]


def test_emulation_catches_broken_bookkeeping(tmp_path):
    from engine import paged_prefill
    programs = cuda_emulator.mutants(paged_prefill, "SOURCE", BROKEN, cuda_emulator.prefill_source,
                                     count=-1)
    # Two cases catch every one (windowed chunks of 1-130 queries over several key tiles; one
    # stage): a fraction of the full run's time.
    for pair, results in zip(BROKEN, cuda_emulator.run_all(tmp_path, programs, cuda_emulator.max_errs,
                                                           args=("15",))):
        assert len(results) == 2 and any(not e < BF16_OUT for _, e in results), (pair, results)
