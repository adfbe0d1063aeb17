"""Host time of the scheduler per decode step, without MLX or a device.

Decode steps are paced by the host at batch 64-128 on an H200 (loadtest/RESULTS.md): every
millisecond of Python in schedule() and update() is a millisecond of step. This drives the
scheduler through steady decode at a given batch, with a stand-in runner that "samples" a
token per request, and reports the microseconds per step spent in schedule() and update().

    python -m loadtest.scheduler_cost --batch 64 --context 1024 --steps 256
"""
from __future__ import annotations

import argparse
import time

from scheduler.kv_manager import KVCacheManager
from scheduler.output import ModelRunnerOutput, SampledToken
from scheduler.request import Request, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig


def run(batch: int, context: int, steps: int, block_size: int = 16, prefix_caching: bool = False,
        window: int | None = None) -> tuple[float, float]:
    """(us per step in schedule(), us per step in update()) over `steps` decode steps at
    `batch` requests of `context` prompt tokens, one step in flight as the engine runs them."""
    blocks = batch * (-(-(context + steps + 8) // block_size) + 1)
    kv = KVCacheManager(blocks, block_size, sliding_window=window, enable_prefix_caching=prefix_caching)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=max(4096, batch), max_num_seqs=batch,
                                      enable_prefix_caching=prefix_caching), kv)
    params = SamplingParams(temperature=0, max_tokens=steps + 16, ignore_eos=True)
    for i in range(batch):
        sched.add_request(Request(f"r{i}", [(7 * i + j) % 32000 for j in range(context)], params))
    token = SampledToken(5)

    def answer(out) -> ModelRunnerOutput:
        return ModelRunnerOutput(sampled={s.request_id: token for s in out.scheduled if s.sample})

    inflight = None
    while sched.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        out = sched.schedule()  # prompts, untimed
        if inflight is not None:
            sched.update(inflight, answer(inflight))
        inflight = out
    t_sched = t_update = 0.0
    for _ in range(steps):  # as engine.step(): schedule N+1, then update N
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        sched.update(inflight, answer(inflight))
        t_update += time.perf_counter() - t1
        t_sched += t1 - t0
        inflight = out
    return 1e6 * t_sched / steps, 1e6 * t_update / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="64,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--prefix-caching", action="store_true")
    ap.add_argument("--window", type=int)
    a = ap.parse_args(argv)
    for b in (int(x) for x in a.batch.split(",")):
        s, u = run(b, a.context, a.steps, prefix_caching=a.prefix_caching, window=a.window)
        print(f"batch {b:4d}, context {a.context}: schedule {s:7.0f} us, update {u:7.0f} us "
              f"a step ({(s + u) / b:.1f} us a request)")


if __name__ == "__main__":
    main()
