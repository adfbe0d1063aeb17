"""LLMEngine: scheduler + model runner + tokenizer, stepped by one thread."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from engine.config import ModelArgs
from engine.kv_cache import PagedKVCache, num_blocks_for_budget
from engine.model import Mistral
from engine.runner import LaunchedStep, ModelRunner
from engine.tokenizer import Tokenizer
from scheduler.kv_manager import KVCacheManager
from scheduler.output import ModelRunnerOutput, RequestOutput, SchedulerOutput
from scheduler.request import Request, SamplingParams, ValidationError
from scheduler.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

DEMO_KV_CACHE_GIB = 1.0
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class EngineConfig:
    """How to load the model and size the batch and the KV cache."""

    model: Optional[str] = None  # local directory or hub id; None: the built-in demo model
    dtype: Optional[str] = None  # float32 | float16 | bfloat16; None: the checkpoint's
    block_size: int = 16
    kv_cache_memory_gib: Optional[float] = None  # None: kv_cache_memory_fraction of free memory
    kv_cache_memory_fraction: float = 0.5
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: Optional[int] = None  # None: the model's context (unbounded with a window)
    enable_prefix_caching: bool = True
    max_stop_strings: int = 16
    max_logprobs: int = 20
    attention_backend: str = "auto"  # auto: the CUDA decode kernel where it passes its self-check

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise ValueError("kv_cache_memory_gib must be positive")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics; counters are totals since start."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class EngineInfo:
    """What the front end needs to know of a loaded engine (plain and picklable: it also
    crosses from an engine process, see engine/process.py), and request validation."""

    model_args: ModelArgs
    config: EngineConfig
    model_path: Optional[str]
    dtype: str  # the weights' float dtype, e.g. "bfloat16"
    max_model_len: Optional[int]  # None: window-bounded
    num_kv_blocks: int
    capacity: Optional[int]  # most tokens (prompt + output) one request may reach

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValidationError when a request cannot be served; pure, safe from any thread."""
        if not prompt_token_ids:
            raise ValidationError("the prompt is empty")
        vocab = self.model_args.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValidationError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        bad = next((t for t in params.stop_token_ids if t >= vocab), None)
        if bad is not None:
            raise ValidationError(f"stop token id {bad} is outside the vocabulary [0, {vocab})")
        if self.capacity is not None and len(prompt_token_ids) >= self.capacity:
            raise ValidationError(
                f"the prompt has {len(prompt_token_ids)} tokens; this server holds at most "
                f"{self.capacity} tokens per sequence (prompt plus at least one generated token)")
        if len(params.stop) > self.config.max_stop_strings:
            raise ValidationError(f"at most {self.config.max_stop_strings} stop strings, "
                                  f"got {len(params.stop)}")
        if params.logprobs > self.config.max_logprobs:
            raise ValidationError(f"logprobs must be <= {self.config.max_logprobs}, "
                                  f"got {params.logprobs}")


class LLMEngine:
    """Owns every MLX array. Not thread-safe: see engine/loop.py for the threaded API."""

    def __init__(self, model: Mistral, args: ModelArgs, tokenizer: Tokenizer,
                 config: EngineConfig, model_path: Optional[Path] = None):
        self.model = model
        self.model_args = args
        self.tokenizer = tokenizer
        self.config = config
        self.model_path = model_path
        dtype = model.model.norm.weight.dtype
        self.max_model_len = config.max_model_len or args.max_context  # None: window-bounded
        # The most KV one sequence can hold: its context, or the window plus one prompt chunk.
        per_seq = [self.max_model_len] if self.max_model_len else []
        if args.sliding_window:
            per_seq.append(args.sliding_window + config.max_num_batched_tokens + config.block_size)
        num_blocks = num_blocks_for_budget(args, dtype, config.block_size,
                                           config.kv_cache_memory_gib,
                                           config.kv_cache_memory_fraction,
                                           max_useful_tokens=config.max_num_seqs * min(per_seq))
        self.kv_cache = PagedKVCache(args, num_blocks, config.block_size, dtype)
        self.kv_manager = KVCacheManager(num_blocks, config.block_size, args.sliding_window,
                                         config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
        ), self.kv_manager)
        self.runner = ModelRunner(model, args, self.kv_cache,
                                  attention_backend=config.attention_backend)
        self.num_steps = 0
        self.info = EngineInfo(
            model_args=args, config=config, model_path=str(model_path) if model_path else None,
            dtype=str(dtype).removeprefix("mlx.core."), max_model_len=self.max_model_len,
            num_kv_blocks=num_blocks, capacity=self.scheduler.max_tokens_capacity())
        self._inflight: Optional[tuple[SchedulerOutput, LaunchedStep]] = None  # launched, unread
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s)", num_blocks, config.block_size,
                 self.kv_cache.nbytes / (1 << 30), dtype)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        """Load the model (or create the demo model) and build the engine."""
        from engine.demo_model import ensure_demo_model
        from engine.weights import load_model

        source = config.model or str(ensure_demo_model())
        if config.model is None and config.kv_cache_memory_gib is None:
            # The demo model is for trying the plumbing: a small pool starts in a blink.
            config = dataclasses.replace(config, kv_cache_memory_gib=DEMO_KV_CACHE_GIB)
        t0 = time.perf_counter()
        model, args, path = load_model(source, dtype=config.dtype)
        tokenizer = Tokenizer.from_dir(path)
        log.info("loaded %s in %.1f s", source, time.perf_counter() - t0)
        return cls(model, args, tokenizer, config, model_path=path)

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValidationError when a request cannot be served; pure, safe from any thread."""
        self.info.validate(prompt_token_ids, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0) -> Request:
        self.validate(prompt_token_ids, params)
        request = Request(request_id, list(prompt_token_ids), params,
                          eos_token_id=self.tokenizer.eos_token_id, priority=priority,
                          detokenizer=self.tokenizer.detokenizer())
        self.scheduler.add_request(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Free the request's blocks now; its CANCELLED output comes from the next step()."""
        return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self._inflight is not None or self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Launch the next step (ONE forward pass), then finish the one before it.

        Step N+1 is scheduled and queued on the device before step N's samples are read, so
        host work (scheduling, input building, graph building, detokenizing) overlaps the
        device. The outputs returned are therefore those of the previous step.
        """
        outputs: list[RequestOutput] = []
        if self._inflight is not None and not self._can_overlap():
            outputs += self._finish_inflight()
        sched_out = self.scheduler.schedule()
        launched, failed = None, None
        if not sched_out.is_empty:
            try:
                launched = self.runner.launch(sched_out)
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the engine
                failed = self._fail_step(sched_out, e)
            self.num_steps += 1
        if self._inflight is not None:
            outputs += self._finish_inflight()
        if launched is not None:
            self._inflight = (sched_out, launched)
        else:  # nothing launched: report aborts, or the failed step's requests
            outputs += self.scheduler.update(sched_out, failed or ModelRunnerOutput())
        return outputs

    def _can_overlap(self) -> bool:
        """Penalties need every output token on the host, so those steps run one at a time."""
        return not any(r.sampling_params.repetition_penalty != 1
                       or r.sampling_params.presence_penalty or r.sampling_params.frequency_penalty
                       for r in self.scheduler.running)

    def _finish_inflight(self) -> list[RequestOutput]:
        sched_out, launched = self._inflight
        self._inflight = None
        try:
            runner_out = self.runner.collect(launched)
        except Exception as e:  # noqa: BLE001
            runner_out = self._fail_step(sched_out, e)
        return self.scheduler.update(sched_out, runner_out)

    def _fail_step(self, sched_out: SchedulerOutput, error: Exception) -> ModelRunnerOutput:
        """Every request of the failed step ends with ERROR (update frees its blocks).

        The step may have queued KV writes, only into its own requests' slots; they are
        evaluated now so the pools are plain arrays again. If even that fails, the pools are
        unusable and the error propagates: the engine loop stops and health turns NOT_SERVING.
        """
        ids = [s.request_id for s in sched_out.scheduled]
        log.error("step %d failed (%s: %s); failing its %d request(s)", sched_out.step,
                  type(error).__name__, error, len(ids), exc_info=error)
        try:
            mx.eval(self.kv_cache.state())
        except Exception as kv_error:
            raise RuntimeError("the KV cache is unusable after a failed step") from kv_error
        message = f"the model step failed ({type(error).__name__}: {error})"
        return ModelRunnerOutput(errors={rid: message for rid in ids})

    def stats(self) -> EngineStats:
        kv = self.kv_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=kv.num_used_blocks,
            kv_blocks_total=kv.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_steps=self.num_steps,
        )
