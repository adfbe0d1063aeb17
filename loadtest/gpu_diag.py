"""Checks of MLX ops on strided views (split matmul outputs) against contiguous copies.

    python -m loadtest.gpu_diag

The fused q|k|v and gate|up projections hand later ops strided views; each line prints the
largest difference from the same op on a contiguous copy (0 expected).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def main() -> None:
    mx.random.seed(0)
    for t in (1, 7, 64):
        h = mx.random.normal((t, 3 * 256))
        a, b, c = mx.split(h, 3, axis=-1)
        ac, bc = mx.contiguous(a), mx.contiguous(b)
        checks = {
            "nn.silu (compiled) on view": (nn.silu(a), nn.silu(ac)),
            "silu(view) * view (compiled)": (mx.compile(lambda x, y: nn.silu(x) * y)(a, b),
                                             nn.silu(ac) * bc),
            "a * sigmoid(a) * b on views": (a * mx.sigmoid(a) * b, ac * mx.sigmoid(ac) * bc),
            "rope on reshaped view": (
                mx.fast.rope(a.reshape(t, 2, 1, 128), 128, traditional=False, base=1e6, scale=1.0,
                             offset=mx.arange(t, dtype=mx.int32)),
                mx.fast.rope(ac.reshape(t, 2, 1, 128), 128, traditional=False, base=1e6, scale=1.0,
                             offset=mx.arange(t, dtype=mx.int32))),
        }
        for name, (x, y) in checks.items():
            print(f"t={t:<3} {name:<34} max |diff| = {mx.abs(x - y).max().item():.3g}")
    # Sorting a whole vocabulary (top-p) and float32 matmul precision (TF32?).
    for rows in (1, 18, 128):
        x = mx.random.normal((rows, 32768))
        try:
            order = mx.argsort(-x, axis=-1)
            ok = bool(mx.all(mx.take_along_axis(x, order, axis=-1)[:, :-1]
                             >= mx.take_along_axis(x, order, axis=-1)[:, 1:]).item())
            print(f"argsort ({rows}, 32768): sorted={ok}")
        except Exception as e:  # noqa: BLE001
            print(f"argsort ({rows}, 32768): {type(e).__name__}: {e}")
    a, b = np.random.default_rng(0).standard_normal((2, 256, 256)).astype(np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    ref = a.astype(np.float64) @ b.astype(np.float64)
    print(f"float32 matmul 256^3: max rel err {np.abs(got - ref).max() / np.abs(ref).max():.2e}")


if __name__ == "__main__":
    main()
