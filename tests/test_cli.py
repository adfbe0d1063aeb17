"""The offline subcommands through the real console script."""

import json
import os
import subprocess
import sys

import pytest

from engine.weights import load_config


def cli(*args, timeout=120):
    exe = os.path.join(os.path.dirname(sys.executable), "mistral-serve")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    r = cli("demo-model", "--out", str(out), "--layers", "2", "--hidden", "64", "--heads", "4",
            "--kv-heads", "2", "--intermediate", "128", "--sliding-window", "16", "--seed", "3")
    assert r.returncode == 0, r.stderr
    return out


def test_demo_model_flags_reach_config(demo):
    args = load_config(demo)
    assert (args.num_hidden_layers, args.hidden_size, args.num_attention_heads,
            args.num_key_value_heads, args.intermediate_size, args.sliding_window) == \
        (2, 64, 4, 2, 128, 16)
    assert json.loads((demo / "config.json").read_text())["model_type"] == "mistral"


def test_generate_streams_and_is_deterministic_at_temperature_0(demo):
    a = cli("generate", "--model", str(demo), "--prompt", "Hello", "--max-tokens", "12")
    b = cli("generate", "--model", str(demo), "--prompt", "Hello", "--max-tokens", "12")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "[prompt: " in a.stderr and "tokens in" in a.stderr


def test_generate_reports_a_missing_model_cleanly(tmp_path):
    r = cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_bench_prints_every_figure(demo):
    r = cli("bench", "--model", str(demo), "--prompt-tokens", "32", "--gen-tokens", "8",
            "--iterations", "1")
    assert r.returncode == 0, r.stderr
    for key in ("load time:", "prompt:", "decode:", "peak memory:"):
        assert key in r.stdout


def test_convert_quantizes_and_loads(demo, tmp_path):
    out = tmp_path / "q8"
    r = cli("convert", "--hf-path", str(demo), "--out", str(out), "--bits", "8",
            "--group-size", "32", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert load_config(out).quantization["bits"] == 8
    r = cli("generate", "--model", str(out), "--prompt", "Hi", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
