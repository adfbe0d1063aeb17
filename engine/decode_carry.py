"""Decode steps that continue the last one take their inputs from it, on the device.

A step's integer inputs (positions, KV slots, block tables, key starts) come from the host,
and MLX keeps an array made from host data in CUDA managed memory, which the device's first
read pages across: on an H200 the step's one input copy (`copy_v`) took 0.17 ms of a 2.9 ms
4-bit decode step at batch 1 (`loadtest/gpu_trace`, tenth session). When a step decodes the
same requests as the last one, in the same order, one position further, each in the block it
wrote last and fed the last step's samples, its inputs are the last step's with positions and
slots one higher: one add on the device and nothing from the host. A request whose token
opens a new block costs a small patch (its new slot and table entry); any other change (a
new batch, reordered or finished requests, a slid window) builds the inputs on the host.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from scheduler.output import ScheduledRequest
from scheduler.scheduler import INFLIGHT_TOKEN

ENABLED = True  # False: every step's inputs come from the host (benchmarks' A/B switch)


@dataclass(frozen=True)
class DecodeCarry:
    """A compiled decode step's inputs: what the host knew, and the device arrays built."""

    request_ids: tuple[str, ...]
    positions: np.ndarray  # (R,) each request's position this step (host)
    tables: tuple[tuple[int, ...], ...]  # each request's block table, as scheduled
    first_blocks: tuple[int, ...]
    moving: mx.array  # (2R + 2,) int32: positions, then KV slots, then 2 spare (device)
    tables_dev: mx.array  # (R, width) int32 block tables as the kernel reads them
    key_start: mx.array  # (R,) int32
    last: mx.array  # (R,) int32: each request's row in the step's hidden states
    # What advance() adds to `moving`: ones made on the device. A Python 1 would be a 4-byte
    # array, and MLX keeps arrays of 8 bytes or less in host memory that the GPU reads across
    # PCIe (so `moving` keeps two spare entries, too, to stay above that at batch 1).
    step: mx.array

    @classmethod
    def of(cls, decodes: Sequence[ScheduledRequest], moving: mx.array, tables_dev: mx.array,
           key_start: mx.array, last: mx.array) -> "DecodeCarry":
        return cls(tuple(r.request_id for r in decodes),
                   np.array([r.start_position for r in decodes], np.int64),
                   tuple(r.block_table for r in decodes),
                   tuple(r.first_block_index for r in decodes),
                   moving, tables_dev, key_start, last, mx.ones(moving.shape, mx.int32))

    def advance(self, decodes: Sequence[ScheduledRequest], block_size: int,
                sampled_rows: dict[str, int],
                to_device: Callable[..., list[mx.array]]) -> Optional["DecodeCarry"]:
        """These inputs one token further for `decodes`, or None unless `decodes` continue
        them exactly (then their tokens are the last step's samples, row i for request i).

        A request whose token opens a new block continues too when that block was appended
        to its table (and fits the table's width): the host sends only those requests' rows,
        new blocks and columns (`to_device`: host ints -> device arrays, in one copy), and
        the device patches their slots and table entries. At batch 64 nearly every step has
        such a request (their positions are spread over the 16 offsets of a block), and
        rebuilding every input on the host for it cost ~1 ms of a ~9 ms step (H200)."""
        if not ENABLED or len(decodes) != len(self.request_ids) \
                or len(sampled_rows) != len(decodes):
            return None
        width = self.tables_dev.shape[1]
        crossing = []  # (row, its new block, the block's column in the table)
        for i, r in enumerate(decodes):
            pos, table, before = r.start_position, r.block_table, self.tables[i]
            if (r.request_id != self.request_ids[i] or sampled_rows.get(r.request_id) != i
                    or pos != self.positions[i] + 1
                    or r.token_ids != (INFLIGHT_TOKEN,) or not r.sample
                    or r.first_block_index != self.first_blocks[i]):
                return None
            if pos % block_size == 0:  # its first token in a new block, appended to its table
                if (len(table) != len(before) + 1 or len(before) >= width
                        or table[:len(before)] != before):
                    return None
                crossing.append((i, table[-1], len(before)))
            elif table != before:
                return None
        moving, tables_dev = self.moving + self.step, self.tables_dev
        if crossing:
            n = len(decodes)
            rows, blocks, cols = (np.array(c, np.int64) for c in zip(*crossing))
            rows, slots, blocks, cols = to_device(rows, blocks * block_size, blocks, cols)
            moving[rows + n] = slots  # the new block's first slot
            tables_dev = mx.array(tables_dev)  # a new array: the last step's stays as it was
            tables_dev[rows, cols] = blocks
        return dataclasses.replace(self, positions=self.positions + 1,
                                   tables=tuple(r.block_table for r in decodes),
                                   moving=moving, tables_dev=tables_dev)
