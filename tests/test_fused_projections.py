"""Fusing q|k|v and gate|up (done by the engine) keeps the model's numbers, float and quantized."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.attention import AttentionGroup, AttentionMetadata
from engine.kv_cache import PagedKVCache
from tests.tiny import tiny_model


def _forward(model, args, ids):
    """Hidden states of one prompt through the portable paged path."""
    n, bs = len(ids), 4
    cache = PagedKVCache(args, num_blocks=-(-n // bs) + 1, block_size=bs, dtype=mx.float32)
    pos = np.arange(n)
    visible = (pos[None, :] <= pos[:, None])
    keys = np.full(((n + bs - 1) // bs) * bs, False)
    mask = np.zeros((1, 1, n, len(keys)), bool)
    mask[0, 0, :, :n] = visible
    group = AttentionGroup(0, n, None, None, mx.arange(len(keys) // bs, dtype=mx.int32)[None] + 1,
                           mx.array(mask), 1, n)
    meta = AttentionMetadata(mx.array(pos + bs, dtype=mx.int32), [group])
    return np.array(model(mx.array(ids), mx.array(pos, dtype=mx.int32), cache, meta))


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_fused_model_equals_unfused(bits):
    model, args, _ = tiny_model(seed=3)
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
        mx.eval(model.parameters())
    ids = np.random.default_rng(0).integers(0, args.vocab_size, 11)
    before = _forward(model, args, ids)
    mlp = model.model.layers[0].mlp
    gate, up = np.array(mlp.gate_proj.weight), np.array(mlp.up_proj.weight)
    model.fuse_projections()
    layer = model.model.layers[0]
    # gate|up alternate runs of 8 features (qgemv's 16-feature tile: 8 gates, their 8 ups)
    assert layer.mlp.run == 8
    fused = np.array(layer.mlp.gate_up_proj.weight)
    assert (fused[:8] == gate[:8]).all() and (fused[8:16] == up[:8]).all()
    assert (fused[-8:] == up[-8:]).all()
    assert "qkv_proj" in layer.self_attn and "q_proj" not in layer.self_attn
    assert "gate_up_proj" in layer.mlp and "up_proj" not in layer.mlp
    if bits:
        assert isinstance(layer.self_attn.qkv_proj, nn.QuantizedLinear)
        assert layer.self_attn.qkv_proj.bits == bits
    after = _forward(model, args, ids)
    assert np.abs(after - before).max() < 1e-4


def test_gate_up_keeps_halves_when_runs_of_8_do_not_fit():
    # intermediate 36 is no multiple of 8: gate|up stays the two halves, and the numbers hold
    model, args, _ = tiny_model(seed=4, intermediate_size=36)
    ids = np.random.default_rng(1).integers(0, args.vocab_size, 7)
    before = _forward(model, args, ids)
    model.fuse_projections()
    assert model.model.layers[0].mlp.run == 36
    assert np.abs(_forward(model, args, ids) - before).max() < 1e-4


def test_rope_form_only_for_one_split_decode_groups():
    from engine import paged_decode
    pools = mx.zeros((8, 2, 16), mx.float32)
    qkv, slots = mx.zeros((2, 96), mx.float32), mx.zeros((2,), mx.int32)

    def group(**kw):
        return AttentionGroup(0, 2, None, None, mx.zeros((2, 4), mx.int32), None, 2, 1, **kw)
    one = group(key_start=mx.zeros((2,), mx.int32), splits=1)
    assert paged_decode.rope_store_applies([one], slots, qkv, pools, pools)
    # two key splits: a split's block could read the new key before another wrote it
    assert not paged_decode.rope_store_applies(
        [group(key_start=mx.zeros((2,), mx.int32), splits=2)], slots, qkv, pools, pools)
    assert not paged_decode.rope_store_applies([group()], slots, qkv, pools, pools)  # portable
    assert not paged_decode.rope_store_applies([one, one], slots, qkv, pools, pools)  # + chunks
    assert not paged_decode.rope_store_applies([one], slots.astype(mx.int64), qkv, pools, pools)
    half = pools.astype(mx.float16)  # K/V are stored as q|k|v's type
    assert not paged_decode.rope_store_applies([one], slots, qkv, half, half)
