"""A decode step that continues the last one takes its inputs from it on the device
(engine/decode_carry.py). Those inputs must be exactly what the host would have built, and
any step that is not a continuation must build them on the host."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from engine import decode_carry, runner as runner_module
from engine.decode_carry import DecodeCarry
from engine.engine import EngineConfig, LLMEngine
from loadtest.offline_bench import _NoTokenizer
from scheduler.output import ScheduledRequest
from scheduler.request import SamplingParams
from scheduler.scheduler import INFLIGHT_TOKEN
from tests.tiny import run_to_completion, tiny_model

BS = 16


def _req(rid="a", pos=20, table=(7, 3), first=0, token=INFLIGHT_TOKEN, sample=True):
    return ScheduledRequest(rid, (token,), pos, table, first, sample, SamplingParams(), 0)


def _carry(reqs):
    n = len(reqs)
    moving = mx.array([r.start_position for r in reqs] + [100 + i for i in range(n)] + [0, 0],
                      mx.int32)
    return DecodeCarry.of(reqs, moving, mx.zeros((n, 4), mx.int32), mx.zeros((n,), mx.int32),
                          mx.arange(n, dtype=mx.int32))


def test_advance_only_continues_the_same_steady_decodes():
    reqs = [_req("a", 20), _req("b", 33, table=(1, 2, 4))]
    carry = _carry(reqs)
    rows = {"a": 0, "b": 1}
    nxt = carry.advance([_req("a", 21), _req("b", 34, table=(1, 2, 4))], BS, rows)
    assert nxt is not None and nxt.positions.tolist() == [21, 34]
    assert nxt.moving.tolist()[:4] == [21, 34, 101, 102]  # positions and slots one further
    assert nxt.tables_dev is carry.tables_dev and nxt.last is carry.last
    breaks = {
        "order": [_req("b", 34, table=(1, 2, 4)), _req("a", 21)],
        "fewer": [_req("a", 21)],
        "position jump": [_req("a", 22), _req("b", 34, table=(1, 2, 4))],
        "new block": [_req("a", 21), _req("b", 32, table=(1, 2, 4))],
        "table changed": [_req("a", 21, table=(7, 5)), _req("b", 34, table=(1, 2, 4))],
        "window slid": [_req("a", 21, first=1), _req("b", 34, table=(1, 2, 4))],
        "token known": [_req("a", 21, token=5), _req("b", 34, table=(1, 2, 4))],
        "not sampled": [_req("a", 21, sample=False), _req("b", 34, table=(1, 2, 4))],
    }
    for why, nxt_reqs in breaks.items():
        assert carry.advance(nxt_reqs, BS, rows) is None, why
    same = [_req("a", 21), _req("b", 34, table=(1, 2, 4))]
    assert carry.advance(same, BS, {"a": 1, "b": 0}) is None  # samples in another order
    assert carry.advance(same, BS, {"a": 0, "b": 1, "c": 2}) is None
    assert carry.advance(same, 1, rows) is None  # block size 1: every token a new block


def test_advance_enters_new_blocks_from_the_tables():
    # "a" enters its third block (9, appended by the scheduler), "b" its second, which it
    # holds already; "c" stays inside its block. Slots and the new table cell come from the
    # host's few numbers, the rest is the last step's arrays one further.
    reqs = [_req("a", 31, table=(7, 3)), _req("b", 15, table=(1, 2)), _req("c", 40, table=(4, 6, 8))]
    carry = _carry(reqs)
    moving = [31, 15, 40, 3 * BS + 15, 1 * BS + 15, 8 * BS + 8, 0, 0]
    carry = dataclasses.replace(carry, moving=mx.array(moving, mx.int32))
    nxt = carry.advance([_req("a", 32, table=(7, 3, 9)), _req("b", 16, table=(1, 2)),
                         _req("c", 41, table=(4, 6, 8))], BS, {"a": 0, "b": 1, "c": 2})
    assert nxt is not None
    assert nxt.moving.tolist() == [32, 16, 41, 9 * BS, 2 * BS, 8 * BS + 9, 1, 1]
    assert nxt.tables_dev.tolist()[0] == [0, 0, 9, 0] and sum(map(sum, nxt.tables_dev.tolist())) == 9
    assert nxt.tables[0] == (7, 3, 9) and nxt.positions.tolist() == [32, 16, 41]
    assert carry.tables_dev.tolist() == [[0] * 4] * 3  # the step before keeps its arrays
    wide = [_req("a", 32, table=(7, 3, 9, 10, 11)), _req("b", 16, table=(1, 2)),
            _req("c", 41, table=(4, 6, 8))]
    assert carry.advance(wide, BS, {"a": 0, "b": 1, "c": 2}) is None  # wider than the device's


def _engine(monkeypatch, max_num_seqs=4, kv_gib=0.01, prefix_caching=False, window=40):
    """A tiny engine whose decode steps take the CUDA kernel's inputs (the kernel itself is
    replaced by an embedding lookup, so tokens still depend on the inputs); the list its
    compiled decode steps' inputs go to, and the list of its host builds."""
    model, args, _ = tiny_model(sliding_window=window)
    engine = LLMEngine(model, args, _NoTokenizer(args), EngineConfig(
        kv_cache_memory_gib=kv_gib, max_num_seqs=max_num_seqs,
        enable_prefix_caching=prefix_caching, max_num_batched_tokens=256))
    runner = engine.runner
    runner.decode_kernel = runner.compile_decode = True
    seen, host_builds = [], []

    def fake_compiled(group, ids, positions, slots):
        arrays = (ids, positions, slots, group.block_tables, group.key_start, group.query_positions)
        seen.append(tuple(np.array(a).tolist() for a in arrays) + (group.splits,))
        return model.model.embed_tokens(ids) * (1 + positions[:, None].astype(mx.float32) % 3)

    def counting(*arrays):
        host_builds.append(1)
        return device_ints(*arrays)

    device_ints = runner_module.device_ints
    monkeypatch.setattr(runner, "_compiled_decode", fake_compiled)
    monkeypatch.setattr(runner_module, "device_ints", counting)
    return engine, seen, host_builds


def _run(enabled: bool, monkeypatch, window=40):
    """Every compiled decode step's inputs, the tokens, and how many steps built on the host."""
    monkeypatch.setattr(decode_carry, "ENABLED", enabled)
    engine, seen, host_builds = _engine(monkeypatch, window=window)
    # Prompts arrive together (one prefill step, no mixed steps: the kernel is not here);
    # then the batch shrinks as requests finish, and contexts cross blocks and the window.
    for i in range(3):
        engine.add_request(f"r{i}", list(range(3 + i, 20 + 9 * i)), SamplingParams(
            temperature=0 if i % 2 else 0.8, seed=i, max_tokens=30 + 12 * i, ignore_eos=True))
    return run_to_completion(engine), seen, len(host_builds)


@pytest.mark.parametrize("window", [40, None])
def test_carried_inputs_are_the_ones_the_host_builds(window, monkeypatch):
    want, want_inputs, host_steps = _run(False, monkeypatch, window)
    got, got_inputs, carried_host_steps = _run(True, monkeypatch, window)
    assert got_inputs == want_inputs and got == want
    decode_steps = len(want_inputs)
    assert host_steps == decode_steps + 1  # with the carry off: every step (and the prefill)
    # On: a step builds on the host only at a new batch or a slid window (and the prefill);
    # new blocks continue. Without a window: the first decode step and 2 smaller batches.
    if window is None:
        assert carried_host_steps == 4, (carried_host_steps, decode_steps)
    else:
        assert carried_host_steps < decode_steps // 3, (carried_host_steps, decode_steps)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_carry_survives_arrivals_aborts_and_preemption(prefix_caching, monkeypatch):
    # Staggered arrivals (mixed steps, whose decodes also take the kernel's inputs: its call is
    # replaced by a function of them), an abort and the same id added again, shared prompt
    # prefixes and a pool small enough to preempt: the same inputs and tokens either way.
    from engine import attention

    def run(enabled):
        monkeypatch.setattr(decode_carry, "ENABLED", enabled)
        kernel_inputs = []

        def fake_kernel(q, k_pool, v_pool, tables, key_start, query_positions, *rest):
            kernel_inputs.append(tuple(np.array(a).tolist() for a in
                                       (tables, key_start, query_positions)) + rest)
            return q * (1 + query_positions[:, None, None].astype(q.dtype) % 3)

        monkeypatch.setattr(attention, "paged_decode_attention", fake_kernel)
        engine, seen, host_builds = _engine(monkeypatch, kv_gib=0.00008,
                                            prefix_caching=prefix_caching)
        out, step = {}, 0
        prompts = [list(range(3, 40)), list(range(3, 30)) + [7] * 9, list(range(50, 95))]
        while step < 400 and (step < 30 or engine.has_unfinished_requests()):
            if step in (0, 6, 13):
                i = (0, 6, 13).index(step)
                engine.add_request(f"r{i}", prompts[i], SamplingParams(
                    temperature=0.8 if i == 1 else 0, seed=i, max_tokens=70, ignore_eos=True))
            if step == 20:
                engine.abort("r1")
                engine.add_request("r1", prompts[1][:20], SamplingParams(max_tokens=40,
                                                                         ignore_eos=True))
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
            step += 1
        return out, seen, kernel_inputs, len(host_builds), engine.scheduler.num_preemptions

    want = run(False)
    got = run(True)
    assert got[:3] == want[:3] and got[4] == want[4]
    assert want[4] > 0 and len(want[2]) > 0  # it did preempt, and ran mixed steps
    assert got[3] < want[3] - 20  # and steps did carry


def test_a_failed_step_leaves_nothing_to_continue(monkeypatch):
    # launch() keeps a step's carry only once it has sampled: a step that raised must not
    # hand the next one its inputs with the samples of an older step.
    engine, seen, _ = _engine(monkeypatch, max_num_seqs=1)
    runner = engine.runner
    engine.add_request("a", list(range(5, 25)), SamplingParams(max_tokens=30, ignore_eos=True))
    while len(seen) < 3:
        engine.step()
    assert runner._carry is not None
    # One sequence's positions and slots are 8 bytes; MLX would keep an array that small in
    # host memory read across PCIe, so the carried array keeps spare entries.
    assert runner._carry.moving.nbytes > 8 and runner._carry.step.nbytes > 8
    monkeypatch.setattr(runner_module, "sample", lambda *a: (_ for _ in ()).throw(RuntimeError))
    with pytest.raises(RuntimeError):
        runner.launch(engine.scheduler.schedule())
    assert len(seen) == 4 and runner._carry is None


@pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend")
@pytest.mark.parametrize("window", [None, 8])
def test_device_tokens_same_with_and_without_carry(window, monkeypatch):
    # On CUDA, with the real decode kernel and compiled step: the same tokens and logprobs
    # whether steady decode steps carry their inputs or the host builds every step's.
    prompts = [list(range(10 + i, 10 + i + n)) for i, n in enumerate((3, 17, 30, 9))]
    results = {}
    for enabled in (False, True):
        monkeypatch.setattr(decode_carry, "ENABLED", enabled)
        model, args, _ = tiny_model(seed=2, vocab_size=32768, hidden_size=128, sliding_window=window)
        engine = LLMEngine(model, args, _NoTokenizer(args), EngineConfig(
            kv_cache_memory_gib=0.01, block_size=4, enable_prefix_caching=False))
        assert engine.runner.decode_kernel and engine.runner.compile_decode
        out = {}
        for i, p in enumerate(prompts):  # staggered: batches grow and shrink
            engine.add_request(str(i), p, SamplingParams(
                temperature=0 if i % 2 else 0.7, seed=i, max_tokens=20 + 7 * i, ignore_eos=True,
                return_logprobs=True))
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(
                    (t, lp.logprob) for t, lp in zip(o.new_token_ids, o.logprobs))
        for rid, (tokens, lps) in run_to_completion(engine).items():
            out.setdefault(rid, []).extend((t, lp) for t, (lp, _) in zip(tokens, lps))
        results[enabled] = out
    assert results[True].keys() == results[False].keys() == {"0", "1", "2", "3"}
    for rid, want in results[False].items():
        got = results[True][rid]
        assert len(want) == 20 + 7 * int(rid) and [t for t, _ in got] == [t for t, _ in want]
        assert np.allclose([lp for _, lp in got], [lp for _, lp in want], atol=1e-4)


def test_decode_only_inputs_match_the_general_build():
    # _flat_inputs builds a decode-only step in plain Python: the same ids, positions and
    # slots as its general path, which a step with one prompt chunk in it takes.
    rng = np.random.default_rng(1)
    decodes = [ScheduledRequest(f"r{i}", (int(t),), int(p), tuple(int(b) for b in rng.integers(
                   1, 999, p // BS + 1 - f)), int(f), True, SamplingParams(), 0)
               for i, (t, p, f) in enumerate(zip(rng.integers(0, 500, 9), rng.integers(48, 300, 9),
                                                 rng.integers(0, 3, 9)))]
    chunk = ScheduledRequest("c", (1, 2, 3), 5, (4,), 0, True, SamplingParams(), 0)
    runner = type("R", (), {"block_size": BS})()
    fast = runner_module.ModelRunner._flat_inputs(runner, decodes)
    general = runner_module.ModelRunner._flat_inputs(runner, decodes + [chunk])
    for a, b in zip(fast, general):
        assert a.dtype == b.dtype == np.int32 and a.tolist() == b[:len(decodes)].tolist()
    assert fast[0].tolist() == [r.token_ids[0] for r in decodes]


def test_warm_up_runs_a_step_carried_into_a_new_block(monkeypatch):
    # warm_decode ends with a step that the carry continues into a new block, so that its
    # scatters are compiled at start-up: that step must build nothing on the host.
    engine, seen, host_builds = _engine(monkeypatch)
    builds, steps = len(host_builds), len(seen)
    engine.runner.warm_decode((1,))
    assert len(seen) - steps == 3 and len(host_builds) - builds == 2
    ids, positions, slots, tables = seen[-1][:4]
    assert positions == [BS] and slots == [0] and tables[0][:2] == [0, 0]
    assert engine.runner._carry is None  # nothing of the warm-up is left to continue
