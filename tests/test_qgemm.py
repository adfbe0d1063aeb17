"""engine/qgemm.py's tensor-core kernel on the device: equal to dequantize + matmul on the
7B's shapes (4- and 8-bit, bf16 and fp16, row counts that fill, split and part-fill tiles),
through project() too; applies() turns away what it does not compute (this part runs
everywhere). The CPU emulation is tests/test_qgemm_emulated.py."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from engine import qgemm, qgemm_wgmma
from engine.model import KernelPlan, project
from tests.tiny import quantized_linear

cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")


def _reference(layer, x):
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    return (x.astype(mx.float32) @ w.astype(mx.float32).T)


@cuda
@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, 64), (4, 128)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_matches_dequantize_matmul_on_7b_shapes(bits, group_size, dtype):
    for k, n in ((4096, 6144), (14336, 4096), (4096, 28672)):
        layer = quantized_linear(k, n, bits, group_size, dtype)
        for rows in (9, 20, 64, 100, 128):
            x = mx.random.normal((rows, k)).astype(dtype)
            assert qgemm.applies(layer, x)
            got, want = qgemm.qgemm(layer, x).astype(mx.float32), _reference(layer, x)
            err = mx.abs(got - want).max().item()
            assert err <= 2e-2 * max(mx.abs(want).max().item(), 1.0), (k, n, rows, err)


@cuda
def test_self_check_and_project():
    layer = quantized_linear(4096, 4096, 4)
    assert qgemm.qgemm_matches_layers([layer])
    x = mx.random.normal((64, 4096)).astype(mx.bfloat16)
    plain = project(layer, x, KernelPlan(dequant_min_rows=8)).astype(mx.float32)
    fast = project(layer, x, KernelPlan(dequant_min_rows=8, qgemm=True)).astype(mx.float32)
    assert mx.abs(fast - plain).max().item() <= 2e-2 * max(mx.abs(plain).max().item(), 1.0)


def test_num_splits_fills_the_gpu_with_even_splits():
    # The 7B at 64 rows: gate|up makes 224 tiles of 128 features (no split); o and down make
    # 32, split until ~2 blocks per SM of an H200 or the splits get shorter than 8 steps.
    assert qgemm.num_splits(64, 28672, 4096) == 1
    assert qgemm.num_splits(64, 4096, 4096) == 4 and qgemm.num_splits(64, 4096, 14336) == 8
    assert qgemm.num_splits(128, 4096, 14336) == 4  # twice the row tiles
    for m, n, k in ((9, 6144, 4096), (120, 4096, 14336), (9, 64, 128)):
        s = qgemm.num_splits(m, n, k)
        steps = k // qgemm.BK
        assert steps % s == 0 and (s == 1 or steps // s >= qgemm.MIN_STEPS_PER_SPLIT)


def test_applies_only_where_it_computes_the_layer():
    layer = quantized_linear(128, 64, 4)
    x = mx.zeros((qgemm.MIN_ROWS, 128), mx.bfloat16)
    assert qgemm.applies(layer, x)
    assert not qgemm.applies(layer, mx.zeros((qgemm.MIN_ROWS - 1, 128), mx.bfloat16))  # gemv's
    assert not qgemm.applies(layer, mx.zeros((qgemm.MAX_ROWS + 1, 128), mx.bfloat16))
    assert not qgemm.applies(layer, x.astype(mx.float16))  # scales are bf16
    assert not qgemm.applies(quantized_linear(128, 64, 4, dtype=mx.float32), x.astype(mx.float32))
    assert not qgemm.applies(nn.Linear(128, 64, bias=False), x)
    assert not qgemm.applies(quantized_linear(192, 64, 4, group_size=32), mx.zeros((16, 192), mx.bfloat16))
    assert qgemm.applies(quantized_linear(256, 64, 4, group_size=128), mx.zeros((16, 256), mx.bfloat16))


@cuda
@pytest.mark.parametrize("bits, dtype", [(4, mx.bfloat16), (8, mx.float16)])
def test_two_warp_groups_per_block_match(bits, dtype, monkeypatch):
    for name in ("K_WARPS", "K_WARPS_64_ROWS"):  # each K step split between two warp groups
        monkeypatch.setattr(qgemm, name, 2)
    for k, n in ((4096, 6144), (14336, 4096)):
        layer = quantized_linear(k, n, bits, 64, dtype)
        for rows in (9, 20, 64, 100):
            x = mx.random.normal((rows, k)).astype(dtype)
            got, want = qgemm.qgemm(layer, x).astype(mx.float32), _reference(layer, x)
            err = mx.abs(got - want).max().item()
            assert err <= 2e-2 * max(mx.abs(want).max().item(), 1.0), (k, n, rows, err)


def test_self_check_compiles_every_variant_a_run_launches():
    # A kernel variant first met mid-run compiles there: a 4.9 s stall on an H200 (gemv's).
    for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 32768)):
        checked = {qgemm.launch_for(m, n, k, s).variant() for m, s in qgemm.check_cases()}
        used = {qgemm.launch_for(m, n, k).variant()
                for m in range(qgemm.MIN_ROWS, qgemm.MAX_ROWS + 1)}
        assert used <= checked, (k, n, used - checked)
        assert all(m <= qgemm.MAX_ROWS for m, _ in qgemm.check_cases())


def test_shared_self_check_passes_only_a_matching_kernel(monkeypatch):
    # The helper behind qgemm's and qgemv's start-up self-checks, driven on any backend by
    # stand-in kernels: dequantize + matmul itself passes; a wrong or failing one does not.
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    layer = quantized_linear(256, 32, 4, dtype=mx.float32)
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    exact = lambda l, x, *args: x @ w.T  # noqa: E731
    seen = []

    def usable(l, x, s):
        seen.append((x.shape[0], s))
        return s != 3

    check = lambda run, cases=[(2, 1), (5, 3)]: qgemm.matches_dequantize_matmul(  # noqa: E731
        [layer], cases, run, usable, "stand-in", seed=0, atol=2e-2)
    assert check(exact) and seen == [(2, 1), (5, 3)]
    assert not check(lambda l, x, *args: 1.1 * (x @ w.T))
    assert not check(lambda l, x, *args: 1 / 0)
    assert not check(exact, cases=[(5, 3)])  # no case ran


def _wgmma_runs() -> bool:
    """Whether this GPU builds the wgmma kernel (sm_90a); a build error skips, a wrong
    result fails."""
    layer = quantized_linear(256, 64, 4)
    try:
        mx.eval(qgemm_wgmma.qgemm_wgmma(layer, mx.zeros((64, 256), mx.bfloat16)))
    except Exception as exc:  # noqa: BLE001 - any build failure means no wgmma here
        pytest.skip(f"no wgmma on this GPU: {exc}")
    return True


@cuda
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_wgmma_kernel_matches_dequantize_matmul_on_7b_shapes(group_size, dtype):
    _wgmma_runs()
    for k, n in ((4096, 6144), (14336, 4096), (4096, 28672), (4096, 4096)):
        layer = quantized_linear(k, n, 4, group_size, dtype)
        for rows in (33, 64, 65, 100, 128):
            x = mx.random.normal((rows, k)).astype(dtype)
            assert qgemm_wgmma.applies(layer, x)
            got, want = qgemm_wgmma.qgemm_wgmma(layer, x).astype(mx.float32), _reference(layer, x)
            err = mx.abs(got - want).max().item()
            assert err <= 2e-2 * max(mx.abs(want).max().item(), 1.0), (k, n, rows, err)


def _wgmma_matches_at_7b_shapes(dtype, row_counts, split_counts):
    """qgemm_wgmma against dequantize + matmul on each 7B shape, for each row count and each of
    split_counts(rows, n, k), twice in a row (what a launch leaves behind, tile counters or
    mbarrier phases, must not spoil the next)."""
    for k, n in ((4096, 6144), (14336, 4096), (4096, 28672), (4096, 4096)):
        layer = quantized_linear(k, n, 4, 64, dtype)
        for rows in row_counts:
            x = mx.random.normal((rows, k)).astype(dtype)
            want = _reference(layer, x)
            for splits in split_counts(rows, n, k):
                for _ in range(2):
                    got = qgemm_wgmma.qgemm_wgmma(layer, x, splits).astype(mx.float32)
                    err = mx.abs(got - want).max().item()
                    assert err <= 2e-2 * max(mx.abs(want).max().item(), 1.0), (k, n, rows, splits, err)


@cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_wgmma_fused_split_sums_match(monkeypatch, dtype):
    # the kernel adding up its own K splits, at every split count it may run
    _wgmma_runs()
    monkeypatch.setattr(qgemm_wgmma, "FUSED_SPLITS", True)
    _wgmma_matches_at_7b_shapes(dtype, (64, 100, 128),
                                lambda rows, n, k: (2, 4, qgemm_wgmma.num_splits(rows, n, k)))


@cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_wgmma_producer_warp_matches(monkeypatch, dtype):
    # the form whose producer warp makes the copies and hands stages over by mbarrier, both
    # block heights and widths (a stage handed over wrongly shows as a wrong sum or a hang)
    _wgmma_runs()
    monkeypatch.setattr(qgemm_wgmma, "PRODUCER_WARP", True)
    _wgmma_matches_at_7b_shapes(dtype, (40, 64, 100, 128),
                                lambda rows, n, k: (1, qgemm_wgmma.num_splits(rows, n, k)))


@cuda
def test_wgmma_self_check_and_project():
    _wgmma_runs()
    layer = quantized_linear(4096, 4096, 4)
    assert qgemm_wgmma.qgemm_wgmma_matches_layers([layer])
    x = mx.random.normal((100, 4096)).astype(mx.bfloat16)
    plain = project(layer, x, KernelPlan(dequant_min_rows=8)).astype(mx.float32)
    fast = project(layer, x, KernelPlan(dequant_min_rows=8, qgemm=True, qgemm_wgmma=True))
    assert mx.abs(fast.astype(mx.float32) - plain).max().item() <= 2e-2 * max(mx.abs(plain).max().item(), 1.0)


def test_wgmma_applies_only_where_it_computes_the_layer():
    layer = quantized_linear(256, 64, 4)
    x = mx.zeros((qgemm_wgmma.MIN_ROWS, 256), mx.bfloat16)
    assert qgemm_wgmma.applies(layer, x)
    assert not qgemm_wgmma.applies(layer, mx.zeros((qgemm_wgmma.MIN_ROWS - 1, 256), mx.bfloat16))
    assert not qgemm_wgmma.applies(layer, mx.zeros((qgemm_wgmma.MAX_ROWS + 1, 256), mx.bfloat16))
    assert not qgemm_wgmma.applies(quantized_linear(256, 64, 8), x)  # 4-bit only
    assert not qgemm_wgmma.applies(layer, x.astype(mx.float16))  # scales are bf16


def test_wgmma_self_check_compiles_every_variant_a_run_launches():
    # (block rows, split or not) of every row count a run sends it, for the 7B's layers
    for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        variant = lambda m, s=0: (qgemm_wgmma.block_rows(m),  # noqa: E731
                                  (s or qgemm_wgmma.num_splits(m, n, k)) > 1)
        checked = {variant(m, s) for m, s in qgemm_wgmma.check_cases()}
        used = {variant(m) for m in range(qgemm_wgmma.MIN_ROWS, qgemm_wgmma.MAX_ROWS + 1)}
        assert used <= checked, (k, n, used - checked)
