"""Hugging Face checkpoint -> MLX checkpoint: dtype cast, 4/8-bit quantization, sharding, files."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors import safe_open

from engine.convert import convert
from engine.weights import ModelLoadError, load_model
from tests.checkpoints import HF_CONFIG, read_tensors, write_hf_checkpoint
from tests.test_weights import check_quantized


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "Mistral-tiny"
    weights = write_hf_checkpoint(path, shards=2)
    return path, weights


def test_convert_float32_keeps_weights_and_copies_tokenizer(hf_dir, tmp_path):
    src, weights = hf_dir
    out = convert(str(src), str(tmp_path / "mlx"), dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    assert {k: v for k, v in config.items()} == HF_CONFIG
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "mlx"}
    tensors = read_tensors(out)
    assert set(tensors) == set(weights)  # the rotary buffer is gone
    for name, w in weights.items():
        np.testing.assert_array_equal(tensors[name], w)
    assert [p.name for p in tmp_path.iterdir()] == ["mlx"]


def test_convert_to_bfloat16(hf_dir, tmp_path):
    src, weights = hf_dir
    out = convert(str(src), str(tmp_path / "bf16"))  # default dtype: bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _, _ = load_model(out)
    params = dict(tree_flatten(model.parameters()))
    assert {v.dtype for v in params.values()} == {mx.bfloat16}
    w = weights["lm_head.weight"]
    np.testing.assert_allclose(np.array(params["lm_head.weight"].astype(mx.float32)), w,
                               atol=np.abs(w).max() / 128)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 32), (4, 64)])
def test_convert_quantized_matches_dequantized(hf_dir, tmp_path, bits, group_size):
    src, weights = hf_dir
    out = convert(str(src), str(tmp_path / "q"), bits=bits, group_size=group_size,
                  dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": group_size, "bits": bits}
    check_quantized(out, bits, group_size, config)
    # The quantization error is what the bit width allows, relative to the weight's spread.
    model, _, _ = load_model(out)
    m = dict(model.named_modules())["model.layers.1.mlp.down_proj"]
    deq = np.array(mx.dequantize(m.weight, m.scales, m.biases, group_size=group_size, bits=bits))
    w = weights["model.layers.1.mlp.down_proj.weight"]
    rel = np.abs(deq - w).mean() / np.abs(w).mean()
    assert rel < (0.15 if bits == 4 else 0.01), rel


def test_convert_shards_large_output(hf_dir, tmp_path):
    src, weights = hf_dir
    out = convert(str(src), str(tmp_path / "sharded"), dtype="float32", max_shard_bytes=200_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    assert (out / "model.safetensors.index.json").is_file()
    model, _, _ = load_model(out)
    for name, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(v), weights[name])


def test_convert_rejects_quantized_source(tmp_path, hf_dir):
    src, _ = hf_dir
    q = convert(str(src), str(tmp_path / "q"), bits=8, group_size=32, dtype="float32")
    with pytest.raises(ModelLoadError, match="is already quantized"):
        convert(str(q), str(tmp_path / "again"))


def test_convert_errors(tmp_path, hf_dir):
    src, _ = hf_dir
    with pytest.raises(ModelLoadError, match="does not exist"):
        convert(str(tmp_path / "missing"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        convert(str(src), str(tmp_path / "out"), bits=3)
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128, got 48"):
        convert(str(src), str(tmp_path / "out"), bits=4, group_size=48)
    with pytest.raises(ValueError, match="has 64 columns, not a multiple of group_size 128"):
        convert(str(src), str(tmp_path / "out"), bits=4, group_size=128)
    assert not (tmp_path / "out").exists()
