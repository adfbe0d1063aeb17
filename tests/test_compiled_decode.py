"""The mx.compile'd decode step (engine/runner.py: _compiled_decode) must give what the
op-by-op forward gives: the same tokens and top-logprob ids, and the same logprobs (exactly
on the CPU; on a GPU within float32 rounding, since mx.compile fuses the log-softmax into
other kernels: the H200 differed by 7e-7), with batches shrinking as requests finish,
contexts growing across block-table widths and past a sliding window."""

import mlx.core as mx
import numpy as np
import pytest

from engine import runner
from engine.engine import EngineConfig, LLMEngine
from loadtest.offline_bench import _NoTokenizer
from scheduler.request import SamplingParams
from tests.tiny import run_to_completion, tiny_model


def _generate(compiled: bool) -> tuple[dict, LLMEngine]:
    model, args, _ = tiny_model(sliding_window=40)
    engine = LLMEngine(model, args, _NoTokenizer(args), EngineConfig(
        kv_cache_memory_gib=0.01, max_num_seqs=4, enable_prefix_caching=False,
        max_num_batched_tokens=64))
    engine.runner.compile_decode = compiled
    for i in range(3):
        engine.add_request(f"r{i}", list(range(3 + i, 20 + 9 * i)), SamplingParams(
            temperature=0 if i % 2 else 0.8, seed=i, max_tokens=50 + 10 * i, ignore_eos=True,
            logprobs=2))
    return run_to_completion(engine), engine


@pytest.mark.parametrize("min_blocks", [runner.BLOCK_PAD, runner.COMPILED_MIN_BLOCKS])
def test_compiled_decode_matches_op_by_op(min_blocks, monkeypatch):
    # Narrow tables retrace at each new width; the default floor pads them (one width here).
    monkeypatch.setattr(runner, "COMPILED_MIN_BLOCKS", min_blocks)
    want, _ = _generate(False)
    got, engine = _generate(True)
    assert engine.runner._compiled, "the compiled path did not run"
    assert {k: len(v[0]) for k, v in got.items()} == {"r0": 50, "r1": 60, "r2": 70}
    if mx.default_device() == mx.cpu:
        assert got == want
    else:
        assert _split(got)[0] == _split(want)[0]
        assert np.allclose(_split(got)[1], _split(want)[1], rtol=0, atol=1e-5)
    assert engine.kv_manager.num_used_blocks == 0
    # The compiled step wrote the KV pools in place of the engine's arrays, still plain arrays.
    assert all(isinstance(a, mx.array) for a in engine.kv_cache.state())


def _split(out: dict) -> tuple[list, list]:
    """(the integers: tokens and top ids, the floats: logprobs) of run_to_completion's output."""
    ints, floats = [], []
    for rid in sorted(out):
        tokens, lps = out[rid]
        ints.append((rid, tokens, [[i for i, _ in top] for _, top in lps]))
        floats.extend(x for lp, top in lps for x in (lp, *(v for _, v in top)))
    return ints, floats


def test_compiled_table_widths_are_few():
    widths = {runner._table_width(b, True) for b in range(1, 1025)}
    assert widths == {runner.COMPILED_MIN_BLOCKS << i for i in range(5)}  # 64 .. 1,024 blocks
    assert runner._table_width(5, False) == 8  # the op-by-op path pads to BLOCK_PAD only


def test_warm_decode_traces_ahead_and_changes_nothing(monkeypatch):
    # Traced at start-up for batch 1, a single request's decode steps (contexts under 1,024
    # tokens) never trace again, and the dummy decodes leave no mark on its tokens.
    want, _ = _generate(True)
    model, args, _ = tiny_model(sliding_window=40)
    monkeypatch.setenv("MISTRAL_SERVE_COMPILE", "1")
    monkeypatch.setattr(runner, "WARM_DECODE_BATCHES", (1, 2, 3))
    traces = []
    original = runner.ModelRunner._decode_fn

    def counted(self, *a):  # Python runs this only while mx.compile traces
        traces.append(a[0].shape[0])
        return original(self, *a)
    monkeypatch.setattr(runner.ModelRunner, "_decode_fn", counted)
    engine = LLMEngine(model, args, _NoTokenizer(args), EngineConfig(
        kv_cache_memory_gib=0.01, max_num_seqs=4, enable_prefix_caching=False,
        max_num_batched_tokens=64))
    assert traces == [1, 2, 3]
    for i in range(3):
        engine.add_request(f"r{i}", list(range(3 + i, 20 + 9 * i)), SamplingParams(
            temperature=0 if i % 2 else 0.8, seed=i, max_tokens=50 + 10 * i, ignore_eos=True,
            logprobs=2))
    assert run_to_completion(engine) == want
    assert traces == [1, 2, 3]  # batches 3, 2, 1 as requests finish: all traced already


def test_benchmark_settings_apply_and_restore():
    # loadtest/settings.py: offline_bench --set runs a variant on the same engine; the variant's
    # settings hold inside the block (with the compiled steps retraced) and are undone after.
    from loadtest import settings

    _, engine = _generate(True)
    plan, floor = engine.model.plan, runner.COMPILED_MIN_BLOCKS
    with settings.applied(engine, "runner.COMPILED_MIN_BLOCKS=8, plan.dequant_min_rows=16"):
        assert runner.COMPILED_MIN_BLOCKS == 8 and engine.model.plan.dequant_min_rows == 16
        assert engine.model.plan.qgemv == plan.qgemv  # fields not named keep their value
        assert list(engine.runner._compiled) == [engine.model.plan]  # warm_decode traced it
    assert runner.COMPILED_MIN_BLOCKS == floor and engine.model.plan == plan
    assert not engine.runner._compiled
    assert settings.parse("paged_decode.NUM_WARPS=(1, 2),plan.gemv=False") == (
        {(runner.paged_decode, "NUM_WARPS"): (1, 2)}, {"gemv": False})
    for bad in ("runner.NO_SUCH=1", "plan.no_such=1"):
        with pytest.raises(SystemExit):
            settings.parse(bad)
    # Its re-trace writes dummy K/V into block 0: not while a request runs.
    engine.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError):
        with settings.applied(engine, "plan.gemv=False"):
            pass
