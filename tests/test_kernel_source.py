"""engine/kernel_source.compact: the CUDA sources MLX hashes on every evaluation lose their
comments and indentation and nothing else. The compacted qgemv sources still pass the CPU
emulation; every kernel source in the engine is free of /* */ comments, which compact keeps."""

import pytest

from engine import dequant, fused_ops, gemv, paged_decode, qgemm, qgemv
from engine.kernel_source import compact
from tests import cuda_emulator


def _sources() -> list[str]:
    return ([qgemv.SOURCE, qgemv.SOURCE_STAGED, qgemm.SOURCE, qgemm.HEADER,
             dequant.SOURCE, paged_decode.VEC_HEADER, paged_decode._MERGE,
             gemv.kernel_source(gemv._DENSE), gemv.kernel_source(gemv._QUANT)]
            + list(fused_ops.SOURCES.values())
            + [paged_decode.kernel_source(part, v) for part in (paged_decode._PARTIAL,
                                                               paged_decode._FINAL)
               for v in ("v1", "v2")])


def test_comments_and_indentation_go_code_stays():
    src = ('    #pragma unroll\n  for (int i = 0; i < N; ++i) {  // a comment\n\n'
           '      asm volatile("mov.u32 %0, 1; // not a comment" : "=r"(x));\n'
           "    const char c = '/'; // gone\n  }\n#define X 1 // gone too\n")
    assert compact(src) == ('#pragma unroll\nfor (int i = 0; i < N; ++i) {\n'
                            'asm volatile("mov.u32 %0, 1; // not a comment" : "=r"(x));\n'
                            "const char c = '/';\n}\n#define X 1\n")


def test_every_kernel_source_shrinks_without_block_comments():
    for src in _sources():
        assert "/*" not in src
        small = compact(src)
        assert len(small) < len(src) and compact(small) == small
        # The same tokens as the source cut at each "//" (no string literal here holds one):
        # only comments and whitespace went, and each line is still a line.
        assert not any('"' in line and "//" in line.split('"', 1)[1] for line in src.splitlines())
        naive = [line.split("//")[0].split() for line in src.splitlines()]
        assert [line.split() for line in small.splitlines()] == [t for t in naive if t]


@pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ (C++20)")
def test_compacted_qgemv_still_computes(tmp_path, monkeypatch):
    for name in ("SOURCE", "SOURCE_STAGED"):
        monkeypatch.setattr(qgemv, name, compact(getattr(qgemv, name)))
    monkeypatch.setattr(qgemm, "UNPACK", compact(qgemm.UNPACK))
    results = cuda_emulator.run_qgemv(tmp_path)
    assert len(results) == 19 and max(err for _, err in results) < 5e-3  # 4 with the SwiGLU epilogue


def test_engine_kernels_are_built_compacted(monkeypatch):
    # Every engine kernel goes through kernel_source.cuda_kernel, which hands MLX the
    # compacted text (and passes the rest unchanged).
    import mlx.core as mx

    from engine import kernel_source
    seen = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: seen.append(kw) or "kernel")
    assert kernel_source.cuda_kernel(name="k", input_names=["x"], output_names=["y"],
                                     source=qgemv.SOURCE, header=qgemm.HEADER,
                                     shared_memory=64) == "kernel"
    assert seen == [dict(name="k", input_names=["x"], output_names=["y"], shared_memory=64,
                         source=compact(qgemv.SOURCE), header=compact(qgemm.HEADER))]
    qgemv._staged_kernel.cache_clear()
    qgemv._staged_kernel(1024)
    qgemv._staged_kernel.cache_clear()
    assert seen[-1]["source"] == compact(qgemv.SOURCE_STAGED)
