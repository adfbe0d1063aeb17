"""Offline throughput: this engine vs mlx-lm's BatchGenerator, same model, same workload, one run.

    python -m loadtest.offline_bench --model DIR --num-prompts 64 --input-len 256 --output-len 128
    python -m loadtest.offline_bench --shape 7b --dtype bfloat16 ...   # random weights, no disk

Every request gets random prompt ids and generates exactly --output-len tokens (EOS ignored),
so both engines do the same work. Output tok/s = generated tokens / wall time from the
first submission to the last token. Both are warmed up first (MLX compiles kernels on
first use, slowly on CUDA): by default on 4 short requests; with --warmup full by the
measured workload itself, so that every step shape (and its kernel compiles, cuBLAS and cuDNN
plans, compiled decode traces) has been seen once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from engine.config import ModelArgs
from engine.engine import DTYPES, EngineConfig, LLMEngine
from engine.kv_cache import kv_cache_gib
from engine.model import Mistral
from loadtest import settings
from scheduler.request import SamplingParams

SHAPES = {
    # Mistral-7B v0.1 / v0.3 shapes; "small" fits a CPU benchmark.
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
               rope_theta=1e6, max_position_embeddings=32768),
    "small": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1536,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=32768,
                  rope_theta=1e6, max_position_embeddings=32768),
    # Long-context runs on a CPU (loadtest/window_bench.py): the KV manager's behaviour, not speed.
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                 num_attention_heads=4, num_key_value_heads=1, vocab_size=32768,
                 rope_theta=1e6, max_position_embeddings=32768),
}


@dataclass
class Result:
    engine: str
    num_requests: int
    output_tokens: int
    seconds: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds


def random_weights(args: ModelArgs, dtype: mx.Dtype, bits: int | None, seed: int = 0):
    """Random parameters for `args`, as (name, array) pairs with Hugging Face names."""
    mx.random.seed(seed)
    model = Mistral(args)
    model.update(tree_map(lambda p: (mx.random.normal(p.shape) * p.shape[-1] ** -0.5).astype(dtype),
                          model.parameters()))
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    return model, tree_flatten(model.parameters())


def build_peer(args: ModelArgs, weights, bits: int | None):
    """mlx-lm's own Mistral (its llama module) holding the very same arrays."""
    from mlx_lm.models import llama

    peer_args = llama.ModelArgs.from_dict({**asdict(args), "model_type": "mistral"})
    peer = llama.Model(peer_args)
    if bits:
        nn.quantize(peer, group_size=64, bits=bits)
    peer.load_weights(weights, strict=False)
    return peer


def run_ours(engine: LLMEngine, prompts, output_len: int, step_log: bool = False) -> Result:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
    tokens, calls = 0, []
    # With the step log: each wait for a launched step's samples (the host's only sync), each
    # launch (building the step in Python, then MLX encoding its kernels) and the encoding
    # alone (mx.async_eval), to tell a host-paced run from a device-paced one.
    runner = engine.runner
    with timed_calls(dict(waits=(runner, "collect"), launches=(runner, "launch"),
                          encodes=(mx, "async_eval")) if step_log else {}) as times:
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            seen = {key: len(secs) for key, secs in times.items()}
            tokens += sum(len(o.new_token_ids) for o in engine.step())
            if step_log:  # (seconds, batched tokens of the step this call launched, detail)
                inflight = engine._inflight
                sched = inflight[0] if inflight else None
                spent = {key: sum(secs[seen[key]:]) for key, secs in times.items()}
                decodes = sum(r.num_tokens == 1 for r in sched.scheduled) if sched else 0
                calls.append((time.perf_counter() - t0, sched.num_batched_tokens if sched else 0,
                              f"{decodes} decodes; launch {1e3 * spent['launches']:.1f} ms "
                              f"(encoding {1e3 * spent['encodes']:.1f}), "
                              f"wait {1e3 * spent['waits']:.1f}"))
    if step_log:
        print_step_log(calls, times["waits"], times["launches"], times["encodes"])
    return Result("mistral-serve", len(prompts), tokens, time.perf_counter() - start)


@contextlib.contextmanager
def timed_calls(targets: dict[str, tuple[object, str]]):
    """Inside the block, every call of each target (object, attribute name: a method or a
    module's function) is timed: yields {target's key: [seconds of each call]}. The
    attributes are put back after."""
    times: dict[str, list[float]] = {key: [] for key in targets}
    saved = []
    for key, (obj, name) in targets.items():
        fn, own = getattr(obj, name), vars(obj).get(name)

        def timed_fn(*a, _fn=fn, _acc=times[key], **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                _acc.append(time.perf_counter() - t0)
        saved.append((obj, name, own))
        setattr(obj, name, timed_fn)
    try:
        yield times
    finally:
        for obj, name, own in reversed(saved):
            if own is None:  # a method of the class: drop the instance's wrapper
                delattr(obj, name)
            else:
                setattr(obj, name, own)


def print_step_log(calls: list[tuple], waits: list[float] = (),
                   launches: list[float] = (), encodes: list[float] = ()) -> None:
    """Where a run's time went: step() calls grouped by the size of the step they launched
    (each call waits for the step before it, so its time is roughly that step's); how much
    of it the host spent waiting for the device (near 0: the host sets the pace), launching
    steps, and of that, in MLX's encoding of the kernels (mx.async_eval)."""
    print(f"{len(calls)} step() calls, {sum(c[0] for c in calls):.2f} s")
    for what, secs in (("waiting for the device", waits), ("launching steps", launches),
                       ("  of which MLX encoding", encodes)):
        if secs:
            print(f"  {what + ':':<24}{sum(secs):6.2f} s in all, median "
                  f"{1e3 * sorted(secs)[len(secs) // 2]:.2f} ms a step")
    groups: dict[str, list[float]] = {}
    for sec, n, *_ in calls:
        key = "0" if n == 0 else f"<= {1 << (n - 1).bit_length()}"
        groups.setdefault(key, []).append(sec)
    for key, secs in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        print(f"  launched {key:>7} tokens: {len(secs):4d} calls, {sum(secs):6.2f} s, "
              f"median {1e3 * sorted(secs)[len(secs) // 2]:7.2f} ms, max {1e3 * max(secs):7.2f} ms")
    ranked = sorted(range(len(calls)), key=lambda i: -calls[i][0])  # slowest first
    print("  slowest: " + ", ".join(f"#{i} {1e3 * calls[i][0]:.0f} ms ({calls[i][1]} tok)"
                                    for i in sorted(ranked[:8])))
    # The first 40 calls (the batch filling up) and the slowest 24, each with its detail: the
    # call's launch, MLX's encoding inside it, and its wait for the step before.
    for i in sorted(set(range(min(40, len(calls)))) | set(ranked[:24])):
        print(f"    #{i:<4d} {1e3 * calls[i][0]:7.1f} ms  {calls[i][1]:5d} tok  " + " ".join(map(str, calls[i][2:])))


def run_peer(peer, prompts, output_len: int, batch_size: int) -> Result:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(peer, max_tokens=output_len, completion_batch_size=batch_size,
                         prefill_batch_size=min(8, batch_size))
    start = time.perf_counter()
    gen.insert(prompts, [output_len] * len(prompts))
    tokens = 0
    while responses := gen.next_generated():
        tokens += len(responses)
    seconds = time.perf_counter() - start
    gen.close()
    return Result(f"mlx-lm BatchGenerator (batch {batch_size})", len(prompts), tokens, seconds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (else random weights of --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--bits", type=int, choices=[4, 8])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--kv-cache-memory", type=float, default=None, help="GiB")
    ap.add_argument("--peer-batch-sizes", default="64,128", help="mlx-lm completion batch sizes")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--step-log", action="store_true", help="print where our run's time went, by step size")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="run ours once more under cProfile; print its N costliest functions")
    ap.add_argument("--repeat", type=int, default=1, help="run ours this many times (the spread)")
    ap.add_argument("--dense-too", action="store_true",
                    help="with --bits: also an engine on the same weights dequantized; each run of "
                         "the quantized engine (also under --set, whose settings are its own) is "
                         "paired with one of it, the pair's order alternating, so that drift in "
                         "the card or host hits both")
    ap.add_argument("--warmup", choices=["short", "full"], default="short",
                    help="short: 4 prompts of 8 tokens; full: the measured workload once, untimed "
                         "(both engines: every step shape of the run has been seen once)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE,...",
                    help="then run ours again with these settings, on the same engine and weights "
                         "(repeatable, one run each): MODULE.ATTR of an engine module, or "
                         "plan.FIELD of the KernelPlan, e.g. qgemv.STAGES=2")
    a = ap.parse_args(argv)

    if a.model:
        from engine.weights import load_model
        model, args, _ = load_model(a.model, dtype=a.dtype)
        weights = tree_flatten(model.parameters())
        bits = (args.quantization or {}).get("bits")
    else:
        args = ModelArgs.from_dict(SHAPES[a.shape])
        model, weights = random_weights(args, DTYPES[a.dtype], a.bits, a.seed)
        bits = a.bits
    if a.dense_too and not bits:
        raise SystemExit("--dense-too needs a quantized model (--bits, or a quantized --model)")
    rng = np.random.default_rng(a.seed)
    prompts = [rng.integers(0, args.vocab_size, a.input_len).tolist() for _ in range(a.num_prompts)]
    warm = [rng.integers(0, args.vocab_size, a.input_len).tolist() for _ in range(4)]
    kv_gib = a.kv_cache_memory or kv_cache_gib(args, DTYPES[a.dtype], min(a.num_prompts, a.max_num_seqs),
                                               a.input_len + a.output_len)

    config = EngineConfig(kv_cache_memory_gib=kv_gib, max_num_seqs=a.max_num_seqs,
                          max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=False)
    dense = LLMEngine(*dense_model(model, args), _NoTokenizer(args), config) if a.dense_too else None
    t0 = time.perf_counter()
    engine = LLMEngine(model, args, _NoTokenizer(args), config)
    startup = time.perf_counter() - t0  # on CUDA: the kernel self-checks compile every variant
    results = []
    warm, warm_len = (prompts, a.output_len) if a.warmup == "full" else (warm, 8)
    run_ours(engine, warm, warm_len)

    def measured(label: str = "mistral-serve"):
        """One run of ours; with --dense-too a pair, the dense engine first in every other pair
        (until the peer runs, results hold only these pairs)."""
        runs = [(engine, f"{label} {bits}-bit" if dense else label)]
        if dense:
            runs.insert(len(results) // 2 % 2, (dense, f"{label} dense"))
        for eng, name in runs:
            results.append(dataclasses.replace(run_ours(eng, prompts, a.output_len, a.step_log),
                                               engine=name))
    if dense:
        run_ours(dense, warm, warm_len)
    for _ in range(a.repeat):
        measured()
    if a.profile:  # where the host's Python time goes (MLX's encoding shows as async_eval)
        import cProfile
        import pstats
        with cProfile.Profile() as prof:
            run_ours(engine, prompts, a.output_len)
        for order in ("tottime", "cumulative"):
            pstats.Stats(prof).sort_stats(order).print_stats(a.profile)
    for spec in a.set:
        with settings.applied(engine, spec):
            if a.step_log:
                print(f"-- {spec}")
            run_ours(engine, warm, warm_len)
            for _ in range(a.repeat):
                measured(f"  {spec}")
    ours = len(results)
    if not a.no_peer:
        peer = build_peer(args, weights, bits)
        for bs in [int(x) for x in a.peer_batch_sizes.split(",")]:
            run_peer(peer, warm, warm_len, bs)
            results.append(run_peer(peer, prompts, a.output_len, bs))

    device = str(mx.default_device())
    print(f"\nworkload: {a.num_prompts} requests, {a.input_len} in / {a.output_len} out, "
          f"{'checkpoint ' + a.model if a.model else a.shape + ' random weights'}, "
          f"{a.dtype}{f', {bits}-bit' if bits else ''}, device {device}")
    print(f"engine start-up (model on the device, kernel self-checks): {startup:.1f} s; "
          f"warm-up: {a.warmup}")
    print(f"kernel plan: {engine.model.plan}")
    print(f"{'engine':<40} {'output tok/s':>14} {'seconds':>9}")
    for r in results:
        print(f"{r.engine:<40} {r.output_tok_s:>14.1f} {r.seconds:>9.2f}")
    if dense:  # each quantized run over the dense run of its pair
        for label in dict.fromkeys(r.engine.rsplit(" ", 1)[0] for r in results[:ours]):
            q = [r.output_tok_s for r in results[:ours] if r.engine == f"{label} {bits}-bit"]
            d = [r.output_tok_s for r in results[:ours] if r.engine == f"{label} dense"]
            ratios = [x / y for x, y in zip(q, d)]
            print(f"{label.strip()}: {bits}-bit / dense, pair by pair: "
                  f"{', '.join(f'{x:.3f}' for x in ratios)}; mean {sum(ratios) / len(ratios):.3f}x")
    if len(results) > ours:
        best_peer = max(results[ours:], key=lambda r: r.output_tok_s)
        first = next(r for r in results if not r.engine.endswith(" dense"))
        print(f"ratio vs best peer ({best_peer.engine}): "
              f"{first.output_tok_s / best_peer.output_tok_s:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "device": device, "startup_s": startup,
                       "results": [{**asdict(r), "output_tok_s": r.output_tok_s} for r in results]},
                      f, indent=2)


def dense_model(model: Mistral, args: ModelArgs) -> tuple[Mistral, ModelArgs]:
    """`model` with its weights dequantized: the same numbers, every matmul dense (before an
    engine has fused the model's projections)."""
    params = dict(tree_flatten(model.parameters()))
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            params[f"{name}.weight"] = mx.dequantize(module.weight, module.scales, module.biases,
                                                     module.group_size, module.bits)
            del params[f"{name}.scales"], params[f"{name}.biases"]
    args = dataclasses.replace(args, quantization=None)
    dense = Mistral(args)
    dense.load_weights(list(params.items()))
    mx.eval(dense.parameters())
    return dense, args


class _NoTokenizer:
    """Random prompt ids need no text: only EOS and a do-nothing detokenizer."""

    def __init__(self, args: ModelArgs):
        self.eos_token_id = args.eos_token_id

    def detokenizer(self):
        return None


if __name__ == "__main__":
    main()
