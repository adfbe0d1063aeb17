"""Host-side cost of serving, on any machine: the device made to take a fixed time per step.

    python -m loadtest.host_overhead --step-ms 15 serve --model DIR --port 50123 ...
    python -m loadtest.host_overhead --step-ms 15 offline --model DIR --num-prompts 256 ...

On a GPU a decode step at batch 128 takes ~15 ms on the device while the host schedules,
builds the next graph, detokenizes and streams in Python. On a CPU the forward pass itself
takes the CPU, so gRPC and offline look alike there and host overhead hides. This wrapper
runs `mistral-serve serve` or `loadtest.offline_bench` with every step's results held back
until --step-ms after the step was launched (a sleep, which releases the GIL like a device
wait), so a tiny model on a CPU behaves like a big one on a GPU: throughput then measures
how much of the host work overlaps the "device". Use a tiny model (the real compute must stay
well under --step-ms) and compare serve (through `loadtest.serve_bench`) with offline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from engine.runner import ModelRunner


def hold_steps(step_ms: float) -> None:
    """Make each step's results ready step_ms after the previous step's (or its own launch)."""
    launch, collect = ModelRunner.launch, ModelRunner.collect
    device_free_at = [0.0]  # steps run one after another on a device, as on a GPU

    def timed_launch(self, sched):
        step = launch(self, sched)
        step.ready_at = max(time.perf_counter(), device_free_at[0]) + step_ms / 1e3
        device_free_at[0] = step.ready_at
        return step

    def held_collect(self, step):
        wait = getattr(step, "ready_at", 0) - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return collect(self, step)

    ModelRunner.launch, ModelRunner.collect = timed_launch, held_collect


def _held_child_main(*args) -> None:
    """The engine process's entry (`serve --engine-process`) with its steps held too. Spawn
    imports this module in the child, where engine.process is fresh (unswapped); step_ms
    comes from the environment."""
    from engine import process
    hold_steps(float(os.environ["MISTRAL_SERVE_HOLD_STEP_MS"]))
    process._child_main(*args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-ms", type=float, required=True, help="simulated device time per step")
    ap.add_argument("mode", choices=["serve", "offline"])
    a, rest = ap.parse_known_args(argv)
    hold_steps(a.step_ms)
    if a.mode == "serve":
        from engine import process
        os.environ["MISTRAL_SERVE_HOLD_STEP_MS"] = str(a.step_ms)
        process._child_main = _held_child_main
        from service.cli import main as cli_main
        sys.exit(cli_main(["serve", *rest]))
    from loadtest.offline_bench import main as bench_main
    bench_main([*rest, "--no-peer"])


if __name__ == "__main__":
    main()
