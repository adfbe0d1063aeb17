"""The forward pass that leaves each residual add + RMSNorm to the projection after it
(KernelPlan.qgemv_norm, engine/model.py: Mistral._forward_norms_in_projections) must give
exactly what the usual pass gives: where engine/qgemv.py's fused kernel does not apply (its
fallback, add_rms_norm + project) and where it does (here a stand-in with MLX's own ops, since
the kernel needs CUDA: tests/test_qgemv.py checks the kernel itself on a GPU)."""

import dataclasses

import pytest

from engine import qgemv
from engine.engine import EngineConfig, LLMEngine
from engine.model import PORTABLE, project
from loadtest.offline_bench import _NoTokenizer
from scheduler.request import SamplingParams
from tests.tiny import run_to_completion, tiny_model


def _generate(norm_plan: bool) -> dict:
    model, args, _ = tiny_model(sliding_window=40)
    engine = LLMEngine(model, args, _NoTokenizer(args), EngineConfig(
        kv_cache_memory_gib=0.01, max_num_seqs=3, enable_prefix_caching=False,
        max_num_batched_tokens=64))
    model.plan = dataclasses.replace(model.plan, qgemv_norm=norm_plan)
    for i in range(3):
        engine.add_request(f"r{i}", list(range(3 + i, 30 + 7 * i)), SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True, logprobs=2))
    return run_to_completion(engine)


@pytest.mark.parametrize("kernel_applies", [False, True])
def test_norms_in_projections_change_nothing(kernel_applies, monkeypatch):
    want = _generate(False)
    asked, fused = [], []

    def applies(layer, delta, residual, norm):
        asked.append(delta.shape)
        return kernel_applies

    def stand_in(layer, delta, residual, norm):  # what the kernel computes, in MLX ops
        fused.append(delta.shape)
        h = residual + delta
        return project(layer, norm(h), PORTABLE), h
    monkeypatch.setattr(qgemv, "norm_applies", applies)
    monkeypatch.setattr(qgemv, "qgemv_norm", stand_in)
    got = _generate(True)
    assert got == want
    # Per forward pass, 2 layers x 2 projections after an add (layer 0's q|k|v has none).
    assert asked and len(asked) % 3 == 0 and fused == (asked if kernel_applies else [])
