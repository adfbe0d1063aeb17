"""Checkpoint loading: demo models, quantized and sharded checkpoints, the hub cache, every error."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors import safe_open
from safetensors.numpy import save_file

from engine import demo_model
from engine.demo_model import default_demo_model_dir, ensure_demo_model, write_demo_model
from engine.weights import ModelLoadError, load_config, load_model, resolve_model_path, save_model
from tests.checkpoints import (TINY, dequantized, engine_logits, hf_cache_entry,
                               read_tensors, write_hf_checkpoint)
from tests.reference import reference_logits

REPO = Path(__file__).resolve().parents[1]
TOKENS = [1, 523, 9011, 17, 4000, 32767, 2, 88, 88, 88, 301]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "model", **TINY)


@pytest.fixture
def model_copy(demo_dir, tmp_path):
    """A writable copy of the demo checkpoint, for tests that damage it."""
    return Path(shutil.copytree(demo_dir, tmp_path / "model"))


# --- demo model: layout, transformers compatibility, weights round trip ---------------------

def test_demo_model_layout_and_config(demo_dir):
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["model_type"] == "mistral" and "quantization" not in config
    assert config["vocab_size"] == 32768 and config["torch_dtype"] == "float32"
    with safe_open(str(demo_dir / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "mlx"}
    assert sorted(p.name for p in demo_dir.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(demo_dir / "tokenizer.json")).get_vocab_size() == 32768
    # Nothing left behind by the atomic write.
    assert [p.name for p in demo_dir.parent.iterdir()] == ["model"]


def test_demo_config_reads_in_transformers(demo_dir, tmp_path):
    from transformers import AutoConfig, MistralConfig

    cfg = AutoConfig.from_pretrained(str(demo_dir))
    assert isinstance(cfg, MistralConfig) and cfg.model_type == "mistral"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size,
            cfg.head_dim) == (64, 2, 4, 2, 128, 32768, 16)
    assert cfg.sliding_window is None and _rope_theta(cfg) == 1e6

    windowed = write_demo_model(tmp_path / "w", **TINY, sliding_window=8, vocab="v1",
                                bits=4, group_size=32, rope_theta=1e4)
    cfg = MistralConfig.from_pretrained(str(windowed))
    assert cfg.sliding_window == 8 and cfg.vocab_size == 32000 and _rope_theta(cfg) == 1e4
    assert cfg.architectures == ["MistralForCausalLM"]
    assert cfg.quantization == {"group_size": 32, "bits": 4}
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(windowed / "tokenizer.json")).get_vocab_size() == 32000


def _rope_theta(cfg) -> float:
    # transformers 5 moves rope_theta into rope_parameters; 4.x keeps the attribute.
    rope = getattr(cfg, "rope_parameters", None)
    return rope["rope_theta"] if rope else cfg.rope_theta


def test_config_saved_by_transformers_5_loads(tmp_path):
    """rope_theta inside rope_parameters and dtype instead of torch_dtype are understood."""
    from transformers import MistralConfig

    MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, rope_theta=1e6,
                  sliding_window=None, dtype="float16").save_pretrained(tmp_path)
    args = load_config(tmp_path)
    assert args.rope_theta == 1e6 and args.torch_dtype == "float16"
    assert (args.hidden_size, args.head_dim, args.num_key_value_heads) == (64, 16, 2)


def test_demo_model_loads_back_exactly(demo_dir):
    model, args, path = load_model(str(demo_dir))
    assert path == demo_dir and args.hidden_size == 64 and args.num_hidden_layers == 2
    on_disk = read_tensors(demo_dir)
    loaded = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert set(loaded) == set(on_disk)
    for name, t in on_disk.items():
        np.testing.assert_array_equal(loaded[name], t, err_msg=name)
        assert loaded[name].dtype == np.float32


def test_demo_model_logits_match_numpy_reference(demo_dir):
    model, args, _ = load_model(demo_dir)
    config = json.loads((demo_dir / "config.json").read_text())
    mine = engine_logits(model, args, TOKENS)
    ref = reference_logits(read_tensors(demo_dir), config, TOKENS)
    np.testing.assert_allclose(mine, ref, atol=1e-4, rtol=1e-4)
    # Well-scaled: logits spread out, and the greedy token depends on the context.
    assert 0.3 < mine.std() < 10
    assert len(set(mine.argmax(-1).tolist())) > 3


def test_demo_model_is_deterministic_per_seed(tmp_path):
    a = read_tensors(write_demo_model(tmp_path / "a", **TINY, seed=5))
    b = read_tensors(write_demo_model(tmp_path / "b", **TINY, seed=5))
    c = read_tensors(write_demo_model(tmp_path / "c", **TINY, seed=6))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["lm_head.weight"], c["lm_head.weight"])


def test_dtype_cast_on_load(demo_dir):
    model, _, _ = load_model(demo_dir, dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}
    with pytest.raises(ModelLoadError, match="dtype must be one of float32, float16, bfloat16"):
        load_model(demo_dir, dtype="int8")


def test_bfloat16_demo_model(tmp_path):
    path = write_demo_model(tmp_path / "bf16", **TINY, dtype="bfloat16")
    model, args, _ = load_model(path)
    assert args.torch_dtype == "bfloat16"
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}


# --- quantized checkpoints -----------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_demo_model_matches_dequantized(tmp_path, bits):
    path = write_demo_model(tmp_path / "q", **TINY, bits=bits, group_size=32)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": bits}
    check_quantized(path, bits, 32, config)


def check_quantized(path: Path, bits: int, group_size: int, config: dict) -> None:
    """Every Linear/Embedding is quantized; each layer and the full logits equal the
    forward of the dequantized weights."""
    model, args, _ = load_model(path)
    tensors = read_tensors(path)
    modules = dict(model.named_modules())
    quantized = sorted(n[: -len(".scales")] for n in tensors if n.endswith(".scales"))
    assert "model.embed_tokens" in quantized and "lm_head" in quantized
    assert len(quantized) == 2 + 7 * config["num_hidden_layers"]
    assert isinstance(modules["model.embed_tokens"], nn.QuantizedEmbedding)
    rng = np.random.default_rng(0)
    for name in quantized:
        m = modules[name]
        assert (m.bits, m.group_size) == (bits, group_size), name
        w = mx.dequantize(m.weight, m.scales, m.biases, group_size=group_size, bits=bits)
        if isinstance(m, nn.QuantizedEmbedding):
            ids = mx.array([0, 5, 77, w.shape[0] - 1])
            np.testing.assert_allclose(np.array(m(ids)), np.array(w[ids]), atol=1e-6)
        else:
            assert isinstance(m, nn.QuantizedLinear), name
            x = mx.array(rng.standard_normal((3, w.shape[1])).astype(np.float32))
            np.testing.assert_allclose(np.array(m(x)), np.array(x @ w.T), atol=1e-4, rtol=1e-4,
                                       err_msg=name)
    tokens = [t % args.vocab_size for t in TOKENS]
    ref = reference_logits(dequantized(tensors, group_size, bits), config, tokens)
    np.testing.assert_allclose(engine_logits(model, args, tokens), ref, atol=2e-4, rtol=2e-4)


def test_partly_quantized_checkpoint_quantizes_only_what_it_stores(model_copy):
    # Older mlx-community checkpoints keep the embedding in float.
    tensors = {k: mx.array(v) for k, v in read_tensors(model_copy).items()}
    for path in ("model.layers.0.mlp.down_proj", "lm_head"):
        tensors[f"{path}.weight"], tensors[f"{path}.scales"], tensors[f"{path}.biases"] = (
            mx.quantize(tensors[f"{path}.weight"], group_size=64, bits=8))
    mx.save_safetensors(str(model_copy / "model.safetensors"), tensors)
    config = json.loads((model_copy / "config.json").read_text())
    config["quantization"] = {"group_size": 64, "bits": 8}
    (model_copy / "config.json").write_text(json.dumps(config))
    model, _, _ = load_model(model_copy)
    modules = dict(model.named_modules())
    assert isinstance(modules["lm_head"], nn.QuantizedLinear)
    assert isinstance(modules["model.layers.0.mlp.down_proj"], nn.QuantizedLinear)
    assert type(modules["model.layers.0.mlp.up_proj"]) is nn.Linear
    assert type(modules["model.embed_tokens"]) is nn.Embedding


def test_quantization_config_that_does_not_match(tmp_path):
    path = write_demo_model(tmp_path / "q", **TINY, bits=4, group_size=32)
    config = json.loads((path / "config.json").read_text())
    config["quantization"]["bits"] = 8
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"expected \(.*\), found \(.*\); does config.json's "
                                             r'"quantization" \(bits, group_size\) match'):
        load_model(path)


def test_scales_without_quantization_config(tmp_path):
    path = write_demo_model(tmp_path / "q", **TINY, bits=4, group_size=32)
    config = json.loads((path / "config.json").read_text())
    del config["quantization"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r'\.scales is quantized but config.json has no '
                                             r'"quantization" entry'):
        load_model(path)


# --- sharded checkpoints -------------------------------------------------------------------

def test_sharded_hf_checkpoint_loads(tmp_path):
    weights = write_hf_checkpoint(tmp_path / "hf", shards=3)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) == 3
    model, args, _ = load_model(tmp_path / "hf")
    loaded = dict(tree_flatten(model.parameters()))
    assert set(loaded) == set(weights)  # rotary inv_freq dropped by sanitize
    for name, w in weights.items():
        np.testing.assert_array_equal(np.array(loaded[name]), w, err_msg=name)


def test_tied_embeddings_without_lm_head(tmp_path):
    weights = write_hf_checkpoint(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    _rewrite(tmp_path / "hf", lambda t: t.pop("lm_head.weight"))
    model, _, _ = load_model(tmp_path / "hf")
    np.testing.assert_array_equal(np.array(model.lm_head.weight),
                                  weights["model.embed_tokens.weight"])


def test_save_model_shards_with_index(demo_dir, tmp_path):
    tensors = {k: mx.array(v) for k, v in read_tensors(demo_dir).items()}
    config = json.loads((demo_dir / "config.json").read_text())
    out = save_model(tmp_path / "sharded", tensors, config, max_shard_bytes=1 << 20)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert sorted(set(index["weight_map"].values())) == shards
    model, _, _ = load_model(out)
    for name, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(v), np.array(tensors[name]))


# --- errors --------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError,
                       match=re.escape(f"model directory {tmp_path / 'nope'} does not exist")):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="model directory /.*/nope/model does not exist"):
        resolve_model_path("./nope/model")


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file; pass the checkpoint's directory"):
        load_model(tmp_path / "f")


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config.json not found"):
        load_model(model_copy)


def test_invalid_config_json(model_copy):
    (model_copy / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ModelLoadError, match=r"config.json is not valid JSON"):
        load_model(model_copy)


def test_invalid_config_values(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config.json: invalid model config: "
                                             r"num_attention_heads \(4\) must be a multiple"):
        load_model(model_copy)


def _rewrite(model_dir: Path, edit) -> None:
    tensors = read_tensors(model_dir)
    edit(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))


def test_missing_tensor(model_copy):
    _rewrite(model_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load_model(model_copy)


def test_unexpected_tensor(model_copy):
    _rewrite(model_copy, lambda t: t.update({"model.layers.2.mlp.up_proj.weight":
                                             np.zeros((128, 64), np.float32)}))
    with pytest.raises(ModelLoadError, match="unexpected tensor model.layers.2.mlp.up_proj.weight"):
        load_model(model_copy)


def test_wrong_shape(model_copy):
    _rewrite(model_copy, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight":
                                             np.zeros((32, 64), np.float32)}))
    with pytest.raises(ModelLoadError, match=r"model.layers.0.self_attn.q_proj.weight: "
                                             r"expected \(64, 64\), found \(32, 64\)"):
        load_model(model_copy)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(model_copy, damage):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match=r"could not read .*model.safetensors: it is corrupt"):
        load_model(model_copy)


def test_missing_shard(tmp_path):
    write_hf_checkpoint(tmp_path / "hf", shards=2)
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="shard model-00002-of-00002.safetensors listed in "
                                             ".*model.safetensors.index.json is missing"):
        load_model(tmp_path / "hf")


def test_no_safetensors(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no model\*.safetensors in .*pytorch_model.bin"):
        load_model(model_copy)


def test_load_config(demo_dir):
    assert load_config(demo_dir).vocab_size == 32768
    assert load_config(demo_dir / "config.json").head_dim == 16


# --- atomic writes and the cached demo model -----------------------------------------------

def test_failed_write_leaves_nothing(tmp_path):
    def boom(_):
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        save_model(tmp_path / "out", {"x": mx.zeros((2,))}, {"model_type": "mistral"},
                   write_extra=boom)
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_existing_checkpoint_but_not_other_dirs(tmp_path):
    first = write_demo_model(tmp_path / "m", **TINY, seed=1)
    again = write_demo_model(tmp_path / "m", **TINY, seed=2)
    assert first == again
    assert not np.array_equal(read_tensors(again)["lm_head.weight"],
                              read_tensors(write_demo_model(tmp_path / "s1", **TINY, seed=1))[
                                  "lm_head.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "s1"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a checkpoint directory"):
        write_demo_model(tmp_path / "docs", **TINY)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"


def test_write_with_replace_false_keeps_existing(tmp_path):
    first = read_tensors(write_demo_model(tmp_path / "m", **TINY, seed=1))
    write_demo_model(tmp_path / "m", **TINY, seed=2, replace=False)
    np.testing.assert_array_equal(read_tensors(tmp_path / "m")["lm_head.weight"],
                                  first["lm_head.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_ensure_demo_model_creates_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MISTRAL_SERVE_CACHE", str(tmp_path / "cache"))
    small = dict(layers=1, hidden=64, heads=4, kv_heads=2, intermediate=128)
    expected = default_demo_model_dir(**small)
    assert expected.parent == tmp_path / "cache" and expected.name.startswith("demo-v3-")
    assert default_demo_model_dir() != expected
    with caplog.at_level(logging.INFO, logger="engine.demo_model"):
        path = ensure_demo_model(**small)
    assert path == expected and "creating the demo model" in caplog.text
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine.demo_model"):
        assert ensure_demo_model(**small) == path
    assert "creating" not in caplog.text
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert load_config(path).num_hidden_layers == 1
    with pytest.raises(TypeError, match="unknown demo model settings: colour"):
        ensure_demo_model(colour="red")


def test_default_demo_settings():
    d = demo_model.DEFAULT_DEMO
    assert (d["layers"], d["hidden"], d["heads"], d["kv_heads"], d["intermediate"],
            d["vocab"], d["dtype"]) == (4, 256, 8, 2, 512, "v3", "float32")


# --- Hugging Face hub ids, offline, from the standard cache --------------------------------

_HUB_SCRIPT = """
import json, sys
from engine.weights import ModelLoadError, load_model
model, args, path = load_model("tiny-org/tiny-mistral")
out = {"path": str(path), "layers": args.num_hidden_layers}
try:
    load_model("tiny-org/not-downloaded")
except ModelLoadError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.parametrize("env_var", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_loads_offline_from_cache(demo_dir, tmp_path, env_var):
    # huggingface_hub reads its settings at import, so the check runs in a fresh process.
    cache = tmp_path / "hub"
    snapshot = hf_cache_entry(cache, "tiny-org/tiny-mistral", demo_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env[env_var] = str(cache if env_var == "HF_HUB_CACHE" else tmp_path)  # HF_HOME/hub
    proc = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["path"]) == snapshot and out["layers"] == 2
    assert "could not reach the Hugging Face hub for tiny-org/not-downloaded" in out["error"]
    assert "pass a local path or pre-download it with `hf download tiny-org/not-downloaded`" \
        in out["error"]


def test_local_directory_wins_over_hub_id(demo_dir, tmp_path, monkeypatch):
    shutil.copytree(demo_dir, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/name") == Path("org/name")


# --- interoperability with mlx-lm, the reference reader/writer of the mlx-community layout --

@pytest.mark.parametrize("bits", [None, 4, 8])
def test_mlx_lm_reads_our_checkpoints_with_same_logits(tmp_path, bits):
    # Full attention only: mlx-lm runs Mistral as Llama and ignores sliding_window.
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    path = write_demo_model(tmp_path / "m", **TINY, bits=bits, group_size=32)
    theirs, _ = mlx_lm_utils.load_model(path)
    ours, args, _ = load_model(path)
    expected = np.array(theirs(mx.array([TOKENS]))[0])
    np.testing.assert_allclose(engine_logits(ours, args, TOKENS), expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_we_read_mlx_lm_quantized_checkpoints(demo_dir, tmp_path, bits):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    model, config = mlx_lm_utils.load_model(demo_dir)
    model, config = mlx_lm_utils.quantize_model(model, config, group_size=32, bits=bits)
    out = tmp_path / "mlx-lm-q"
    out.mkdir()
    mlx_lm_utils.save_model(out, model)
    mlx_lm_utils.save_config(config, out / "config.json")
    ours, args, _ = load_model(out)
    assert args.quantization["bits"] == bits
    expected = np.array(model(mx.array([TOKENS]))[0])
    np.testing.assert_allclose(engine_logits(ours, args, TOKENS), expected, atol=2e-4, rtol=2e-4)


def test_temp_dirs_of_dead_writers_are_removed(tmp_path):
    import subprocess
    import sys

    from engine.demo_model import write_demo_model

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "m"
    stale = tmp_path / f".m.tmp-{dead.pid}-abc"
    live = tmp_path / f".m.tmp-{os.getpid()}-def"
    other = tmp_path / f".other.tmp-{dead.pid}-ghi"
    for d in (stale, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    write_demo_model(out, layers=1, hidden=64, heads=4, kv_heads=2, intermediate=128)
    assert not stale.exists()  # its writer is dead: nothing will ever finish it
    assert live.exists() and other.exists()  # a live writer's, and another model's
    assert (out / "config.json").is_file()
    assert not [d for d in tmp_path.iterdir() if d.name.startswith(".m.") and d != live]
