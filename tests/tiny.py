"""Tiny random-weight models built in memory, for engine tests."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from engine.config import ModelArgs
from engine.model import Mistral

TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-5, rope_theta=10000.0)


def tiny_model(seed: int = 0, **overrides) -> tuple[Mistral, ModelArgs, dict]:
    """A float32 Mistral with random weights, scaled so logits are far from uniform."""
    cfg = {**TINY, **overrides}
    args = ModelArgs.from_dict(cfg)
    model = Mistral(args)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(p.shape)
        else:
            w = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])
            if name.endswith("embed_tokens.weight"):
                w = rng.standard_normal(p.shape)
        weights[name] = w.astype(np.float32)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    mx.eval(model.parameters())
    return model, args, {**cfg, "head_dim": args.head_dim, "sliding_window": args.sliding_window}


def quantized_linear(k: int, n: int, bits: int, group_size: int = 64,
                     dtype=mx.bfloat16) -> nn.QuantizedLinear:
    """A random k -> n Linear without bias, quantized MLX-style, scales and biases in `dtype`:
    the layer the quantized-kernel tests run on."""
    q = nn.QuantizedLinear.from_linear(nn.Linear(k, n, bias=False), group_size=group_size, bits=bits)
    q.set_dtype(dtype)
    return q


def run_to_completion(engine) -> dict:
    """Step an engine until its requests finish: request id -> (tokens, [(logprob, top)])."""
    out: dict = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            toks, lps = out.setdefault(o.request_id, ([], []))
            toks.extend(o.new_token_ids)
            lps.extend((lp.logprob, lp.top_logprobs) for lp in o.logprobs)
    return out
