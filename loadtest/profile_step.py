"""Where a decode step's time goes: scheduling, input building, graph building, device, update.

    python -m loadtest.profile_step --shape 7b --dtype bfloat16 --batch 1,64,128 --context 256

Each phase is timed with the device synchronized at its edges, so the phases add up to a
step (the synchronizing itself removes any overlap the engine would otherwise get).
Also times the attention pieces of one layer in isolation.

--overlap instead times the engine's own asynchronous loop (engine.step(), nothing
synchronized): per step, the host time spent building the graph, queueing it on the device
(mx.async_eval) and waiting for the previous step's samples. When the wait is near zero the
host, not the device, sets the pace.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import mlx.core as mx
import numpy as np

from engine.attention import paged_attention
from engine.config import ModelArgs
from engine.engine import DTYPES, EngineConfig, LLMEngine
from engine.kv_cache import kv_cache_gib
from engine.sampling import SamplingBatch, sample
from loadtest.offline_bench import SHAPES, _NoTokenizer, random_weights, timed_calls
from scheduler.request import SamplingParams


def timed(acc, name, fn, *a):
    mx.synchronize()
    t = time.perf_counter()
    out = fn(*a)
    mx.synchronize()
    acc[name].append(time.perf_counter() - t)
    return out


def decode_engine(shape: str, dtype: str, bits, max_batch: int, max_len: int) -> LLMEngine:
    """A random-weight engine of `shape` with a KV pool for max_batch sequences of max_len."""
    args = ModelArgs.from_dict(SHAPES[shape])
    model, _ = random_weights(args, DTYPES[dtype], bits)
    gib = kv_cache_gib(args, DTYPES[dtype], max_batch, max_len)
    return LLMEngine(model, args, _NoTokenizer(args), EngineConfig(
        kv_cache_memory_gib=gib, max_num_seqs=max_batch, max_num_batched_tokens=4096,
        enable_prefix_caching=False))


def start_decoding(engine: LLMEngine, prefix: str, batch: int, context: int, max_tokens: int,
                   seed: int = 0) -> None:
    """Add `batch` greedy requests with random `context`-token prompts."""
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    vocab = engine.model_args.vocab_size
    for i in range(batch):
        engine.add_request(f"{prefix}{batch}-{i}", rng.integers(0, vocab, context).tolist(), params)


def stop_all(engine: LLMEngine) -> None:
    """Abort every request and step until the engine is idle."""
    for r in list(engine.scheduler.running):
        engine.abort(r.request_id)
    while engine.has_unfinished_requests():
        engine.step()


def profile_decode(engine: LLMEngine, batch: int, context: int, steps: int, vocab: int):
    start_decoding(engine, "p", batch, context, steps + 8)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    runner, acc = engine.runner, defaultdict(list)
    for _ in range(steps):
        so = timed(acc, "schedule", engine.scheduler.schedule)

        def build():  # the host-built inputs: step by step, decode_carry never applies
            return runner._forward(so)
        ordered, hidden, _, _ = timed(acc, "prepare+graph", build)
        timed(acc, "forward (device)", mx.eval, hidden)
        rows = [r for r in ordered if r.sample]

        def samp():
            logits = runner.model.logits(hidden[mx.arange(len(rows))]).astype(mx.float32)
            out = sample(logits, SamplingBatch.build(rows, vocab, runner.rng))
            mx.eval(out.token_ids)
            return out
        out = timed(acc, "lm_head+sample", samp)
        from engine.runner import _to_host
        from scheduler.output import ModelRunnerOutput
        ro = ModelRunnerOutput(sampled=_to_host(rows, out))
        timed(acc, "update", engine.scheduler.update, so, ro)
    stop_all(engine)
    total = sum(np.median(v) for v in acc.values())
    print(f"\n-- decode step, batch {batch}, context ~{context}: {total * 1e3:.2f} ms/step "
          f"({batch / total:.0f} tok/s)")
    for k, v in acc.items():
        print(f"   {k:<20} {np.median(v) * 1e3:8.2f} ms")


def profile_overlap(engine: LLMEngine, batch: int, context: int, steps: int, vocab: int):
    """Time the phases of engine.step() as it runs (async, nothing added in between)."""
    import engine.runner as runner_mod
    start_decoding(engine, "o", batch, context, steps + 16, seed=1)
    for _ in range(8):  # prefill and a few warm decode steps
        engine.step()
    runner, sched = engine.runner, engine.scheduler
    with timed_calls({"build layers": (runner, "_forward"),
                      "queue (async_eval)": (runner_mod.mx, "async_eval"),
                      "wait + copy samples": (runner, "collect"),
                      "schedule": (sched, "schedule"), "update": (sched, "update")}) as times:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t0
    acc = {k: sum(v) for k, v in times.items()}
    stop_all(engine)
    print(f"\n-- engine.step() loop, batch {batch}, context ~{context}: "
          f"{wall / steps * 1e3:.2f} ms/step ({batch * steps / wall:.0f} tok/s)")
    named = 0.0
    for k, v in acc.items():
        print(f"   {k:<22} {v / steps * 1e3:8.2f} ms")
        named += v
    print(f"   {'other (launch: head+sampling graph, outputs)':<22} {(wall - named) / steps * 1e3:8.2f} ms")


def profile_attention(args: ModelArgs, dtype, batch: int, context: int, block_size=16, reps=20):
    """One layer's paged attention vs SDPA on contiguous K/V of the same size."""
    from engine.attention import AttentionGroup, AttentionMetadata
    kvh, d, h = args.num_key_value_heads, args.head_dim, args.num_attention_heads
    nblk = -(-context // block_size)
    num_blocks = batch * nblk + 1
    pool_k = mx.zeros((num_blocks * block_size, kvh, d), dtype)
    pool_v = mx.zeros_like(pool_k)
    tables = mx.arange(batch * nblk).reshape(batch, nblk).astype(mx.int32)
    q = mx.random.normal((batch, h, d)).astype(dtype)
    k = mx.random.normal((batch, kvh, d)).astype(dtype)
    slots = (tables[:, -1] * block_size).astype(mx.int32)
    mask = mx.ones((batch, 1, 1, nblk * block_size), mx.bool_)
    meta = AttentionMetadata(slots, [AttentionGroup(0, batch, None, None, tables, mask, batch, 1)])
    kc = mx.random.normal((batch, kvh, nblk * block_size, d)).astype(dtype)
    mx.eval(pool_k, pool_v, q, k, kc)

    def paged():
        pool_k[slots] = k
        pool_v[slots] = k
        mx.eval(paged_attention(q, pool_k, pool_v, meta, block_size, d ** -0.5))

    def dense():
        mx.eval(mx.fast.scaled_dot_product_attention(q[:, :, None], kc, kc, scale=d ** -0.5))

    def dense_masked():
        mx.eval(mx.fast.scaled_dot_product_attention(q[:, :, None], kc, kc, scale=d ** -0.5,
                                                     mask=mask))

    def gather_only():
        mx.eval(pool_k.reshape(num_blocks, block_size, kvh, d)[tables])

    print(f"\n-- one layer's attention, batch {batch}, context {nblk * block_size}")
    for name, fn in [("paged (ours)", paged), ("dense sdpa", dense),
                     ("dense sdpa + bool mask", dense_masked), ("gather K only", gather_only)]:
        fn()
        mx.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        mx.synchronize()
        print(f"   {name:<24} {(time.perf_counter() - t) / reps * 1e3:8.3f} ms")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--bits", type=int, choices=[4, 8])
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--overlap", action="store_true",
                    help="time the engine's asynchronous step loop instead (see above)")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batch.split(",")]
    engine = decode_engine(a.shape, a.dtype, a.bits, max(batches), a.context + a.steps + 16)
    args = engine.model_args
    for b in batches:
        if a.overlap:
            profile_overlap(engine, b, a.context, a.steps, args.vocab_size)
            continue
        profile_decode(engine, b, a.context, a.steps, args.vocab_size)
        profile_attention(args, DTYPES[a.dtype], b, a.context)


if __name__ == "__main__":
    main()
