"""Batched sampling on the device: one set of array ops for every row of the step.

Randomness is a counter-based hash of (seed, output index, vocab id), so a row's sample
depends only on its own logits, seed and position: the same seed gives the same tokens
whatever else shares the batch, and there is no per-request RNG state to keep.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from scheduler.output import ScheduledRequest


@dataclass
class SamplingBatch:
    """Per-row parameters for the rows that sample in this step (device arrays).

    Only what the step reads is built: the sampling parameters not at all when every row is
    greedy, a penalty only when some row uses it. What is built reaches the device as ONE
    host array (per-row slices of it): MLX keeps each array made from host data in CUDA
    managed memory, which the device pages over on first read (engine/runner.device_ints
    packs the step's inputs the same way)."""

    temperature: Optional[mx.array]  # (R,) float32; 0 for greedy rows; None: all greedy
    top_k: Optional[mx.array]  # (R,) int32; vocab size where disabled
    top_p: Optional[mx.array]  # (R,) float32
    min_p: Optional[mx.array]  # (R,) float32
    seed: Optional[mx.array]  # (R,) uint32
    counter: Optional[mx.array]  # (R,) uint32, the index of the token being sampled
    all_greedy: bool
    needs_sort: bool  # some row uses top-k or top-p
    needs_min_p: bool
    repetition_penalty: Optional[mx.array]  # (R,) or None when no row uses it
    presence_penalty: Optional[mx.array]
    frequency_penalty: Optional[mx.array]
    prompt_and_output_ids: Optional[mx.array]  # (R, L) padded with vocab_size
    output_ids: Optional[mx.array]  # (R, L) padded with vocab_size
    num_logprobs: int  # max top-n asked by any row; 0: none
    want_logprobs: bool

    @classmethod
    def build(cls, rows: Sequence[ScheduledRequest], vocab_size: int,
              rng: random.Random) -> "SamplingBatch":
        ps = [r.sampling_params for r in rows]
        sampled = [p.temperature > 0 for p in ps]
        all_greedy = not any(sampled)
        use_rep = any(p.repetition_penalty != 1 for p in ps)
        use_out = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in ps)
        floats: dict[str, list] = {}
        ints: dict[str, list] = {}
        if not all_greedy:
            floats.update(temperature=[p.temperature for p in ps], top_p=[p.top_p for p in ps],
                          min_p=[p.min_p for p in ps])
            # Unseeded sampled rows draw a fresh seed every step: they need no reproducibility
            # (greedy rows read no seed, so they draw none).
            ints.update(top_k=[p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in ps],
                        seed=[p.seed & 0xFFFFFFFF if p.seed is not None
                              else rng.getrandbits(32) if s else 0 for s, p in zip(sampled, ps)],
                        counter=[r.num_output_tokens for r in rows])
        if use_rep:
            floats["repetition_penalty"] = [p.repetition_penalty for p in ps]
        if use_out:
            floats.update(presence_penalty=[p.presence_penalty for p in ps],
                          frequency_penalty=[p.frequency_penalty for p in ps])
        dev = _one_copy(floats, ints, len(rows))
        return cls(
            temperature=dev.get("temperature"), top_k=dev.get("top_k"), top_p=dev.get("top_p"),
            min_p=dev.get("min_p"), seed=dev.get("seed"), counter=dev.get("counter"),
            all_greedy=all_greedy,
            needs_sort=any(s and (0 < p.top_k < vocab_size or p.top_p < 1)
                           for s, p in zip(sampled, ps)),
            needs_min_p=any(s and p.min_p > 0 for s, p in zip(sampled, ps)),
            repetition_penalty=dev.get("repetition_penalty"),
            presence_penalty=dev.get("presence_penalty"),
            frequency_penalty=dev.get("frequency_penalty"),
            prompt_and_output_ids=_pad([r.prompt_token_ids + r.output_token_ids for r in rows],
                                       vocab_size) if use_rep else None,
            output_ids=_pad([r.output_token_ids for r in rows], vocab_size) if use_out else None,
            num_logprobs=max(p.logprobs for p in ps),
            want_logprobs=any(p.return_logprobs or p.logprobs for p in ps),
        )


def _one_copy(floats: dict[str, list], ints: dict[str, list], n: int) -> dict[str, mx.array]:
    """Per-row float32 and 32-bit integer parameters (n rows each) as device arrays from one
    uint32 host array: the floats travel as their bits (an integer array, so no conversion can
    touch them; a seed's bits could be a float NaN), and come back by mx.view; top_k comes
    back int32, the other integers uint32."""
    if not floats and not ints:
        return {}
    packed = np.concatenate([np.array(list(floats.values()), np.float32).reshape(-1).view(np.uint32),
                             np.array(list(ints.values()), np.uint32).reshape(-1)])
    staged, out = _device(packed), {}
    for i, name in enumerate([*floats, *ints]):
        part = staged[i * n:(i + 1) * n]
        out[name] = mx.view(part, mx.float32 if name in floats
                            else mx.int32 if name == "top_k" else mx.uint32)
    return out


# argmax over the vocabulary in two stages: the best of each chunk of about ARGMAX_CHUNK ids
# (the largest divisor of the vocabulary from ARGMAX_CHUNK down to half of it), then the best
# chunk (0: one mx.argmax). On an H200 MLX's one-stage argmax over 128 x 32,768 logits took
# 144 us a step, the two stages of 1,024 37 us each (`gpu_trace --batch 128 --context 320
# --set sampling.ARGMAX_CHUNK=1024`, fifteenth session).
ARGMAX_CHUNK = 1024


@functools.lru_cache(maxsize=None)
def _argmax_chunk(vocab: int, most: int) -> int:
    """The largest divisor of vocab from most down to most // 2 + 1; 0 if none (every step
    asks, so it is worked out once)."""
    return next((c for c in range(most, most // 2, -1) if vocab % c == 0), 0)


def argmax(x: mx.array) -> mx.array:
    """The first index of each row's maximum (R, V) -> (R,) int32, as mx.argmax gives it:
    the first chunk holding the row's maximum, and in it the first index of it."""
    rows, vocab = x.shape
    c = _argmax_chunk(vocab, ARGMAX_CHUNK)
    if not c or vocab <= c:
        return mx.argmax(x, axis=-1).astype(mx.int32)
    chunks = x.reshape(rows, vocab // c, c)
    best_in = mx.argmax(chunks, axis=-1)  # (R, V / c)
    best = mx.take_along_axis(chunks, best_in[..., None], axis=-1)[..., 0]
    chunk = mx.argmax(best, axis=-1)
    within = mx.take_along_axis(best_in, chunk[:, None], axis=-1)[:, 0]
    return (chunk * c + within).astype(mx.int32)


@dataclass
class SamplerOutput:
    token_ids: mx.array  # (R,) int32
    logprobs: Optional[mx.array]  # (R,) float32: the sampled token's, raw model distribution
    top_ids: Optional[mx.array]  # (R, n) int32, best first
    top_logprobs: Optional[mx.array]  # (R, n) float32


def sample(logits: mx.array, batch: SamplingBatch) -> SamplerOutput:
    """Sample one token per row of logits (R, V), float32."""
    raw = logits
    logits = _apply_penalties(logits, batch)
    greedy_tokens = argmax(logits)
    if batch.all_greedy:
        tokens = greedy_tokens
    else:
        # Greedy rows divide by 1 here; their token comes from greedy_tokens below.
        temp = mx.where(batch.temperature > 0, batch.temperature, 1.0)
        scaled = logits / temp[:, None]
        if batch.needs_sort:
            scaled = _top_k_top_p(scaled, batch.top_k, batch.top_p)
        if batch.needs_min_p:
            probs = mx.softmax(scaled, axis=-1)
            limit = batch.min_p[:, None] * mx.max(probs, axis=-1, keepdims=True)
            scaled = mx.where(probs < limit, -mx.inf, scaled)
        gumbel = -mx.log(-mx.log(_hash_uniform(batch.seed, batch.counter, logits.shape[-1])))
        sampled = argmax(scaled + gumbel)
        tokens = mx.where(batch.temperature > 0, sampled, greedy_tokens)

    out = SamplerOutput(tokens, None, None, None)
    if batch.want_logprobs:
        logprobs = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
        out.logprobs = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        n = batch.num_logprobs
        if n:
            top = mx.argpartition(-logprobs, kth=n - 1, axis=-1)[:, :n]
            top_lp = mx.take_along_axis(logprobs, top, axis=-1)
            order = mx.argsort(-top_lp, axis=-1)
            out.top_ids = mx.take_along_axis(top, order, axis=-1).astype(mx.int32)
            out.top_logprobs = mx.take_along_axis(top_lp, order, axis=-1)
    return out


def _apply_penalties(logits: mx.array, b: SamplingBatch) -> mx.array:
    vocab = logits.shape[-1]
    if b.repetition_penalty is not None:
        seen = _counts(b.prompt_and_output_ids, vocab) > 0
        penalty = b.repetition_penalty[:, None]
        penalized = mx.where(logits > 0, logits / penalty, logits * penalty)
        logits = mx.where(seen, penalized, logits)
    if b.presence_penalty is not None:
        counts = _counts(b.output_ids, vocab)
        logits = logits - b.frequency_penalty[:, None] * counts
        logits = logits - b.presence_penalty[:, None] * (counts > 0)
    return logits


def _counts(ids: mx.array, vocab: int) -> mx.array:
    """(R, L) ids padded with `vocab` -> (R, V) occurrence counts."""
    rows = mx.arange(ids.shape[0])[:, None]
    counts = mx.zeros((ids.shape[0], vocab + 1), mx.float32).at[rows, ids].add(1.0)
    return counts[:, :vocab]


def _top_k_top_p(logits: mx.array, top_k: mx.array, top_p: mx.array) -> mx.array:
    """Mask logits outside each row's top-k, then outside its top-p nucleus."""
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)  # descending
    rank = mx.arange(logits.shape[-1])[None, :]
    sorted_logits = mx.where(rank < top_k[:, None], sorted_logits, -mx.inf)
    probs = mx.softmax(sorted_logits, axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    keep = (before < top_p[:, None]) & (rank < top_k[:, None])
    num_kept = mx.maximum(keep.sum(axis=-1), 1)
    cutoff = mx.take_along_axis(sorted_logits, (num_kept - 1)[:, None].astype(mx.int32), axis=-1)
    return mx.where(logits < cutoff, -mx.inf, logits)


def _hash_uniform(seed: mx.array, counter: mx.array, vocab: int) -> mx.array:
    """(R, V) uniforms in (0, 1) from a murmur3-style mix of (seed, counter, column)."""
    def fmix(x):
        x = x ^ (x >> 16)
        x = x * mx.array(0x85EBCA6B, mx.uint32)
        x = x ^ (x >> 13)
        x = x * mx.array(0xC2B2AE35, mx.uint32)
        return x ^ (x >> 16)

    row = fmix(seed ^ fmix(counter + mx.array(0x9E3779B9, mx.uint32)))  # (R,)
    col = mx.arange(vocab, dtype=mx.uint32) * mx.array(0x27D4EB2F, mx.uint32)  # (V,)
    x = fmix(row[:, None] ^ col[None, :])
    return ((x >> 8).astype(mx.float32) + 0.5) * (1.0 / (1 << 24))


def _pad(seqs: list[tuple[int, ...]], pad: int) -> mx.array:
    width = max(1, max(len(s) for s in seqs))
    out = np.full((len(seqs), width), pad, np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return _device(out)


_device = mx.array  # host data to the device (a name of its own, for tests to count)
