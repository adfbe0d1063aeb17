"""Every CUDA kernel of the engine is built here: mx.fast.cuda_kernel with its source text
compacted (comments and indentation stripped).

MLX's CUDA backend hashes a custom kernel's whole source (header + body) every time the
kernel is evaluated, to find its compiled module; on a 4-bit decode step of one sequence the
host, not the GPU, sets the pace, at ~8 us of host work per custom kernel (H200, ninth
session: loadtest/host_cost.py). The kernels keep their comments here in Python; what MLX
sees is the same program in fewer bytes.
"""

from __future__ import annotations

import functools

import mlx.core as mx


def cuda_kernel(*, source: str, header: str = "", **kwargs):
    """mx.fast.cuda_kernel with `source` and `header` compacted; other arguments as MLX's."""
    return mx.fast.cuda_kernel(source=compact(source), header=compact(header), **kwargs)


@functools.lru_cache(maxsize=None)
def compact(source: str) -> str:
    """source without // comments, leading and trailing blanks, or empty lines. Each line
    stays a line (preprocessor directives need theirs); string and char literals are kept
    whole. The kernels use no /* */ comments (a test checks)."""
    lines = (_code(line).strip() for line in source.splitlines())
    return "".join(line + "\n" for line in lines if line)


def _code(line: str) -> str:
    """line up to a // comment that is not inside a string or char literal."""
    quote, i = None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif line.startswith("//", i):
            return line[:i]
        i += 1
    return line
