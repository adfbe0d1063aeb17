"""A plain NumPy float32 Mistral forward: naive attention with the sliding-window mask."""

from __future__ import annotations

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, positions, theta):
    """x (L, H, D); non-interleaved halves, as Hugging Face Mistral does."""
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (L, D/2)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(np.float32)


def reference_logits(weights: dict[str, np.ndarray], cfg: dict, token_ids) -> np.ndarray:
    """Logits (L, V) for one whole sequence. weights use Hugging Face names."""
    ids = np.asarray(token_ids)
    n = len(ids)
    h_q, h_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // h_q
    eps, theta, window = cfg["rms_norm_eps"], cfg["rope_theta"], cfg.get("sliding_window")
    pos = np.arange(n)
    visible = pos[None, :] <= pos[:, None]  # (query, key)
    if window:
        visible &= pos[None, :] > pos[:, None] - window
    x = weights["model.embed_tokens.weight"][ids].astype(np.float32)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        q = (h @ weights[p + "self_attn.q_proj.weight"].T).reshape(n, h_q, d)
        k = (h @ weights[p + "self_attn.k_proj.weight"].T).reshape(n, h_kv, d)
        v = (h @ weights[p + "self_attn.v_proj.weight"].T).reshape(n, h_kv, d)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        rep = h_q // h_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        scores = np.where(visible[None], scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n, h_q * d)
        x = x + attn @ weights[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        gate = h @ weights[p + "mlp.gate_proj.weight"].T
        up = h @ weights[p + "mlp.up_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * up) @ weights[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, weights["model.norm.weight"], eps)
    return x @ weights["lm_head.weight"].T
