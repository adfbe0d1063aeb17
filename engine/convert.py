"""Convert a Hugging Face Mistral checkpoint (safetensors) into an MLX one, optionally quantized."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from engine.model import Mistral
from engine.weights import (DTYPES, ModelLoadError, cast_floating, check_weights,
                            load_safetensors, quantizable_paths, quantize_weights, read_config,
                            load_config, resolve_model_path, sanitize, save_model)

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")


def convert(hf_path: str, out_dir: str, *, bits: Optional[int] = None, group_size: int = 64,
            dtype: str = "bfloat16", max_shard_bytes: int = 5 << 30) -> Path:
    """Write hf_path (local dir or hub id) to out_dir in the mlx-community layout.

    Floating weights are cast to dtype; with bits (4 or 8) every Linear layer plus the
    embedding and lm_head is quantized with group_size. The write is atomic.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if bits is not None and bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size}")
    src = resolve_model_path(hf_path)
    config = read_config(src)
    if "quantization" in config or "quantization_config" in config:
        raise ModelLoadError(f"{src} is already quantized; convert needs an unquantized "
                             f"(float) Hugging Face checkpoint")
    args = load_config(src)
    weights = sanitize(load_safetensors(src), args)
    model = Mistral(args)  # lazy: only names and shapes are used
    check_weights(model, weights, str(src))

    weights = cast_floating(weights, DTYPES[dtype])
    config = {k: v for k, v in config.items() if k != "dtype"}
    config["torch_dtype"] = dtype
    if bits is not None:
        weights = quantize_weights(weights, quantizable_paths(model), group_size, bits)
        config["quantization"] = {"group_size": group_size, "bits": bits}

    def copy_tokenizer(out: Path) -> None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)

    out = save_model(out_dir, weights, config, write_extra=copy_tokenizer,
                     max_shard_bytes=max_shard_bytes)
    log.info("converted %s to %s (%s%s)", hf_path, out, dtype,
             f", {bits}-bit group {group_size}" if bits else "")
    return out
