"""engine/fused_ops.py on the device: each kernel must match the portable MLX ops it replaces
(the runner's start-up check, on 7B and tiny shapes, float32 and bf16), and a whole forward
pass with the kernels must match one without. Off CUDA the portable ops are what runs."""

import mlx.core as mx
import numpy as np
import pytest

from engine import fused_ops
from engine.model import PORTABLE, KernelPlan

cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")


@cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
# The 7B shape and a small one (on an H200 the tiny test model's widths, hidden 64 and
# head_dim 16, failed inside MLX with "cudaGraphAddKernelNode: invalid argument").
@pytest.mark.parametrize("shape", [(4096, 14336, 32, 8, 128), (512, 1536, 8, 2, 64)])
def test_self_check_passes(dtype, shape):
    hidden, inter, heads, kv, d = shape
    assert fused_ops.fused_ops_match_portable(hidden, inter, heads, kv, d, 1e6, 1e-5, dtype,
                                              rows=(1, 7, 300))


@cuda
def test_forward_with_kernels_matches_portable():
    from engine.attention import AttentionGroup, AttentionMetadata
    from engine.kv_cache import PagedKVCache
    from tests.tiny import tiny_model
    model, args, _ = tiny_model(hidden_size=256, intermediate_size=512)  # head_dim 64
    model.fuse_projections()
    t = 21
    ids = mx.array(np.arange(1, t + 1, dtype=np.int32))

    def forward(plan):
        model.plan = plan
        cache = PagedKVCache(args, num_blocks=4, block_size=16, dtype=mx.float32)
        pos = np.arange(t)
        visible = pos[None, :] <= pos[:, None]
        key_ok = np.zeros((t, 32), bool)
        key_ok[:, :t] = visible
        group = AttentionGroup(0, t, None, None, mx.array([[1, 2]], mx.int32),
                               mx.array(key_ok[None, None]), 1, t)
        meta = AttentionMetadata(mx.array((16 + pos).astype(np.int32)), [group])
        return model(ids, mx.array(pos.astype(np.int32)), cache, meta)
    want = forward(PORTABLE)
    got = forward(KernelPlan(fused=True))
    model.plan = PORTABLE
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()


def test_portable_off_cuda():
    if mx.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    assert not fused_ops.fused_ops_match_portable(64, 128, 4, 2, 16, 1e4, 1e-5, mx.float32)


@cuda
def test_engine_decode_with_kernels_matches_portable():
    # The served path (fused kernels, K/V written in place, compiled decode step, decode
    # attention kernel) against the portable one, over batches that shrink as requests end.
    from engine.engine import EngineConfig, LLMEngine
    from loadtest.offline_bench import _NoTokenizer
    from scheduler.request import SamplingParams
    from tests.tiny import tiny_model

    def generate(portable: bool):
        model, args, _ = tiny_model(hidden_size=256, intermediate_size=512, sliding_window=40)
        engine = LLMEngine(model, args, _NoTokenizer(args), EngineConfig(
            kv_cache_memory_gib=0.02, max_num_seqs=4, enable_prefix_caching=False,
            max_num_batched_tokens=64))
        if portable:
            model.plan, engine.runner.compile_decode, engine.runner.decode_kernel = PORTABLE, False, False
        else:
            assert model.plan.fused and engine.runner.compile_decode and engine.runner.decode_kernel
        for i in range(3):
            engine.add_request(f"r{i}", list(range(3 + i, 20 + 9 * i)), SamplingParams(
                temperature=0, max_tokens=40 + 10 * i, ignore_eos=True, logprobs=1))
        out = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                toks, lps = out.setdefault(o.request_id, ([], []))
                toks.extend(o.new_token_ids)
                lps.extend(lp.logprob for lp in o.logprobs)
        return out
    want, got = generate(True), generate(False)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    for k in want:
        assert np.allclose(got[k][1], want[k][1], atol=2e-3), k
