"""The batched device sampler: each parameter does what it says, row by row."""

import random

import mlx.core as mx
import numpy as np
import pytest

from engine.sampling import SamplingBatch, sample
from scheduler.output import ScheduledRequest
from scheduler.request import SamplingParams

V = 64


def row(rid="r", n_out=0, prompt=(), output=(), **params):
    return ScheduledRequest(rid, (1,), 0, (0,), 0, True, SamplingParams(**params), n_out,
                            tuple(prompt), tuple(output))


def draw(logits, rows, seed=0):
    batch = SamplingBatch.build(rows, V, random.Random(seed))
    out = sample(mx.array(np.asarray(logits, np.float32)), batch)
    return out


def logits_rows(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, V)).astype(np.float32) * 3


def test_greedy_is_argmax():
    lg = logits_rows(5)
    out = draw(lg, [row(str(i), temperature=0) for i in range(5)])
    assert out.token_ids.tolist() == lg.argmax(-1).tolist()


@pytest.mark.parametrize("chunk", [0, 8, 16, 64, 11])  # one mx.argmax / two stages / one
# chunk / chunks of 8, the largest divisor of V = 64 from 11 down to 6
def test_argmax_is_the_first_maximum(chunk, monkeypatch):
    from engine import sampling
    monkeypatch.setattr(sampling, "ARGMAX_CHUNK", chunk)
    rng = np.random.default_rng(1)
    x = np.round(rng.standard_normal((50, V)), 1).astype(np.float32)  # maxima anywhere, some tied
    x[3] = 0  # all tied: index 0
    x[4, [7, 40]] = 9  # the same maximum in two chunks: the first
    assert sampling.argmax(mx.array(x)).tolist() == x.argmax(-1).tolist()
    assert sampling._argmax_chunk(V, chunk) == {0: 0, 8: 8, 16: 16, 64: 64, 11: 8}[chunk]


def test_seeded_rows_reproduce_whatever_shares_the_batch():
    lg = logits_rows(1)
    alone = [draw(lg, [row(n_out=i, temperature=1.0, seed=42)]).token_ids.item() for i in range(20)]
    others = logits_rows(7, seed=1)
    mixed = []
    for i in range(20):
        batch = np.concatenate([others[:3], lg, others[3:]])
        rows = [row(f"o{j}", temperature=0.7, top_p=0.9) for j in range(3)]
        rows += [row(n_out=i, temperature=1.0, seed=42)]
        rows += [row(f"p{j}", temperature=0) for j in range(4)]
        mixed.append(draw(batch, rows, seed=i).token_ids.tolist()[3])
    assert alone == mixed
    assert len(set(alone)) > 1  # the counter moves the sample along


def test_sampling_follows_the_distribution():
    lg = np.log(np.array([[0.6, 0.3, 0.1] + [1e-9] * (V - 3)], np.float32))
    counts = np.zeros(V)
    for i in range(600):
        counts[draw(lg, [row(n_out=i, temperature=1.0, seed=7)]).token_ids.item()] += 1
    freq = counts[:3] / counts.sum()
    assert np.allclose(freq, [0.6, 0.3, 0.1], atol=0.07), freq


@pytest.mark.parametrize("params, allowed", [
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.5), {0}),  # the best token alone holds 0.6 >= 0.5
    (dict(top_p=0.8), {0, 1}),
    (dict(min_p=0.4), {0, 1}),  # 0.3 >= 0.4 * 0.6, 0.1 is not
])
def test_filters_restrict_the_support(params, allowed):
    lg = np.log(np.array([[0.6, 0.3, 0.1] + [1e-9] * (V - 3)], np.float32))
    seen = {draw(lg, [row(n_out=i, temperature=1.0, seed=3, **params)]).token_ids.item()
            for i in range(200)}
    assert seen == allowed


def test_filters_are_per_row():
    lg = np.tile(np.log(np.array([[0.6, 0.3, 0.1] + [1e-9] * (V - 3)], np.float32)), (2, 1))
    seen0, seen1 = set(), set()
    for i in range(200):
        t = draw(lg, [row("a", n_out=i, temperature=1.0, seed=1, top_k=1),
                      row("b", n_out=i, temperature=1.0, seed=2)]).token_ids.tolist()
        seen0.add(t[0]), seen1.add(t[1])
    assert seen0 == {0} and seen1 == {0, 1, 2}


def test_repetition_penalty_hf_semantics():
    lg = np.zeros((1, V), np.float32)
    lg[0, 5], lg[0, 6] = 2.0, 1.9
    # 5 seen in the prompt: 2.0 / 1.5 < 1.9, so greedy moves to 6
    out = draw(lg, [row(temperature=0, repetition_penalty=1.5, prompt=(5,), output=())])
    assert out.token_ids.item() == 6
    out = draw(lg, [row(temperature=0, repetition_penalty=1.0, prompt=(5,))])
    assert out.token_ids.item() == 5


def test_presence_and_frequency_penalties_use_output_tokens():
    lg = np.zeros((1, V), np.float32)
    lg[0, 5], lg[0, 6] = 2.0, 1.5
    out = draw(lg, [row(temperature=0, frequency_penalty=0.3, output=(5, 5))])
    assert out.token_ids.item() == 6  # 2.0 - 0.6 < 1.5
    out = draw(lg, [row(temperature=0, presence_penalty=0.4, output=(5, 5))])
    assert out.token_ids.item() == 5  # 2.0 - 0.4 > 1.5
    out = draw(lg, [row(temperature=0, presence_penalty=0.6, prompt=(6,), output=(5,))])
    assert out.token_ids.item() == 6


def test_logprobs_are_raw_model_logprobs_best_first():
    lg = logits_rows(2, seed=5)
    out = draw(lg, [row("a", temperature=0, logprobs=3), row("b", temperature=0.8, seed=1)])
    ref = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    tok = out.token_ids.tolist()
    assert np.allclose(out.logprobs.tolist(), [ref[0, tok[0]], ref[1, tok[1]]], atol=1e-5)
    top = out.top_ids.tolist()[0]
    assert top == list(np.argsort(-ref[0])[:3])
    assert np.allclose(out.top_logprobs.tolist()[0], np.sort(ref[0])[::-1][:3], atol=1e-5)


def test_parameters_reach_the_device_in_one_copy(monkeypatch):
    # Each array made from host data costs the GPU a page fault on first read (CUDA managed
    # memory): every per-row parameter comes from one host array, and none at all when every
    # row is greedy and nothing else is asked for.
    from engine import sampling
    made = []
    monkeypatch.setattr(sampling, "_device", lambda *a: made.append(1) or mx.array(*a))
    greedy = SamplingBatch.build([row(str(i), temperature=0) for i in range(3)], V,
                                 random.Random(0))
    assert len(made) == 0 and greedy.all_greedy and greedy.temperature is None
    nan_bits = [0xFFFFFFFF, 0x7F800001, 0x7FC00000]  # seeds whose bits are float NaNs
    rows = [row("a", n_out=5, temperature=0.7, top_k=3, seed=2**32 + 9, repetition_penalty=1.2),
            row("b", temperature=0, top_p=0.5, presence_penalty=0.5, frequency_penalty=0.25,
                min_p=0.1, top_k=V + 5)]
    rows += [row(f"n{i}", temperature=1.0, seed=s) for i, s in enumerate(nan_bits)]
    b = SamplingBatch.build(rows, V, random.Random(0))
    assert len(made) == 3  # the parameters, and the token ids the two penalties count
    assert b.temperature.dtype == mx.float32 and np.allclose(b.temperature.tolist(), [0.7, 0, 1, 1, 1])
    assert b.top_k.dtype == mx.int32 and b.top_k.tolist()[:2] == [3, V]  # past the vocab: off
    assert np.allclose(b.top_p.tolist()[:2], [1, 0.5]) and np.allclose(b.min_p.tolist()[:2], [0, 0.1])
    assert b.seed.dtype == mx.uint32 and b.seed.tolist() == [9, 0] + nan_bits  # greedy: no draw
    assert b.counter.dtype == mx.uint32 and b.counter.tolist() == [5, 0, 0, 0, 0]
    assert np.allclose(b.repetition_penalty.tolist()[:2], [1.2, 1])
    assert np.allclose(b.presence_penalty.tolist()[:2], [0, 0.5])
    assert np.allclose(b.frequency_penalty.tolist()[:2], [0, 0.25])
    assert b.needs_sort and not b.needs_min_p  # b's top-p and min-p: a greedy row's, unused
