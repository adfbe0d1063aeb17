"""Plain dataclasses that cross the scheduler / runner / service boundaries.

Everything here is read-only by convention once built. The three made per request and per
step (ScheduledRequest, SampledToken, RequestOutput) are not frozen=True: a frozen
dataclass sets each field through object.__setattr__, ~1.3 us more per object of ~11 fields
(CPython 3.11), and at batch 128 a step builds ~400 of them on the host that paces decode
(loadtest/scheduler_cost.py). slots=True keeps them small and attribute typos loud.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from scheduler.request import FinishReason, SamplingParams


@dataclass(slots=True)
class ScheduledRequest:
    """What the runner needs to run one request's tokens in this step."""

    request_id: str
    token_ids: tuple[int, ...]  # the tokens fed this step (a prompt chunk, or 1 for a decode)
    start_position: int  # position of token_ids[0] (= num_computed_tokens before the step)
    # Physical block ids of logical blocks first_block_index, first_block_index + 1, ...;
    # blocks before first_block_index fell out of the sliding window and were freed.
    block_table: tuple[int, ...]
    first_block_index: int
    sample: bool  # this step reaches the last known token, so a new token is sampled
    sampling_params: SamplingParams
    num_output_tokens: int  # tokens generated so far (the sampler's counter for seeds)
    # Filled only when a penalty needs them (repetition: prompt + output; others: output).
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step: every scheduled request, in batch order, run in ONE forward pass."""

    step: int
    scheduled: tuple[ScheduledRequest, ...]
    num_batched_tokens: int
    preempted_request_ids: tuple[str, ...] = ()
    finished_request_ids: tuple[str, ...] = ()  # finished or aborted since the last step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: Optional[float] = None  # of the sampled token, under the model's distribution
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class ModelRunnerOutput:
    """The runner's answer for one SchedulerOutput."""

    sampled: dict[str, SampledToken] = field(default_factory=dict)  # requests with sample=True
    errors: dict[str, str] = field(default_factory=dict)  # request id -> what went wrong


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: new tokens, text delta, and at the end usage."""

    request_id: str
    new_token_ids: tuple[int, ...] = ()
    new_text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: Optional[FinishReason] = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: Optional[str] = None
    queue_time: Optional[float] = None  # seconds waiting before first scheduled (set once)
