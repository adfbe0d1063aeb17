"""One benchmark run: send a workload on an arrival schedule under a concurrency cap.

Each request is its own coroutine: it sleeps until its arrival time, waits for a slot
(--max-concurrency), then streams. Latencies are measured from the moment it is sent,
so time spent waiting for a client-side slot is not counted (as in vLLM's benchmark).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

from tqdm import tqdm

from loadtest.arrivals import send_times
from loadtest.client import RequestRecord, ServeClient
from loadtest.datasets import BenchRequest
from loadtest.server_metrics import MetricsWatcher, ServerStats


class BenchmarkError(RuntimeError):
    """The benchmark cannot go on (e.g. every warm-up request failed)."""


@dataclass(frozen=True)
class RunConfig:
    """How requests are sent."""

    request_rate: float = math.inf  # requests per second; inf sends all at once
    burstiness: float = 1.0  # gamma shape; 1.0 is Poisson
    max_concurrency: Optional[int] = None  # most requests in flight; None: no cap
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not (self.request_rate > 0):
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if not (0 < self.burstiness < math.inf):
            raise ValueError(f"--burstiness must be a positive number, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")


@dataclass
class RunResult:
    """Everything one run measured; report.summarize turns it into the result JSON."""

    config: RunConfig
    records: list[RequestRecord]
    duration: float  # from the first send to the last request's end
    started_at: str  # ISO 8601, UTC
    server: Optional[ServerStats] = None
    warmup_records: list[RequestRecord] = field(default_factory=list)


async def _send_all(client: ServeClient, requests: list[BenchRequest], due: list[float],
                    max_concurrency: Optional[int], id_prefix: str, t0: float,
                    bar: Optional[tqdm] = None) -> list[RequestRecord]:
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(i: int, req: BenchRequest, at: float) -> RequestRecord:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with sem if sem is not None else nullcontext():
            rec = await client.generate(req, i, f"{id_prefix}-{i}", t0)
        if bar is not None:
            bar.update(1)
        return rec

    return list(await asyncio.gather(*(one(i, r, at)
                                       for i, (r, at) in enumerate(zip(requests, due)))))


async def warm_up(client: ServeClient, requests: list[BenchRequest], num_warmups: int,
                  max_concurrency: Optional[int]) -> list[RequestRecord]:
    """Send num_warmups requests (the workload's first ones, cycled) all at once; not measured.

    Raises BenchmarkError when every one fails: the run would only measure errors.
    """
    if num_warmups <= 0:
        return []
    batch = [requests[i % len(requests)] for i in range(num_warmups)]
    records = await _send_all(client, batch, [0.0] * len(batch), max_concurrency,
                              f"warmup-{uuid.uuid4().hex[:8]}", time.perf_counter())
    if not any(r.success for r in records):
        raise BenchmarkError(f"every warm-up request failed: {records[0].error}")
    return records


async def run_benchmark(client: ServeClient, requests: list[BenchRequest], config: RunConfig,
                        watcher: Optional[MetricsWatcher] = None,
                        desc: str = "requests") -> RunResult:
    """Send every request on config's schedule and collect their records."""
    due = send_times(len(requests), config.request_rate, config.burstiness, config.seed)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr,
               disable=not config.progress, dynamic_ncols=True)
    t0 = await watcher.start() if watcher is not None else time.perf_counter()
    try:
        records = await _send_all(client, requests, list(due), config.max_concurrency,
                                  f"bench-{uuid.uuid4().hex[:8]}", t0, bar)
        duration = time.perf_counter() - t0
    finally:
        bar.close()
        server = await watcher.stop() if watcher is not None else None
    return RunResult(config, records, duration, started_at, server)
