"""The load generator (loadtest.serve_bench) against a real server with the tiny demo model.

Runs the generator in process through main(argv) and once through the real CLI, and checks
its numbers against what the server itself returned (usage, /metrics). Unit tests of the
arrival schedule, datasets and report run without a server.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.arrivals import intervals, send_times
from loadtest.client import RequestRecord
from loadtest.datasets import (RANDOM_ID_LOW, keep_sharegpt, prefix_requests, random_requests,
                               sharegpt_requests)
from loadtest.report import RESULT_KEYS, format_report, parse_goodput, summarize
from loadtest.runner import RunConfig, RunResult
from loadtest.serve_bench import main
from tests.test_service_e2e import REPO, free_port, start_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPECTED_KEYS = {
    "schema_version", "kind", "started_at", "target", "model", "config", "completed", "failed",
    "duration_s", "total_input_tokens", "total_output_tokens", "total_cached_tokens",
    "request_throughput", "request_goodput", "output_throughput", "peak_output_throughput",
    "peak_concurrent_requests", "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms",
    "e2el_ms", "output_tokens_per_second", "server", "errors", "requests",
}
DISTRIBUTION = {"count", "mean", "median", "std", "min", "max", "percentiles"}
SERVER_KEYS = {"metrics_url", "peak_kv_cache_usage", "num_preemptions", "prefix_cache_queries",
               "prefix_cache_hits", "prefix_cache_hit_rate", "peak_num_requests_running",
               "peak_num_requests_waiting", "prompt_tokens", "generation_tokens", "samples"}
RECORD_KEYS = {"index", "request_id", "success", "error", "start_s", "prompt_len", "output_len",
               "prompt_tokens", "output_tokens", "cached_tokens", "streamed_tokens",
               "finish_reason", "ttft_ms", "tpot_ms", "e2el_ms", "itl_ms"}


# ---- a real server -------------------------------------------------------------------------
def bench_args(server, *extra: str) -> list[str]:
    return ["--target", server.target, "--no-progress",
            "--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics",
            "--metrics-interval", "0.05", *extra]


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def check_distribution(d: dict, percentiles: list[str]) -> None:
    assert set(d) == DISTRIBUTION and list(d["percentiles"]) == percentiles
    assert d["count"] > 0
    assert d["min"] <= d["mean"] <= d["max"]
    assert d["min"] <= d["median"] <= d["max"]
    values = [d["percentiles"][p] for p in percentiles]
    assert values == sorted(values) and d["min"] <= values[0] and values[-1] <= d["max"]


# ---- end to end ----------------------------------------------------------------------------
def test_random_run_matches_server_usage(server, tmp_path, capsys):
    n, input_len, output_len = 8, 16, 8
    result_file, plot_dir = tmp_path / "result.json", tmp_path / "plots"
    code = main(bench_args(
        server, "--num-prompts", str(n), "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--max-concurrency", "4", "--num-warmups", "2",
        "--metric-percentiles", "50,90,99", "--goodput", "ttft:60000", "tpot:60000",
        "--result-file", str(result_file), "--save-detailed", "--plot-dir", str(plot_dir)))
    out = capsys.readouterr().out
    assert code == 0, out
    r = json.loads(result_file.read_text())

    assert set(r) == EXPECTED_KEYS and tuple(r) == RESULT_KEYS
    assert r["schema_version"] == 1 and r["kind"] == "serve_bench"
    assert r["completed"] == n and r["failed"] == 0 and r["errors"] == {}
    assert r["model"]["model_name"] == "tiny" and r["model"]["vocab_size"] == 32768
    assert r["config"]["request_rate"] is None  # inf, written as null
    assert r["config"]["max_concurrency"] == 4

    # Token counts: the server's usage, the stream, the request and /metrics all agree.
    reqs = r["requests"]
    assert len(reqs) == n and all(set(q) == RECORD_KEYS for q in reqs)
    assert sorted(q["index"] for q in reqs) == list(range(n))
    for q in reqs:
        assert q["success"] and q["finish_reason"] == "length"
        assert q["output_tokens"] == q["streamed_tokens"] == q["output_len"] == output_len
        assert q["prompt_tokens"] == q["prompt_len"] == input_len
        assert len(q["itl_ms"]) == output_len - 1
        # TPOT is (E2EL - TTFT) / (n - 1); the ITLs add up to no more than that span
        assert q["tpot_ms"] == pytest.approx((q["e2el_ms"] - q["ttft_ms"]) / (output_len - 1))
        assert sum(q["itl_ms"]) <= q["e2el_ms"] - q["ttft_ms"] + 1e-6
    assert r["total_output_tokens"] == sum(q["output_tokens"] for q in reqs) == n * output_len
    assert r["total_input_tokens"] == n * input_len
    server_stats = r["server"]
    assert set(server_stats) == SERVER_KEYS
    assert server_stats["generation_tokens"] == n * output_len  # warm-ups excluded
    assert server_stats["prompt_tokens"] == n * input_len
    assert server_stats["num_preemptions"] == 0
    assert server_stats["prefix_cache_queries"] >= n * input_len // 16
    assert 0 <= server_stats["peak_kv_cache_usage"] <= 1 and len(server_stats["samples"]) >= 2

    # Rates and distributions.
    assert r["duration_s"] > 0
    assert r["request_throughput"] == pytest.approx(n / r["duration_s"])
    assert r["output_throughput"] == pytest.approx(n * output_len / r["duration_s"])
    assert r["total_token_throughput"] == pytest.approx(n * (input_len + output_len)
                                                       / r["duration_s"])
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # generous SLOs
    assert sum(r["output_tokens_per_second"]) == n * output_len
    assert r["peak_output_throughput"] == max(r["output_tokens_per_second"])
    assert 1 <= r["peak_concurrent_requests"] <= 4
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        check_distribution(r[name], ["p50", "p90", "p99"])
    assert r["ttft_ms"]["count"] == r["e2el_ms"]["count"] == n
    assert r["itl_ms"]["count"] == n * (output_len - 1)
    assert r["ttft_ms"]["max"] <= r["e2el_ms"]["max"]

    # The printed report, in vLLM's layout.
    for line in ("============ Serving Benchmark Result ============",
                 f"Successful requests:                     {n}",
                 "Failed requests:                         0",
                 f"Total generated tokens:                  {n * output_len}",
                 "Request goodput (req/s):", "Peak output token throughput (tok/s):",
                 "---------------Time to First Token----------------",
                 "-----Time per Output Token (excl. 1st token)------",
                 "---------------Inter-token Latency----------------",
                 "----------------End-to-end Latency----------------",
                 "P90 TPOT (ms):", "Median E2EL (ms):", "Peak KV cache usage (%):",
                 "Preemptions:", "Prefix cache hit rate (%):"):
        assert line in out, line
    assert out.count("Warming up with 2 request(s)") == 1

    assert is_png(plot_dir / "latency.png") and is_png(plot_dir / "timeline.png")


def test_prefix_dataset_hits_the_prefix_cache(server, tmp_path):
    result_file = tmp_path / "prefix.json"
    code = main(bench_args(
        server, "--dataset", "prefix", "--prefix-num-groups", "2", "--prefix-len", "64",
        "--prefix-suffix-len", "8", "--num-prompts", "8", "--random-output-len", "4",
        "--max-concurrency", "2", "--request-rate", "200", "--save-detailed",
        "--result-file", str(result_file)))
    assert code == 0
    r = json.loads(result_file.read_text())
    assert r["completed"] == 8 and r["failed"] == 0 and r["total_output_tokens"] == 32
    assert all(q["prompt_tokens"] == 72 for q in r["requests"])
    s = r["server"]
    assert s["prefix_cache_hit_rate"] == pytest.approx(s["prefix_cache_hits"]
                                                       / s["prefix_cache_queries"])
    # 2 groups x 64 shared tokens: at least 6 of 8 requests reuse 4 full blocks.
    assert s["prefix_cache_hits"] >= 6 * 64 and s["prefix_cache_hit_rate"] > 0.5
    assert r["total_cached_tokens"] >= 6 * 64  # usage.cached_tokens agrees


def test_sharegpt_dataset_uses_server_token_counts(server, tmp_path):
    convs = [{"id": str(i), "conversations": [
        {"from": "human", "value": f"Question {i}: how do tides work on planet {i}?"},
        {"from": "gpt", "value": " ".join(["tides rise and fall"] * (i + 1))}]}
        for i in range(6)]
    convs.append({"id": "short", "conversations": [{"from": "human", "value": "hi"},
                                                   {"from": "gpt", "value": "yo"}]})
    convs.append({"id": "one-turn", "conversations": [{"from": "human", "value": "alone"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    result_file = tmp_path / "sharegpt_result.json"
    code = main(bench_args(server, "--dataset", "sharegpt", "--dataset-path", str(path),
                           "--num-prompts", "6", "--ignore-eos", "--save-detailed",
                           "--result-file", str(result_file)))
    assert code == 0
    r = json.loads(result_file.read_text())
    assert r["completed"] == 6 and r["failed"] == 0
    for q in r["requests"]:
        assert q["prompt_tokens"] == q["prompt_len"]  # counted by the server's Tokenize
        assert q["output_tokens"] == q["output_len"] >= 4
    assert len({q["output_len"] for q in r["requests"]}) == 6  # each answer's own length
    # Too many asked: every usable conversation is used and the error says how many exist.
    assert main(bench_args(server, "--dataset", "sharegpt", "--dataset-path", str(path),
                           "--num-prompts", "7")) == 2


def test_cli_sweep_writes_every_point(server, tmp_path):
    result_file, plot_dir = tmp_path / "sweep.json", tmp_path / "plots"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "proto")])}
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.serve_bench",
         *bench_args(server, "--num-prompts", "6", "--random-input-len", "16",
                     "--random-output-len", "4", "--sweep", "max-concurrency=1,4",
                     "--result-file", str(result_file), "--plot-dir", str(plot_dir))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Serving Benchmark Result") == 2
    assert "Sweep over max-concurrency" in proc.stdout
    r = json.loads(result_file.read_text())
    assert r["kind"] == "serve_bench_sweep" and r["values"] == [1, 4]
    assert [p["config"]["max_concurrency"] for p in r["points"]] == [1, 4]
    assert all(p["completed"] == 6 and p["total_output_tokens"] == 24 for p in r["points"])
    assert all(set(p) == EXPECTED_KEYS for p in r["points"])
    assert r["points"][0]["peak_concurrent_requests"] == 1
    assert [row["value"] for row in r["summary"]] == [1, 4]
    csv = result_file.with_suffix(".csv").read_text().splitlines()
    assert csv[0].startswith("max_concurrency,completed,") and len(csv) == 3
    assert is_png(plot_dir / "sweep.png")
    for point in ("max-concurrency-1", "max-concurrency-4"):
        assert is_png(plot_dir / point / "latency.png")


def test_unreachable_server_is_a_clean_error(capsys):
    code = main(["--target", f"127.0.0.1:{free_port()}", "--connect-timeout", "0.5",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no mistral-serve server answered" in err


def test_bad_metrics_url_and_options_are_clean_errors(server, capsys):
    wrong_port = f"http://127.0.0.1:{server.port}/metrics"  # the gRPC port, not metrics
    assert main(["--target", server.target, "--metrics-url", wrong_port]) == 1
    assert main(["--target", server.target, "--sweep", "temperature=1,2"]) == 2
    assert main(["--target", server.target, "--goodput", "latency:5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err
    assert "cannot read metrics" in err and "--sweep" in err and "--goodput" in err


def test_tls_and_api_key(model_dir, tmp_path, capsys):
    cert, key, key_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "api_key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    key_file.write_text("bench-key-42\n")
    secure = start_server(model_dir, tmp_path / "server", "--tls-cert", str(cert),
                          "--tls-key", str(key), "--api-key-file", str(key_file),
                          root_cert=cert.read_bytes())
    try:
        common = ["--target", secure.target, "--tls-ca", str(cert), "--no-progress",
                  "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "2"]
        capsys.readouterr()
        assert main([*common, "--api-key", "bench-key-42"]) == 0
        assert "Successful requests:                     2" in capsys.readouterr().out
        assert main([*common, "--api-key", "wrong"]) == 1
        err = capsys.readouterr().err
        assert "UNAUTHENTICATED" in err and "--api-key" in err and err.count("\n") == 1
        # plaintext to a TLS-only server: no answer, a clean error
        assert main(["--target", secure.target, "--connect-timeout", "0.5"]) == 1
        assert "no mistral-serve server answered" in capsys.readouterr().err
    finally:
        assert secure.stop() == 0, secure.log()


# ---- without a server ----------------------------------------------------------------------
def test_arrivals_have_the_requested_rate_and_shape():
    assert np.all(intervals(5, math.inf) == 0)
    poisson = intervals(20000, 4.0, 1.0, seed=1)
    assert poisson.mean() == pytest.approx(0.25, rel=0.03)
    assert poisson.std() == pytest.approx(0.25, rel=0.05)  # exponential: std == mean
    bursty = intervals(20000, 4.0, 0.25, seed=1)
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.std() == pytest.approx(0.25 / math.sqrt(0.25), rel=0.08)  # CV = 1/sqrt(k)
    times = send_times(10, 2.0, seed=3)
    assert np.all(np.diff(times) >= 0) and np.array_equal(times, send_times(10, 2.0, seed=3))
    with pytest.raises(ValueError, match="request-rate"):
        intervals(3, 0.0)


def test_synthetic_datasets():
    reqs = random_requests(200, 100, 20, 0.5, 32768, seed=0)
    ins = [r.prompt_len for r in reqs]
    assert all(len(r.prompt_token_ids) == r.prompt_len for r in reqs)
    assert 50 <= min(ins) < 70 and 130 < max(ins) <= 150
    assert all(10 <= r.output_len <= 30 and r.ignore_eos for r in reqs)
    assert all(RANDOM_ID_LOW <= t < 32768 for r in reqs for t in r.prompt_token_ids)
    assert reqs == random_requests(200, 100, 20, 0.5, 32768, seed=0)
    fixed = random_requests(4, 16, 8, 0.0, 32768)
    assert {(r.prompt_len, r.output_len) for r in fixed} == {(16, 8)}

    pre = prefix_requests(12, 3, 32, 5, 4, 0.0, 32768, seed=0)
    prefixes = {r.prompt_token_ids[:32] for r in pre}
    assert len(prefixes) == 3 and all(len(r.prompt_token_ids) == 37 for r in pre)
    assert len({r.prompt_token_ids[32:] for r in pre}) == 12  # suffixes unique
    with pytest.raises(ValueError, match="random-range-ratio"):
        random_requests(2, 16, 8, 1.0, 32768)


def test_sharegpt_filters_like_vllm(tmp_path):
    assert not keep_sharegpt(3, 100, None) and not keep_sharegpt(10, 3, None)
    assert keep_sharegpt(10, 3, 3)  # a fixed output length skips the short-answer rule
    assert not keep_sharegpt(1025, 10, None) and not keep_sharegpt(1000, 1049, None)
    assert keep_sharegpt(1000, 1048, None)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "a b c d e"},
                           {"from": "gpt", "value": "w " * n}]} for n in (2, 5, 9)]))

    async def words(texts, add_bos):
        return [len(t.split()) + add_bos for t in texts]

    reqs = asyncio.run(sharegpt_requests(path, 2, 0, words))
    assert sorted(r.output_len for r in reqs) == [5, 9] and all(r.prompt_len == 6 for r in reqs)
    assert all(r.prompt.startswith("a b") and not r.ignore_eos for r in reqs)
    with pytest.raises(ValueError, match="only 2 conversations"):
        asyncio.run(sharegpt_requests(path, 3, 0, words))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        asyncio.run(sharegpt_requests(tmp_path / "bad.json", 1, 0, words))


def _record(i: int, ttft: float, e2el: float, n: int, start: float = 0.0) -> RequestRecord:
    step = (e2el - ttft) / (n - 1)
    return RequestRecord(i, f"r{i}", 10, n, start=start, success=True, ttft=ttft, e2el=e2el,
                         itl=[step] * (n - 1), prompt_tokens=10, output_tokens=n,
                         token_times=[start + ttft + k * step for k in range(n)],
                         streamed_tokens=n, finish_reason="length")


def test_summary_numbers_from_known_records():
    # Token times avoid bucket edges: request 0 at 0.05, 0.15, ... 1.05; request 1 at
    # 0.75, 0.95, ..., 2.75. The failed request overlaps both (3 in flight at 0.6 s).
    records = [_record(0, 0.05, 1.05, 11), _record(1, 0.25, 2.25, 11, start=0.5),
               RequestRecord(2, "r2", 10, 11, start=0.6, e2el=0.1, error="INTERNAL: boom")]
    run = RunResult(RunConfig(request_rate=2.0), records, duration=2.8, started_at="t")
    r = summarize(run, target="x", model={}, config={"request_rate": 2.0}, percentiles=[50, 99],
                  goodput=parse_goodput(["ttft:200", "tpot:150"]))
    assert (r["completed"], r["failed"]) == (2, 1)
    assert r["errors"] == {"INTERNAL: boom": 1}
    assert r["total_output_tokens"] == 22 and r["total_input_tokens"] == 20
    assert r["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert r["tpot_ms"]["mean"] == pytest.approx(150.0)  # (100 ms + 200 ms) / 2
    assert r["e2el_ms"]["median"] == pytest.approx(1650.0)
    assert r["request_goodput"] == pytest.approx(1 / 2.8)  # request 1 misses the TTFT SLO
    assert r["peak_concurrent_requests"] == 3
    assert r["output_tokens_per_second"] == [12, 6, 4]
    assert r["peak_output_throughput"] == 12.0
    text = format_report(r, ["ttft", "e2el"], [50, 99])
    assert "Mean TTFT (ms):                          150.00" in text
    assert "Time per Output Token" not in text  # not chosen with --percentile-metrics
    assert "1 x INTERNAL: boom" in text
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput(["ttft=5"])


def test_timed_calls_times_each_call_and_puts_targets_back():
    import types
    from loadtest.offline_bench import timed_calls

    class Runner:
        def launch(self, x):
            return x + 1
    runner, module = Runner(), types.SimpleNamespace(eval=lambda *a: len(a))
    original = module.eval
    with timed_calls({"launch": (runner, "launch"), "eval": (module, "eval")}) as times:
        assert runner.launch(1) == 2 and runner.launch(5) == 6 and module.eval(1, 2) == 2
    assert len(times["launch"]) == 2 and len(times["eval"]) == 1
    assert all(t >= 0 for t in times["launch"] + times["eval"])
    assert "launch" not in vars(runner) and module.eval is original  # as before the block


def test_gpu_trace_gaps_sums_idle_time_by_neighbouring_kernels():
    """gpu_trace.gaps: idle spans >= 20 us between kernels, keyed by the kernels around
    them; an overlapping kernel extends the busy span rather than opening a gap."""
    from types import SimpleNamespace as NS

    from loadtest.gpu_trace import gaps

    def k(name, start, end):
        return NS(name=name, time_range=NS(start=start, end=end))
    events = [k("a", 0, 10), k("b", 5, 40), k("c", 50, 60),  # 10 us gap: too short
              k("sample", 60, 70), k("a", 170, 180), k("sample", 180, 190), k("a", 290, 300)]
    assert gaps(events) == [(200.0, 2, "sample", "a")]
    assert gaps(events, min_us=5) == [(200.0, 2, "sample", "a"), (10.0, 1, "b", "c")]


def test_gpu_trace_prefill_rounds_compute_every_prompt_and_free_its_blocks():
    """gpu_trace --prefill traces the steps that compute a batch of prompts: each round ends
    with the engine idle and every KV block back, so rounds (warm, traced) repeat alike."""
    from loadtest.gpu_trace import _linear_params, _prefill_all
    from loadtest.offline_bench import SHAPES
    from loadtest.profile_step import decode_engine
    from engine.config import ModelArgs

    engine = decode_engine("tiny", "float32", None, 8, 600)
    free = engine.kv_manager.num_free_blocks
    steps = [_prefill_all(engine, f"r{i}", 8, 512) for i in range(2)]
    # 8 x 512 prompt tokens in a 4,096-token step budget: one step launched (the step()
    # call that only collects its samples is not counted: the per-step figures divide by it).
    assert steps == [1, 1]
    assert not engine.has_unfinished_requests() and engine.kv_manager.num_free_blocks == free
    # 7B: 32 layers x (q|k|v 4096x6144 + o 4096x4096 + gate|up|down 3x4096x14336)
    assert _linear_params(ModelArgs.from_dict(SHAPES["7b"])) == 32 * 4096 * (6144 + 4096 + 3 * 14336)


def test_op_profile_prompt_kernel_inputs(monkeypatch):
    """op_profile --prompt-shapes times the prompt kernel on inputs of the kernel's contract
    (here read by the CPU stand-in: each chunk's rows, positions and blocks)."""
    import mlx.core as mx

    from engine import paged_prefill
    from loadtest.op_profile import _prompt_kernel_times
    from tests.test_runner_reference import _prefill_stand_in
    monkeypatch.setattr(paged_prefill, "paged_prefill_attention", _prefill_stand_in)
    first, warm = _prompt_kernel_times(3, 20, 70, 4, 2, 16, mx.float32)
    assert first > 0 and warm > 0


@pytest.mark.parametrize("options", [{}, {"prefix_caching": True}, {"window": 64}])
def test_scheduler_cost_times_steady_decode_steps(options):
    """loadtest/scheduler_cost drives the scheduler through decode steps (one in flight, as
    the engine runs them) after the prompts, untimed: every timed step schedules the whole
    batch for one token each, and the KV blocks stay bounded by the window."""
    from loadtest import scheduler_cost
    from scheduler.scheduler import Scheduler

    seen = []
    schedule = Scheduler.schedule

    def recording(self):
        out = schedule(self)
        seen.append(([s.num_tokens for s in out.scheduled], self.kv.num_used_blocks))
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scheduler, "schedule", recording)
        t_sched, t_update = scheduler_cost.run(batch=6, context=100, steps=40, **options)
    assert t_sched > 0 and t_update > 0
    timed = seen[-40:]
    assert all(tokens == [1] * 6 for tokens, _ in timed)
    if options.get("window"):  # ceil(64 / 16) + 1 blocks a sequence at most, plus the new one
        assert max(used for _, used in timed) <= 6 * (64 // 16 + 2)


def test_offline_bench_dense_too_pairs_each_quantized_run_with_its_dequantized_twin(tmp_path):
    """--dense-too: an engine on the same weights dequantized, its runs paired with the
    quantized engine's in alternating order; the twin computes what the quantized layers do."""
    import json

    import mlx.core as mx
    import mlx.nn as nn

    from engine.config import ModelArgs
    from loadtest.offline_bench import SHAPES, dense_model, main, random_weights

    args = ModelArgs.from_dict(SHAPES["tiny"])
    model, _ = random_weights(args, mx.float32, 4)
    dense, dense_args = dense_model(model, args)
    assert dense_args.quantization is None
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in dense.named_modules())
    x = mx.random.normal((3, args.hidden_size))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert mx.allclose(q_proj(x), dense.model.layers[0].self_attn.q_proj(x), atol=1e-4)

    out = tmp_path / "pairs.json"
    main(["--shape", "tiny", "--bits", "4", "--dense-too", "--repeat", "3", "--num-prompts", "2",
          "--input-len", "8", "--output-len", "2", "--no-peer", "--json", str(out)])
    names = [r["engine"] for r in json.loads(out.read_text())["results"]]
    assert names == ["mistral-serve dense", "mistral-serve 4-bit", "mistral-serve 4-bit",
                     "mistral-serve dense", "mistral-serve dense", "mistral-serve 4-bit"]
