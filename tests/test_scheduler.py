"""Scheduler tests with made-up runner outputs (no model)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from scheduler.kv_manager import KVCacheManager
from scheduler.output import ModelRunnerOutput, SampledToken
from scheduler.request import FinishReason, Request, RequestStatus, SamplingParams, ValidationError
from scheduler.scheduler import Scheduler, SchedulerConfig

EOS = 2


class FakeDetokenizer:
    """Maps each token id to a fixed piece of text."""

    def __init__(self, pieces: dict[int, str]):
        self.pieces = pieces

    def add(self, token_id: int) -> str:
        return self.pieces[token_id]


def make_request(rid: str, prompt_len: int = 4, prompt=None, priority: int = 0,
                 detokenizer=None, **sampling) -> Request:
    prompt = list(prompt) if prompt is not None else [10 + i for i in range(prompt_len)]
    sampling.setdefault("max_tokens", 16)
    return Request(rid, prompt, SamplingParams(**sampling), eos_token_id=EOS, priority=priority,
                   detokenizer=detokenizer)


def make_scheduler(num_blocks: int = 100, block_size: int = 4, sliding_window=None,
                   prefix_caching: bool = True, **config) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, sliding_window, prefix_caching)
    return Scheduler(SchedulerConfig(enable_prefix_caching=prefix_caching, **config), kv)


def step(sched: Scheduler, tokens=None, default: int = 7, errors=None, logprob=None):
    """Schedule, answer every sample=True request with a token, update."""
    out = sched.schedule()
    tokens = tokens or {}
    sampled = {}
    for s in out.scheduled:
        if s.sample:
            t = tokens[s.request_id] if s.request_id in tokens else default
            t = next(t) if hasattr(t, "__next__") else t
            sampled[s.request_id] = SampledToken(t, logprob, ((t, logprob),) if logprob else ())
    outputs = sched.update(out, ModelRunnerOutput(sampled=sampled, errors=errors or {}))
    assert len({o.request_id for o in outputs}) == len(outputs)
    return out, {o.request_id: o for o in outputs}


def by_id(out):
    return {s.request_id: s for s in out.scheduled}


def test_budget_respected_until_all_finish():
    sched = make_scheduler(max_num_batched_tokens=16)
    for i in range(10):
        sched.add_request(make_request(f"r{i}", prompt_len=7, max_tokens=5))
    finished = {}
    for _ in range(100):
        if not sched.has_unfinished_requests():
            break
        out, outputs = step(sched)
        assert out.num_batched_tokens == sum(s.num_tokens for s in out.scheduled) <= 16
        finished.update({k: o for k, o in outputs.items() if o.finished})
    assert len(finished) == 10
    assert all(o.finish_reason == FinishReason.LENGTH and o.num_output_tokens == 5
               for o in finished.values())
    assert sched.kv.num_used_blocks == 0


def test_chunked_prefill_while_decodes_flow_and_decodes_come_first():
    sched = make_scheduler(max_num_batched_tokens=10, long_prefill_token_threshold=4)
    sched.add_request(make_request("long", prompt_len=20, max_tokens=3))
    sched.add_request(make_request("short", prompt_len=2, max_tokens=10))
    out, outputs = step(sched)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("long", 4), ("short", 2)]
    assert list(outputs) == ["short"]
    position = 4
    for _ in range(4):  # long's prompt goes on in chunks of 4; short decodes every step
        out, outputs = step(sched)
        assert [s.request_id for s in out.scheduled] == ["short", "long"]  # decode first
        short, long = out.scheduled
        assert short.num_tokens == 1 and short.sample
        assert long.start_position == position and long.num_tokens == 4
        assert long.token_ids == tuple(range(10 + position, 14 + position))
        position += 4
        assert "short" in outputs
    assert long.sample and "long" in outputs  # the last chunk samples the first token
    out, _ = step(sched)
    assert all(s.num_tokens == 1 and s.sample for s in out.scheduled)


def test_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", max_tokens=2))
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 2
    out, outputs = step(sched)  # r0 and r1 finish here
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    assert all(o.finished for o in outputs.values())
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["r2", "r3"]


def test_priority_then_arrival_order():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("low", priority=5, max_tokens=1))
    sched.add_request(make_request("high1", priority=0, max_tokens=1))
    sched.add_request(make_request("high2", priority=0, max_tokens=1))
    order = [step(sched)[0].scheduled[0].request_id for _ in range(3)]
    assert order == ["high1", "high2", "low"]


def test_preempts_newest_and_resumes_with_same_tokens():
    sched = make_scheduler(num_blocks=4, block_size=4, prefix_caching=False)
    a = make_request("a", prompt_len=6, max_tokens=4)
    b = make_request("b", prompt=range(50, 56), max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    b_tokens = iter(range(100, 200))
    for _ in range(3):  # prompt, then decodes at positions 6 and 7: 4 blocks in use
        out, _ = step(sched, {"b": b_tokens})
        assert not out.preempted_request_ids
    assert sched.kv.num_free_blocks == 0
    out, outputs = step(sched, {"b": b_tokens})  # position 8 needs a fifth block
    assert out.preempted_request_ids == ("b",)
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [100, 101, 102]
    assert sched.num_preemptions == 1 and b.num_preemptions == 1
    assert outputs["a"].finish_reason == FinishReason.LENGTH
    out, outputs = step(sched, {"b": b_tokens})
    (s,) = out.scheduled
    assert s.start_position == 0 and s.sample and s.num_output_tokens == 3
    assert s.token_ids == tuple(range(50, 56)) + (100, 101, 102)  # recomputed
    assert outputs["b"].new_token_ids == (103,) and outputs["b"].num_output_tokens == 4
    assert b.output_token_ids == [100, 101, 102, 103]


def test_request_that_cannot_grow_preempts_itself():
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.add_request(make_request("a", prompt_len=5))
    sched.add_request(make_request("b", prompt_len=8))
    step(sched)
    out, outputs = step(sched)  # b's position 8 needs a block; b is the newest
    assert out.preempted_request_ids == ("b",)
    assert [s.request_id for s in out.scheduled] == ["a"] and list(outputs) == ["a"]
    assert sched.get_request("b").status == RequestStatus.PREEMPTED


def test_no_newcomers_in_a_step_that_preempted():
    sched = make_scheduler(num_blocks=4, block_size=4, prefix_caching=False)
    sched.add_request(make_request("a", prompt_len=8))
    sched.add_request(make_request("b", prompt_len=8))
    step(sched)
    sched.add_request(make_request("c", prompt_len=1))
    out, _ = step(sched)
    assert out.preempted_request_ids == ("b",)
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]  # the preempted one first


def test_abort_frees_blocks_and_reports_cancelled_on_next_update():
    sched = make_scheduler()
    sched.add_request(make_request("a", prompt_len=9))
    sched.add_request(make_request("w", max_tokens=1, priority=9))
    step(sched, {"w": EOS})
    sched.add_request(make_request("waiting"))
    assert sched.kv.num_used_blocks == 3
    assert sched.abort("a") and sched.abort("waiting")
    assert not sched.abort("a") and not sched.abort("unknown")
    assert sched.kv.num_used_blocks == 0 and sched.num_running == 0 and sched.num_waiting == 0
    assert sched.has_unfinished_requests()  # until the cancellations are handed out
    out, outputs = step(sched)
    assert out.is_empty and set(out.finished_request_ids) == {"a", "w", "waiting"}
    assert {k: o.finish_reason for k, o in outputs.items()} == {
        "a": FinishReason.CANCELLED, "waiting": FinishReason.CANCELLED}
    assert outputs["a"].finished and outputs["a"].num_output_tokens == 1
    assert outputs["a"].queue_time is None  # it had output before: not its first
    assert not sched.has_unfinished_requests()


def test_eos_stops_counts_as_output_but_adds_no_text():
    detok = FakeDetokenizer({5: "hi", EOS: "</s>"})
    sched = make_scheduler()
    sched.add_request(make_request("a", detokenizer=detok))
    step(sched, {"a": 5})
    _, outputs = step(sched, {"a": EOS})
    o = outputs["a"]
    assert o.finished and o.finish_reason == FinishReason.STOP
    assert o.new_token_ids == (EOS,) and o.num_output_tokens == 2 and o.new_text == ""
    assert sched.kv.num_used_blocks == 0


def test_ignore_eos_runs_to_max_tokens():
    sched = make_scheduler()
    sched.add_request(make_request("a", ignore_eos=True, max_tokens=3))
    results = [step(sched, {"a": EOS})[1]["a"] for _ in range(3)]
    assert [o.finished for o in results] == [False, False, True]
    assert results[-1].finish_reason == FinishReason.LENGTH and results[-1].num_output_tokens == 3


def test_stop_token_id_stops_even_with_ignore_eos():
    sched = make_scheduler()
    sched.add_request(make_request("a", stop_token_ids=(9,), ignore_eos=True))
    assert not step(sched, {"a": 8})[1]["a"].finished
    o = step(sched, {"a": 9})[1]["a"]
    assert o.finished and o.finish_reason == FinishReason.STOP


def test_stop_string_across_tokens_is_cut_and_held_back():
    detok = FakeDetokenizer({10: "ab", 11: "cx", 12: "y", 13: "zq"})
    sched = make_scheduler()
    request = make_request("a", detokenizer=detok, stop=("xyz",))
    sched.add_request(request)
    texts = []
    for token in (10, 11, 12, 13):
        o = step(sched, {"a": token})[1]["a"]
        texts.append(o.new_text)
    assert texts == ["ab", "c", "", ""]  # "x", then "xy", held back as a possible stop
    assert o.finished and o.finish_reason == FinishReason.STOP_SEQUENCE
    assert request.output_text == "abc" and o.num_output_tokens == 4


def test_held_back_text_is_released_when_no_stop_follows():
    detok = FakeDetokenizer({10: "ab", 11: "cx", 12: "a"})
    sched = make_scheduler()
    sched.add_request(make_request("a", detokenizer=detok, stop=("xyz",), max_tokens=4))
    outputs = [step(sched, {"a": t})[1]["a"] for t in (10, 11, 12, 11)]
    # "x" waits until "xa" rules out "xyz"; the last "x" is released by the finish.
    assert [o.new_text for o in outputs] == ["ab", "c", "xa", "cx"]
    assert outputs[-1].finish_reason == FinishReason.LENGTH


def test_max_model_len():
    sched = make_scheduler(max_model_len=6)
    with pytest.raises(ValidationError, match="7 tokens"):
        sched.add_request(make_request("too-long", prompt_len=7))
    sched.add_request(make_request("a", prompt_len=4, max_tokens=100))
    outputs = [step(sched)[1]["a"] for _ in range(2)]
    assert outputs[-1].finish_reason == FinishReason.LENGTH and outputs[-1].num_output_tokens == 2


def test_prompt_over_kv_capacity_is_rejected_and_generation_capped():
    sched = make_scheduler(num_blocks=4, block_size=4)  # 16 tokens at most, no window
    assert sched.max_tokens_capacity() == 16
    with pytest.raises(ValidationError, match="17 tokens"):
        sched.add_request(make_request("a", prompt_len=17))
    sched.add_request(make_request("b", prompt_len=12, max_tokens=100))
    for _ in range(4):
        _, outputs = step(sched)
        assert sched.kv.num_used_blocks <= 4
    assert outputs["b"].finish_reason == FinishReason.LENGTH
    assert outputs["b"].num_output_tokens == 4


def test_sliding_window_sequence_runs_past_the_pool_size():
    sched = make_scheduler(num_blocks=6, block_size=4, sliding_window=8, max_num_batched_tokens=8)
    assert sched.max_tokens_capacity() is None
    sched.add_request(make_request("a", prompt_len=20, max_tokens=40))
    for _ in range(45):
        out, outputs = step(sched)
        for s in out.scheduled:  # the table covers the window of the first query to the last
            last_block = (s.start_position + s.num_tokens - 1) // 4
            assert s.first_block_index + len(s.block_table) == last_block + 1
            assert s.first_block_index * 4 + 3 > s.start_position - 8  # first block visible
            assert s.first_block_index == 0 or s.first_block_index * 4 - 1 <= s.start_position - 8
        if "a" in outputs and outputs["a"].finished:
            break
    assert outputs["a"].finish_reason == FinishReason.LENGTH
    assert outputs["a"].num_output_tokens == 40


def test_errors_finish_only_that_request():
    sched = make_scheduler()
    sched.add_request(make_request("a"))
    sched.add_request(make_request("b"))
    step(sched)
    _, outputs = step(sched, errors={"a": "NaN in logits"})
    assert outputs["a"].finish_reason == FinishReason.ERROR and outputs["a"].finished
    assert outputs["a"].error == "NaN in logits"
    assert not outputs["b"].finished and outputs["b"].new_token_ids == (7,)
    assert sched.get_request("a") is None and sched.num_running == 1
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled] == ["b"] and out.finished_request_ids == ("a",)


def test_prefix_cache_hit_reuses_blocks():
    sched = make_scheduler(block_size=4)
    prompt = list(range(30, 40))
    sched.add_request(make_request("a", prompt=prompt, max_tokens=2))
    out, _ = step(sched)
    a_table = out.scheduled[0].block_table
    sched.add_request(make_request("b", prompt=prompt + [99], max_tokens=2))
    out, outputs = step(sched)
    b = by_id(out)["b"]
    assert b.start_position == 8 and b.token_ids == (38, 39, 99)
    assert b.block_table[:2] == a_table[:2] and b.block_table[2] != a_table[2]
    _, outputs = step(sched)
    assert outputs["b"].num_cached_tokens == 8
    assert sched.kv.prefix_cache_hits == 8 and sched.kv.prefix_cache_queries == 10 + 11


def test_penalty_token_lists_only_when_needed():
    sched = make_scheduler()
    sched.add_request(make_request("plain"))
    sched.add_request(make_request("rep", repetition_penalty=1.2))
    sched.add_request(make_request("freq", frequency_penalty=0.5))
    step(sched)
    s = by_id(sched.schedule())
    assert s["plain"].prompt_token_ids == () and s["plain"].output_token_ids == ()
    assert s["rep"].prompt_token_ids == (10, 11, 12, 13) and s["rep"].output_token_ids == (7,)
    assert s["freq"].prompt_token_ids == () and s["freq"].output_token_ids == (7,)


def test_logprobs_and_queue_time_on_first_output_only():
    sched = make_scheduler()
    sched.add_request(make_request("a", logprobs=1, return_logprobs=True))
    first = step(sched, logprob=-0.5)[1]["a"]
    second = step(sched, logprob=-0.5)[1]["a"]
    assert first.queue_time is not None and first.queue_time >= 0 and second.queue_time is None
    (lp,) = first.logprobs
    assert (lp.token_id, lp.logprob, lp.top_logprobs) == (7, -0.5, ((7, -0.5),))


def test_add_request_validation():
    sched = make_scheduler()
    sched.add_request(make_request("a"))
    with pytest.raises(ValidationError, match="already in use"):
        sched.add_request(make_request("a"))
    with pytest.raises(ValidationError, match="empty"):
        sched.add_request(make_request("e", prompt=[]))
    with pytest.raises(ValueError, match="detokenizer"):
        sched.add_request(make_request("s", stop=("x",)))
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), num_blocks=st.integers(4, 12), window=st.sampled_from([None, 4, 8]),
       caching=st.booleans(), budget=st.integers(1, 12), max_seqs=st.integers(1, 4))
def test_random_traffic_keeps_invariants(data, num_blocks, window, caching, budget, max_seqs):
    sched = make_scheduler(num_blocks, 2, window, caching, max_num_batched_tokens=budget,
                           max_num_seqs=max_seqs)
    cap = sched.max_tokens_capacity()
    requests, streams = {}, {}
    small = st.integers(0, 30)  # EOS (2) now and then

    def one_step():
        out = sched.schedule()
        assert out.num_batched_tokens == sum(s.num_tokens for s in out.scheduled) <= budget
        assert len(out.scheduled) <= max_seqs
        is_decode = [s.sample and s.num_tokens == 1 for s in out.scheduled]
        assert is_decode == sorted(is_decode, reverse=True)  # decodes first
        for s in out.scheduled:
            all_ids = requests[s.request_id].all_token_ids
            assert s.token_ids == tuple(all_ids[s.start_position:s.start_position + s.num_tokens])
        sampled = {s.request_id: SampledToken(data.draw(small)) for s in out.scheduled if s.sample}
        errors = {}
        if out.scheduled and data.draw(st.integers(0, 20)) == 0:
            errors = {out.scheduled[0].request_id: "boom"}
        for o in sched.update(out, ModelRunnerOutput(sampled=sampled, errors=errors)):
            assert not (streams[o.request_id] and streams[o.request_id][-1].finished)
            streams[o.request_id].append(o)

    for i in range(data.draw(st.integers(1, 30))):
        if data.draw(st.booleans()):
            prompt = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=12))
            request = make_request(f"r{i}", prompt=prompt, max_tokens=data.draw(st.integers(1, 16)))
            if cap is not None and len(prompt) > cap:
                with pytest.raises(ValidationError):
                    sched.add_request(request)
                continue
            sched.add_request(request)
            requests[request.request_id], streams[request.request_id] = request, []
        if data.draw(st.integers(0, 5)) == 0 and requests:
            sched.abort(data.draw(st.sampled_from(sorted(requests))))
        one_step()
    for _ in range(500):  # everything finishes: no livelock between preemption and resume
        if not sched.has_unfinished_requests():
            break
        one_step()
    assert not sched.has_unfinished_requests()
    assert sched.kv.num_used_blocks == 0
    for rid, request in requests.items():
        outputs = streams[rid]
        assert outputs and outputs[-1].finished and outputs[-1].finish_reason is not None
        tokens = [t for o in outputs for t in o.new_token_ids]
        assert tokens == request.output_token_ids
        assert outputs[-1].num_output_tokens == len(tokens) <= request.sampling_params.max_tokens
