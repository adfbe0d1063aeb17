"""Fixtures shared by the end-to-end tests: one tiny demo checkpoint, a real server per module."""

import os
from pathlib import Path

import pytest

# MLX's CUDA backend rounds float32 matmuls like TF32 unless told not to (MLX reads this once,
# at the first matmul). The tiny float32 models are compared with float64 references at 1e-4,
# which TF32's ~3e-4 relative error fails on a GPU; the CPU ignores it.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

TINY_DEMO = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, dtype="float32")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint with the real v3 tokenizer, written once per run."""
    from engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("model") / "tiny", **TINY_DEMO)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """A real `mistral-serve serve` process on free ports, shared by a test module."""
    from tests.test_service_e2e import start_server

    s = start_server(model_dir, tmp_path_factory.mktemp("server"))
    yield s
    assert s.stop() == 0, s.log()
