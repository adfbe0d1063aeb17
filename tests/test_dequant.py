"""engine/dequant.py's kernel on the device: equal to mx.dequantize on the 7B's shapes (4- and
8-bit), and project() gives the same output with it; applies() turns away what it does not
handle (this part runs everywhere). The CPU emulation is tests/test_dequant_emulated.py."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from engine import dequant
from engine.model import KernelPlan, project
from tests.tiny import quantized_linear

cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")


@cuda
@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, 64), (4, 32), (8, 128)])
def test_matches_mx_dequantize_on_7b_shapes(bits, group_size):
    # q|k|v, o, gate|up and down of the 7B; the widest needs more blocks than one launch row.
    layers = [quantized_linear(k, n, bits, group_size) for k, n in
              ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))]
    assert all(dequant.applies(l) for l in layers)
    assert dequant.dequantize_matches_layers(layers)
    for layer in layers:
        got = dequant.dequantize(layer)
        want = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size, bits)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item() <= 1e-2


@cuda
def test_project_same_with_the_kernel():
    layer = quantized_linear(4096, 4096, 4, 64)
    x = mx.random.normal((64, 4096)).astype(mx.bfloat16)
    plain = project(layer, x, KernelPlan(dequant_min_rows=8))
    kernel = project(layer, x, KernelPlan(dequant_min_rows=8, dequant_kernel=True))
    scale = max(mx.abs(plain.astype(mx.float32)).max().item(), 1.0)
    assert mx.abs(kernel.astype(mx.float32) - plain.astype(mx.float32)).max().item() <= 2e-2 * scale


def test_applies_only_to_what_it_computes():
    assert dequant.applies(quantized_linear(128, 8, 4, 64)) and dequant.applies(quantized_linear(128, 8, 8, 64))
    assert not dequant.applies(nn.Linear(128, 8, bias=False))
    assert not dequant.applies(quantized_linear(128, 8, 2, 64))  # 2-bit: not unpacked here
