"""ServerConfig: how the gRPC front end listens, authenticates, limits and shuts down."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServerConfig:
    """Settings of the gRPC server; the engine's own settings live in engine.EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400  # Prometheus text format over HTTP; 0 turns it off
    model_name: Optional[str] = None  # the name in ModelInfo and metric labels; None: from --model
    max_waiting: int = 1024  # requests queued beyond this get RESOURCE_EXHAUSTED
    api_key: Optional[str] = None  # when set, calls need "authorization: Bearer <key>"
    api_key_file: Optional[str] = None  # the key read from a file (keeps it off the command line)
    tls_cert: Optional[str] = None  # PEM certificate chain; with tls_key, serve TLS only
    tls_key: Optional[str] = None
    drain_seconds: float = 30.0  # on SIGTERM, how long in-flight calls may run before cancelling
    max_message_bytes: int = 16 << 20  # largest request or response message gRPC accepts
    max_prompt_tokens: Optional[int] = None  # None: the model's context is the only limit
    default_max_tokens: int = 256  # when a request leaves max_tokens unset
    max_tokens_cap: int = 8192  # largest max_tokens a request may ask for
    max_request_id_chars: int = 128
    max_stop_string_chars: int = 256
    # GenerateStream sends the first token at once, then a message per this many tokens
    # (fewer, larger messages: less per-token gRPC work on a busy server; cf. SGLang's and
    # vLLM's --stream-interval). The last message carries whatever is left.
    stream_interval: int = 1
    # Run the engine in a child process (engine/process.py): the engine's Python and gRPC's
    # per-message work then no longer share one GIL. H200, 7B, 128 requests 256 in / 128 out
    # at concurrency 128: 6,058.8 output tok/s against 5,008.7 with the engine on a thread
    # of the server process (same call; loadtest/RESULTS.md).
    engine_process: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        problems = []
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.port == 0:
            problems.append("port must be set (0 would listen on a random port)")
        if self.metrics_port and self.metrics_port == self.port:
            problems.append(f"metrics_port and port are both {self.port}")
        for name in ("max_waiting", "max_message_bytes", "default_max_tokens", "max_tokens_cap",
                     "max_request_id_chars", "max_stop_string_chars", "stream_interval"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            problems.append(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.default_max_tokens > self.max_tokens_cap:
            problems.append(f"default_max_tokens ({self.default_max_tokens}) is above "
                            f"max_tokens_cap ({self.max_tokens_cap})")
        if self.drain_seconds < 0:
            problems.append(f"drain_seconds must be >= 0, got {self.drain_seconds}")
        if self.api_key is not None and self.api_key_file is not None:
            problems.append("give api_key or api_key_file, not both")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("api_key is empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("TLS needs both tls_cert and tls_key")
        for name in ("api_key_file", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                problems.append(f"{name}: no such file {path!r}")
        if self.log_level.lower() not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}, "
                            f"got {self.log_level!r}")
        if problems:
            raise ValueError("invalid server config: " + "; ".join(problems))

    def resolved_api_key(self) -> Optional[str]:
        """The API key from api_key or the first line of api_key_file; None when auth is off."""
        if self.api_key_file is None:
            return self.api_key
        key = Path(self.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"api_key_file {self.api_key_file!r} is empty")
        return key

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def log_level_number(self) -> int:
        return getattr(logging, self.log_level.upper())
