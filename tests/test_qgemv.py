"""engine/qgemv.py's few-row tensor-core kernel on the device: equal to dequantize + matmul
on the 7B's shapes (4- and 8-bit, bf16 and fp16, every row count 1-8, each warp count), and
through project() too; applies() and the warp split are checked everywhere. The CPU
emulation is tests/test_qgemv_emulated.py."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from engine import qgemv
from engine.model import KernelPlan, project
from tests.tiny import quantized_linear

cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")


def _close(layer, x, **kw) -> tuple[bool, float]:
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    want = x.astype(mx.float32) @ w.astype(mx.float32).T
    err = mx.abs(qgemv.qgemv(layer, x, **kw).astype(mx.float32) - want).max().item()
    return err <= 2e-2 * max(mx.abs(want).max().item(), 1.0), err


@cuda
@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, 64), (4, 128), (4, 32)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_matches_dequantize_matmul_on_7b_shapes(bits, group_size, dtype):
    # Every row count (each its own kernel) on each shape in the default format; fewer
    # elsewhere, since every combination compiles on first use.
    full = (bits, group_size, dtype) == (4, 64, mx.bfloat16)
    for k, n in ((4096, 6144), (14336, 4096), (4096, 28672))[:None if full else 2]:
        layer = quantized_linear(k, n, bits, group_size, dtype)
        for rows in range(1, qgemv.MAX_ROWS + 1) if full else (1, 3, 8):
            x = mx.random.normal((rows, k)).astype(dtype)
            assert qgemv.applies(layer, x)
            ok, err = _close(layer, x)
            assert ok, (k, n, rows, err)


@cuda
@pytest.mark.parametrize("setting", [{"STAGED_MAX_ROWS": 0}, {"STAGED_MAX_ROWS": 8},
                                     {"STAGED_MAX_ROWS": 8, "X_SMEM": False},
                                     {"STAGED_MAX_ROWS": 8, "STAGES": 2},
                                     {"STAGED_MAX_ROWS": 8, "STAGES": 4}])
def test_each_kernel_variant_matches_on_7b_shapes(setting, monkeypatch):
    # The direct kernel (where the staged one does not apply) and the staged one's knobs.
    for name, value in setting.items():
        monkeypatch.setattr(qgemv, name, value)
    for k, n in ((4096, 6144), (14336, 4096), (4096, 28672)):
        layer = quantized_linear(k, n, 4)
        for rows in (1, 3, 8):
            ok, err = _close(layer, mx.random.normal((rows, k)).astype(mx.bfloat16))
            assert ok, (setting, k, n, rows, err)


@cuda
@pytest.mark.parametrize("warps", [1, 2, 4, 8])
def test_every_warp_split_matches(warps):
    layer = quantized_linear(1280, 72, 4)  # 10 K steps: no warp count divides them into equal shares
    for rows in (1, 5):
        ok, err = _close(layer, mx.random.normal((rows, 1280)).astype(mx.bfloat16), warps=warps)
        assert ok, (warps, rows, err)


@cuda
def test_self_check_and_project():
    layer = quantized_linear(4096, 4096, 4)
    assert qgemv.qgemv_matches_layers([layer])
    x = mx.random.normal((3, 4096)).astype(mx.bfloat16)
    plain = project(layer, x, KernelPlan()).astype(mx.float32)
    fast = project(layer, x, KernelPlan(qgemv=True)).astype(mx.float32)
    assert mx.abs(fast - plain).max().item() <= 2e-2 * max(mx.abs(plain).max().item(), 1.0)


@cuda
@pytest.mark.parametrize("bits, dtype", [(4, mx.bfloat16), (8, mx.bfloat16), (4, mx.float16)])
def test_swiglu_epilogue_matches_on_7b_gate_up(bits, dtype):
    # gate|up (28,672 x 4,096) in runs of 8, every row count: staged (1 row) and direct
    layer = quantized_linear(4096, 28672, bits, 64, dtype)
    assert qgemv.swiglu_matches_layers([layer])
    x = mx.random.normal((1, 4096)).astype(dtype)
    assert qgemv.qgemv(layer, x, swiglu=True).shape == (1, 14336)


@cuda
def test_mlp_with_swiglu_epilogue_equals_without():
    from engine.model import MLP
    from tests.tiny import TINY
    from engine.config import ModelArgs
    args = ModelArgs.from_dict({**TINY, "hidden_size": 1024, "intermediate_size": 2048})
    mlp = MLP(args)
    mlp.set_dtype(mx.bfloat16)
    nn.quantize(mlp, group_size=64, bits=4)
    mlp.fuse()
    for rows in (1, 5):
        x = (mx.random.normal((rows, 1024)) * 0.1).astype(mx.bfloat16)
        assert qgemv.swiglu_applies(mlp.gate_up_proj, x)
        plain = mlp(x, KernelPlan(qgemv=True, fused=True)).astype(mx.float32)
        fast = mlp(x, KernelPlan(qgemv=True, fused=True, qgemv_swiglu=True)).astype(mx.float32)
        assert fast.shape == plain.shape == (rows, 1024)
        assert mx.abs(fast - plain).max().item() <= 2e-2 * max(mx.abs(plain).max().item(), 1.0)


def test_applies_only_where_it_computes_the_layer():
    layer = quantized_linear(128, 64, 4)
    x = mx.zeros((1, 128), mx.bfloat16)
    assert qgemv.applies(layer, x) and qgemv.applies(layer, mx.zeros((8, 128), mx.bfloat16))
    assert not qgemv.applies(layer, mx.zeros((qgemv.MAX_ROWS + 1, 128), mx.bfloat16))  # qgemm's
    assert not qgemv.applies(layer, x.astype(mx.float16))  # scales are bf16
    assert not qgemv.applies(quantized_linear(128, 64, 4, dtype=mx.float32), x.astype(mx.float32))
    assert not qgemv.applies(nn.Linear(128, 64, bias=False), x)
    assert not qgemv.applies(quantized_linear(192, 64, 4, group_size=32), mx.zeros((1, 192), mx.bfloat16))


def test_warps_fill_the_gpu_without_idle_warps():
    # The 7B: gate|up (1,792 warp tiles) needs few warps per block; o and down (256) the most.
    assert qgemv.warps_per_block(28672, 4096) == 4 and qgemv.warps_per_block(32768, 4096) == 2
    assert qgemv.warps_per_block(4096, 4096) == qgemv.MAX_WARPS
    assert qgemv.warps_per_block(4096, 14336) == qgemv.MAX_WARPS
    assert qgemv.warps_per_block(4096, 256) == 2  # two K steps: a third warp would idle


def test_staged_launch_fits_shared_memory():
    # The 7B's layers in each format get a staged launch within the budget; x leaves shared
    # memory before the warps are cut, and a group size that makes K part-chunks is not staged.
    for k, n in ((4096, 28672), (14336, 4096), (4096, 6144), (4096, 32000)):
        for bits, gs in ((4, 64), (8, 64), (8, 128), (4, 32)):
            layer = quantized_linear(k, n, bits, gs)
            assert qgemv.staged_applies(layer, 1)
            for m in range(1, qgemv.MAX_ROWS + 1):
                nw, xr, smem = qgemv.staged_launch(layer, m)
                assert smem <= qgemv.SMEM_BUDGET and xr in (0, 1, 2, 4, 8) and (xr == 0 or xr >= m)
                assert smem == qgemv.staged_shared_bytes(bits, gs, nw, xr)
    layer = quantized_linear(4096, 28672, 4)
    assert qgemv.staged_launch(layer, 1)[:2] == (4, 1)     # gate|up: x staged at one row
    down = quantized_linear(14336, 4096, 4)
    assert qgemv.staged_launch(down, 8)[:2] == (8, 0)  # 8 x rows would pass the budget


def test_staged_ring_depth_decides_what_fits(monkeypatch):
    monkeypatch.setattr(qgemv, "STAGED_MAX_ROWS", 8)
    down = quantized_linear(14336, 4096, 4)
    monkeypatch.setattr(qgemv, "STAGES", 2)
    assert qgemv.staged_launch(down, 1)[:2] == (8, 1)  # x staged
    monkeypatch.setattr(qgemv, "STAGES", 3)
    assert qgemv.staged_launch(down, 1)[:2] == (8, 0)  # x from global memory
    assert not qgemv.staged_applies(quantized_linear(1280, 72, 4), 1)
    assert not qgemv.staged_applies(down, qgemv.STAGED_MAX_ROWS + 1)
