"""Checks of MLX ops on strided views (split matmul outputs) against contiguous copies.

    PYTHONPATH=. python -m loadtest.gpu_diag

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


def engine_trials() -> None:
    """Bisect the tiny-model batch that fails on CUDA (loadtest/RESULTS.md, GPU-only failures)."""
    import tempfile

    from engine.engine import EngineConfig, LLMEngine
    from engine.tokenizer import Tokenizer, write_tokenizer_files
    from scheduler.request import SamplingParams
    from tests.tiny import tiny_model

    d = tempfile.mkdtemp()
    write_tokenizer_files(d, version="v3")
    tok = Tokenizer.from_dir(d)

    def trial(lengths, params) -> str:
        model, args, _ = tiny_model(seed=1, vocab_size=32768, sliding_window=8)
        eng = LLMEngine(model, args, tok, EngineConfig(kv_cache_memory_gib=0.01, block_size=4))
        rng = np.random.default_rng(3)
        for i, n in enumerate(lengths):
            eng.add_request(str(i), rng.integers(10, 32768, n).tolist(), params[i % len(params)])
        try:
            while eng.has_unfinished_requests():
                eng.step()
            return "ok"
        except Exception as e:  # noqa: BLE001
            return "FAIL " + str(e)[:80]

    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    top_p = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=3, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=3, ignore_eos=True)
    lp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, return_logprobs=True)
    many = [1, 5, 17, 40, 2, 8, 33, 11, 4, 26, 9, 19, 3, 14, 6, 22, 13, 13]
    for name, lengths, params in [
            ("1 token, greedy", [1], [greedy]), ("5+17 greedy", [5, 17], [greedy]),
            ("5+17 top-p", [5, 17], [top_p]), ("5+17 seeded", [5, 17], [seeded]),
            ("5+17 logprobs", [5, 17], [lp]), ("18 greedy", many, [greedy]),
            ("18 top-p", many, [top_p]), ("18 mixed + logprobs", many, [top_p, lp, seeded])]:
        print(f"engine {name:<22} {trial(lengths, params)}", flush=True)


if __name__ == "__main__":
    main()
    engine_trials()
