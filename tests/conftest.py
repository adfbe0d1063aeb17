"""Fixtures shared by the end-to-end tests: one tiny demo checkpoint, a real server per module."""

from pathlib import Path

import pytest

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
