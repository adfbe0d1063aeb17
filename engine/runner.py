"""ModelRunner: one SchedulerOutput -> ONE forward pass over every scheduled token -> samples.

The runner never changes request state; it reads the plain SchedulerOutput, builds the
flat token batch and the paged-attention metadata, runs the model and samples on the
device. launch() returns as soon as the step is queued on the device and collect() waits
for it, so the engine can build step N+1 while step N runs: one host sync per step.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine import paged_decode, paged_prefill, qgemm_wgmma, qgemv
from engine.attention import (AttentionGroup, AttentionMetadata, decode_kernel_matches_portable,
                              prefill_kernel_matches_portable, rope_store_kernel_matches)
from engine.config import ModelArgs
from engine.decode_carry import DecodeCarry
from engine.fused_ops import fused_ops_match_portable
from engine.dequant import dequantize_matches_layers
from engine.gemv import gemv_matches_layers, input_width
from engine.qgemm import MAX_ROWS as QGEMM_MAX_ROWS, qgemm_matches_layers
from engine.qgemm_wgmma import MIN_ROWS as WGMMA_MIN_ROWS, qgemm_wgmma_matches_layers
from engine.qgemv import qgemv_matches_layers
from engine.kv_cache import PagedKVCache
from engine.model import KernelPlan, Mistral
from engine.sampling import SamplerOutput, SamplingBatch, sample
from scheduler.request import SamplingParams
from scheduler.scheduler import INFLIGHT_TOKEN
from scheduler.output import ModelRunnerOutput, SampledToken, ScheduledRequest, SchedulerOutput

log = logging.getLogger(__name__)

BLOCK_PAD = 4  # pad block-table widths to a multiple of this to limit distinct shapes
# The compiled decode step is traced anew for each block-table width, and a trace costs a
# stall of the step (Python rebuilds the graph, MLX recompiles it). Tables start this wide
# (1,024 tokens at block size 16): the decode kernel reads only a sequence's live blocks, so
# the padding costs 4 bytes a block in the step's one host copy, and a sequence keeps one
# trace up to 1,024 tokens instead of retracing at 64, 128, 256 and 512.
COMPILED_MIN_BLOCKS = 64
# Batch sizes whose compiled decode step is traced at start-up (ModelRunner.warm_decode).
WARM_DECODE_BATCHES = (1, 2, 4, 8)
# MLX's CUDA 4-bit matmul loses to dequantize + bf16 GEMM for many rows (H200, MLX 0.32.4,
# `python -m loadtest.op_profile --qmm-rows ...`: from 256 rows on once warm). Between 16 and
# 128 rows it wins when warm, but a batched 4-bit run with it stalled for minutes (new row
# counts), so quantized layers fed 8 rows or more keep the dense GEMM.
DEQUANT_MIN_ROWS_CUDA = 8


class ModelRunner:
    def __init__(self, model: Mistral, args: ModelArgs, kv_cache: PagedKVCache, seed: int = 0,
                 attention_backend: str = "auto"):
        self.model = model
        model.fuse_projections()
        self.args = args
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.rng = random.Random(seed)
        # Tests only (see engine/faults.py): fault_hook(sched) may raise, failing the whole
        # step, or return {request_id: message} to fail those requests alone.
        self.fault_hook: Optional[Callable[[SchedulerOutput], Optional[dict[str, str]]]] = None
        self.decode_kernel = _choose_decode_kernel(attention_backend, args, kv_cache)
        self.prefill_kernel = self.decode_kernel and _choose_prefill_kernel(args, kv_cache)
        # (request id -> row, token ids) sampled by the last launched step
        self._last_sampled: tuple[dict[str, int], Optional[mx.array]] = ({}, None)
        self._carry: Optional[DecodeCarry] = None  # the last step's inputs, if it can continue
        on_cuda = mx.cuda.is_available() and mx.default_device() == mx.gpu
        if on_cuda:  # the self-checks compile every kernel variant: minutes on a fresh machine
            t0 = time.perf_counter()
            model.plan = _choose_plan(model, args, self.decode_kernel, kv_cache)
            log.info("kernel self-checks took %.1f s", time.perf_counter() - t0)
        # Decode-only steps run an mx.compile'd forward pass on CUDA (MISTRAL_SERVE_COMPILE=0:
        # never; =1: on any backend, as the tests do on the CPU).
        compile_env = os.environ.get("MISTRAL_SERVE_COMPILE", "auto")
        self.compile_decode = compile_env == "1" or (compile_env == "auto" and on_cuda)
        self._compiled: dict = {}  # KernelPlan -> compiled decode forward
        if self.compile_decode:
            self.warm_decode(WARM_DECODE_BATCHES)

    def warm_decode(self, batch_sizes: Sequence[int]) -> None:
        """Trace and run the compiled decode step once for each batch size (at the smallest
        table width), so that the first requests of those sizes do not stall on a trace (on
        an H200 the first decode step of one 4-bit sequence took 9-10 ms against 2.9).

        Only before any request runs: the dummy decodes write K/V into slot 0 of block 0,
        which a request given that block overwrites before reading."""
        state = self.rng.getstate()  # dummy samples must not move the seed stream
        params = SamplingParams(temperature=0, max_tokens=1)
        for b in batch_sizes:
            reqs = tuple(ScheduledRequest(f"warm-{i}", (0,), 0, (0,), 0, True, params, 0)
                         for i in range(b))
            self.collect(self.launch(SchedulerOutput(0, reqs, b)))
        # Then a step that continues the last into a new block (as the engine launches them:
        # the second before the first is read), so that DecodeCarry's scatters are compiled
        # here and not in a request's step (on an H200 that first step took 30 ms).
        bs = self.block_size
        first = self.launch(SchedulerOutput(0, (ScheduledRequest(
            "warm-0", (0,), bs - 1, (0,), 0, True, params, 0),), 1))
        second = self.launch(SchedulerOutput(0, (ScheduledRequest(
            "warm-0", (INFLIGHT_TOKEN,), bs, (0, 0), 0, True, params, 0),), 1))
        self.collect(first)
        self.collect(second)
        self.rng.setstate(state)
        self._last_sampled, self._carry = ({}, None), None

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for it; every request in `sched` shares one forward pass."""
        return self.collect(self.launch(sched))

    def launch(self, sched: SchedulerOutput) -> "LaunchedStep":
        """Build the step's graph and start it on the device; returns without waiting.

        Input tokens still in flight (scheduler.INFLIGHT_TOKEN) are taken from the sampled
        tokens of the previously launched step, on the device, with no host sync.
        """
        errors = dict(self.fault_hook(sched) or {}) if self.fault_hook is not None else {}
        ordered, hidden, last_index, carry = self._forward(sched, sampled_only=True)
        rows = [r for r in ordered if r.sample]
        if not rows:
            mx.async_eval(self.kv_cache.state())
            return LaunchedStep(rows, None, errors)
        logits = self.model.logits(hidden[last_index]).astype(mx.float32)
        out = sample(logits, SamplingBatch.build(rows, self.args.vocab_size, self.rng))
        arrays = [a for a in (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs)
                  if a is not None]
        mx.async_eval(arrays + self.kv_cache.state())
        self._last_sampled = ({r.request_id: i for i, r in enumerate(rows)}, out.token_ids)
        self._carry = carry
        return LaunchedStep(rows, out, errors)

    def collect(self, step: "LaunchedStep") -> ModelRunnerOutput:
        """Wait for a launched step and bring its samples to the host."""
        if step.out is None:
            mx.eval(self.kv_cache.state())
            return ModelRunnerOutput(errors=step.errors)
        return ModelRunnerOutput(sampled=_to_host(step.rows, step.out), errors=step.errors)

    def all_logits(self, sched: SchedulerOutput) -> dict[str, np.ndarray]:
        """Logits (num_tokens, V) of every scheduled token, by request (tests, scoring)."""
        ordered, hidden, _, _ = self._forward(sched)
        logits = np.array(self.model.logits(hidden).astype(mx.float32))
        result, offset = {}, 0
        for r in ordered:
            result[r.request_id] = logits[offset:offset + r.num_tokens]
            offset += r.num_tokens
        return result

    def _forward(self, sched: SchedulerOutput, sampled_only: bool = False
                 ) -> tuple[list[ScheduledRequest], mx.array, Optional[mx.array],
                            Optional[DecodeCarry]]:
        """(requests in step order, hidden states, the step index of each sampling request's
        last token when `sampled_only`: only those become logits, and the step's inputs if
        the next step may continue them)."""
        # Decodes (one query) first, then prompt chunks: each kind is one attention group.
        decodes = [r for r in sched.scheduled if r.num_tokens == 1]
        chunks = [r for r in sched.scheduled if r.num_tokens > 1]
        ordered = decodes + chunks
        compiled = bool(decodes) and not chunks and self.compile_decode
        kernel = bool(decodes) and self.decode_kernel
        carriable = compiled and kernel and sampled_only  # what DecodeCarry can continue
        prev, self._carry = self._carry, None  # launch() keeps the new one once it samples
        carry = prev.advance(decodes, self.block_size, self._last_sampled[0]) \
            if carriable and prev is not None else None
        if carry is not None:  # the last step's inputs, one token further (engine/decode_carry.py)
            ids, moving, tables, key_start, last = (self._last_sampled[1], carry.moving,
                                                    carry.tables_dev, carry.key_start, carry.last)
            splits, n = self._splits(decodes), len(decodes)
        else:
            input_ids, positions, slots = self._flat_inputs(ordered)
            # Every host integer array of the step, brought to the device in one copy.
            # (moving: two spare entries keep it, and the carry's copies, over MLX's 8-byte
            # arrays, which live in host memory the GPU reads across PCIe: DecodeCarry)
            host = dict(moving=np.concatenate([positions, slots, (0, 0)]),
                        ids=np.maximum(input_ids, 0))
            n = len(input_ids)
            ends = np.cumsum([r.num_tokens for r in ordered])  # each request's end in the step
            inflight = input_ids == INFLIGHT_TOKEN
            if inflight.any():
                at = np.flatnonzero(inflight)
                owner = np.searchsorted(ends, at, side="right")
                row_of, tokens = self._last_sampled
                host["at"] = at
                host["rows"] = np.array([row_of[ordered[k].request_id] for k in owner])
            if sampled_only:
                host["last"] = ends[[i for i, r in enumerate(ordered) if r.sample]] - 1
            if kernel:
                host["tables"], host["key_start"] = self._kernel_tables(decodes, compiled)
                splits = self._splits(decodes)
            if chunks and self.prefill_kernel:
                host["chunk_tables"], host["seqs"], host["tiles"] = self._chunk_inputs(chunks)
            dev = dict(zip(host, device_ints(*host.values())))
            ids, moving, last = dev["ids"], dev["moving"], dev.get("last")
            tables, key_start = dev.get("tables"), dev.get("key_start")
            if "at" in dev:  # tokens still in flight: from the previous step's samples
                ids[dev["at"]] = tokens[dev["rows"]]
            if carriable and all(r.sample for r in decodes):
                carry = DecodeCarry.of(decodes, moving, tables, key_start, last)
        positions, slots = moving[:n], moving[n:2 * n]
        if kernel:  # a decode's query is its one token, at its position
            group = AttentionGroup(
                token_start=0, num_tokens=len(decodes), query_index=None, output_index=None,
                block_tables=tables, mask=None, num_seqs=len(decodes), query_len=1,
                key_start=key_start, query_positions=positions[:len(decodes)], splits=splits)
        elif decodes:
            group = self._group(decodes, 0, len(decodes), pad_to_power_of_two=compiled)
        if compiled:
            return ordered, self._compiled_decode(group, ids, positions, slots), last, carry
        groups = [group] if decodes else []
        if chunks and self.prefill_kernel:  # unpadded, read through the tables by the kernel
            groups.append(AttentionGroup(
                token_start=len(decodes), num_tokens=n - len(decodes), query_index=None,
                output_index=None, block_tables=dev["chunk_tables"], mask=None,
                num_seqs=len(chunks), query_len=max(r.num_tokens for r in chunks),
                seqs=dev["seqs"], tiles=dev["tiles"]))
        elif chunks:
            groups.append(self._group(chunks, len(decodes), len(input_ids) - len(decodes)))
        meta = AttentionMetadata(slot_mapping=slots, groups=groups,
                                 sliding_window=self.args.sliding_window)
        return ordered, self.model(ids, positions, self.kv_cache, meta), last, None

    def _compiled_decode(self, group: AttentionGroup, ids: mx.array, positions: mx.array,
                         slots: mx.array) -> mx.array:
        """A decode-only step through the mx.compile'd forward pass (see _decode_fn)."""
        kernel = group.mask is None
        arrays = ((group.block_tables, group.key_start, group.query_positions) if kernel
                  else (group.block_tables, group.mask))
        fn = self._compiled.get(self.model.plan)
        if fn is None:  # a new plan (tests and benchmarks switch it) needs its own trace
            fn = self._compiled[self.model.plan] = mx.compile(self._decode_fn)
        out = fn(ids, positions, slots, arrays, self.kv_cache.state(), group.splits, kernel)
        n = len(self.kv_cache.keys)
        # In-place kernel writes return the same pools; MLX's scatter returns new ones, and
        # with the old ones now held only by the step's graph it may update them in place.
        self.kv_cache.keys[:], self.kv_cache.values[:] = out[1:1 + n], out[1 + n:]
        return out[0]

    def _decode_fn(self, ids, positions, slots, arrays, pools, splits, kernel):
        """The forward pass of a decode-only step as a pure function of its arrays, for
        mx.compile: traced once per (batch, block-table width, splits), then replayed without
        rebuilding ~1,000 ops in Python each step (at small batches the host, not the GPU,
        set the pace: `python -m loadtest.gpu_trace`). `arrays` are the decode group's:
        (block tables, key starts, query positions) for the kernel, else (tables, mask)."""
        n = len(pools) // 2
        cache = _Pools(list(pools[:n]), list(pools[n:]), self.block_size)
        g = ids.shape[0]
        if kernel:
            tables, key_start, query_positions = arrays
            group = AttentionGroup(0, g, None, None, tables, None, g, 1, key_start=key_start,
                                   query_positions=query_positions, splits=splits)
        else:
            tables, mask = arrays
            group = AttentionGroup(0, g, None, None, tables, mask, g, 1)
        meta = AttentionMetadata(slots, [group], self.args.sliding_window)
        hidden = self.model(ids, positions, cache, meta)
        return [hidden, *cache.keys, *cache.values]

    def _flat_inputs(self, reqs: Sequence[ScheduledRequest]):
        bs = self.block_size
        if all(r.num_tokens == 1 for r in reqs):
            # A decode-only step, rebuilt on the host whenever the carry cannot continue it
            # (at batch 64 nearly every step): plain Python per request, not two small numpy
            # arrays each (0.04 vs 0.69 ms a step at batch 128 on a 2-core CPU machine).
            pos = [r.start_position for r in reqs]
            slots = [r.block_table[p // bs - r.first_block_index] * bs + p % bs
                     for r, p in zip(reqs, pos)]
            return (np.array([r.token_ids[0] for r in reqs], np.int32), np.array(pos, np.int32),
                    np.array(slots, np.int32))
        ids, pos, slots = [], [], []
        for r in reqs:
            p = np.arange(r.start_position, r.start_position + r.num_tokens, dtype=np.int64)
            table = np.asarray(r.block_table, dtype=np.int64)
            ids.extend(r.token_ids)
            pos.append(p)
            slots.append(table[p // bs - r.first_block_index] * bs + p % bs)
        return (np.asarray(ids, np.int32), np.concatenate(pos).astype(np.int32),
                np.concatenate(slots).astype(np.int32))

    def _kernel_tables(self, reqs: Sequence[ScheduledRequest], pad_to_power_of_two: bool
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The CUDA decode kernel's block tables and key starts, on the host."""
        n_blocks = _table_width(max(len(r.block_table) for r in reqs), pad_to_power_of_two)
        tables = np.zeros((len(reqs), n_blocks), np.int32)
        for i, r in enumerate(reqs):
            tables[i, :len(r.block_table)] = r.block_table
        return tables, np.array([r.first_block_index * self.block_size for r in reqs])

    def _splits(self, reqs: Sequence[ScheduledRequest]) -> int:
        """How many key splits the decode kernel runs for these decodes."""
        max_keys = max(r.start_position + 1 - r.first_block_index * self.block_size for r in reqs)
        return paged_decode.num_splits(len(reqs), self.args.num_key_value_heads, max_keys)

    def _chunk_inputs(self, reqs: Sequence[ScheduledRequest]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host arrays of the prompt-chunk kernel: block tables (as the decode kernel's),
        paged_prefill.chunk_layout."""
        tables, key_start = self._kernel_tables(reqs, False)
        seqs, tiles = paged_prefill.chunk_layout(
            [r.num_tokens for r in reqs], [r.start_position for r in reqs], key_start,
            self.args.sliding_window)
        return tables, seqs, tiles

    def _group(self, reqs: Sequence[ScheduledRequest], token_start: int,
               num_tokens: int, pad_to_power_of_two: bool = False) -> AttentionGroup:
        bs = self.block_size
        g = len(reqs)
        q_len = max(r.num_tokens for r in reqs)
        n_blocks = _table_width(max(len(r.block_table) for r in reqs), pad_to_power_of_two)
        tables = np.zeros((g, n_blocks), np.int32)
        key_pos = np.full((g, n_blocks * bs), -1, np.int64)  # -1: no key there
        q_pos = np.zeros((g, q_len), np.int64)
        query_index = np.zeros((g, q_len), np.int32)
        output_index = []
        start = token_start
        for i, r in enumerate(reqs):
            nb = len(r.block_table)
            tables[i, :nb] = r.block_table
            key_pos[i, :nb * bs] = r.first_block_index * bs + np.arange(nb * bs)
            # Padded query rows repeat the last real query, so no row is fully masked.
            idx = np.minimum(np.arange(q_len), r.num_tokens - 1)
            q_pos[i] = r.start_position + idx
            query_index[i] = start + idx
            output_index.append(i * q_len + np.arange(r.num_tokens))
            start += r.num_tokens
        padded = q_len > 1 and g * q_len != num_tokens
        return AttentionGroup(
            token_start=token_start,
            num_tokens=num_tokens,
            query_index=mx.array(query_index.reshape(-1)) if padded else None,
            output_index=mx.array(np.concatenate(output_index).astype(np.int32)) if padded else None,
            block_tables=mx.array(tables),
            mask=_additive_mask(key_pos, q_pos, self.args.sliding_window, self.kv_cache.dtype),
            num_seqs=g,
            query_len=q_len,
        )


def _additive_mask(key_pos: np.ndarray, q_pos: np.ndarray, window: Optional[int],
                   dtype: mx.Dtype) -> mx.array:
    """(G, 1, Lq, L): 0 where query (g, i) at q_pos[g, i] sees the key at key_pos[g, j] (-1: no
    key), -inf elsewhere, in the model's dtype, built on the device from the positions.

    SDPA takes an additive mask as is (broadcast over heads by stride 0). A bool mask it first
    broadcasts to every head and turns into an additive one inside each layer's call: two
    full-size fills and a select, a third of a 4,096-token prompt step on an H200
    (`gpu_trace --prefill`), besides copying G x Lq x L bytes from the host."""
    kp = mx.array(key_pos.astype(np.int32))[:, None, None, :]
    qp = mx.array(q_pos.astype(np.int32))[:, None, :, None]
    visible = (kp >= 0) & (kp <= qp)
    if window:
        visible = visible & (kp > qp - window)
    return mx.where(visible, mx.array(0, dtype), mx.array(-float("inf"), dtype))


STAGE_INPUTS = True  # False: plain mx.array per input (gpu_trace's A/B switch)


def device_ints(*arrays: np.ndarray) -> list[mx.array]:
    """Host integer arrays as int32 arrays written by the device, in one copy for all.

    MLX puts an array made from host data in CUDA managed memory, and one of 8 bytes or less
    (batch 1's position, slot, key start) in a pool the GPU reads across PCIe on every
    access. The step's kernels read these per thread block, 32 layers over, while the host
    already writes the next step's inputs; so they are packed into one host array and
    converted (int64 -> int32) by the device, whose output is device memory.
    """
    if not STAGE_INPUTS:
        return [mx.array(np.asarray(a, np.int32)) for a in arrays]
    flat = np.concatenate([np.asarray(a, np.int64).ravel() for a in arrays])
    staged = mx.array(flat).astype(mx.int32)
    out, at = [], 0
    for a in arrays:
        out.append(staged[at:at + a.size].reshape(a.shape))
        at += a.size
    return out


def _table_width(blocks: int, power_of_two: bool) -> int:
    """Block-table width: a multiple of BLOCK_PAD, or for the compiled decode step a power of
    two of at least COMPILED_MIN_BLOCKS, so a growing context retraces it only a few times."""
    if power_of_two:
        return max(COMPILED_MIN_BLOCKS, 1 << (blocks - 1).bit_length())
    return -(-blocks // BLOCK_PAD) * BLOCK_PAD


@dataclass
class _Pools:
    """The KV pools as the model reads and replaces them (PagedKVCache's interface)."""

    keys: list
    values: list
    block_size: int


@dataclass
class LaunchedStep:
    """A step running on the device: its sampling rows and lazy outputs."""

    rows: list[ScheduledRequest]
    out: Optional[SamplerOutput]
    errors: dict[str, str]


def _choose_decode_kernel(backend: str, args: ModelArgs, kv_cache: PagedKVCache) -> bool:
    """Use the CUDA decode kernel only where it runs and matches the portable path here."""
    if backend == "portable":
        return False
    if backend not in ("auto", "cuda"):
        raise ValueError(f"attention backend must be auto, portable or cuda, got {backend!r}")
    try:
        ok = paged_decode.supported(args.head_dim, kv_cache.dtype) and \
            decode_kernel_matches_portable(args.num_attention_heads, args.num_key_value_heads,
                                           args.head_dim, kv_cache.block_size,
                                           args.sliding_window, kv_cache.dtype)
    except Exception:  # e.g. the kernel does not compile with this CUDA toolkit
        log.exception("the CUDA decode attention kernel failed to run")
        ok = False
    if not ok and backend == "cuda":
        raise RuntimeError("the CUDA decode attention kernel is unavailable or failed its self-check")
    log.info("decode attention: %s", "CUDA paged kernel" if ok else "portable gather + SDPA")
    return ok


def _choose_prefill_kernel(args: ModelArgs, kv_cache: PagedKVCache) -> bool:
    """Prompt chunks go to the CUDA kernel (engine/paged_prefill.py) where it runs, matches the
    portable path here and MISTRAL_SERVE_PREFILL_KERNEL is not "0"; else gather + SDPA."""
    ok = os.environ.get("MISTRAL_SERVE_PREFILL_KERNEL", "1") != "0" and \
        paged_prefill.supported(args.head_dim, kv_cache.dtype) and _runs(
            "the prompt attention kernel", prefill_kernel_matches_portable,
            args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            kv_cache.block_size, args.sliding_window, kv_cache.dtype)
    log.info("prompt attention: %s", "CUDA paged kernel" if ok else "portable gather + SDPA")
    return ok


def check_layers(model: Mistral) -> list[nn.Module]:
    """The projections a kernel's self-check runs on: every layer shares these shapes and
    formats, so the first layer and the head stand for all."""
    first = model.model.layers[0]
    return [first.self_attn.qkv_proj, first.self_attn.o_proj, first.mlp.gate_up_proj,
            first.mlp.down_proj, model.lm_head]


def _choose_plan(model: Mistral, args: ModelArgs, decode_kernel: bool = False,
                 kv_cache: Optional[PagedKVCache] = None) -> KernelPlan:
    """Which custom kernels run on MLX's CUDA backend, each only after its self-check.

    1-8 rows of a quantized layer run as engine/qgemv.py's tensor-core kernel
    (MISTRAL_SERVE_QGEMV=0 turns it off), which on gate|up also applies SwiGLU
    (MISTRAL_SERVE_QGEMV_SWIGLU=0: the separate kernel instead). Layers it cannot serve go
    through engine/gemv.py's kernels where they match MLX's matmul on this model's own layers
    (on an H200 those made 4-bit single-stream decode 1.28x faster). For float layers MLX's own matmul was as fast or
    faster, so gemv stays opt-in there. MISTRAL_SERVE_GEMV: "quant" (default), "all", or "0"
    (none, to measure against MLX's own).
    The small per-layer ops run fused (engine/fused_ops.py) unless MISTRAL_SERVE_FUSED=0;
    with the decode kernel too, decode-only steps in one split apply RoPE and write K/V in
    the attention kernel itself (MISTRAL_SERVE_DECODE_ROPE=0: in their own kernel).
    9-128 rows of a quantized layer run as engine/qgemm.py's tensor-core kernel (4-bit batch-64
    step 1.85x faster on an H200 with its first version; MISTRAL_SERVE_QGEMM=0 turns it off);
    on a Hopper GPU 33-128 rows of a 4-bit layer run as engine/qgemm_wgmma.py's kernel instead
    (MISTRAL_SERVE_QGEMM_WGMMA=0 turns it off; MISTRAL_SERVE_WGMMA_FUSED_SPLITS=1 has it add up
    its K splits itself, MISTRAL_SERVE_WGMMA_PRODUCER=1 gives its blocks a producer warp: both
    off, see qgemm_wgmma.py), and
    more rows dequantize with engine/dequant.py's kernel (5-20% faster than mx.dequantize + GEMM
    there; MISTRAL_SERVE_DEQUANT_KERNEL=0 for MLX's).
    """
    mode = os.environ.get("MISTRAL_SERVE_GEMV", "quant")
    if mode not in ("quant", "all", "0"):
        raise ValueError(f"MISTRAL_SERVE_GEMV must be quant, all or 0, got {mode!r}")
    layers = check_layers(model)
    quantized = [l for l in layers if type(l) is nn.QuantizedLinear]
    qv = _switched_on("MISTRAL_SERVE_QGEMV", qgemv_matches_layers, quantized)
    gate_up = [l for l in quantized if l is model.model.layers[0].mlp.gate_up_proj]
    qsw = qv and _switched_on("MISTRAL_SERVE_QGEMV_SWIGLU", qgemv.swiglu_matches_layers, gate_up)

    def gemv_serves(l: nn.Module) -> bool:  # project() tries qgemv first: those need no gemv
        quant = type(l) is nn.QuantizedLinear
        return (mode == "all" or (mode == "quant" and quant)) and not (
            qv and quant and qgemv.applies(l, mx.zeros((1, input_width(l)), l.scales.dtype)))
    used = [l for l in layers if gemv_serves(l)]
    ok = bool(used) and gemv_matches_layers(used)
    log.info("few-row matmuls: %s%s", "CUDA tensor-core kernel (quantized%s), " % (
                 ", gate|up with SwiGLU" if qsw else "") if qv else "",
             f"CUDA gemv kernels ({mode})" if ok else "MLX matmul")
    fused = os.environ.get("MISTRAL_SERVE_FUSED", "1") != "0" and fused_ops_match_portable(
        args.hidden_size, args.intermediate_size, args.num_attention_heads,
        args.num_key_value_heads, args.head_dim, args.rope_theta, args.rms_norm_eps,
        model.model.norm.weight.dtype)
    log.info("per-layer small ops: %s", "fused CUDA kernels" if fused else "MLX ops")
    rope = fused and decode_kernel and kv_cache is not None and \
        os.environ.get("MISTRAL_SERVE_DECODE_ROPE", "1") != "0" and _runs(
            "decode attention with RoPE and the K/V write", rope_store_kernel_matches,
            args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            kv_cache.block_size, args.sliding_window, args.rope_theta, kv_cache.dtype)
    deq = _switched_on("MISTRAL_SERVE_DEQUANT_KERNEL", dequantize_matches_layers, quantized)
    qg = _switched_on("MISTRAL_SERVE_QGEMM", qgemm_matches_layers, quantized)
    qw = _switched_on("MISTRAL_SERVE_QGEMM_WGMMA", qgemm_wgmma_matches_layers, quantized)
    if qw and qgemm_wgmma.FUSED_SPLITS:  # every layer's tile counters, before any step is compiled
        for layer in model.modules():
            if type(layer) is nn.QuantizedLinear:
                qgemm_wgmma.counters_for(layer)
    if quantized:
        log.info("many-row quantized matmuls: %s%s%s + GEMM",
                 f"CUDA tensor-core kernel up to {QGEMM_MAX_ROWS} rows, " if qg else "",
                 f"(4-bit from {WGMMA_MIN_ROWS} rows: the wgmma kernel), " if qw else "",
                 "then CUDA dequantize kernel" if deq else "then mx.dequantize")
    return KernelPlan(DEQUANT_MIN_ROWS_CUDA, gemv=ok, gemv_dense=ok and mode == "all",
                      fused=fused, dequant_kernel=deq, qgemm=qg, qgemm_wgmma=qw, qgemv=qv,
                      qgemv_swiglu=qsw, decode_rope=rope)


def _runs(what: str, self_check: Callable[..., bool], *args) -> bool:
    """self_check(*args), False (with a warning) if it fails or raises: a kernel that does
    not build or match must not stop the server."""
    try:
        if self_check(*args):
            return True
        log.warning("%s off its reference; not used", what)
    except Exception as exc:
        log.warning("%s unavailable (%s); not used", what, exc)
    return False


def _switched_on(env: str, self_check: Callable[[list], bool], layers: list[nn.Module]) -> bool:
    """A quantized-layer kernel runs unless `env` is "0", where there are such layers and its
    self-check passes on them."""
    return os.environ.get(env, "1") != "0" and bool(layers) and self_check(layers)


def _to_host(rows: Sequence[ScheduledRequest], out) -> dict[str, SampledToken]:
    tokens = out.token_ids.tolist()
    logprobs: Optional[list] = out.logprobs.tolist() if out.logprobs is not None else None
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    result = {}
    for i, r in enumerate(rows):
        p = r.sampling_params
        lp = logprobs[i] if logprobs is not None and (p.return_logprobs or p.logprobs) else None
        top = tuple(zip(top_ids[i][:p.logprobs], top_lps[i][:p.logprobs])) if p.logprobs else ()
        result[r.request_id] = SampledToken(tokens[i], lp, top)
    return result
