"""The `mistral-serve` command line: one small function per subcommand.

Adding a subcommand: write `register_<name>(subparsers)` that adds its parser and sets
`func=<handler>` (handler(args) -> exit code), and list it in COMMANDS.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Callable, Optional

from service.cli_tools import COMMANDS as TOOL_COMMANDS
from service.config import LOG_LEVELS, ServerConfig

log = logging.getLogger("mistral_serve")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---- serve ---------------------------------------------------------------------------------
def register_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over gRPC",
                              description="Serve a model over gRPC, with Prometheus metrics.")
    d = ServerConfig()
    m = p.add_argument_group("model and engine")
    m.add_argument("--model", help="checkpoint directory or Hugging Face hub id "
                                   "(default: the built-in demo model, random weights)")
    m.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="compute dtype (default: the checkpoint's)")
    m.add_argument("--kv-cache-memory", type=float, metavar="GIB",
                   help="KV cache size in GiB (default: half of the free memory)")
    m.add_argument("--max-num-seqs", type=int, default=64, help="most requests per step")
    m.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="most tokens per step (prompt chunks + decodes)")
    m.add_argument("--max-model-len", type=int,
                   help="cap on prompt + output tokens (default: the model's context)")
    m.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    m.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse KV blocks of identical prompt prefixes")
    m.add_argument("--attention-backend", choices=("auto", "portable", "cuda"), default="auto",
                   help="decode attention: the CUDA paged kernel where it passes its self-check "
                        "(auto), always the portable gather + SDPA path, or the kernel or fail")

    s = p.add_argument_group("server")
    s.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    s.add_argument("--port", type=int, default=d.port, help=f"gRPC port (default {d.port})")
    s.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help=f"Prometheus metrics port, 0 to turn off (default {d.metrics_port})")
    s.add_argument("--model-name", help="name in ModelInfo and metric labels")
    s.add_argument("--max-waiting", type=int, default=d.max_waiting,
                   help="queued requests beyond this get RESOURCE_EXHAUSTED")
    s.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap,
                   help="largest max_tokens a request may ask for")
    s.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="max_tokens of requests that leave it unset")
    s.add_argument("--max-prompt-tokens", type=int, help="reject longer prompts")
    s.add_argument("--stream-interval", type=int, default=d.stream_interval, metavar="N",
                   help="GenerateStream: first token at once, then one message per N tokens "
                        f"(default {d.stream_interval}; larger cuts per-token server work)")
    s.add_argument("--engine-process", action=argparse.BooleanOptionalAction,
                   default=d.engine_process,
                   help="run the engine in its own process, no GIL shared with gRPC (default; "
                        "--no-engine-process runs it on a thread of the server process)")
    s.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help="largest gRPC message accepted")
    s.add_argument("--api-key", help="require 'authorization: Bearer <key>' on every call "
                                     "(health checks excepted)")
    s.add_argument("--api-key-file", help="read the API key from this file")
    s.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key, serve TLS")
    s.add_argument("--tls-key", help="PEM private key")
    s.add_argument("--drain-seconds", type=float, default=d.drain_seconds,
                   help="on SIGTERM, how long in-flight calls may finish (default "
                        f"{d.drain_seconds:g})")
    s.add_argument("--log-level", default=d.log_level, choices=LOG_LEVELS)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from engine.engine import EngineConfig  # heavy (MLX): only for commands that need it
    from service.server import serve

    setup_logging(args.log_level)
    try:
        config = ServerConfig(
            host=args.host, port=args.port, metrics_port=args.metrics_port,
            model_name=args.model_name, max_waiting=args.max_waiting, api_key=args.api_key,
            api_key_file=args.api_key_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
            drain_seconds=args.drain_seconds, max_message_bytes=args.max_message_bytes,
            max_prompt_tokens=args.max_prompt_tokens, default_max_tokens=args.default_max_tokens,
            max_tokens_cap=args.max_tokens_cap, stream_interval=args.stream_interval,
            engine_process=args.engine_process, log_level=args.log_level)
        engine_config = EngineConfig(
            model=args.model, dtype=args.dtype, block_size=args.block_size,
            kv_cache_memory_gib=args.kv_cache_memory, max_num_batched_tokens=
            args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
            attention_backend=args.attention_backend)
    except ValueError as e:
        print(f"mistral-serve serve: error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config, engine_config))


# ---- entry point ---------------------------------------------------------------------------
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [register_serve, *TOOL_COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-serve", description="Batched serving of Mistral-family models on MLX.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Console script `mistral-serve`."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
