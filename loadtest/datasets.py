"""Benchmark workloads: random token ids, ShareGPT conversations, shared-prefix prompts.

Every dataset yields BenchRequests; the load generator sends them over gRPC unchanged.
Synthetic datasets send token ids (exact input length, no tokenizer needed on the client)
and ignore EOS so each request generates exactly its output length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Optional

import numpy as np

# Random ids start above the control tokens (v3: 0..770) and byte tokens (next 256) of the
# Mistral vocabularies, so a random prompt is ordinary text to the model.
RANDOM_ID_LOW = 1100
# ShareGPT filters (as vLLM's benchmark): too short to measure, or too long for small contexts.
SHAREGPT_MIN_TOKENS = 4
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048

DATASETS = ("random", "sharegpt", "prefix")

CountTokens = Callable[[list[str], bool], Awaitable[list[int]]]  # (texts, add_bos) -> lengths


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: a text prompt or token ids, and how many tokens to generate."""

    prompt_len: int  # tokens the server will see (BOS included for text prompts)
    output_len: int  # max_tokens
    prompt_token_ids: Optional[tuple[int, ...]] = None
    prompt: Optional[str] = None
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("a BenchRequest needs exactly one of prompt and prompt_token_ids")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")


def spread_lengths(rng: np.random.Generator, n: int, length: int, range_ratio: float,
                   minimum: int = 1) -> np.ndarray:
    """n lengths drawn uniformly from [length*(1-r), length*(1+r)] (all equal to length at r=0)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(minimum, int(np.floor(length * (1 - range_ratio))))
    high = max(low, int(np.ceil(length * (1 + range_ratio))))
    return rng.integers(low, high + 1, size=n)


def _random_ids(rng: np.random.Generator, n: int, vocab_size: int) -> tuple[int, ...]:
    low = RANDOM_ID_LOW if vocab_size > 2 * RANDOM_ID_LOW else 0
    return tuple(int(i) for i in rng.integers(low, vocab_size, size=n))


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    """num prompts of random token ids; lengths spread by range_ratio around the given ones."""
    _check_positive(input_len=input_len, output_len=output_len, num_prompts=num)
    rng = np.random.default_rng(seed)
    in_lens = spread_lengths(rng, num, input_len, range_ratio)
    out_lens = spread_lengths(rng, num, output_len, range_ratio)
    return [BenchRequest(prompt_len=int(i), output_len=int(o),
                         prompt_token_ids=_random_ids(rng, int(i), vocab_size))
            for i, o in zip(in_lens, out_lens)]


def prefix_requests(num: int, num_groups: int, prefix_len: int, suffix_len: int,
                    output_len: int, range_ratio: float, vocab_size: int,
                    seed: int = 0) -> list[BenchRequest]:
    """num prompts, each one of num_groups shared prefixes plus its own random suffix.

    Requests of a group share prefix_len identical leading tokens, so every one after the
    first can reuse the prefix's KV blocks. Groups are interleaved in a seeded random order.
    """
    _check_positive(num_prompts=num, prefix_num_groups=num_groups, prefix_len=prefix_len,
                    prefix_suffix_len=suffix_len, output_len=output_len)
    rng = np.random.default_rng(seed)
    prefixes = [_random_ids(rng, prefix_len, vocab_size) for _ in range(num_groups)]
    out_lens = spread_lengths(rng, num, output_len, range_ratio)
    groups = rng.permutation(np.arange(num) % num_groups)
    return [BenchRequest(prompt_len=prefix_len + suffix_len, output_len=int(o),
                         prompt_token_ids=prefixes[g] + _random_ids(rng, suffix_len, vocab_size))
            for g, o in zip(groups, out_lens)]


def load_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(first human turn, the answer to it) of every conversation with at least two turns."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--dataset-path: no such file {str(path)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--dataset-path {str(path)!r} is not JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations (ShareGPT format)")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, answer = (t.get("value") if isinstance(t, dict) else None for t in turns[:2])
        if isinstance(prompt, str) and isinstance(answer, str) and prompt:
            pairs.append((prompt, answer))
    if not pairs:
        raise ValueError(f"{path}: no conversation with a prompt and an answer; expected "
                         f'[{{"conversations": [{{"from": "human", "value": ...}}, '
                         f'{{"from": "gpt", "value": ...}}]}}, ...]')
    return pairs


def keep_sharegpt(prompt_len: int, output_len: int, fixed_output_len: Optional[int]) -> bool:
    """vLLM's ShareGPT filter: drop pairs too short to measure or too long for the context."""
    if prompt_len < SHAREGPT_MIN_TOKENS:
        return False
    if fixed_output_len is None and output_len < SHAREGPT_MIN_TOKENS:
        return False
    return (prompt_len <= SHAREGPT_MAX_PROMPT_TOKENS
            and prompt_len + output_len <= SHAREGPT_MAX_TOTAL_TOKENS)


async def sharegpt_requests(path: str | Path, num: int, seed: int, count_tokens: CountTokens,
                            fixed_output_len: Optional[int] = None,
                            ignore_eos: bool = False, chunk: int = 64) -> list[BenchRequest]:
    """num requests from a ShareGPT file, shuffled by seed, lengths counted by count_tokens.

    The answer's token length is the request's max_tokens (or fixed_output_len). Pairs are
    tokenized a chunk at a time until num pass keep_sharegpt.
    """
    _check_positive(num_prompts=num)
    pairs = load_sharegpt(path)
    order = np.random.default_rng(seed).permutation(len(pairs))
    out: list[BenchRequest] = []
    for start in range(0, len(order), chunk):
        batch = [pairs[i] for i in order[start:start + chunk]]
        prompt_lens = await count_tokens([p for p, _ in batch], True)
        answer_lens = await count_tokens([a for _, a in batch], False)
        for (prompt, _), p_len, a_len in zip(batch, prompt_lens, answer_lens):
            out_len = fixed_output_len or a_len
            if keep_sharegpt(p_len, out_len, fixed_output_len):
                out.append(BenchRequest(prompt_len=p_len, output_len=out_len, prompt=prompt,
                                        ignore_eos=ignore_eos))
                if len(out) == num:
                    return out
    raise ValueError(f"{path}: only {len(out)} conversations pass the length filters "
                     f"({SHAREGPT_MIN_TOKENS}..{SHAREGPT_MAX_PROMPT_TOKENS} prompt tokens, "
                     f"<= {SHAREGPT_MAX_TOTAL_TOKENS} in all); asked for {num}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
