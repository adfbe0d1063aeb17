"""Load-test a running mistral-serve over gRPC and report what vLLM's `bench serve` reports.

    python -m loadtest.serve_bench --target 127.0.0.1:50051 \\
        --metrics-url http://127.0.0.1:9400/metrics \\
        --dataset random --random-input-len 256 --random-output-len 64 --num-prompts 200 \\
        --request-rate 8 --max-concurrency 32 --result-file out/result.json --plot-dir out/

    python -m loadtest.serve_bench ... --sweep request-rate=1,2,4,inf --plot-dir out/

Exit status: 0 after a run (even with failed requests: they are counted and reported),
1 when the benchmark cannot run (server unreachable, metrics unreadable), 2 for bad
options or an unusable dataset file.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from loadtest.client import ServerUnreachable, ServeClient
from loadtest.datasets import (DATASETS, BenchRequest, prefix_requests, random_requests,
                               sharegpt_requests)
from loadtest.report import (format_report, format_sweep_table, parse_goodput,
                             parse_percentile_metrics, parse_percentiles, summarize,
                             sweep_result, write_json, write_sweep_csv)
from loadtest.runner import BenchmarkError, RunConfig, RunResult, run_benchmark, warm_up
from loadtest.server_metrics import MetricsUnavailable, MetricsWatcher

PROG = "python -m loadtest.serve_bench"
SWEEPABLE = {"request-rate": float, "max-concurrency": int}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s = p.add_argument_group("server")
    s.add_argument("--target", default="127.0.0.1:50051", help="gRPC host:port")
    s.add_argument("--metrics-url", help="the server's Prometheus /metrics URL; adds KV cache, "
                                         "preemption and prefix cache numbers")
    s.add_argument("--metrics-interval", type=float, default=1.0,
                   help="seconds between /metrics samples during the run")
    s.add_argument("--api-key", help="sent as 'authorization: Bearer KEY' "
                                     "(default: $MISTRAL_SERVE_API_KEY)")
    s.add_argument("--tls-ca", help="PEM root certificate: connect with TLS, trusting it")
    s.add_argument("--tls-server-name", help="expected name in the server's certificate, "
                                             "when it differs from the target host")
    s.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for the server's health check to say SERVING")
    s.add_argument("--request-timeout", type=float, help="deadline of each request (seconds)")

    d = p.add_argument_group("dataset")
    d.add_argument("--dataset", choices=DATASETS, default="random")
    d.add_argument("--dataset-path", help="ShareGPT JSON file (--dataset sharegpt)")
    d.add_argument("--num-prompts", type=int, default=1000, help="requests measured")
    d.add_argument("--random-input-len", type=int, default=1024)
    d.add_argument("--random-output-len", type=int, default=128,
                   help="output tokens per request (random and prefix datasets)")
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    d.add_argument("--prefix-num-groups", type=int, default=4,
                   help="distinct shared prefixes (prefix dataset)")
    d.add_argument("--prefix-len", type=int, default=512, help="tokens of each shared prefix")
    d.add_argument("--prefix-suffix-len", type=int, default=64,
                   help="unique tokens after the prefix")
    d.add_argument("--sharegpt-output-len", type=int,
                   help="max_tokens of every ShareGPT request (default: the answer's length)")
    d.add_argument("--ignore-eos", action="store_true",
                   help="ShareGPT: generate max_tokens even past EOS (random/prefix always do)")
    d.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")

    t = p.add_argument_group("traffic")
    t.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second (inf: all at once)")
    t.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival times: 1 Poisson, <1 burstier")
    t.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    t.add_argument("--num-warmups", type=int, default=0,
                   help="requests sent and discarded before the measured run")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--sweep", metavar="PARAM=V1,V2,...",
                   help=f"run once per value of {' or '.join(SWEEPABLE)}, e.g. "
                        "request-rate=1,2,4,inf")

    r = p.add_argument_group("report")
    r.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                   help="which latencies to print (ttft, tpot, itl, e2el)")
    r.add_argument("--metric-percentiles", default="99", help="percentiles, e.g. 50,90,99")
    r.add_argument("--goodput", nargs="+", metavar="METRIC:MS",
                   help="SLOs, e.g. ttft:500 tpot:50 e2el:3000; adds request goodput")
    r.add_argument("--result-file", help="write the results as JSON here")
    r.add_argument("--save-detailed", action="store_true",
                   help="include every request's record in the JSON")
    r.add_argument("--plot-dir", help="write PNG plots here")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_sweep(text: Optional[str]) -> tuple[Optional[str], list[Any]]:
    """"request-rate=1,2,inf" -> ("request-rate", [1.0, 2.0, inf])."""
    if not text:
        return None, [None]
    name, sep, values = text.partition("=")
    name = name.strip().replace("_", "-")
    if not sep or name not in SWEEPABLE:
        raise ValueError(f"--sweep takes {' or '.join(SWEEPABLE)}=V1,V2,...; got {text!r}")
    try:
        parsed = [SWEEPABLE[name](v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: values must be {SWEEPABLE[name].__name__}s") \
            from None
    if not parsed:
        raise ValueError(f"--sweep {text!r} has no values")
    return name, parsed


def run_config(args: argparse.Namespace, sweep_name: Optional[str], value: Any) -> RunConfig:
    cfg = RunConfig(request_rate=args.request_rate, burstiness=args.burstiness,
                    max_concurrency=args.max_concurrency, seed=args.seed,
                    progress=not args.no_progress)
    if sweep_name is not None:
        cfg = replace(cfg, **{sweep_name.replace("-", "_"): value})
    return cfg


def config_dict(args: argparse.Namespace, cfg: RunConfig, percentile_metrics: list[str],
                percentiles: list[float], goodput: dict[str, float]) -> dict[str, Any]:
    """The options that shaped a run, for the result JSON (the same keys for every dataset)."""
    return {
        "dataset": args.dataset, "dataset_path": args.dataset_path,
        "num_prompts": args.num_prompts, "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "prefix_num_groups": args.prefix_num_groups, "prefix_len": args.prefix_len,
        "prefix_suffix_len": args.prefix_suffix_len,
        "sharegpt_output_len": args.sharegpt_output_len, "ignore_eos": args.ignore_eos,
        "temperature": args.temperature, "request_rate": cfg.request_rate,
        "burstiness": cfg.burstiness, "max_concurrency": cfg.max_concurrency,
        "num_warmups": args.num_warmups, "seed": cfg.seed,
        "percentile_metrics": percentile_metrics, "metric_percentiles": percentiles,
        "goodput": goodput or None,
    }


def model_dict(info: Any) -> dict[str, Any]:
    return {"model_name": info.model_name, "model_path": info.model_path, "dtype": info.dtype,
            "quantization_bits": info.quantization_bits, "vocab_size": info.vocab_size,
            "max_num_seqs": info.max_num_seqs, "block_size": info.block_size,
            "kv_blocks_total": info.kv_blocks_total}


async def build_requests(args: argparse.Namespace, client: ServeClient,
                         vocab_size: int) -> list[BenchRequest]:
    if args.dataset == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, vocab_size, args.seed)
    if args.dataset == "prefix":
        return prefix_requests(args.num_prompts, args.prefix_num_groups, args.prefix_len,
                               args.prefix_suffix_len, args.random_output_len,
                               args.random_range_ratio, vocab_size, args.seed)
    if not args.dataset_path:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
    return await sharegpt_requests(args.dataset_path, args.num_prompts, args.seed,
                                   client.count_tokens, args.sharegpt_output_len,
                                   ignore_eos=args.ignore_eos)


def _describe(cfg: RunConfig) -> str:
    rate = "inf" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g}"
    kind = "Poisson process" if cfg.burstiness == 1.0 else "gamma distribution"
    return (f"Traffic request rate: {rate}\nBurstiness factor: {cfg.burstiness} ({kind})\n"
            f"Maximum request concurrency: {cfg.max_concurrency}")


async def run(args: argparse.Namespace) -> int:
    percentile_metrics = parse_percentile_metrics(args.percentile_metrics)
    percentiles = parse_percentiles(args.metric_percentiles)
    goodput = parse_goodput(args.goodput)
    sweep_name, sweep_values = parse_sweep(args.sweep)
    configs = [run_config(args, sweep_name, v) for v in sweep_values]  # validates them all
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    tail_p = max(percentiles)

    api_key = args.api_key or os.environ.get("MISTRAL_SERVE_API_KEY")  # env: keeps it off `ps`
    async with ServeClient(args.target, api_key=api_key, tls_ca=args.tls_ca,
                           tls_server_name=args.tls_server_name, temperature=args.temperature,
                           request_timeout=args.request_timeout) as client:
        info = await client.wait_ready(args.connect_timeout)
        watcher = None
        if args.metrics_url:
            watcher = MetricsWatcher(args.metrics_url, args.metrics_interval)
            await asyncio.to_thread(watcher.check)
        requests = await build_requests(args, client, info.vocab_size)
        print(f"Model: {info.model_name} ({info.dtype}) at {args.target}; dataset "
              f"{args.dataset}, {len(requests)} prompts")
        if args.num_warmups:
            print(f"Warming up with {args.num_warmups} request(s)...")
            await warm_up(client, requests, args.num_warmups, configs[0].max_concurrency)

        results, runs = [], []
        for value, cfg in zip(sweep_values, configs):
            if sweep_name is not None:
                print(f"\n--- sweep point {sweep_name}={value:g} ---")
            print(_describe(cfg))
            result_run = await run_benchmark(client, requests, cfg, watcher)
            result = summarize(result_run, target=args.target, model=model_dict(info),
                               config=config_dict(args, cfg, percentile_metrics, percentiles,
                                                  goodput),
                               percentiles=percentiles, goodput=goodput,
                               detailed=args.save_detailed)
            print(format_report(result, percentile_metrics, percentiles))
            results.append(result)
            runs.append(result_run)

    if sweep_name is None:
        write_run_outputs(args, runs[0], results[0], tail_p)
    else:
        write_sweep_outputs(args, sweep_name, sweep_values, runs, results, tail_p)
    return 0


def write_run_outputs(args: argparse.Namespace, run_: RunResult, result: dict[str, Any],
                      tail_p: float) -> None:
    """--result-file and --plot-dir of a single run."""
    if args.result_file:
        print(f"Results written to {write_json(args.result_file, result)}")
    if args.plot_dir:
        from loadtest.plots import plot_run  # matplotlib only when plots are asked for

        paths = plot_run(run_, result, args.plot_dir, tail_p)
        print(f"Plots written to {', '.join(str(p) for p in paths)}")


def write_sweep_outputs(args: argparse.Namespace, name: str, values: list[Any],
                        runs: list[RunResult], results: list[dict[str, Any]],
                        tail_p: float) -> None:
    """The summary table, and the sweep's --result-file (+ CSV) and --plot-dir."""
    summary = sweep_result(name, values, results, tail_p)
    print("\n" + format_sweep_table(name, summary["summary"], tail_p))
    if args.result_file:
        path = write_json(args.result_file, summary)
        csv = write_sweep_csv(Path(path).with_suffix(".csv"), name, summary["summary"])
        print(f"Results written to {path} and {csv}")
    if args.plot_dir:
        from loadtest.plots import plot_run, plot_sweep

        for value, run_, result in zip(values, runs, results):
            plot_run(run_, result, Path(args.plot_dir) / f"{name}-{value:g}", tail_p)
        curve = plot_sweep(name, values, results, args.plot_dir, tail_p)
        print(f"Plots written to {curve} and one folder per point")


def main(argv: Optional[list[str]] = None) -> int:
    """Parse argv, run the benchmark; the exit status (errors are one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (ServerUnreachable, MetricsUnavailable, BenchmarkError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
