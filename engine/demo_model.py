"""Random-weight Mistral checkpoints in the mlx-community layout, for tests, demos and benchmarks.

A weight's value does not change how long a step takes, so a random model of the 7B shape
measures speed, and a tiny one exercises every code path without a hub download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from engine.config import ModelArgs
from engine.model import Mistral
from engine.weights import DTYPES, quantizable_paths, quantize_weights, save_model

log = logging.getLogger(__name__)

VOCAB_SIZES = {"v1": 32000, "v3": 32768}

# What `serve` runs with no --model: small, but deep and wide enough to look like a model.
DEFAULT_DEMO: dict[str, Any] = dict(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512,
                                    sliding_window=None, vocab="v3", dtype="float32", bits=None,
                                    group_size=64, seed=0, rope_theta=1e6,
                                    max_position_embeddings=32768)
# Bump when write_demo_model's output changes, so cached demo models are rebuilt.
_FORMAT_VERSION = 1


def demo_config(*, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
                sliding_window: Optional[int], vocab: str, dtype: str, bits: Optional[int],
                group_size: int, rope_theta: float, max_position_embeddings: int) -> dict:
    """config.json of a demo model: every key transformers' MistralConfig reads, plus MLX's."""
    if vocab not in VOCAB_SIZES:
        raise ValueError(f"vocab must be one of {', '.join(VOCAB_SIZES)}, got {vocab!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    config = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": VOCAB_SIZES[vocab],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": float(rope_theta),
        "sliding_window": sliding_window,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if bits is not None:
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {group_size}")
        for name, dim in (("hidden", hidden), ("intermediate", intermediate)):
            if dim % group_size:
                raise ValueError(f"group_size {group_size} must divide {name} ({dim}) "
                                 f"to quantize")
        config["quantization"] = {"group_size": group_size, "bits": bits}
    ModelArgs.from_dict(config)  # validates heads / kv_heads and the rest
    return config


def random_weights(args: ModelArgs, seed: int) -> dict[str, mx.array]:
    """float32 weights with Hugging Face names, scaled so activations and logits stay O(1)."""
    params = sorted(tree_flatten(Mistral(args).parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    weights = {}
    for (name, param), k in zip(params, keys):
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            # Ones with a little noise: a norm that is exactly 1 would hide a missing weight.
            weights[name] = 1.0 + 0.1 * mx.random.normal(param.shape, key=k)
        elif name == "model.embed_tokens.weight":
            weights[name] = mx.random.normal(param.shape, key=k)
        else:  # Linear (out, in): std 1/sqrt(fan_in) keeps the output variance of the input
            weights[name] = mx.random.normal(param.shape, key=k) / math.sqrt(param.shape[-1])
    return weights


def write_demo_model(out_dir: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 128,
                     sliding_window: Optional[int] = None, vocab: str = "v3",
                     dtype: str = "float32", bits: Optional[int] = None, group_size: int = 64,
                     seed: int = 0, rope_theta: float = 1e6,
                     max_position_embeddings: int = 32768, replace: bool = True) -> Path:
    """Write a random-weight checkpoint (config.json, model.safetensors, tokenizer) to out_dir.

    With bits, every Linear layer plus the embedding and lm_head is quantized (MLX affine,
    group_size), as in mlx-community's 4-bit and 8-bit checkpoints. The write is atomic; an
    existing checkpoint at out_dir is replaced, or kept when replace is False.
    """
    from engine.tokenizer import write_tokenizer_files

    config = demo_config(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                         intermediate=intermediate, sliding_window=sliding_window, vocab=vocab,
                         dtype=dtype, bits=bits, group_size=group_size, rope_theta=rope_theta,
                         max_position_embeddings=max_position_embeddings)
    args = ModelArgs.from_dict(config)
    weights = {k: v.astype(DTYPES[dtype]) for k, v in random_weights(args, seed).items()}
    if bits is not None:
        weights = quantize_weights(weights, quantizable_paths(Mistral(args)), group_size, bits)
    return save_model(out_dir, weights, config, replace=replace,
                      write_extra=lambda d: write_tokenizer_files(d, version=vocab))


def _cache_root() -> Path:
    if os.environ.get("MISTRAL_SERVE_CACHE"):
        return Path(os.environ["MISTRAL_SERVE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mistral-serve"


def default_demo_model_dir(**overrides: Any) -> Path:
    """Cache directory of the demo model with DEFAULT_DEMO (+ overrides) settings.

    The name holds a hash of the settings, so a changed setting never reuses a stale model.
    """
    settings = {**DEFAULT_DEMO, **overrides, "_format": _FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return _cache_root() / f"demo-{settings['vocab']}-{digest}"


def ensure_demo_model(out_dir: Optional[str | Path] = None, **overrides: Any) -> Path:
    """The demo model's directory, written on first use (and logged), reused afterwards."""
    unknown = set(overrides) - set(DEFAULT_DEMO)
    if unknown:
        raise TypeError(f"unknown demo model settings: {', '.join(sorted(unknown))}")
    target = Path(out_dir) if out_dir is not None else default_demo_model_dir(**overrides)
    if (target / "config.json").is_file():
        return target
    settings = {**DEFAULT_DEMO, **overrides}
    log.info("creating the demo model (random weights, %s layers, hidden %s, vocab %s) in %s",
             settings["layers"], settings["hidden"], settings["vocab"], target)
    # replace=False: if another process wrote it meanwhile, keep theirs.
    return write_demo_model(target, **settings, replace=False)
