"""The Mistral architecture in MLX, over a flat batch of tokens and a paged KV cache.

Module and parameter names follow Hugging Face (model.layers.N.self_attn.q_proj, ...), so
checkpoint tensors load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from engine import dequant, fused_ops, gemv, paged_decode, qgemm, qgemm_wgmma, qgemv
from engine.attention import AttentionMetadata, paged_attention
from engine.config import ModelArgs
from engine.kv_cache import PagedKVCache


@dataclass(frozen=True)
class KernelPlan:
    """Which kernels a forward pass uses; the runner sets it for the backend it runs on.

    dequant_min_rows: a quantized layer fed at least this many rows runs as dequantize +
    dense GEMM (MLX's CUDA quantized matmul is slow for many rows); None: never.
    gemv: few rows of a quantized layer go through engine/gemv.py's kernels (after their
    self-check passed); gemv_dense: of a float layer too.
    fused: the small per-layer ops run as engine/fused_ops.py's kernels.
    dequant_kernel: that dequantize is engine/dequant.py's kernel, not mx.dequantize.
    qgemm: quantized layers fed engine/qgemm.py's row counts use its tensor-core kernel
    (before dequantize + GEMM is considered).
    qgemm_wgmma: 4-bit layers fed engine/qgemm_wgmma.py's row counts use its Hopper kernel
    (before qgemm's).
    qgemv: quantized layers fed 1-8 rows use engine/qgemv.py's tensor-core kernel (before
    engine/gemv.py's).
    qgemv_swiglu: where qgemv serves gate|up, it also applies SwiGLU (one kernel, not two).
    decode_rope: on decode-only kernel steps in one split, the decode attention kernel
    applies RoPE and writes K/V itself (paged_decode.rope_store_decode_attention).
    """

    dequant_min_rows: Optional[int] = None
    gemv: bool = False
    gemv_dense: bool = False
    fused: bool = False
    dequant_kernel: bool = False
    qgemm: bool = False
    qgemm_wgmma: bool = False
    qgemv: bool = False
    qgemv_swiglu: bool = False
    decode_rope: bool = False


PORTABLE = KernelPlan()


def project(layer: nn.Module, x: mx.array, plan: KernelPlan) -> mx.array:
    """layer(x), run the way `plan` says is fastest here."""
    if plan.qgemv and qgemv.applies(layer, x):
        return qgemv.qgemv(layer, x)
    if plan.gemv and gemv.applies(layer, x, plan.gemv_dense):
        return gemv.gemv(layer, x)
    if plan.qgemm_wgmma and qgemm_wgmma.applies(layer, x):
        return qgemm_wgmma.qgemm_wgmma(layer, x)
    if plan.qgemm and qgemm.applies(layer, x):
        return qgemm.qgemm(layer, x)
    if plan.dequant_min_rows is not None and isinstance(layer, nn.QuantizedLinear) \
            and x.shape[0] >= plan.dequant_min_rows:
        if plan.dequant_kernel and dequant.applies(layer):
            w = dequant.dequantize(layer)
        else:
            w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size,
                              layer.bits)
        return x @ w.astype(x.dtype).T
    return layer(x)


def concat_linear(layers: list[nn.Module], run: int = 0) -> nn.Module:
    """One Linear (or QuantizedLinear) computing every layer's output side by side, or, for
    two layers and a `run`, alternating runs of `run` features of each.

    Rows of a weight are output features, and quantization groups run along the input
    dimension, so weights, scales and biases all concatenate along axis 0.
    """
    first = layers[0]
    fused = type(first).__new__(type(first))
    nn.Module.__init__(fused)
    for name, value in vars(first).items():  # group_size, bits, mode, ...
        if not hasattr(fused, name):
            object.__setattr__(fused, name, value)
    for name in first.keys():
        parts = [layer[name] for layer in layers]
        if run:
            a, b = parts
            pairs = mx.stack(parts).reshape(2, a.shape[0] // run, run, *a.shape[1:])
            fused[name] = mx.swapaxes(pairs, 0, 1).reshape(2 * a.shape[0], *a.shape[1:])
        else:
            fused[name] = mx.concatenate(parts, axis=0)
    return fused


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim ** -0.5
        self.rope_theta = args.rope_theta
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)

    def fuse(self) -> None:
        """Replace q_proj, k_proj, v_proj by one qkv_proj: one matmul instead of three."""
        self.qkv_proj = concat_linear([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def __call__(self, x: mx.array, positions: mx.array, cache: PagedKVCache, layer: int,
                 meta: AttentionMetadata, plan: KernelPlan) -> mx.array:
        if "qkv_proj" in self:
            qkv = project(self.qkv_proj, x, plan)
        else:
            qkv = mx.concatenate([project(p, x, plan) for p in (self.q_proj, self.k_proj,
                                                                 self.v_proj)], axis=-1)
        if plan.decode_rope and paged_decode.rope_store_applies(
                meta.groups, meta.slot_mapping, qkv, cache.keys[layer], cache.values[layer]):
            g = meta.groups[0]  # one kernel: RoPE, the K/V write and attention
            out = paged_decode.rope_store_decode_attention(
                qkv, cache.keys[layer], cache.values[layer], g.block_tables, g.key_start,
                g.query_positions, meta.slot_mapping, self.n_heads, self.rope_theta,
                cache.block_size, meta.sliding_window)
            return project(self.o_proj, out.reshape(out.shape[0], -1), plan)
        q, cache.keys[layer], cache.values[layer] = fused_ops.qkv_rope_store(
            qkv, positions, meta.slot_mapping, cache.keys[layer], cache.values[layer],
            self.n_heads, self.n_kv_heads, self.head_dim, self.rope_theta, plan.fused,
            in_place=meta.only_kernels)
        out = paged_attention(q, cache.keys[layer], cache.values[layer], meta, cache.block_size,
                              self.scale)
        return project(self.o_proj, out, plan)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def fuse(self) -> None:
        """Replace gate_proj and up_proj by one gate_up_proj: one matmul instead of two. Its
        features alternate runs of GATE_UP_RUN gates and ups (fused_ops.GATE_UP_RUN), so that
        qgemv can apply SwiGLU in the same kernel; the order costs other matmuls nothing."""
        inner = self.gate_proj.weight.shape[0]
        self.run = fused_ops.GATE_UP_RUN if inner % fused_ops.GATE_UP_RUN == 0 else inner
        self.gate_up_proj = concat_linear([self.gate_proj, self.up_proj], self.run)
        del self.gate_proj, self.up_proj

    def __call__(self, x: mx.array, plan: KernelPlan) -> mx.array:
        if "gate_up_proj" not in self:
            gate_up = mx.concatenate([project(self.gate_proj, x, plan),
                                      project(self.up_proj, x, plan)], axis=-1)
            h = fused_ops.swiglu(gate_up, plan.fused)
        elif (plan.qgemv_swiglu and self.run == fused_ops.GATE_UP_RUN
              and qgemv.swiglu_applies(self.gate_up_proj, x)):
            h = qgemv.qgemv(self.gate_up_proj, x, swiglu=True)
        else:
            h = fused_ops.swiglu(project(self.gate_up_proj, x, plan), plan.fused, self.run)
        return project(self.down_proj, h, plan)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, h: mx.array, normed: mx.array, positions: mx.array,
                 cache: PagedKVCache, layer: int, meta: AttentionMetadata, plan: KernelPlan,
                 next_norm: nn.RMSNorm) -> tuple[mx.array, mx.array]:
        """h: the residual stream; normed: input_layernorm(h). Returns the new residual
        stream and next_norm of it (the next layer's input norm, or the final norm), so each
        residual add runs together with the norm after it."""
        attn = self.self_attn(normed, positions, cache, layer, meta, plan)
        h, normed = fused_ops.add_rms_norm(h, attn, self.post_attention_layernorm, plan.fused)
        return fused_ops.add_rms_norm(h, self.mlp(normed, plan), next_norm, plan.fused)


class MistralModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Mistral(nn.Module):
    """Mistral-7B family: GQA, RoPE, SwiGLU, RMSNorm, optional sliding window, untied head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = MistralModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Which kernels run (set by the runner for its backend; see KernelPlan).
        self.plan = PORTABLE

    def __call__(self, input_ids: mx.array, positions: mx.array, cache: PagedKVCache,
                 meta: AttentionMetadata) -> mx.array:
        """Hidden states after the final norm, (T, hidden), for a flat batch of T tokens."""
        layers = self.model.layers
        h = self.model.embed_tokens(input_ids)
        normed = layers[0].input_layernorm(h)
        for i, layer in enumerate(layers):
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h, normed = layer(h, normed, positions, cache, i, meta, self.plan, next_norm)
        return normed

    def fuse_projections(self) -> None:
        """Fuse q|k|v and gate|up in every layer (fewer, larger matmuls; same numbers).

        Done by the engine once the weights are loaded; checkpoints keep Hugging Face names.
        Each layer is evaluated as it goes, so the unfused weights are freed layer by layer.
        """
        for layer in self.model.layers:
            if "qkv_proj" not in layer.self_attn:
                layer.self_attn.fuse()
                layer.mlp.fuse()
                mx.eval(layer.parameters())

    def logits(self, hidden: mx.array) -> mx.array:
        return project(self.lm_head, hidden, self.plan)
