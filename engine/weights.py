"""Checkpoints on disk: find them (local dir or Hugging Face hub id), load them, save them.

The on-disk layout is mlx-community's: config.json (optionally with "quantization":
{"group_size", "bits"}), model*.safetensors with Hugging Face tensor names (sharded ones
listed in model.safetensors.index.json), tokenizer files beside them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.config import ModelArgs
from engine.model import Mistral

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
INDEX_FILE = "model.safetensors.index.json"
# model*.safetensors, not *.safetensors: mistralai repos also carry consolidated.safetensors
# (the same weights under other names), which would double the download.
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model"]
# Tensors that Hugging Face checkpoints carry but that the model recomputes.
_DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(ValueError):
    """A checkpoint cannot be found or read; the message says which file and what to do."""


def resolve_model_path(path_or_id: str) -> Path:
    """A local checkpoint directory, or a hub id fetched into (or found in) the HF cache.

    Honours HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE, as huggingface_hub reads them.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model path {path} is a file; pass the checkpoint's directory")
    looks_local = (path_or_id.startswith((".", "/", "~", os.sep)) or path_or_id.count("/") > 1
                   or not _HUB_ID.match(path_or_id))
    if looks_local:
        raise ModelLoadError(f"model directory {path.absolute()} does not exist")
    return _download(path_or_id)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import GatedRepoError, HFValidationError, RepositoryNotFoundError

    hint = (f"pass a local path or pre-download it with `hf download {repo_id}` "
            f"(`huggingface-cli download {repo_id}` on older huggingface_hub)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except HFValidationError as e:
        raise ModelLoadError(f"{repo_id!r} is neither a local directory nor a valid Hugging "
                             f"Face repo id: {e}") from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelLoadError(f"{repo_id} was not found on the Hugging Face hub, or it is gated "
                             f"and needs `hf auth login` first; {hint}") from e
    except Exception as e:  # offline and not cached, no network, proxy, HTTP errors
        raise ModelLoadError(f"could not reach the Hugging Face hub for {repo_id} and it is not "
                             f"in the local cache ({type(e).__name__}: {_first_line(e)}); "
                             f"{hint}") from e


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def read_config(model_dir: Path) -> dict:
    """config.json of a checkpoint directory as a dict."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file} not found: a checkpoint directory needs config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} must hold a JSON object, found {type(config).__name__}")
    return config


def load_config(path: str | Path) -> ModelArgs:
    """ModelArgs of a checkpoint directory (or of a config.json file itself)."""
    path = Path(path)
    model_dir = path.parent if path.name == "config.json" else path
    config = read_config(model_dir)
    model_type = config.get("model_type")
    if model_type not in (None, "mistral"):
        log.warning("%s has model_type %r; loading it as Mistral", model_dir / "config.json",
                    model_type)
    # transformers >= 5 writes rope_theta inside rope_parameters and torch_dtype as dtype.
    rope = config.get("rope_parameters")
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        if rope.get("rope_type", "default") != "default":
            raise ModelLoadError(f"{model_dir / 'config.json'}: rope_type "
                                 f"{rope['rope_type']!r} is not supported (only default RoPE)")
        config = {**config, "rope_theta": rope["rope_theta"]}
    if "torch_dtype" not in config and isinstance(config.get("dtype"), str):
        config = {**config, "torch_dtype": config["dtype"]}
    try:
        return ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{model_dir / 'config.json'}: {e}") from e


def load_safetensors(model_dir: Path) -> dict[str, mx.array]:
    """Every tensor of a checkpoint, from the index's shards or from model*.safetensors."""
    model_dir = Path(model_dir)
    index_file = model_dir / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index_file} is not a valid safetensors index: {e!r}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"shard {f.name} listed in {index_file} is missing; "
                                     f"re-download the checkpoint")
    else:
        files = sorted(model_dir.glob("model*.safetensors"))
        if not files:
            others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
                p.name for p in model_dir.glob("*.safetensors"))
            found = f" (found {', '.join(others)})" if others else ""
            raise ModelLoadError(f"no model*.safetensors in {model_dir}{found}; "
                                 f"only safetensors checkpoints are supported")
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f), format="safetensors"))
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelLoadError(f"could not read {f}: it is corrupt or incomplete ({e}); "
                                 f"re-download or re-convert the checkpoint") from e
    return weights


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """The one renaming step: drop tensors the model recomputes, untie a tied head."""
    weights = {k: v for k, v in weights.items() if not k.endswith(_DROPPED_SUFFIXES)}
    if args.tie_word_embeddings and "lm_head.weight" not in weights:
        for suffix in ("weight", "scales", "biases"):
            if f"model.embed_tokens.{suffix}" in weights:
                weights[f"lm_head.{suffix}"] = weights[f"model.embed_tokens.{suffix}"]
    return weights


def quantizable_paths(model: nn.Module) -> list[str]:
    """Module paths that MLX checkpoints quantize: every Linear and Embedding."""
    return [path for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding))]


def quantize_weights(weights: dict[str, mx.array], paths: list[str], group_size: int,
                     bits: int) -> dict[str, mx.array]:
    """Replace each path's .weight with packed weight + scales + biases (MLX affine)."""
    out = dict(weights)
    for path in paths:
        w = out.pop(f"{path}.weight")
        if w.shape[-1] % group_size:
            raise ValueError(f"{path}.weight has {w.shape[-1]} columns, not a multiple of "
                             f"group_size {group_size}")
        out[f"{path}.weight"], out[f"{path}.scales"], out[f"{path}.biases"] = mx.quantize(
            w, group_size=group_size, bits=bits)
    return out


def check_weights(model: nn.Module, weights: dict[str, mx.array], where: str,
                  hint: str = "") -> None:
    """Raise ModelLoadError naming the first missing, unexpected or misshaped tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{where}: missing tensor {missing[0]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelLoadError(f"{where}: unexpected tensor {unexpected[0]}{more}; the checkpoint "
                             f"does not match config.json")
    for name, param in expected.items():
        if tuple(weights[name].shape) != tuple(param.shape):
            raise ModelLoadError(f"{where}: {name}: expected {tuple(param.shape)}, "
                                 f"found {tuple(weights[name].shape)}{hint}")


def _parse_dtype(dtype: Optional[str]) -> Optional[mx.Dtype]:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def cast_floating(weights: dict[str, mx.array], dtype: Optional[mx.Dtype]) -> dict[str, mx.array]:
    """Cast floating tensors to dtype; packed quantized weights (uint32) stay as they are."""
    if dtype is None:
        return weights
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()}


def load_model(path_or_id: str | Path, dtype: Optional[str] = None
               ) -> tuple[Mistral, ModelArgs, Path]:
    """Load a checkpoint: (model with evaluated weights, its args, the resolved directory).

    dtype (float32, float16, bfloat16) casts floating weights; None keeps the checkpoint's.
    """
    mx_dtype = _parse_dtype(dtype)
    model_dir = resolve_model_path(str(path_or_id))
    args = load_config(model_dir)
    weights = sanitize(load_safetensors(model_dir), args)
    model = Mistral(args)  # lazy: parameters are never materialised before load_weights

    quantized = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
    if quantized and args.quantization is None:
        raise ModelLoadError(f"{model_dir}: tensor {sorted(quantized)[0]}.scales is quantized "
                             f"but config.json has no \"quantization\" entry")
    if args.quantization is not None:
        q = args.quantization
        kwargs = {"group_size": q.get("group_size", 64), "bits": q["bits"]}
        if "mode" in q:
            kwargs["mode"] = q["mode"]

        # Quantize exactly the layers the checkpoint stores quantized (per-layer overrides too).
        def predicate(path: str, module: nn.Module):
            if path not in quantized or not hasattr(module, "to_quantized"):
                return False
            override = q.get(path)
            return {**kwargs, **override} if isinstance(override, dict) else kwargs

        nn.quantize(model, class_predicate=predicate)

    hint = ("; does config.json's \"quantization\" (bits, group_size) match the checkpoint?"
            if quantized else "")
    check_weights(model, weights, str(model_dir), hint)
    model.load_weights(list(cast_floating(weights, mx_dtype).items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model, args, model_dir


def save_model(out_dir: str | Path, weights: dict[str, mx.array], config: dict, *,
               write_extra: Optional[Callable[[Path], None]] = None,
               max_shard_bytes: int = 5 << 30, replace: bool = True) -> Path:
    """Write config.json + model*.safetensors (+ whatever write_extra adds) atomically.

    Everything goes into a temporary directory beside out_dir that is renamed into place,
    so a killed process never leaves a half-written checkpoint. An existing checkpoint at
    out_dir is replaced (replace=True) or kept (replace=False: its path is returned as is).
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not replace and (out / "config.json").is_file():
        return out
    if out.exists() and not (out.is_dir() and (not any(out.iterdir())
                                               or (out / "config.json").is_file())):
        raise FileExistsError(f"{out} exists and is not a checkpoint directory; "
                              f"choose another output directory or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        _write_shards(tmp, weights, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        _move_into_place(tmp, out, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_shards(out: Path, weights: dict[str, mx.array], max_shard_bytes: int) -> None:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(out / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / file), shard, metadata={"format": "mlx"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())},
             "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _remove_stale_temp_dirs(out: Path) -> None:
    """Delete temporary directories that killed writers of `out` left behind.

    Their names carry the writer's pid; one whose process is gone is never renamed into
    place, so it is only wasted disk. A live writer's directory is left alone.
    """
    for d in out.parent.glob(f".{out.name}.*-*-*"):
        kind, _, rest = d.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _move_into_place(tmp: Path, out: Path, replace: bool) -> None:
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if not out.exists():
                raise
            # Another process finished the same checkpoint first.
    if not replace:
        return
    # rename() cannot replace a non-empty directory: move the old one aside first.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rename(out, old / "model")
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
