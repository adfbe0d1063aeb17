"""The committed gRPC stubs are what `make proto` generates from generation.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
STUBS = ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates stubs")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}",
                    str(PROTO_ROOT / "mistral_serve/v1/generation.proto")], check=True)
    drifted = [name for name in STUBS
               if (tmp_path / "mistral_serve/v1" / name).read_text()
               != (PROTO_ROOT / "mistral_serve/v1" / name).read_text()]
    assert not drifted, f"stubs out of date: {drifted}; run `make proto` and commit them"
