"""Numbers from a run: the result JSON (stable schema) and the text report in vLLM's layout.

Latencies are milliseconds in both. Infinite and NaN values are written to JSON as null
(a request rate of null means "inf": every request sent at once).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from loadtest.client import RequestRecord
from loadtest.runner import RunResult

SCHEMA_VERSION = 1
# The result file's top-level keys; a change here is a schema change (bump SCHEMA_VERSION).
RESULT_KEYS = (
    "schema_version", "kind", "started_at", "target", "model", "config",
    "completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
    "total_cached_tokens", "request_throughput", "request_goodput", "output_throughput",
    "peak_output_throughput", "peak_concurrent_requests", "total_token_throughput",
    "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "output_tokens_per_second", "server", "errors",
    "requests",
)
DISTRIBUTION_KEYS = ("count", "mean", "median", "std", "min", "max", "percentiles")
METRICS = {  # name -> (section title, short name)
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
WIDTH = 50


# ---- parsing the report options ------------------------------------------------------------
def parse_goodput(items: Optional[Iterable[str]]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"--goodput takes {'/'.join(GOODPUT_METRICS)}:MILLISECONDS, "
                             f"got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number") from None
        if not slos[name] > 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
    return slos


def parse_percentile_metrics(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ValueError(f"--percentile-metrics takes a comma list of {', '.join(METRICS)}; "
                         f"got {text!r}")
    return names


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles takes numbers like 50,90,99; got {text!r}") \
            from None
    if not values or any(not 0 < p < 100 for p in values):
        raise ValueError(f"--metric-percentiles must be in (0, 100); got {text!r}")
    return values


def pkey(p: float) -> str:
    """The JSON key of percentile p: 99 -> "p99", 99.9 -> "p99.9"."""
    return f"p{p:g}"


# ---- numbers -------------------------------------------------------------------------------
def distribution(values_s: list[float], percentiles: list[float]) -> dict[str, Any]:
    """count, mean, median, std, min, max and chosen percentiles of values_s, in ms."""
    if not values_s:
        return {"count": 0, "mean": None, "median": None, "std": None, "min": None,
                "max": None, "percentiles": {pkey(p): None for p in percentiles}}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {"count": int(ms.size), "mean": float(ms.mean()), "median": float(np.median(ms)),
            "std": float(ms.std()), "min": float(ms.min()), "max": float(ms.max()),
            "percentiles": {pkey(p): float(np.percentile(ms, p)) for p in percentiles}}


def tokens_per_second(records: list[RequestRecord], duration: float) -> list[int]:
    """Output tokens received in each 1-second bucket from the benchmark start."""
    buckets = [0] * max(1, math.ceil(duration))
    for r in records:
        for t in r.token_times:
            i = min(int(t), len(buckets) - 1)
            buckets[i] += 1
    return buckets


def in_flight_steps(records: list[RequestRecord]) -> list[tuple[float, int]]:
    """(time, requests in flight from then on), one step per send or end, in time order."""
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records],
                    key=lambda e: (e[0], e[1]))  # an end before a send at the same instant
    steps, n = [], 0
    for t, d in events:
        n += d
        steps.append((t, n))
    return steps


def _meets(r: RequestRecord, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot if r.tpot is not None else 0.0, "e2el": r.e2el}
    return all(values[name] * 1000.0 <= slo for name, slo in slos.items())


def _record_dict(r: RequestRecord) -> dict[str, Any]:
    tpot = r.tpot
    return {"index": r.index, "request_id": r.request_id, "success": r.success,
            "error": r.error, "start_s": r.start, "prompt_len": r.prompt_len,
            "output_len": r.output_len, "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens, "cached_tokens": r.cached_tokens,
            "streamed_tokens": r.streamed_tokens, "finish_reason": r.finish_reason,
            "ttft_ms": r.ttft * 1000.0, "tpot_ms": None if tpot is None else tpot * 1000.0,
            "e2el_ms": r.e2el * 1000.0, "itl_ms": [x * 1000.0 for x in r.itl]}


def summarize(run: RunResult, *, target: str, model: dict[str, Any], config: dict[str, Any],
              percentiles: list[float], goodput: Optional[dict[str, float]] = None,
              detailed: bool = False) -> dict[str, Any]:
    """The result JSON of one run (keys: RESULT_KEYS)."""
    ok = [r for r in run.records if r.success]
    failed = [r for r in run.records if not r.success]
    duration = run.duration
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    per_second = tokens_per_second(ok, duration)
    result = {
        "schema_version": SCHEMA_VERSION,
        "kind": "serve_bench",
        "started_at": run.started_at,
        "target": target,
        "model": model,
        "config": config,
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "request_throughput": len(ok) / duration,
        "request_goodput": (sum(_meets(r, goodput) for r in ok) / duration) if goodput else None,
        "output_throughput": total_out / duration,
        # a bucket cut short by the end of the run still counts as a whole second
        "peak_output_throughput": float(max(per_second)),
        "peak_concurrent_requests": max((n for _, n in in_flight_steps(run.records)), default=0),
        "total_token_throughput": (total_in + total_out) / duration,
        "ttft_ms": distribution([r.ttft for r in ok], percentiles),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None], percentiles),
        "itl_ms": distribution([x for r in ok for x in r.itl], percentiles),
        "e2el_ms": distribution([r.e2el for r in ok], percentiles),
        "output_tokens_per_second": per_second,
        "server": run.server.to_dict() if run.server is not None else None,
        "errors": dict(Counter(r.error for r in failed).most_common()),
        "requests": [_record_dict(r) for r in run.records] if detailed else None,
    }
    assert tuple(result) == RESULT_KEYS
    return result


# ---- text ----------------------------------------------------------------------------------
def _line(label: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value!s:<10}".rstrip()


def _rate(value: Optional[float]) -> str:
    return "inf" if value is None or math.isinf(value) else f"{value:g}"


def format_report(result: dict[str, Any], percentile_metrics: list[str],
                  percentiles: list[float]) -> str:
    """The run's numbers in the layout of vLLM's `bench serve`."""
    cfg = result["config"]
    lines = [f"{' Serving Benchmark Result ':=^{WIDTH}}",
             _line("Successful requests:", result["completed"]),
             _line("Failed requests:", result["failed"])]
    if cfg.get("max_concurrency") is not None:
        lines.append(_line("Maximum request concurrency:", cfg["max_concurrency"]))
    lines += [_line("Request rate configured (RPS):", _rate(cfg.get("request_rate"))),
              _line("Benchmark duration (s):", result["duration_s"]),
              _line("Total input tokens:", result["total_input_tokens"]),
              _line("Total generated tokens:", result["total_output_tokens"]),
              _line("Request throughput (req/s):", result["request_throughput"])]
    if result["request_goodput"] is not None:
        lines.append(_line("Request goodput (req/s):", result["request_goodput"]))
    lines += [_line("Output token throughput (tok/s):", result["output_throughput"]),
              _line("Peak output token throughput (tok/s):", result["peak_output_throughput"]),
              _line("Peak concurrent requests:", result["peak_concurrent_requests"]),
              _line("Total token throughput (tok/s):", result["total_token_throughput"])]
    for name in percentile_metrics:
        title, short = METRICS[name]
        d = result[f"{name}_ms"]
        lines.append(f"{title:-^{WIDTH}}")
        if d["count"] == 0:
            lines.append(_line(f"Mean {short} (ms):", "n/a"))
            continue
        lines.append(_line(f"Mean {short} (ms):", d["mean"]))
        lines.append(_line(f"Median {short} (ms):", d["median"]))
        for p in percentiles:
            lines.append(_line(f"P{p:g} {short} (ms):", d["percentiles"][pkey(p)]))
    server = result["server"]
    if server is not None:
        lines.append(f"{'Server Metrics':-^{WIDTH}}")
        lines.append(_line("Peak KV cache usage (%):", 100.0 * server["peak_kv_cache_usage"]))
        lines.append(_line("Preemptions:", server["num_preemptions"]))
        rate = server["prefix_cache_hit_rate"]
        lines.append(_line("Prefix cache hit rate (%):",
                           "n/a" if rate is None else 100.0 * rate))
        lines.append(_line("Peak running requests (server):",
                           server["peak_num_requests_running"]))
        lines.append(_line("Peak waiting requests (server):",
                           server["peak_num_requests_waiting"]))
    if result["errors"]:
        lines.append(f"{'Errors':-^{WIDTH}}")
        lines += [f"{count:>6} x {message}" for message, count in result["errors"].items()]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


# ---- sweeps --------------------------------------------------------------------------------
def sweep_row(value: Optional[float], result: dict[str, Any], p: float) -> dict[str, Any]:
    """One point of a sweep: the swept value and the headline numbers (ms, tok/s, req/s)."""
    row = {"value": value}
    for key in ("completed", "failed", "request_throughput", "output_throughput"):
        row[key] = result[key]
    for name in METRICS:
        d = result[f"{name}_ms"]
        row[f"{name}_mean_ms"] = d["mean"]
        row[f"{name}_{pkey(p)}_ms"] = d["percentiles"].get(pkey(p))
    return row


def format_sweep_table(parameter: str, rows: list[dict[str, Any]], p: float) -> str:
    """A Markdown table of a sweep, one row per point."""
    heads = [parameter, "ok", "failed", "req/s", "out tok/s"]
    for name in METRICS:
        short = METRICS[name][1]
        heads += [f"{short} mean", f"{short} P{p:g}"]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    body = [[_rate(r["value"]) if parameter == "request-rate" else cell(r["value"])]
            + [cell(v) for k, v in r.items() if k != "value"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([f"Sweep over {parameter} (latencies in ms)", fmt(heads),
                      "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt(b) for b in body])


def sweep_result(parameter: str, values: list[Optional[float]], points: list[dict[str, Any]],
                 p: float) -> dict[str, Any]:
    """The result JSON of a sweep: the summary rows and every point's full result."""
    return {"schema_version": SCHEMA_VERSION, "kind": "serve_bench_sweep",
            "parameter": parameter, "values": values,
            "summary": [sweep_row(v, r, p) for v, r in zip(values, points)],
            "points": points}


# ---- files ---------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write data as strict JSON (inf and NaN become null), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    return path


def write_sweep_csv(path: str | Path, parameter: str, rows: list[dict[str, Any]]) -> Path:
    """The sweep's summary rows as CSV (the first column is the swept value; empty is inf)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = _finite(rows)
    lines = [",".join([parameter.replace("-", "_"), *list(rows[0])[1:]])]
    lines += [",".join("" if v is None else str(v) for v in r.values()) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path
