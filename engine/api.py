"""The Python API for use in code: load a model and a tokenizer, stream tokens.

    from engine.api import load_model, load_tokenizer, generate
    model = load_model("mistralai/Mistral-7B-Instruct-v0.3")   # or a local directory
    tokenizer = load_tokenizer("mistralai/Mistral-7B-Instruct-v0.3")
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    detok = tokenizer.detokenizer()
    for token in generate(model, tokenizer, ids, temperature=0.0, max_tokens=50):
        print(detok.add(token), end="", flush=True)
"""

from __future__ import annotations

import itertools
from typing import Iterator, Optional

from engine.engine import EngineConfig, LLMEngine
from engine.model import Mistral
from engine.tokenizer import Tokenizer
from engine.weights import load_model as _load_weights
from engine.weights import resolve_model_path
from scheduler.request import FinishReason, SamplingParams

_ids = itertools.count()


def load_model(path_or_id: str, dtype: Optional[str] = None) -> Mistral:
    """A Mistral model from a local checkpoint directory or a Hugging Face hub id."""
    model, _, path = _load_weights(path_or_id, dtype=dtype)
    model.path = path
    return model


def load_tokenizer(path_or_id: str) -> Tokenizer:
    """The tokenizer that ships with a checkpoint (tokenizer.json + tokenizer_config.json)."""
    return Tokenizer.from_dir(resolve_model_path(path_or_id))


def generate(model: Mistral, tokenizer: Tokenizer, prompt_ids: list[int], *,
             temperature: float = 0.0, max_tokens: int = 256, seed: Optional[int] = None,
             engine: Optional[LLMEngine] = None, kv_cache_memory_gib: float = 1.0,
             **sampling) -> Iterator[int]:
    """Yield generated token ids one at a time until EOS or max_tokens (0 temperature: greedy).

    Pass an `engine` to reuse its KV cache across calls; otherwise a small one is made.
    Extra keyword arguments are SamplingParams fields (top_p, top_k, stop, ...).
    """
    if engine is None:
        engine = LLMEngine(model, model.args, tokenizer,
                           EngineConfig(kv_cache_memory_gib=kv_cache_memory_gib, max_num_seqs=1))
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed, **sampling)
    request_id = f"api-{next(_ids)}"
    engine.add_request(request_id, list(prompt_ids), params)
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                if out.error:
                    raise RuntimeError(out.error)
                tokens = out.new_token_ids
                if out.finish_reason == FinishReason.STOP and tokens \
                        and tokens[-1] == tokenizer.eos_token_id and not params.ignore_eos:
                    tokens = tokens[:-1]  # EOS ends the answer; it is not part of it
                yield from tokens
                if out.finished:
                    return
    finally:
        engine.abort(request_id)
