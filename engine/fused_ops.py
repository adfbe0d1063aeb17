"""The small per-layer ops of a step, each fused into one CUDA kernel (mx.fast.cuda_kernel).

On MLX's CUDA backend every op of the graph costs the host ~10 us to build, encode into a
CUDA graph and launch, whatever its size; at small batches a 7B decode step is bound by that
host work, not by the GPU (`python -m loadtest.profile_step --overlap`: on an H200 the
host is still queueing a step when the GPU has finished it). A layer ran ~28 ops, 16 of them
kernels. These kernels replace the small ones:

- add_rms_norm: the residual add and the next RMSNorm (2 kernels -> 1), twice per layer;
- qkv_rope: splitting the fused q|k|v output into heads and RoPE on q and k (2 RoPE kernels
  and up to 3 copies, plus ~9 view ops -> 1 kernel);
- swiglu: silu(gate) * up from the fused gate|up output (3 kernels -> 1).

Each function takes `kernel`: False runs the portable MLX ops (the default everywhere), True
the CUDA kernel; the runner turns kernels on only after fused_ops_match_portable() has shown
them to agree on this machine. The kernels compute in float32 and round once, where the
portable ops round after each op, so they agree to the dtype's precision, not bit for bit.
"""

from __future__ import annotations

import functools
import logging
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.kernel_source import cuda_kernel
from engine.paged_decode import VEC_HEADER

log = logging.getLogger(__name__)

NORM_THREADS = 256  # threads per row of add_rms_norm
ELEMENTWISE_THREADS = 256
# The fused gate|up projection's features alternate runs of GATE_UP_RUN gates and their ups
# (engine/model.py's MLP.fuse): one 16-feature tile of engine/qgemv.py then holds 8 gates
# and their 8 ups, and its epilogue applies SwiGLU itself.
GATE_UP_RUN = 8

# h = x + y (rounded to T, as the portable add), then n = h * rsqrt(mean(h^2) + eps) * w.
# A block per row; each thread handles VEC-wide chunks and rereads its own h in the second pass.
_ADD_RMS_NORM = r"""
    constexpr int VEC = 16 / sizeof(T);
    const long row = blockIdx.x;
    const T* xr = x + row * H;
    const T* yr = y + row * H;
    T* hr = h + row * H;
    T* nr = n + row * H;
    float ss = 0.f;
    for (int i = threadIdx.x * VEC; i < H; i += NT * VEC) {
        const Vec<T, VEC> a = *reinterpret_cast<const Vec<T, VEC>*>(xr + i);
        const Vec<T, VEC> b = *reinterpret_cast<const Vec<T, VEC>*>(yr + i);
        Vec<T, VEC> s;
        #pragma unroll
        for (int j = 0; j < VEC; ++j) {
            s.v[j] = static_cast<T>(static_cast<float>(a.v[j]) + static_cast<float>(b.v[j]));
            const float f = static_cast<float>(s.v[j]);
            ss += f * f;
        }
        *reinterpret_cast<Vec<T, VEC>*>(hr + i) = s;
    }
    __shared__ float part[NT / 32];
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, off);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
    #pragma unroll
    for (int i = 0; i < NT / 32; ++i) total += part[i];
    const float inv = rsqrtf(total / H + __int_as_float(EPS_BITS));
    for (int i = threadIdx.x * VEC; i < H; i += NT * VEC) {
        const Vec<T, VEC> s = *reinterpret_cast<const Vec<T, VEC>*>(hr + i);
        const Vec<T, VEC> wv = *reinterpret_cast<const Vec<T, VEC>*>(w + i);
        Vec<T, VEC> o;
        #pragma unroll
        for (int j = 0; j < VEC; ++j)
            o.v[j] = static_cast<T>(static_cast<float>(s.v[j]) * inv * static_cast<float>(wv.v[j]));
        *reinterpret_cast<Vec<T, VEC>*>(nr + i) = o;
    }
"""

# cos and sin (c, s) of dim pair i's angle at position ROPE_POS, as MLX's RoPE computes it.
ROPE_ANGLE = r"""
        const float inv_freq = exp2f(-(static_cast<float>(i) / static_cast<float>(P)) * __int_as_float(LOG2_BASE_BITS));
        const float theta = static_cast<float>(ROPE_POS) * inv_freq;
        const float c = cosf(theta), s = sinf(theta);
"""
# Rotates the pair (x1, x2) = dims (i, i + P) of a head at position ROPE_POS; shared with
# engine/paged_decode.py's form that applies RoPE itself.
ROPE_ROTATE = ROPE_ANGLE + r"""        const float r1 = x1 * c - x2 * s;
        x2 = x1 * s + x2 * c;
        x1 = r1;
"""

# A thread per (token, group of HG heads of q|k|v, two dim pairs i0, i0 + 1 < D/2): RoPE
# (non-traditional: dims i and i + D/2 rotate together) on q and k heads, with inv_freq =
# 2^(-(i / (D/2)) * log2(base)) and theta = position * inv_freq as MLX's RoPE computes them;
# v heads pass through. Each thread computes its two angles' cos and sin once for its HG
# heads, and moves two values per load and store: with a thread per (token, head, pair), a
# 4,096-token prompt step spent 87 us a layer here, 1.2 TB/s (H200, fifteenth session).
_ROPE_PAIR = r"""
    constexpr int P = D / 2;
    constexpr int HS = NH + 2 * KVH;
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const long t = idx / ((HS / HG) * (P / 2));
    if (t >= positions_shape[0]) return;
    const int hg = (idx / (P / 2)) % (HS / HG);
    const int i0 = 2 * (idx % (P / 2));
    float cs[2], sn[2];
    #pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int i = i0 + e;""" + ROPE_ANGLE.replace("ROPE_POS", "positions[t]") + r"""
        cs[e] = c; sn[e] = s;
    }
    #pragma unroll
    for (int u = 0; u < HG; ++u) {  // (k is an output's name)
        const int hs = hg * HG + u;
        const T* src = qkv + (t * HS + hs) * D;
        const Vec<T, 2> lo = *reinterpret_cast<const Vec<T, 2>*>(src + i0);
        const Vec<T, 2> hi = *reinterpret_cast<const Vec<T, 2>*>(src + i0 + P);
        Vec<T, 2> o1, o2;
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
            const float x1 = static_cast<float>(lo.v[e]), x2 = static_cast<float>(hi.v[e]);
            const bool rot = hs < NH + KVH;
            o1.v[e] = static_cast<T>(rot ? x1 * cs[e] - x2 * sn[e] : x1);
            o2.v[e] = static_cast<T>(rot ? x1 * sn[e] + x2 * cs[e] : x2);
        }
"""
_QKV_ROPE = _ROPE_PAIR + r"""
        T* dst = hs < NH ? q + (t * NH + hs) * D
               : hs < NH + KVH ? k + (t * KVH + hs - NH) * D : v + (t * KVH + hs - NH - KVH) * D;
        *reinterpret_cast<Vec<T, 2>*>(dst + i0) = o1;
        *reinterpret_cast<Vec<T, 2>*>(dst + i0 + P) = o2;
    }
"""
# The same, with K and V written straight into their pool rows (slot * KVH + head) and only
# q as output. The pools come in as inputs and are written through them, in place: MLX
# neither copies nor replaces them (see qkv_rope_store for when that is safe).
_QKV_ROPE_STORE = _ROPE_PAIR + r"""
        T* dst = hs < NH ? q + (t * NH + hs) * D
               : const_cast<T*>(hs < NH + KVH ? k_pool : v_pool) + ((long)slots[t] * KVH + (hs - NH) % KVH) * D;
        *reinterpret_cast<Vec<T, 2>*>(dst + i0) = o1;
        *reinterpret_cast<Vec<T, 2>*>(dst + i0 + P) = o2;
    }
"""

# out (R, I) = silu(g) * u with each row of gu (R, 2I) alternating runs of RUN gates and
# their RUN ups (RUN = I: the two halves); a thread per VEC outputs, VEC dividing RUN.
_SWIGLU = r"""
    constexpr int VEC = 16 / sizeof(T);
    const long idx = ((long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (idx >= (long)gu_shape[0] * I) return;
    const long r = idx / I;
    const long j = idx % I;
    const long gj = r * 2 * I + (j / RUN) * (2 * RUN) + j % RUN;  // gate j; RUN further: up j
    const Vec<T, VEC> g = *reinterpret_cast<const Vec<T, VEC>*>(gu + gj);
    const Vec<T, VEC> u = *reinterpret_cast<const Vec<T, VEC>*>(gu + gj + RUN);
    Vec<T, VEC> o;
    #pragma unroll
    for (int e = 0; e < VEC; ++e) {
        const float gf = static_cast<float>(g.v[e]);
        o.v[e] = static_cast<T>(gf / (1.f + __expf(-gf)) * static_cast<float>(u.v[e]));
    }
    *reinterpret_cast<Vec<T, VEC>*>(out + idx) = o;
"""

SOURCES = {"add_rms_norm": _ADD_RMS_NORM, "qkv_rope": _QKV_ROPE,
           "qkv_rope_store": _QKV_ROPE_STORE, "swiglu": _SWIGLU}


@functools.lru_cache(maxsize=None)
def _kernel(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]):
    return cuda_kernel(name=f"fused_{name}", input_names=list(inputs),
                       output_names=list(outputs), source=SOURCES[name],
                       header=VEC_HEADER)


def _vec(dtype: mx.Dtype) -> int:
    return 16 // dtype.size


def _elementwise_launch(threads: int) -> dict:
    """grid and threadgroup for one CUDA thread per work item, ELEMENTWISE_THREADS a block."""
    return dict(grid=(-(-threads // ELEMENTWISE_THREADS) * ELEMENTWISE_THREADS, 1, 1),
                threadgroup=(ELEMENTWISE_THREADS, 1, 1))


def rope_heads_per_thread(heads: int) -> int:
    """HG of the RoPE kernels: the most of 8, 4, 2, 1 that divides the q|k|v heads."""
    return next(n for n in (8, 4, 2, 1) if heads % n == 0)


def _rope_launch(qkv: mx.array, n_heads: int, kv_heads: int, head_dim: int, base: float) -> dict:
    """Template and launch of the q|k|v RoPE kernels: a thread per (token, HG heads, two
    dim pairs)."""
    heads = n_heads + 2 * kv_heads
    hg = rope_heads_per_thread(heads)
    threads = qkv.shape[0] * (heads // hg) * (head_dim // 4)
    return dict(template=[("T", qkv.dtype), ("NH", n_heads), ("KVH", kv_heads), ("D", head_dim),
                          ("HG", hg), ("LOG2_BASE_BITS", float_bits(math.log2(base)))],
                **_elementwise_launch(threads))


def float_bits(value: float) -> int:
    """A float32 constant as a template argument (its bit pattern): kernels read eps and the
    RoPE base from no memory at all. As an input array it would be a scalar, and MLX keeps
    arrays of 8 bytes or less in CUDA managed memory on the host, which the GPU then reads
    across PCIe from every warp (an H200 trace: add_rms_norm 16 us a call at 64 rows)."""
    return int(np.array(value, np.float32).view(np.int32))


# ---- residual add + RMSNorm ------------------------------------------------------------------
def add_rms_norm(x: mx.array, y: mx.array, norm: nn.RMSNorm, kernel: bool = False
                 ) -> tuple[mx.array, mx.array]:
    """(h, norm(h)) with h = x + y: the residual stream and the next sublayer's input."""
    width = x.shape[-1]
    if not kernel or width % _vec(x.dtype) or y.dtype != x.dtype or norm.weight.dtype != x.dtype:
        h = x + y
        return h, norm(h)
    rows = x.size // width
    h, n = _kernel("add_rms_norm", ("x", "y", "w"), ("h", "n"))(
        inputs=[x, y, norm.weight],
        template=[("T", x.dtype), ("H", width), ("NT", NORM_THREADS), ("EPS_BITS", float_bits(norm.eps))],
        grid=(rows * NORM_THREADS, 1, 1), threadgroup=(NORM_THREADS, 1, 1),
        output_shapes=[x.shape, x.shape], output_dtypes=[x.dtype, x.dtype])
    return h, n


# ---- q|k|v split + RoPE ----------------------------------------------------------------------
def qkv_rope(qkv: mx.array, positions: mx.array, n_heads: int, kv_heads: int, head_dim: int,
             base: float, kernel: bool = False) -> tuple[mx.array, mx.array, mx.array]:
    """q (T, n_heads, D), k (T, kv_heads, D) with RoPE at each token's position, and v
    (T, kv_heads, D), from the fused projection's output (T, (n_heads + 2 kv_heads) * D)."""
    t = qkv.shape[0]
    if not kernel or head_dim % 4 or positions.dtype != mx.int32:
        q_end, k_end = n_heads * head_dim, (n_heads + kv_heads) * head_dim
        # Made contiguous: on MLX's CUDA backend, strided views of the fused output gave
        # wrong KV writes and invalid CUDA graph nodes further down (RoPE keeps strides).
        q, k, v = (mx.contiguous(a) for a in mx.split(qkv, [q_end, k_end], axis=-1))
        # Each token is its own "batch" row so RoPE takes a per-token position.
        q, k = (mx.fast.rope(a.reshape(t, heads, 1, head_dim), head_dim, traditional=False,
                             base=base, scale=1.0, offset=positions).squeeze(2)
                for a, heads in ((q, n_heads), (k, kv_heads)))
        return q, k, v.reshape(t, kv_heads, head_dim)
    return tuple(_kernel("qkv_rope", ("qkv", "positions"), ("q", "k", "v"))(
        inputs=[qkv, positions],
        **_rope_launch(qkv, n_heads, kv_heads, head_dim, base),
        output_shapes=[(t, n_heads, head_dim), (t, kv_heads, head_dim), (t, kv_heads, head_dim)],
        output_dtypes=[qkv.dtype] * 3))


def qkv_rope_store(qkv: mx.array, positions: mx.array, slots: mx.array, k_pool: mx.array,
                   v_pool: mx.array, n_heads: int, kv_heads: int, head_dim: int, base: float,
                   kernel: bool = False, in_place: bool = False
                   ) -> tuple[mx.array, mx.array, mx.array]:
    """qkv_rope, with each token's K and V written into the pools at its slot: returns
    (q, k_pool, v_pool).

    Portable: MLX's scatter, which returns new pool arrays and updates in place only when it
    may donate the old buffer. While the previous step still runs on the GPU its kernels hold
    the pools, so a host one step ahead made MLX copy whole pools (an H200 trace: ~1 ms of
    copies per single-stream step). With the kernel and `in_place`, K and V are written into
    the very pool buffers and the same arrays come back. That is safe only when everything
    that reads the pools this step takes q as an input (the decode attention kernel does), so
    it runs after the write; steps of earlier and later launches are ordered on the stream.
    """
    if kernel and in_place and positions.dtype == slots.dtype == mx.int32 and not head_dim % 4 \
            and k_pool.dtype == v_pool.dtype == qkv.dtype:
        q = _kernel("qkv_rope_store", ("qkv", "positions", "slots", "k_pool", "v_pool"), ("q",))(
            inputs=[qkv, positions, slots, k_pool, v_pool],
            **_rope_launch(qkv, n_heads, kv_heads, head_dim, base),
            output_shapes=[(qkv.shape[0], n_heads, head_dim)], output_dtypes=[qkv.dtype])[0]
        return q, k_pool, v_pool
    q, k, v = qkv_rope(qkv, positions, n_heads, kv_heads, head_dim, base, kernel)
    k_pool[slots] = k
    v_pool[slots] = v
    return q, k_pool, v_pool


# ---- SwiGLU ----------------------------------------------------------------------------------
def swiglu(gate_up: mx.array, kernel: bool = False, run: int | None = None) -> mx.array:
    """silu(gate) * up from the fused projection's output, whose features alternate runs of
    `run` gates and their `run` ups (engine/model.py's GATE_UP_RUN); None: the two halves."""
    inner = gate_up.shape[-1] // 2
    run = run or inner
    if not kernel or inner % _vec(gate_up.dtype) or run % _vec(gate_up.dtype):
        lead = gate_up.shape[:-1]
        pairs = gate_up.reshape(*lead, inner // run, 2, run)
        gate, up = (pairs[..., i, :].reshape(*lead, inner) for i in (0, 1))
        # Written out rather than nn.silu (an mx.compile'd function): gate and up are strided
        # views of one matmul output here. See loadtest/gpu_diag.py.
        return gate * mx.sigmoid(gate) * up
    rows = gate_up.size // gate_up.shape[-1]
    return _kernel("swiglu", ("gu",), ("out",))(
        inputs=[gate_up.reshape(rows, 2 * inner)],
        template=[("T", gate_up.dtype), ("I", inner), ("RUN", run)],
        **_elementwise_launch(rows * inner // _vec(gate_up.dtype)),
        output_shapes=[(*gate_up.shape[:-1], inner)], output_dtypes=[gate_up.dtype])[0]


# ---- self-check ------------------------------------------------------------------------------
def fused_ops_match_portable(hidden: int, intermediate: int, n_heads: int, kv_heads: int,
                             head_dim: int, base: float, eps: float, dtype: mx.Dtype,
                             rows: tuple[int, ...] = (1, 7)) -> bool:
    """Run every kernel and its portable ops on the model's shapes and dtype, at 1 and a few
    rows, and compare; the runner's start-up check (it also compiles the kernels)."""
    if not mx.cuda.is_available():
        return False
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    try:
        # One key per random input: the norm weight, then six per row count.
        keys = iter(mx.random.split(mx.random.key(1), 1 + 6 * len(rows)))

        def rand(*shape):
            return mx.random.normal(shape, key=next(keys)).astype(dtype)
        gu_run = GATE_UP_RUN if intermediate % GATE_UP_RUN == 0 else None  # as MLP.fuse lays it out
        norm = nn.RMSNorm(hidden, eps=eps)
        norm.weight = rand(hidden)
        for t in rows:
            positions = mx.array([3, 1000, 30000, 5, 9, 0, 4095] * (t // 7 + 1))[:t]
            x, y, qkv = rand(t, hidden), rand(t, hidden), rand(t, (n_heads + 2 * kv_heads) * head_dim)
            gate_up = rand(t, 2 * intermediate)

            def run(k):
                return [*add_rms_norm(x, y, norm, k),
                        *qkv_rope(qkv, positions, n_heads, kv_heads, head_dim, base, k),
                        swiglu(gate_up, k, gu_run)]
            # In-place K/V writes into pools holding other rows: only the tokens' slots change.
            slots = mx.array([5, 0, 9, 2, 7, 11, 3][:t] + list(range(12, 12 + max(0, t - 7))), mx.int32)
            pools = [rand(12 + t, kv_heads, head_dim) for _ in range(2)]
            mx.eval(pools)
            before = [np.array(p.astype(mx.float32)) for p in pools]
            q_store, kp, vp = qkv_rope_store(qkv, positions, slots, *pools, n_heads, kv_heads,
                                             head_dim, base, kernel=True, in_place=True)
            mx.eval(q_store)
            if kp is not pools[0] or vp is not pools[1]:
                return False
            _, k_want, v_want = qkv_rope(qkv, positions, n_heads, kv_heads, head_dim, base)
            for pool, old, new in zip(pools, before, (k_want, v_want)):
                old[np.array(slots)] = np.array(new.astype(mx.float32))
                err = np.abs(np.array(pool.astype(mx.float32)) - old).max()
                if not err <= tol * max(np.abs(old).max(), 1.0):
                    log.warning("in-place K/V write off by %.3g; using MLX's ops", err)
                    return False
            portable = run(False)
            for got, want in zip(run(True) + [q_store], portable + [portable[2]]):
                got, want = got.astype(mx.float32), want.astype(mx.float32)
                err = mx.abs(got - want).max().item()
                if not err <= tol * max(mx.abs(want).max().item(), 1.0):
                    log.warning("fused op kernel off by %.3g (shape %s); using MLX's ops",
                                err, want.shape)
                    return False
        return True
    except Exception as exc:  # a kernel that fails to build or run must not stop the server
        log.warning("fused op kernels unavailable (%s); using MLX's ops", exc)
        return False
