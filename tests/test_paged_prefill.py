"""engine/paged_prefill.py's kernel on a GPU against the portable path (gather + SDPA with a
mask), as the engine's start-up self-check runs it; skipped without MLX's CUDA backend.
tests/test_paged_prefill_emulated.py checks the same source on the CPU."""

import mlx.core as mx
import pytest

from engine import paged_prefill
from engine.attention import prefill_kernel_matches_portable

gpu = pytest.mark.skipif(not paged_prefill.supported(128, mx.bfloat16),
                         reason="needs MLX's CUDA backend")


def test_chunk_layout():
    seqs, tiles = paged_prefill.chunk_layout([3, 64, 130], [0, 17, 5], [0, 16, 0])
    assert seqs.tolist() == [[0, 3, 0, 0], [3, 64, 17, 16], [67, 130, 5, 0]]
    assert tiles.tolist() == [[0, 0], [1, 0], [2, 0], [2, 64], [2, 128]]


def test_chunk_layout_heavy_first(monkeypatch):
    # Keys a tile reads: chunk 0: 0..2 (3); chunk 1: 16..80 (65); chunk 2's tiles 0..68 (69),
    # 0..132 (133), 0..134 (135); with window 50 (from its first query's window): 0..68,
    # 20..132 (113), 84..134 (51).
    monkeypatch.setattr(paged_prefill, "HEAVY_FIRST", True)
    _, tiles = paged_prefill.chunk_layout([3, 64, 130], [0, 17, 5], [0, 16, 0])
    assert tiles.tolist() == [[2, 128], [2, 64], [2, 0], [1, 0], [0, 0]]
    _, tiles = paged_prefill.chunk_layout([3, 64, 130], [0, 17, 5], [0, 16, 0], window=50)
    assert tiles.tolist() == [[2, 64], [2, 0], [1, 0], [2, 128], [0, 0]]


@gpu
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("window", [None, 40, 4096])
def test_kernel_matches_portable_7b_heads(dtype, window):
    assert prefill_kernel_matches_portable(32, 8, 128, 16, window, dtype)


@gpu
@pytest.mark.parametrize("block_size", [8, 32])
def test_kernel_matches_portable_other_shapes(block_size):
    assert prefill_kernel_matches_portable(4, 2, 32, block_size, 24, mx.bfloat16, seed=2)


@gpu
def test_self_check_fails_a_broken_kernel(monkeypatch):
    # One key past the window seen: the check the engine relies on must say so.
    broken = paged_prefill.SOURCE.replace("p > qp - WINDOW", "p >= qp - WINDOW")
    assert broken != paged_prefill.SOURCE
    monkeypatch.setattr(paged_prefill, "SOURCE", broken)
    paged_prefill._kernel.cache_clear()
    try:
        assert not prefill_kernel_matches_portable(32, 8, 128, 16, 40, mx.bfloat16)
    finally:
        paged_prefill._kernel.cache_clear()


def test_a_kernel_that_fails_to_build_leaves_the_portable_path(monkeypatch, caplog):
    """If the kernel does not compile or misses its self-check on some machine, the engine
    starts anyway, with prompt chunks on gather + SDPA, and says so."""
    from engine import runner
    from tests.tiny import tiny_model

    def broken(*args):
        raise RuntimeError("nvrtc: error")
    monkeypatch.setattr(paged_prefill, "supported", lambda head_dim, dtype: True)
    monkeypatch.setattr(runner, "prefill_kernel_matches_portable", broken)
    _, args, _ = tiny_model()
    cache = type("Cache", (), {"block_size": 16, "dtype": mx.bfloat16})()
    with caplog.at_level("INFO", logger="engine.runner"):
        assert runner._choose_prefill_kernel(args, cache) is False
    assert "nvrtc: error" in caplog.text and "portable gather + SDPA" in caplog.text
    monkeypatch.setattr(runner, "prefill_kernel_matches_portable", lambda *a: False)
    assert runner._choose_prefill_kernel(args, cache) is False
    monkeypatch.setenv("MISTRAL_SERVE_PREFILL_KERNEL", "0")
    monkeypatch.setattr(runner, "prefill_kernel_matches_portable", lambda *a: True)
    assert runner._choose_prefill_kernel(args, cache) is False
    monkeypatch.delenv("MISTRAL_SERVE_PREFILL_KERNEL")
    assert runner._choose_prefill_kernel(args, cache) is True
