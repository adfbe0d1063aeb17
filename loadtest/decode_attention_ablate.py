"""What bounds the staged decode attention kernel at batch 64 x 1,024 keys (7B shape, bf16).

    python -m loadtest.decode_attention_ablate        (needs MLX's CUDA build)

Runs paged_decode.rope_store_decode_attention over 32 layers' own pools (as a step does),
for v4 (tensor cores) and v3, with K/V rows addressed head-major instead of slot-major (the
same bytes, laid out as a per-head block would lie: does the pool layout matter?), and with
other ring depths and warp counts; block tables sequential (as the KV manager hands out a
prompt's blocks) and scrambled. Wall time of 32 launches over 32, so launch gaps count: the
figures are coarser than gpu_trace's kernel times and differ from them by ~10-20%, and only
differences well past that spread mean anything (sixteenth session, RESULTS.md). The
head-major variant reads the right number of bytes from the wrong rows: timing only.
"""

import time

import mlx.core as mx
import numpy as np

from engine import paged_decode as pd

B, CTX, KVH, H, D, BS, L = 64, 1024, 8, 32, 128, 16, 32
SLOT_MAJOR = "(((long)table[p / BS - first_block] * BS + p % BS) * KVH + g) * D"
HEAD_MAJOR = "(((long)table[p / BS - first_block] * KVH + g) * BS + p % BS) * D"
VARIANTS = {
    "v4": {}, "v3": {"TENSOR_CORES": False},
    "v4 head-major rows": {"body": (SLOT_MAJOR, HEAD_MAJOR)},
    "v4 stages 2": {"STAGES": 2}, "v4 stages 4": {"STAGES": 4}, "v4 stages 6": {"STAGES": 6},
    "v4 warps 4 stages 2": {"STAGED_WARPS": 4, "STAGES": 2},
    "v4 warps 1 stages 4": {"STAGED_WARPS": 1, "STAGES": 4},
    "v4 warps 4 stages 3": {"STAGED_WARPS": 4, "STAGES": 3},
}


def main() -> None:
    nb = B * (CTX // BS + 4) + 1
    rng = np.random.default_rng(0)
    pools = [(mx.random.normal((nb * BS, KVH, D)).astype(mx.bfloat16),
              mx.random.normal((nb * BS, KVH, D)).astype(mx.bfloat16)) for _ in range(L)]
    qkv = mx.random.normal((B, (H + 2 * KVH) * D)).astype(mx.bfloat16)
    qpos, kstart = mx.array(np.full(B, CTX - 1, np.int32)), mx.zeros(B, mx.int32)

    def tables(sequential: bool) -> mx.array:
        ids = np.arange(1, nb) if sequential else rng.permutation(np.arange(1, nb))
        return mx.array(ids[:B * (CTX // BS + 1)].reshape(B, -1).astype(np.int32))

    def step(bt: mx.array) -> list[mx.array]:
        slots = (bt[:, (CTX - 1) // BS] * BS + (CTX - 1) % BS).astype(mx.int32)
        return [pd.rope_store_decode_attention(qkv, k, v, bt, kstart, qpos, slots, H, 1e6, BS, None)
                for k, v in pools]

    def timed(bt: mx.array, reps: int = 7) -> float:
        mx.eval(step(bt))
        times = []
        for _ in range(reps):
            mx.synchronize()
            t = time.perf_counter()
            mx.eval(step(bt))
            mx.synchronize()
            times.append(time.perf_counter() - t)
        return 1e6 * float(np.median(times)) / L

    saved = pd._BODY_V4, pd.STAGES, pd.STAGED_WARPS, pd.TENSOR_CORES
    kv_bytes = B * CTX * KVH * D * 2 * 2
    for sequential in (True, False):
        bt = tables(sequential)
        for name, change in VARIANTS.items():
            body = saved[0]
            if "body" in change:
                body = body.replace(*change["body"])
                assert body != saved[0]
            pd._BODY_V4, pd.STAGES = body, change.get("STAGES", saved[1])
            pd.STAGED_WARPS = change.get("STAGED_WARPS", saved[2])
            pd.TENSOR_CORES = change.get("TENSOR_CORES", saved[3])
            pd._kernel.cache_clear()
            try:
                us = timed(bt)
                print(f"{'sequential' if sequential else 'scrambled '} tables, {name:28s}: "
                      f"{us:7.1f} us a layer, {kv_bytes / us / 1e6:5.2f} TB/s", flush=True)
            finally:
                pd._BODY_V4, pd.STAGES, pd.STAGED_WARPS, pd.TENSOR_CORES = saved
                pd._kernel.cache_clear()


if __name__ == "__main__":
    main()
