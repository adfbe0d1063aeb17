"""engine/gemv.py's kernels on the device: they must match MLX's own matmul (dense, 4-bit and
8-bit, 1 to MAX_ROWS rows), the check the runner makes before using them; and applies() must
turn away every layer the kernels do not compute (this part runs everywhere)."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from engine import gemv

cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")


def _layers(k: int, n: int, dtype, bits_list=(0, 4, 8), group_size: int = 64):
    dense = nn.Linear(k, n, bias=False)
    dense.set_dtype(dtype)
    out = []
    for bits in bits_list:
        if bits:
            q = nn.QuantizedLinear.from_linear(dense, group_size=group_size, bits=bits)
            q.set_dtype(dtype)
            out.append(q)
        else:
            out.append(dense)
    return out


@cuda
@pytest.mark.parametrize("fast_unpack", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_self_check_passes(dtype, fast_unpack, monkeypatch):
    monkeypatch.setattr(gemv, "FAST_UNPACK", fast_unpack)
    # An odd number of output features leaves the last block's second feature empty.
    assert gemv.gemv_matches_layers(_layers(4096, 1001, dtype))


@cuda
@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("rows", [1, 5])
def test_mistral_shapes(bits, rows):
    # The 7B's widest (gate|up, 4096 -> 28672) and longest (down, 14336 -> 4096) inputs.
    for k, n in ((4096, 28672), (14336, 4096)):
        layer = _layers(k, n, mx.bfloat16, (bits,), group_size=128 if bits == 8 else 64)[0]
        x = mx.random.normal((rows, k)).astype(mx.bfloat16)
        assert gemv.applies(layer, x)
        got, want = gemv.gemv(layer, x).astype(mx.float32), layer(x).astype(mx.float32)
        err = mx.abs(got - want).max().item()
        assert err <= 2e-2 * max(mx.abs(want).max().item(), 1.0), (k, n, err)


def test_applies_only_where_it_computes_the_layer():
    dense, q4 = _layers(64, 8, mx.bfloat16, (0, 4))
    x = mx.zeros((1, 64), mx.bfloat16)
    assert gemv.applies(dense, x) and gemv.applies(q4, x)
    assert not gemv.applies(dense, x, dense=False) and gemv.applies(q4, x, dense=False)
    assert not gemv.applies(dense, mx.zeros((gemv.MAX_ROWS + 1, 64), mx.bfloat16))
    assert not gemv.applies(dense, x.astype(mx.float32))  # weight dtype differs
    assert not gemv.applies(q4, x.astype(mx.float32))  # scales dtype differs
    wide = mx.zeros((1, 128), mx.bfloat16)  # not the layers' input width
    assert not gemv.applies(dense, wide) and not gemv.applies(q4, wide)
    assert not gemv.applies(nn.Linear(64, 8, bias=True), x.astype(mx.float32))
    q2 = nn.QuantizedLinear.from_linear(nn.Linear(64, 8, bias=False), group_size=64, bits=2)
    assert not gemv.applies(q2, x.astype(mx.float32))  # only 4 and 8 bits are unpacked

    class Scaled(nn.Linear):  # a subclass may compute something else
        def __call__(self, x):
            return 2 * super().__call__(x)
    assert not gemv.applies(Scaled(64, 8, bias=False), x.astype(mx.float32))
