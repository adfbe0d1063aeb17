"""`mistral-serve bench`: load time, prompt tok/s, decode tok/s and peak memory of one model."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.engine import EngineConfig, LLMEngine
from engine.kv_cache import kv_cache_gib
from engine.tokenizer import Tokenizer
from engine.weights import load_model
from scheduler.request import SamplingParams


@dataclass
class BenchResult:
    load_seconds: float
    prompt_tok_s: list[float]
    decode_tok_s: list[float]
    peak_memory_gib: float

    def report(self) -> str:
        def fmt(xs):
            return f"{statistics.mean(xs):.1f}" + (f" (±{statistics.stdev(xs):.1f})" if len(xs) > 1 else "")
        return (f"load time:     {self.load_seconds:.2f} s\n"
                f"prompt:        {fmt(self.prompt_tok_s)} tok/s\n"
                f"decode:        {fmt(self.decode_tok_s)} tok/s\n"
                f"peak memory:   {self.peak_memory_gib:.2f} GiB\n"
                f"device:        {mx.default_device()}")


def run_bench(model: str, dtype: str | None = None, prompt_tokens: int = 512,
              gen_tokens: int = 128, iterations: int = 3, batch_size: int = 1,
              kv_cache_memory_gib: float | None = None, seed: int = 0) -> BenchResult:
    """Time one batch of random prompts per iteration, after one warm-up iteration."""
    t0 = time.perf_counter()
    m, args, path = load_model(model, dtype=dtype)
    load_seconds = time.perf_counter() - t0
    tokenizer = Tokenizer.from_dir(path)
    if kv_cache_memory_gib is None:  # just what the batch needs, so peak memory means something
        kv_cache_memory_gib = kv_cache_gib(args, m.model.norm.weight.dtype, batch_size,
                                           prompt_tokens + gen_tokens)
    engine = LLMEngine(m, args, tokenizer, EngineConfig(
        kv_cache_memory_gib=kv_cache_memory_gib,
        max_num_batched_tokens=max(prompt_tokens * batch_size, 512), max_num_seqs=batch_size,
        enable_prefix_caching=False))
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True)
    prompt_speeds, decode_speeds = [], []
    mx.reset_peak_memory()
    for it in range(iterations + 1):
        for i in range(batch_size):
            ids = rng.integers(0, args.vocab_size, prompt_tokens).tolist()
            engine.add_request(f"bench-{it}-{i}", ids, params)
        start = time.perf_counter()
        first_token_at, generated = None, 0
        while engine.has_unfinished_requests():
            outs = engine.step()
            generated += sum(len(o.new_token_ids) for o in outs)
            if first_token_at is None and generated >= batch_size:
                first_token_at = time.perf_counter()
        end = time.perf_counter()
        if it == 0:
            continue  # warm-up: kernels compile on first use
        prompt_speeds.append(prompt_tokens * batch_size / (first_token_at - start))
        decode_speeds.append((generated - batch_size) / max(end - first_token_at, 1e-9))
    return BenchResult(load_seconds, prompt_speeds, decode_speeds, mx.get_peak_memory() / (1 << 30))
