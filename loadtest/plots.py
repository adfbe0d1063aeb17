"""PNG plots of a run (latency histograms, throughput and load over time) and of a sweep.

matplotlib is imported here only, with the Agg backend (no display needed), so the load
generator runs without it when --plot-dir is not given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from loadtest.report import METRICS, in_flight_steps, pkey  # noqa: E402
from loadtest.runner import RunResult  # noqa: E402


def plot_latencies(run: RunResult, out: Path, p: float = 99.0) -> Path:
    """latency.png: histograms of TTFT, TPOT, ITL and E2EL (ms) with mean and P{p} marked."""
    ok = [r for r in run.records if r.success]
    values = {
        "ttft": [r.ttft * 1e3 for r in ok],
        "tpot": [r.tpot * 1e3 for r in ok if r.tpot is not None],
        "itl": [x * 1e3 for r in ok for x in r.itl],
        "e2el": [r.e2el * 1e3 for r in ok],
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, data) in zip(axes.flat, values.items()):
        title, short = METRICS[name]
        ax.set_title(f"{title} ({len(data)} values)", fontsize=10)
        ax.set_xlabel(f"{short} (ms)")
        ax.set_ylabel("count")
        if not data:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(data, bins=min(50, max(5, len(data) // 4)), color="tab:blue", alpha=0.8)
        mean, tail = float(np.mean(data)), float(np.percentile(data, p))
        ax.axvline(mean, color="tab:orange", label=f"mean {mean:.1f}")
        ax.axvline(tail, color="tab:red", linestyle="--", label=f"P{p:g} {tail:.1f}")
        ax.legend(fontsize=8)
    fig.suptitle("Latency distributions (successful requests)")
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_timeline(run: RunResult, per_second: list[int], out: Path) -> Path:
    """timeline.png: output tok/s per second; requests in flight (client, server); KV usage."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    top.bar([i + 0.5 for i in range(len(per_second))], per_second, width=0.9,
            color="tab:green")
    top.set_ylabel("output tokens / s")
    top.set_title("Output throughput (1-second buckets)", fontsize=10)

    steps = in_flight_steps(run.records)
    if steps:
        xs, ys = [0.0] + [t for t, _ in steps], [0] + [n for _, n in steps]
        bottom.step(xs, ys, where="post", label="in flight (client)", color="tab:blue")
    server = run.server
    if server is not None and server.samples:
        t = [s.t for s in server.samples]
        bottom.plot(t, [s.num_requests_running for s in server.samples], "o-",
                    color="tab:orange", label="running (server)")
        bottom.plot(t, [s.num_requests_waiting for s in server.samples], "x:",
                    color="tab:gray", label="waiting (server)")
        kv = bottom.twinx()
        kv.plot(t, [100 * s.kv_cache_usage for s in server.samples], "-", color="tab:red",
                alpha=0.6, label="KV cache usage")
        kv.set_ylabel("KV cache usage (%)", color="tab:red")
        kv.set_ylim(0, 100)
    bottom.set_ylabel("requests")
    bottom.set_xlabel("seconds from the benchmark start")
    bottom.set_title("Requests in flight", fontsize=10)
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = out / "timeline.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_run(run: RunResult, result: dict[str, Any], out_dir: str | Path,
             p: float = 99.0) -> list[Path]:
    """Every plot of one run, written to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_latencies(run, out, p),
            plot_timeline(run, result["output_tokens_per_second"], out)]


def plot_sweep(parameter: str, values: list[Optional[float]], points: list[dict[str, Any]],
               out_dir: str | Path, p: float = 99.0) -> Path:
    """sweep.png: latency (mean and P{p}) against output throughput, one marker per point."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = [r["output_throughput"] for r in points]
    labels = ["inf" if v is None or v == float("inf") else f"{v:g}" for v in values]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    for ax, name in zip(axes, ("ttft", "tpot", "e2el")):
        _, short = METRICS[name]
        mean = [r[f"{name}_ms"]["mean"] for r in points]
        tail = [r[f"{name}_ms"]["percentiles"].get(pkey(p)) for r in points]
        ax.plot(x, mean, "o-", label="mean")
        ax.plot(x, tail, "s--", label=f"P{p:g}")
        for xi, yi, label in zip(x, mean, labels):
            if yi is not None:
                ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{short} (ms)")
        ax.set_title(short, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"Latency vs throughput, sweeping {parameter} (points labelled by value)")
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
