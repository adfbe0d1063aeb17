"""Every engine CUDA kernel compiled on the CPU, as MLX would build it for an H100/H200
(sm_90a), through NVIDIA's NVRTC wheels (loadtest/kernel_sass.py; installed by `make
install` on Linux): each builds, fits an SM's registers at its block size, and spills none.
A kernel source that does not compile, or a change that makes one spill, fails here in CI
instead of on a GPU."""

import re

import pytest

from loadtest import kernel_sass

pytestmark = pytest.mark.skipif(not kernel_sass.available(),
                                reason="needs NVIDIA's nvrtc wheels (pip install -e '.[kernels]')")

REGISTERS_PER_SM = 65536


def test_every_kernel_builds_for_sm90a_within_registers_and_without_spills():
    builds = kernel_sass.builds(sass=False)
    names = {re.sub(r"_\d+$", "", b.name) for b in builds}  # less shared-memory sizes
    # the kernels a 4-bit or bf16 run launches on an H200, each entry point at least once
    assert {"qgemm_mma", "qgemm_wgmma", "qgemv_mma", "qgemv_staged", "paged_prefill",
            "paged_decode_attention_split_v4", "paged_decode_attention_rope_v4",
            "paged_decode_merge", "fused_qkv_rope", "dequantize_affine"} <= names, names
    assert "wgmma_phases" in names  # loadtest/wgmma_phases.py's marked copy, built on a GPU only when run
    for b in builds:
        assert 0 < b.registers <= 255, (b.name, b.template, b.registers)
        assert b.registers * b.threads <= REGISTERS_PER_SM, (b.name, b.template, b.registers)
        assert b.spill_bytes == 0, (b.name, b.template, b.log[-1500:])


def test_a_kernel_that_does_not_compile_fails(monkeypatch):
    from engine import qgemm_wgmma
    monkeypatch.setattr(qgemm_wgmma, "SOURCE", qgemm_wgmma.SOURCE.replace("wgmma_commit();", "wgmma_commit()", 1))
    with pytest.raises(RuntimeError, match="does not build"):
        kernel_sass.builds(["qgemm_wgmma"], sass=False)
