"""Model architecture arguments, read from a checkpoint's config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class ModelArgs:
    """Mistral architecture hyper-parameters (Hugging Face config.json names)."""

    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 14336
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None  # defaults to hidden_size // num_attention_heads
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None  # None: full attention (v0.2, v0.3)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int = 1
    eos_token_id: int = 2
    quantization: Optional[dict] = None  # {"group_size": 64, "bits": 4|8}

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        problems = []
        for name in ("hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not problems and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                            f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window must be positive or null, got {self.sliding_window}")
        if self.quantization is not None:
            bits = self.quantization.get("bits")
            if bits not in (4, 8):
                problems.append(f"quantization bits must be 4 or 8, got {bits!r}")
            if self.quantization.get("group_size", 64) not in (32, 64, 128):
                problems.append("quantization group_size must be 32, 64 or 128")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a config.json dict, ignoring keys this architecture does not use."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        if "quantization" not in kwargs and "quantization_config" in config:
            kwargs["quantization"] = config["quantization_config"]
        return cls(**kwargs)

    @property
    def max_context(self) -> Optional[int]:
        """Longest sequence the model accepts; None when a sliding window bounds it."""
        return None if self.sliding_window else self.max_position_embeddings
