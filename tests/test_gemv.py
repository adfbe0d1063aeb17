"""engine/gemv.py's kernels on the device: they must match MLX's own matmul (dense, 4-bit and
8-bit, 1 to MAX_ROWS rows), the check the runner makes before using them."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from engine import gemv

cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")


@cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_self_check_passes(dtype):
    assert gemv.gemv_matches_portable(dtype)


@cuda
@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("rows", [1, 5])
def test_mistral_shapes(bits, rows):
    # The 7B's widest (gate|up, 4096 -> 28672) and longest (down, 14336 -> 4096) inputs.
    for k, n in ((4096, 28672), (14336, 4096)):
        layer = nn.Linear(k, n, bias=False)
        layer.set_dtype(mx.bfloat16)
        if bits:
            layer = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=bits)
            layer.set_dtype(mx.bfloat16)
        x = mx.random.normal((rows, k)).astype(mx.bfloat16)
        assert gemv.applies(layer, x)
        got, want = gemv.gemv(layer, x).astype(mx.float32), layer(x).astype(mx.float32)
        err = mx.abs(got - want).max().item()
        assert err <= 2e-2 * max(mx.abs(want).max().item(), 1.0), (k, n, err)


def test_applies_only_where_it_computes_the_layer():
    x = mx.zeros((1, 64), mx.bfloat16)
    dense = nn.Linear(64, 8, bias=False)
    dense.set_dtype(mx.bfloat16)
    assert gemv.applies(dense, x)
    assert not gemv.applies(dense, mx.zeros((gemv.MAX_ROWS + 1, 64), mx.bfloat16))
    assert not gemv.applies(dense, x.astype(mx.float32))  # weight dtype differs
    assert not gemv.applies(nn.Linear(64, 8, bias=True), x.astype(mx.float32))
