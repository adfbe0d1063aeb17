"""A generation request and its sampling parameters, as the scheduler tracks them."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol


class ValidationError(ValueError):
    """Bad user input; the service maps it to INVALID_ARGUMENT."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping parameters (vLLM / OpenAI semantics)."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # in (0, 1]; 1 disables
    top_k: int = 0  # 0 disables
    min_p: float = 0.0  # in [0, 1]; 0 disables
    repetition_penalty: float = 1.0  # > 0; 1 disables; over prompt and output tokens
    presence_penalty: float = 0.0  # in [-2, 2]; over output tokens
    frequency_penalty: float = 0.0  # in [-2, 2]; over output tokens
    seed: Optional[int] = None  # same seed, same output, whatever shares the batch
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # number of top logprobs to return besides the sampled token's; 0 = none
    return_logprobs: bool = False  # logprob of the sampled token

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValidationError(msg)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            check(math.isfinite(getattr(self, name)), f"{name} must be a finite number")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, f"top_k must be >= 0 (0 disables), got {self.top_k}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(-2 <= self.presence_penalty <= 2,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2 <= self.frequency_penalty <= 2,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        check(self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty")
        check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or the model's context
    STOP_SEQUENCE = "stop_sequence"  # a stop string matched
    CANCELLED = "cancelled"  # aborted by the client or a deadline
    ERROR = "error"  # a fault while running this request


class Detokenizer(Protocol):
    """Turns output token ids into text, one token at a time (see engine/tokenizer.py)."""

    def add(self, token_id: int) -> str:
        """Feed one token; return the new complete text (never a broken UTF-8 character)."""
        ...


@dataclass(eq=False)
class Request:
    """One sequence. num_computed_tokens catches up with len(all_token_ids) step by step."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: Optional[int] = None
    priority: int = 0  # lower runs first; ties are first-come-first-served
    arrival_time: float = field(default_factory=time.monotonic)
    detokenizer: Optional[Detokenizer] = None  # needed only for stop strings and text output

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # advanced when a step is scheduled, not when it returns
    # Tokens sampled by steps already launched but not yet seen by update(): with async
    # scheduling the next step feeds them straight from the device (see engine/engine.py).
    num_inflight_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    num_preemptions: int = 0
    finish_reason: Optional[FinishReason] = None
    output_text: str = ""  # text decoded so far, stop string excluded
    num_text_sent: int = 0  # chars of output_text already handed to the client
    first_scheduled_time: Optional[float] = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
