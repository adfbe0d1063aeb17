"""Tiny checkpoints on disk, written as other tools write them, for the loader and converter tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from engine.kv_cache import PagedKVCache
from engine.runner import ModelRunner
from scheduler.output import ScheduledRequest, SchedulerOutput
from scheduler.request import SamplingParams

TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128)

HF_CONFIG = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "sliding_window": None, "max_position_embeddings": 32768,
    "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu",
}


def hf_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face names, computed in NumPy (not by the engine)."""
    rng = np.random.default_rng(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "lm_head.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = w.astype(np.float32)
    return out


def write_hf_checkpoint(out: Path, *, shards: int = 1, seed: int = 0,
                        extra_files: bool = True) -> dict[str, np.ndarray]:
    """A float32 checkpoint as transformers saves it: safetensors ("pt" metadata), an index
    when sharded, a rotary inv_freq buffer as old checkpoints carry, tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(HF_CONFIG))
    weights = hf_weights(HF_CONFIG, seed)
    on_disk = dict(weights)
    on_disk["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    names = sorted(on_disk)
    if shards == 1:
        save_file(on_disk, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: on_disk[n] for n in names[s::shards]}
            save_file(part, str(out / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    if extra_files:
        (out / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
        (out / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
        (out / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
        (out / "tokenizer.model").write_bytes(b"\x0a\x05fake sentencepiece")
    return weights


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, read with the safetensors library."""
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def dequantized(tensors: dict[str, np.ndarray], group_size: int, bits: int
                ) -> dict[str, np.ndarray]:
    """Float weights of a quantized checkpoint: each (weight, scales, biases) dequantized."""
    out = {}
    for name, t in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")]
        if base + ".scales" in tensors:
            t = np.array(mx.dequantize(mx.array(t), mx.array(tensors[base + ".scales"]),
                                       mx.array(tensors[base + ".biases"]),
                                       group_size=group_size, bits=bits))
        out[name] = t.astype(np.float32)
    return out


def engine_logits(model, args, token_ids: list[int], block_size: int = 4) -> np.ndarray:
    """Logits (L, V) of one sequence, run through the real paged runner in one step."""
    n_blocks = -(-len(token_ids) // block_size)
    cache = PagedKVCache(args, num_blocks=n_blocks + 1, block_size=block_size,
                         dtype=mx.float32)
    req = ScheduledRequest(
        request_id="r", token_ids=tuple(token_ids), start_position=0,
        block_table=tuple(range(1, n_blocks + 1)), first_block_index=0, sample=True,
        sampling_params=SamplingParams(temperature=0), num_output_tokens=0)
    runner = ModelRunner(model, args, cache)
    return runner.all_logits(SchedulerOutput(0, (req,), len(token_ids)))["r"]


def hf_cache_entry(cache: Path, repo_id: str, files_from: Path,
                   commit: Optional[str] = None) -> Path:
    """Lay files out as huggingface_hub's cache does: blobs, snapshots/<commit>, refs/main."""
    commit = commit or "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(p for p in files_from.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"blob{i:04d}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
