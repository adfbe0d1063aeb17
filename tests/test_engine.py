"""LLMEngine end to end on a tiny float32 model: paged + batched == reference, batch invariance."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine.engine import EngineConfig, LLMEngine
from engine.tokenizer import Tokenizer, write_tokenizer_files
from scheduler.request import FinishReason, SamplingParams
from tests.reference import reference_logits
from tests.tiny import tiny_model

VOCAB = 32768


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d, version="v3")
    return Tokenizer.from_dir(d)


def make_engine(tokenizer, window=8, blocks_gib=0.01, **cfg):
    model, args, ref_cfg = tiny_model(seed=1, vocab_size=VOCAB, sliding_window=window)
    config = EngineConfig(kv_cache_memory_gib=blocks_gib, block_size=4, **cfg)
    return LLMEngine(model, args, tokenizer, config), ref_cfg


def hf_weights(window):
    """make_engine's weights under their checkpoint names, taken before the engine fuses them."""
    model = tiny_model(seed=1, vocab_size=VOCAB, sliding_window=window)[0]
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def run(engine, prompts: dict, params: dict):
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params[rid] if isinstance(params, dict) else params)
    tokens = {rid: [] for rid in prompts}
    logprobs = {rid: [] for rid in prompts}
    finish = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += [lp.logprob for lp in out.logprobs]
            if out.finished:
                finish[out.request_id] = out
    return tokens, logprobs, finish


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return {f"r{i}": rng.integers(10, VOCAB, n).tolist() for i, n in enumerate(lengths)}


# float32 against the float64 NumPy reference (TF32 is off on a GPU: tests/conftest.py).
REF_ATOL = 1e-4
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, return_logprobs=True)


@pytest.mark.parametrize("window", [None, 8])
def test_greedy_tokens_match_reference(tokenizer, window):
    engine, cfg = make_engine(tokenizer, window=window, max_num_batched_tokens=16)
    weights = hf_weights(window)
    prompts = prompts_of([3, 21, 9, 30])  # 21 and 30 > window, chunked by the 16-token budget
    tokens, logprobs, _ = run(engine, prompts, GREEDY)
    for rid, ids in prompts.items():
        seq = ids + tokens[rid]
        ref = reference_logits(weights, cfg, seq[:-1])[len(ids) - 1:]
        ref_lp = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - ref.max(-1, keepdims=True)
        assert tokens[rid] == ref.argmax(-1).tolist(), rid
        chosen = ref_lp[np.arange(len(tokens[rid])), tokens[rid]]
        assert np.allclose(logprobs[rid], chosen, atol=REF_ATOL), rid


def test_batch_invariance_greedy_and_seeded(tokenizer):
    target = prompts_of([13], seed=7)["r0"]
    params = {"t": SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, return_logprobs=True),
              "s": SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True,
                                  return_logprobs=True)}
    engine, _ = make_engine(tokenizer)
    alone, alone_lp, _ = run(engine, {"t": target, "s": target}, params)
    others = prompts_of([1, 5, 17, 40, 2, 8, 33, 11, 4, 26, 9, 19, 3, 14, 6, 22], seed=3)
    mixed_params = {rid: SamplingParams(temperature=0.8, top_p=0.9, max_tokens=5 + i % 7,
                                        ignore_eos=True) for i, rid in enumerate(others)}
    mixed_params.update(params)
    engine, _ = make_engine(tokenizer)
    mixed, mixed_lp, _ = run(engine, {**others, "t": target, "s": target}, mixed_params)
    assert mixed["t"] == alone["t"] and mixed["s"] == alone["s"]
    assert np.allclose(mixed_lp["t"], alone_lp["t"], atol=1e-4)
    assert np.allclose(mixed_lp["s"], alone_lp["s"], atol=1e-4)


def test_preemption_recomputes_same_output(tokenizer):
    prompts = prompts_of([30, 28, 25, 31], seed=5)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine, _ = make_engine(tokenizer, window=None)
    alone = {rid: run(engine, {rid: p}, params)[0][rid] for rid, p in prompts.items()}
    # 4 sequences of ~50 tokens need ~52 blocks of 4; give the pool far fewer.
    from engine.kv_cache import kv_bytes_per_token
    per_block = kv_bytes_per_token(engine.model_args, mx.float32) * 4
    small, _ = make_engine(tokenizer, window=None, blocks_gib=30 * per_block / (1 << 30))
    tokens, _, finish = run(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert tokens == alone
    assert small.kv_manager.num_used_blocks == 0


def test_prefix_cache_hit_same_output(tokenizer):
    prompt = prompts_of([37], seed=9)["r0"]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine, _ = make_engine(tokenizer, window=None)
    first, _, f1 = run(engine, {"a": prompt}, params)
    second, _, f2 = run(engine, {"b": prompt}, params)
    assert f1["a"].num_cached_tokens == 0
    assert f2["b"].num_cached_tokens == 36  # 9 full blocks of 4; the last token is recomputed
    assert first["a"] == second["b"]


def test_eos_and_max_tokens_finish(tokenizer):
    engine, _ = make_engine(tokenizer)
    _, _, finish = run(engine, prompts_of([5]), SamplingParams(temperature=0, max_tokens=3))
    assert finish["r0"].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert finish["r0"].num_output_tokens <= 3
    assert engine.kv_manager.num_used_blocks == 0


def test_penalties_follow_the_reference_through_the_engine(tokenizer):
    """Greedy with repetition / frequency / presence penalties == a NumPy reference loop.

    The penalties see every output token up to the previous one, so this also checks that
    steps with penalties are not overlapped (an in-flight token would be missed).
    """
    engine, cfg = make_engine(tokenizer, window=None)
    weights = hf_weights(None)
    cases = {"p": (prompts_of([12], seed=11)["r0"], 1.0, 0.0, 1.5),
             "q": (prompts_of([5], seed=4)["r0"], 1.0, 1.2, 0.0),
             "r": (prompts_of([9], seed=6)["r0"], 1.8, 0.0, 0.0)}
    params = {rid: SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                  repetition_penalty=rep, frequency_penalty=freq,
                                  presence_penalty=pres)
              for rid, (_, rep, freq, pres) in cases.items()}
    launch, seen_by_runner = engine.runner.launch, []

    def spy(sched):
        seen_by_runner.extend((s.num_output_tokens, len(s.output_token_ids))
                              for s in sched.scheduled if s.sample)
        return launch(sched)
    engine.runner.launch = spy
    tokens, _, _ = run(engine, {rid: c[0] for rid, c in cases.items()}, params)
    # Every step that samples sees all earlier output tokens: none is still in flight.
    assert seen_by_runner and all(n == m for n, m in seen_by_runner)
    for rid, (prompt, rep, freq, pres) in cases.items():
        seq, out = list(prompt), []
        for _ in range(16):
            logits = reference_logits(weights, cfg, seq)[-1]
            seen = np.zeros(len(logits), bool)
            seen[seq] = True
            logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
            counts = np.bincount(out, minlength=len(logits))[:len(logits)]
            logits = logits - freq * counts - pres * (counts > 0)
            out.append(int(logits.argmax()))
            seq.append(out[-1])
        assert tokens[rid] == out, rid
