"""The CUDA paged decode kernel matches the portable path (runs only where MLX has CUDA)."""

import mlx.core as mx
import numpy as np
import pytest

from engine import paged_decode
from engine.attention import decode_kernel_matches_portable, rope_store_kernel_matches

pytestmark = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")


# Every template variant is an NVRTC compile of a few seconds on the card, so the full grid
# runs for the default kernel at the 7B shape only; other shapes and v1 get one case each.
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("window", [None, 50, 4096])
def test_kernel_matches_portable(dtype, window):
    assert paged_decode.supported(128, dtype)
    # 1: one block per (sequence, KV head); 5: keys split over blocks, then merged.
    assert decode_kernel_matches_portable(32, 8, 128, 16, window, dtype, splits=(1, 5))


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", [(4, 2, 32, 4), (8, 8, 64, 32)])
def test_other_shapes_match_portable(heads, kv_heads, head_dim, block_size):
    assert decode_kernel_matches_portable(heads, kv_heads, head_dim, block_size, 50, mx.bfloat16,
                                          splits=(1, 5))


@pytest.mark.parametrize("v_batch", [0, 16])  # the unrolled loop; more than the default 8
def test_v_batch_matches_portable(monkeypatch, v_batch):
    monkeypatch.setattr(paged_decode, "V_BATCH", v_batch)
    assert decode_kernel_matches_portable(32, 8, 128, 16, None, mx.bfloat16, splits=(1, 5))


@pytest.mark.parametrize("warps, v_batch", [(8, 32), (8, 16)])  # few blocks: fewer warps, more V rows
def test_few_block_variants_match_portable(monkeypatch, warps, v_batch):
    monkeypatch.setattr(paged_decode, "FEW_BLOCKS_WARPS", warps)
    monkeypatch.setattr(paged_decode, "V_BATCH_FEW", v_batch)
    assert paged_decode.v_batch(warps) == v_batch
    assert decode_kernel_matches_portable(32, 8, 128, 16, None, mx.bfloat16, splits=(1, 5))


@pytest.mark.parametrize("dtype, window, base", [(mx.bfloat16, None, 1e6), (mx.bfloat16, 50, 1e4),
                                                (mx.float32, None, 1e4)])
def test_rope_form_matches_the_two_kernels_it_replaces(dtype, window, base):
    # out, and the K/V rows it writes into the pools, as qkv_rope_store + the decode kernel
    assert rope_store_kernel_matches(32, 8, 128, 16, window, base, dtype)


@pytest.mark.parametrize("dtype, window, stages, warps", [
    (mx.bfloat16, None, 2, 2), (mx.bfloat16, 50, 3, 2), (mx.float32, 4096, 2, 4),
    (mx.float16, None, 4, 2), (mx.bfloat16, None, 3, 4)])
def test_staged_kernel_matches_portable(monkeypatch, dtype, window, stages, warps):
    # v3 serves the many-block launches (STAGED_WARPS); the check runs every warp count the
    # engine launches, so the few-block v2 launch is compared too. The ROPE form against
    # the two kernels it replaces.
    monkeypatch.setattr(paged_decode, "STAGED", True)
    monkeypatch.setattr(paged_decode, "STAGES", stages)
    monkeypatch.setattr(paged_decode, "STAGED_WARPS", warps)
    assert paged_decode.staged(paged_decode.num_warps(512))
    assert decode_kernel_matches_portable(32, 8, 128, 16, window, dtype, splits=(1, 5))
    assert rope_store_kernel_matches(32, 8, 128, 16, window, 1e4, dtype)


def test_v1_matches_portable(monkeypatch):
    monkeypatch.setattr(paged_decode, "VERSION", "v1")
    assert decode_kernel_matches_portable(32, 8, 128, 16, 50, mx.bfloat16, splits=(1, 5))


@pytest.mark.parametrize("window", [None, 50])
def test_many_splits_match_portable(window):
    # 32 splits leave some splits of the short sequences empty: they must merge as nothing.
    assert decode_kernel_matches_portable(32, 8, 128, 16, window, mx.bfloat16, splits=(2, 8, 32))


def test_num_splits_fills_the_gpu_and_keeps_splits_long():
    assert paged_decode.num_splits(64, 8, 30000) == 1  # 512 blocks already
    assert paged_decode.num_splits(1, 8, 32768) == paged_decode.MAX_SPLITS
    assert paged_decode.num_splits(1, 8, 1024) == 1  # too few keys to share
    for seqs, keys in [(1, 256), (32, 4096), (64, 1024), (8, 1024)]:
        s = paged_decode.num_splits(seqs, 8, keys)
        # a power of two; past one split, each split keeps at least MIN_KEYS_PER_SPLIT keys
        assert s & (s - 1) == 0 and (s == 1 or keys >= s * paged_decode.MIN_KEYS_PER_SPLIT)
        assert seqs * 8 * s <= paged_decode.TARGET_BLOCKS


@pytest.mark.parametrize("window", [None, 8])
def test_engine_tokens_same_with_and_without_kernel(window, tmp_path):
    from engine.engine import EngineConfig, LLMEngine
    from engine.tokenizer import Tokenizer, write_tokenizer_files
    from scheduler.request import SamplingParams
    from tests.tiny import tiny_model

    write_tokenizer_files(tmp_path, version="v3")
    tok = Tokenizer.from_dir(tmp_path)
    rng = np.random.default_rng(0)
    # 700 tokens: without a window the kernel splits that sequence's keys over blocks.
    prompts = [rng.integers(10, 32768, n).tolist() for n in (3, 17, 30, 9, 700)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, return_logprobs=True)
    results = {}
    for backend in ("portable", "cuda"):
        model, args, _ = tiny_model(seed=2, vocab_size=32768, hidden_size=128, sliding_window=window)
        engine = LLMEngine(model, args, tok, EngineConfig(kv_cache_memory_gib=0.01, block_size=4,
                                                          attention_backend=backend))
        assert engine.runner.decode_kernel == (backend == "cuda")
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        out = {str(i): ([], []) for i in range(len(prompts))}
        while engine.has_unfinished_requests():
            for o in engine.step():
                out[o.request_id][0].extend(o.new_token_ids)
                out[o.request_id][1].extend(lp.logprob for lp in o.logprobs)
        results[backend] = out
    for rid in results["portable"]:
        assert results["cuda"][rid][0] == results["portable"][rid][0]
        assert np.allclose(results["cuda"][rid][1], results["portable"][rid][1], atol=1e-3)


def test_few_blocks_get_more_warps(monkeypatch):
    assert paged_decode.num_warps(8) == paged_decode.FEW_BLOCKS_WARPS  # batch 1
    assert paged_decode.num_warps(512) == paged_decode.STAGED_WARPS  # batch 64, staged
    assert paged_decode.launch_warps() == sorted({paged_decode.STAGED_WARPS, paged_decode.FEW_BLOCKS_WARPS})
    monkeypatch.setattr(paged_decode, "STAGED", False)
    assert paged_decode.num_warps(512) == paged_decode.NUM_WARPS
    assert not paged_decode.staged(paged_decode.NUM_WARPS)
