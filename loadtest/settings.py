"""Engine settings by name, for benchmarks that compare variants in one process.

A spec is "NAME=VALUE,..." where NAME is MODULE.ATTR (a constant of an engine module, e.g.
qgemv.STAGES=2) or plan.FIELD (a field of the model's KernelPlan, e.g. plan.qgemm=False).
One process can then time several variants on the same weights: on a GPU, a 4-bit engine's
start-up (kernel self-checks) costs about a minute each time.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import re


def parse(spec: str) -> tuple[dict, dict]:
    """spec -> ({(module, attr): value}, {plan field: value}); unknown names raise SystemExit."""
    constants, plan = {}, {}
    # Split at the commas that start a new "name=" so that tuple values stay whole.
    for item in re.split(r",(?=\s*[\w.]+\s*=)", spec):
        target, value = item.split("=", 1)
        owner, attr = target.strip().rsplit(".", 1)
        value = ast.literal_eval(value.strip())
        if owner == "plan":
            from engine.model import KernelPlan
            if attr not in {f.name for f in dataclasses.fields(KernelPlan)}:
                raise SystemExit(f"{spec}: KernelPlan has no field {attr}")
            plan[attr] = value
            continue
        mod = importlib.import_module(f"engine.{owner}")
        if not hasattr(mod, attr):
            raise SystemExit(f"{spec}: engine.{owner} has no {attr}")
        constants[(mod, attr)] = value
    return constants, plan


@contextlib.contextmanager
def constants(values: dict):
    """Engine module constants {(module, attr): value} set inside the block, restored after."""
    saved = {key: getattr(*key) for key in values}
    for (mod, attr), value in values.items():
        setattr(mod, attr, value)
    try:
        yield
    finally:
        for (mod, attr), value in saved.items():
            setattr(mod, attr, value)


@contextlib.contextmanager
def applied(engine, spec: str):
    """The engine runs with spec's settings inside the block; they are restored after.

    The compiled decode steps captured the old kernels, so they are dropped (both ways)
    and, where the runner compiles, traced again before the block's requests run."""
    values, plan_fields = parse(spec)
    # warm_decode's dummy decodes write slot 0 of block 0: safe only with no request running
    # and no cached prefix that could hold that block.
    if engine.has_unfinished_requests() or engine.info.config.enable_prefix_caching:
        raise ValueError("settings.applied needs an idle engine without prefix caching")
    model, runner = engine.model, engine.runner
    plan = model.plan
    with constants(values):
        model.plan = dataclasses.replace(plan, **plan_fields)
        runner._compiled.clear()
        try:
            if runner.compile_decode:
                from engine.runner import WARM_DECODE_BATCHES
                runner.warm_decode(WARM_DECODE_BATCHES)
            yield
        finally:
            model.plan = plan
            runner._compiled.clear()
