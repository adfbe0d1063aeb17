"""Each step: who runs and how many tokens each (schedule), then what came of it (update).

A step is a token budget: running requests first (1 token per decode, the next chunk for a
prompt still being computed), then waiting requests while blocks and max_num_seqs allow.
When blocks run out, the newest running request is preempted and later recomputed.

Choices:
- abort() finishes the request at once (blocks freed); its CANCELLED RequestOutput comes
  from the next update(), and has_unfinished_requests() stays true until then.
- EOS and stop token ids count as output tokens (in new_token_ids and usage) but add no text.
- A request longer than the KV cache can hold alone is capped: add_request rejects a prompt
  over max_tokens_capacity() with ValidationError; generation stops there with LENGTH.
- Priority orders the waiting queue only; a running request is never preempted for priority.
- schedule() advances num_computed_tokens (the step's KV will exist once it runs) and counts
  the token a sampling step will produce as in flight, so the next schedule() may run before
  this step's update(): a decode whose input token is still on the device is fed the
  placeholder INFLIGHT_TOKEN, which the runner replaces with the previous step's sample.
"""

from __future__ import annotations

import itertools
import time
from bisect import insort
from dataclasses import dataclass
from typing import Optional

from scheduler.kv_manager import KVCacheManager
from scheduler.output import (ModelRunnerOutput, RequestOutput, SampledToken, ScheduledRequest,
                              SchedulerOutput, TokenLogprob)
from scheduler.request import FinishReason, Request, RequestStatus, ValidationError

INFLIGHT_TOKEN = -1  # input token sampled by the previous step, not yet on the host


@dataclass
class SchedulerConfig:
    """Limits of one step. max_model_len None: only the KV cache bounds a sequence."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: Optional[int] = None
    long_prefill_token_threshold: Optional[int] = None  # cap on one prompt chunk
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "long_prefill_token_threshold"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")


class Scheduler:
    """Owns request state; the only place it changes."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager):
        if config.enable_prefix_caching != kv_manager.enable_prefix_caching:
            raise ValueError("SchedulerConfig.enable_prefix_caching and the KVCacheManager's "
                             "enable_prefix_caching must agree")
        self.config = config
        self.kv = kv_manager
        self._max_chunk = min(config.max_num_batched_tokens,
                              config.long_prefill_token_threshold or config.max_num_batched_tokens)
        lengths = [n for n in (config.max_model_len, kv_manager.max_num_tokens(self._max_chunk))
                   if n is not None]
        self._max_len = min(lengths) if lengths else None
        self._requests: dict[str, Request] = {}
        self._keys: dict[str, tuple] = {}  # (priority, arrival_time, order added)
        self._counter = itertools.count()
        self.waiting: list[Request] = []  # sorted by key
        self.running: list[Request] = []  # sorted by key: the newest is last
        self._pending: list[RequestOutput] = []  # aborts, returned by the next update()
        self._finished_ids: list[str] = []  # told to the runner in the next SchedulerOutput
        self._step = 0
        # step -> the Request objects it scheduled, until update(): with a step in flight an
        # id may be aborted and reused, and the old step's token must not reach the new one.
        self._launched: dict[int, dict[str, Request]] = {}
        self.num_preemptions = 0

    def _key(self, request: Request) -> tuple:
        return self._keys[request.request_id]

    def max_tokens_capacity(self) -> Optional[int]:
        """Most tokens (prompt + output) one request may reach; None: unbounded."""
        return self._max_len

    def add_request(self, request: Request) -> None:
        """Queue a request; ValidationError if it can never run."""
        if request.request_id in self._requests:
            raise ValidationError(f"request id {request.request_id!r} is already in use")
        if not request.prompt_token_ids:
            raise ValidationError("the prompt is empty; send at least one token")
        if self._max_len is not None and request.num_prompt_tokens > self._max_len:
            raise ValidationError(
                f"the prompt has {request.num_prompt_tokens} tokens but this server takes at most "
                f"{self._max_len} (the model's context or the KV cache); shorten the prompt")
        if request.sampling_params.stop and request.detokenizer is None:
            raise ValueError("stop strings need a request.detokenizer")
        self._requests[request.request_id] = request
        self._keys[request.request_id] = (request.priority, request.arrival_time,
                                          next(self._counter))
        insort(self.waiting, request, key=self._key)

    def abort(self, request_id: str) -> bool:
        """Finish a request as CANCELLED and free its blocks; False if unknown or finished."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._pending.append(self._finish(request, FinishReason.CANCELLED))
        return True

    def get_request(self, request_id: str) -> Optional[Request]:
        return self._requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self._pending)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- schedule ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts; decodes first in the batch."""
        budget = self.config.max_num_batched_tokens
        num_new: dict[str, int] = {}
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(_length(request) - request.num_computed_tokens, budget, self._max_chunk)
            if n <= 0 or self._ends_with_inflight(request):
                i += 1  # nothing to feed until its in-flight token lands
            elif self._allocate_or_preempt(request, n, preempted):
                num_new[request.request_id] = n
                budget -= n
                i += 1

        # A step that had to preempt has no room for newcomers.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            cached = self.kv.get_computed_blocks(request)
            n = min(_length(request) - cached, budget, self._max_chunk)
            if not self.kv.allocate_slots(request, n, cached):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.pop(0)
            if request.first_scheduled_time is None:  # not a resume after preemption
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = cached
            request.num_computed_tokens = cached
            request.status = RequestStatus.RUNNING
            insort(self.running, request, key=self._key)
            num_new[request.request_id] = n
            budget -= n

        decodes, chunks = [], []
        for request_id, n in num_new.items():
            request = self._requests[request_id]
            s = self._scheduled_request(request, n)
            (decodes if s.sample and n == 1 else chunks).append(s)
            request.num_computed_tokens += n
            request.num_inflight_tokens += s.sample
        self._step += 1
        self._launched[self._step] = {rid: self._requests[rid] for rid in num_new}
        finished, self._finished_ids = tuple(self._finished_ids), []
        return SchedulerOutput(step=self._step, scheduled=tuple(decodes + chunks),
                               num_batched_tokens=sum(num_new.values()),
                               preempted_request_ids=tuple(preempted),
                               finished_request_ids=finished)

    def _allocate_or_preempt(self, request: Request, n: int, preempted: list[str]) -> bool:
        """Preempt the newest running requests until n slots fit; False if request went too."""
        while not self.kv.allocate_slots(request, n):
            victim = self.running.pop()  # never one already scheduled this step
            self.kv.free(victim)
            victim.num_computed_tokens = 0
            victim.status = RequestStatus.PREEMPTED
            victim.num_preemptions += 1
            self.num_preemptions += 1
            insort(self.waiting, victim, key=self._key)  # FCFS puts it at the front
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _ends_with_inflight(self, request: Request) -> bool:
        """Its in-flight token is certainly its last (max_tokens or the length cap)."""
        if not request.num_inflight_tokens:
            return False
        n_out = len(request.output_token_ids) + request.num_inflight_tokens
        return n_out >= request.sampling_params.max_tokens or (
            self._max_len is not None and _length(request) >= self._max_len)

    def _scheduled_request(self, request: Request, n: int) -> ScheduledRequest:
        start, end = request.num_computed_tokens, request.num_computed_tokens + n
        prompt, output = request.prompt_token_ids, request.output_token_ids
        p, known = len(prompt), request.num_tokens
        if n == 1 and start >= p:  # a decode (most of a busy step): one token, no lists
            token_ids = (output[start - p],) if start < known else (INFLIGHT_TOKEN,)
        else:
            if end <= p:
                ids = prompt[start:end]
            elif start >= p:
                ids = output[start - p:min(end, known) - p]
            else:
                ids = prompt[start:] + output[:min(end, known) - p]
            token_ids = tuple(ids + [INFLIGHT_TOKEN] * (end - max(start, known)))
        sp = request.sampling_params
        needs_output = sp.repetition_penalty != 1 or sp.presence_penalty or sp.frequency_penalty
        return ScheduledRequest(
            request_id=request.request_id, token_ids=token_ids, start_position=start,
            block_table=self.kv.block_table(request.request_id),
            first_block_index=self.kv.first_block_index(request.request_id),
            sample=end == _length(request), sampling_params=sp,
            num_output_tokens=len(output) + request.num_inflight_tokens,
            prompt_token_ids=tuple(prompt) if sp.repetition_penalty != 1 else (),
            output_token_ids=tuple(output) if needs_output else ())

    # -- update ------------------------------------------------------------------------------
    def update(self, scheduler_output: SchedulerOutput,
               runner_output: ModelRunnerOutput) -> list[RequestOutput]:
        """Apply one step's results; one RequestOutput per request that got a token or finished."""
        outputs, self._pending = self._pending, []
        requests = self._launched.pop(scheduler_output.step, {})
        for request_id, message in runner_output.errors.items():
            request = requests.get(request_id)
            if request is not None and not request.is_finished:
                outputs.append(self._finish(request, FinishReason.ERROR, error=message))
        for s in scheduler_output.scheduled:
            request = requests.get(s.request_id)
            if request is None or request.is_finished:  # aborted or failed since schedule()
                continue
            if not s.sample:
                self._after_step(request)
                continue
            request.num_inflight_tokens -= 1
            sampled = runner_output.sampled.get(s.request_id)
            if sampled is None:
                outputs.append(self._finish(request, FinishReason.ERROR,
                                            error="the model runner returned no token"))
            else:
                outputs.append(self._append_token(request, sampled))
                if not request.is_finished:
                    self._after_step(request)
        return outputs

    def _after_step(self, request: Request) -> None:
        # The hashes need the tokens on the host; freeing blocks a step still in flight reads
        # is safe because a new owner's writes come from a later step, run after it in order.
        if request.status == RequestStatus.RUNNING:
            self.kv.cache_full_blocks(request)
            self.kv.free_outside_window(request)

    def _append_token(self, request: Request, sampled: SampledToken) -> RequestOutput:
        request.output_token_ids.append(sampled.token_id)
        reason = self._stop_reason(request, sampled.token_id)
        logprobs = ()
        if sampled.logprob is not None:
            logprobs = (TokenLogprob(sampled.token_id, sampled.logprob, sampled.top_logprobs),)
        if reason is not None:
            return self._finish(request, reason, (sampled.token_id,), logprobs)
        return self._output(request, (sampled.token_id,), logprobs)

    def _stop_reason(self, request: Request, token_id: int) -> Optional[FinishReason]:
        sp = request.sampling_params
        is_eos = token_id == request.eos_token_id and not sp.ignore_eos
        if is_eos or token_id in sp.stop_token_ids:
            return FinishReason.STOP
        if request.detokenizer is not None:
            before = len(request.output_text)
            request.output_text += request.detokenizer.add(token_id)
            # A match may start up to len(stop) - 1 characters before the new text.
            hits = [i for i in (request.output_text.find(s, max(0, before - len(s) + 1))
                                for s in sp.stop) if i >= 0]
            if hits:
                request.output_text = request.output_text[:min(hits)]
                return FinishReason.STOP_SEQUENCE
        if len(request.output_token_ids) >= sp.max_tokens:
            return FinishReason.LENGTH
        if self._max_len is not None and request.num_tokens >= self._max_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason, new_token_ids: tuple = (),
                logprobs: tuple = (), error: Optional[str] = None) -> RequestOutput:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv.free(request)
        for queue in (self.running, self.waiting):
            if request in queue:
                queue.remove(request)
        del self._requests[request.request_id]
        del self._keys[request.request_id]
        self._finished_ids.append(request.request_id)
        return self._output(request, new_token_ids, logprobs, error)

    def _output(self, request: Request, new_token_ids: tuple, logprobs: tuple,
                error: Optional[str] = None) -> RequestOutput:
        text = request.output_text
        end = len(text)
        if not request.is_finished:
            end -= _partial_stop_len(text, request.sampling_params.stop)
        new_text = text[request.num_text_sent:end]
        request.num_text_sent = max(request.num_text_sent, end)
        queue_time = None
        if (len(request.output_token_ids) == len(new_token_ids)
                and request.first_scheduled_time is not None):
            queue_time = request.first_scheduled_time - request.arrival_time  # first output
        return RequestOutput(
            request_id=request.request_id, new_token_ids=new_token_ids, new_text=new_text,
            logprobs=logprobs, finished=request.is_finished, finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=request.num_cached_tokens, error=error, queue_time=queue_time)


def _length(request: Request) -> int:
    """Tokens the sequence will have once its in-flight samples land."""
    return request.num_tokens + request.num_inflight_tokens


def _partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of text that could still grow into a stop string."""
    if not stops:
        return 0
    for k in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0
