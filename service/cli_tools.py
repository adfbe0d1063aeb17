"""The offline subcommands of `mistral-serve`: generate, bench, demo-model, convert.

Each is `register_<name>(subparsers)` + a handler returning an exit code; service/cli.py
lists them. MLX-heavy imports stay inside the handlers so `--help` is quick.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import wraps


def _user_errors(fn):
    """Turn load and input errors into one line on stderr and exit code 1, not a traceback."""
    @wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from engine.weights import ModelLoadError
        from scheduler.request import ValidationError
        try:
            return fn(args)
        except (ModelLoadError, ValidationError, ValueError, FileNotFoundError) as e:
            print(f"mistral-serve {args.command}: error: {e}", file=sys.stderr)
            return 1
    return run


# ---- generate ------------------------------------------------------------------------------
def register_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text for one prompt, streamed",
                              description="Format PROMPT as an Instruct turn and stream the answer.")
    p.add_argument("--model", help="checkpoint directory or hub id (default: the demo model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, no chat format")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    p.set_defaults(func=run_generate)


@_user_errors
def run_generate(args: argparse.Namespace) -> int:
    from engine.api import generate, load_model, load_tokenizer
    from engine.demo_model import ensure_demo_model

    source = args.model or str(ensure_demo_model())
    model = load_model(source, dtype=args.dtype)
    tokenizer = load_tokenizer(str(model.path))
    if args.raw:
        ids = tokenizer.encode(args.prompt, add_bos=True)
    else:
        ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    print(f"[prompt: {len(ids)} tokens]", file=sys.stderr)
    detok = tokenizer.detokenizer()
    start, n = time.perf_counter(), 0
    for token in generate(model, tokenizer, ids, temperature=args.temperature,
                          max_tokens=args.max_tokens, top_p=args.top_p, seed=args.seed):
        n += 1
        print(detok.add(token), end="", flush=True)
    print(detok.flush())
    seconds = time.perf_counter() - start
    print(f"[{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tok/s]", file=sys.stderr)
    return 0


# ---- bench ---------------------------------------------------------------------------------
def register_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="load time, prompt and decode speed, peak memory",
                              description="Time prompt processing and decoding of random prompts.")
    p.add_argument("--model", help="checkpoint directory or hub id (default: the demo model)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together")
    p.add_argument("--iterations", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--kv-cache-memory", type=float, metavar="GIB")
    p.set_defaults(func=run_bench_cmd)


@_user_errors
def run_bench_cmd(args: argparse.Namespace) -> int:
    from engine.bench import run_bench
    from engine.demo_model import ensure_demo_model

    result = run_bench(args.model or str(ensure_demo_model()), dtype=args.dtype,
                       prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                       iterations=args.iterations, batch_size=args.batch_size,
                       kv_cache_memory_gib=args.kv_cache_memory)
    print(result.report())
    return 0


# ---- demo-model ----------------------------------------------------------------------------
def register_demo_model(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo-model", help="write a random-weight checkpoint",
                              description="Write a random-weight Mistral checkpoint in the "
                                          "mlx-community layout, with the real tokenizer.")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--sliding-window", type=int)
    p.add_argument("--vocab", choices=("v1", "v3"), default="v3", help="tokenizer version")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--bits", type=int, choices=(4, 8))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo_model)


@_user_errors
def run_demo_model(args: argparse.Namespace) -> int:
    from engine.demo_model import write_demo_model

    path = write_demo_model(args.out, layers=args.layers, hidden=args.hidden, heads=args.heads,
                            kv_heads=args.kv_heads, intermediate=args.intermediate,
                            sliding_window=args.sliding_window, vocab=args.vocab,
                            dtype=args.dtype, bits=args.bits, group_size=args.group_size,
                            seed=args.seed)
    print(f"wrote {path}")
    return 0


# ---- convert -------------------------------------------------------------------------------
def register_convert(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="Hugging Face checkpoint -> MLX checkpoint",
                              description="Convert a Hugging Face Mistral checkpoint to MLX, "
                                          "optionally quantized.")
    p.add_argument("--hf-path", required=True, help="local directory or hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, choices=(4, 8))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="bfloat16")
    p.set_defaults(func=run_convert)


@_user_errors
def run_convert(args: argparse.Namespace) -> int:
    from engine.convert import convert

    path = convert(args.hf_path, args.out, bits=args.bits, group_size=args.group_size,
                   dtype=args.dtype)
    print(f"wrote {path}")
    return 0


COMMANDS = [register_generate, register_bench, register_demo_model, register_convert]
