"""Decode steps that continue the last one take their inputs from it, on the device.

A step's integer inputs (positions, KV slots, block tables, key starts) come from the host,
and MLX keeps an array made from host data in CUDA managed memory, which the device's first
read pages across: on an H200 the step's one input copy (`copy_v`) took 0.17 ms of a 2.9 ms
4-bit decode step at batch 1 (`loadtest/gpu_trace`, tenth session). When a step decodes the
same requests as the last one, in the same order, one position further and fed the last
step's samples, its inputs are the last step's with positions and slots one higher: one add
on the device. Requests that enter a new block need a few numbers from the host (their new
slot, their new table entries). Any other step (a new batch, a slid window, a table wider
than the device's) builds its inputs on the host.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

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
                sampled_rows: dict[str, int]) -> Optional["DecodeCarry"]:
        """These inputs one token further for `decodes`, or None unless `decodes` continue
        them exactly (then their tokens are the last step's samples, row i for request i).

        A request that enters a new block continues too: its slot is set from its table, and
        blocks appended to its table are added into the device table's zero padding (the
        host sends just those few numbers). At batch 64 some request enters a new block at
        nearly every step, so without this the carry would almost never apply there.
        """
        if not ENABLED or len(decodes) != len(self.request_ids) \
                or len(sampled_rows) != len(decodes):
            return None
        width = self.tables_dev.shape[1]
        n = len(decodes)
        slot_at, slot_add, cell_row, cell_col, cell_block = [], [], [], [], []
        for i, r in enumerate(decodes):
            pos, table, old = r.start_position, r.block_table, self.tables[i]
            if (r.request_id != self.request_ids[i] or sampled_rows.get(r.request_id) != i
                    or pos != self.positions[i] + 1 or r.token_ids != (INFLIGHT_TOKEN,)
                    or not r.sample or r.first_block_index != self.first_blocks[i]):
                return None
            if table is not old and table != old:  # blocks appended, and nothing else
                if len(table) > width or table[:len(old)] != old:
                    return None
                cell_row += [i] * (len(table) - len(old))
                cell_col += range(len(old), len(table))
                cell_block += table[len(old):]
            if pos % block_size == 0:  # the first slot of a new block, not the last one + 1
                k = pos // block_size - r.first_block_index  # its new block, in the table
                k_old = k - 1  # the block its last slot was in
                if not (0 <= k < len(table) and 0 <= k_old < len(old)):
                    return None
                slot_at.append(n + i)  # slots follow the positions in `moving`
                slot_add.append(table[k] * block_size
                                - (old[k_old] * block_size + (pos - 1) % block_size + 1))
        moving, tables_dev = self.moving + self.step, self.tables_dev
        if slot_at or cell_row:
            # One host array for all of it; the adds are scatters (functional: the arrays
            # of the step before stay as they were).
            flat = mx.array(np.array(slot_at + slot_add + cell_row + cell_col + cell_block,
                                     np.int32))
            k, c = len(slot_at), len(cell_row)
            if k:
                moving = moving.at[flat[:k]].add(flat[k:2 * k])
            if c:
                at = 2 * k
                tables_dev = tables_dev.at[flat[at:at + c], flat[at + c:at + 2 * c]].add(
                    flat[at + 2 * c:])
        return dataclasses.replace(self, positions=self.positions + 1, moving=moving,
                                   tables=tuple(r.block_table for r in decodes),
                                   tables_dev=tables_dev)
