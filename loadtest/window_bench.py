"""Window-bounded KV memory: sequences growing far past a sliding window hold a bounded pool.

    python -m loadtest.window_bench --shape 7b --dtype bfloat16 --num-seqs 32 --total-len 16384

A v0.1-style config (sliding window 4096) runs N sequences from a short prompt to total-len
tokens each. Every `--report-every` generated tokens it prints the decode throughput of that
stretch and the KV blocks in use, and at the end the peak against the bound
N x (ceil(window / block_size) + 1), over the whole run and once every prompt has been read
(a prompt is read in one chunk of up to max(2048, prompt-len) tokens, whose blocks are all
live until the chunk has run, so long prompts overshoot the bound while they are read).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from engine.config import ModelArgs
from engine.engine import DTYPES, EngineConfig, LLMEngine
from engine.kv_cache import kv_bytes_per_token
from loadtest.offline_bench import SHAPES, _NoTokenizer, random_weights
from scheduler.request import SamplingParams


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--num-seqs", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--total-len", type=int, default=16384)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--report-every", type=int, default=1024)
    a = ap.parse_args(argv)

    args = ModelArgs.from_dict({**SHAPES[a.shape], "sliding_window": a.window,
                                "rope_theta": 1e4, "vocab_size": 32000})
    model, _ = random_weights(args, DTYPES[a.dtype], None)
    bound = a.num_seqs * (math.ceil(a.window / a.block_size) + 1)
    # Room for the bound plus the prompts, which are read before any block can be freed.
    num_blocks = bound + a.num_seqs * (math.ceil(a.prompt_len / a.block_size) + 2)
    gib = num_blocks * a.block_size * kv_bytes_per_token(args, DTYPES[a.dtype]) / (1 << 30)
    engine = LLMEngine(model, args, _NoTokenizer(args), EngineConfig(
        kv_cache_memory_gib=gib, block_size=a.block_size, max_num_seqs=a.num_seqs,
        max_num_batched_tokens=max(2048, a.prompt_len), enable_prefix_caching=False))
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=a.total_len - a.prompt_len, ignore_eos=True)
    for i in range(a.num_seqs):
        engine.add_request(f"w{i}", rng.integers(0, args.vocab_size, a.prompt_len).tolist(), params)

    print(f"{a.num_seqs} sequences, window {a.window}, block {a.block_size}: pool "
          f"{engine.kv_manager.num_blocks} blocks, bound {bound}", flush=True)
    print(f"{'tokens/seq':>10} {'decode tok/s':>13} {'KV blocks used':>15}", flush=True)
    generated, peak, decode_peak, mark, t_mark = 0, 0, 0, a.report_every, time.perf_counter()
    last_report = 0
    while engine.has_unfinished_requests():
        generated += sum(len(o.new_token_ids) for o in engine.step())
        used = engine.kv_manager.num_used_blocks
        peak = max(peak, used)
        if not engine.scheduler.waiting and all(
                r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running):
            decode_peak = max(decode_peak, used)  # every prompt read: only growth by decoding
        per_seq = generated // a.num_seqs
        if per_seq >= mark:
            now = time.perf_counter()
            rate = (generated - last_report) / (now - t_mark)
            print(f"{a.prompt_len + per_seq:>10} {rate:>13.1f} {used:>15}", flush=True)
            mark += a.report_every
            t_mark, last_report = now, generated
    print(f"peak KV blocks {peak} (bound {bound}: {'within' if peak <= bound else 'ABOVE'}); "
          f"once every prompt was read {decode_peak} "
          f"({'within' if decode_peak <= bound else 'ABOVE'})")


if __name__ == "__main__":
    main()
