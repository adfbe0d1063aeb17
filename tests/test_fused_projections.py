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
