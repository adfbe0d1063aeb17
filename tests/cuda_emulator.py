"""Run the CUDA decode-attention kernels' source on a CPU: one thread per CUDA thread.

The kernel bodies in engine/paged_decode.py are pasted into a C++ program in which every
CUDA thread of a block is a std::thread, __syncthreads / __syncwarp are barriers and warp
shuffles go through a per-warp buffer between two barriers. The program runs them (float32)
on a scrambled paged cache and compares with a double-precision reference, so the kernels'
logic (tiling, splits, window, online softmax, merge) is checked in CI without a GPU.
Memory-model, bf16 and alignment effects are not emulated: those need the device tests.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine import paged_decode as pd


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """A g++ that compiles C++20 with <barrier> is needed."""
    if shutil.which("g++") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe.cpp"
        probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); }\n")
        return subprocess.run(["g++", "-std=c++20", "-pthread", "-o", str(Path(d) / "probe"),
                               str(probe)], capture_output=True).returncode == 0


SMEM = ("extern __shared__ __align__(16) unsigned char smem[];",
        "alignas(16) static unsigned char smem[1 << 18];")


def _kernel_body(version: str, epilogue: str, rope: bool = False) -> str:
    return pd.kernel_source(epilogue, version, rope).replace(*SMEM)


PRELUDE = r"""
    #include <cmath>
    #include <cstdint>
    #include <cstring>
    #include <algorithm>
    #include <barrier>
    #include <thread>
    #include <vector>
    #include <random>
    #include <cstdio>
    using std::min; using std::max;
    struct dim3 { int x, y, z; };
    thread_local dim3 threadIdx, blockIdx;
    dim3 gridDim, blockDim;
    std::barrier<>* block_bar; std::barrier<>* warp_bar[32]; std::barrier<>* wg_bar[8];
    float shfl_buf[32][32];
    #define __shared__ static
    #define __align__(n) alignas(n)
    inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
    inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
    inline float __expf(float x) { return expf(x); }
    inline void __syncthreads() { block_bar->arrive_and_wait(); }
    inline void __syncwarp() { warp_bar[threadIdx.x >> 5]->arrive_and_wait(); }
    inline float __shfl_xor_sync(unsigned, float v, int off) {
      int w = threadIdx.x >> 5, l = threadIdx.x & 31;
      shfl_buf[w][l] = v; warp_bar[w]->arrive_and_wait();
      float r = shfl_buf[w][l ^ off]; warp_bar[w]->arrive_and_wait(); return r; }
    long shfl_long[32][32];
    inline long __shfl_sync(unsigned, long v, int src) {
      int w = threadIdx.x >> 5, l = threadIdx.x & 31;
      shfl_long[w][l] = v; warp_bar[w]->arrive_and_wait();
      long r = shfl_long[w][src]; warp_bar[w]->arrive_and_wait(); return r; }
    inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
    // cp.async as a synchronous copy: the data are right, but a ring slot refilled before
    // its readers are done would go unnoticed here (the device tests cover that).
    template <int BYTES> void cp_async(void* dst, const void* src, bool ok) {
      static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
      if (((uintptr_t)dst | (uintptr_t)src) % BYTES) { printf("misaligned cp.async\n"); abort(); }
      if (ok) memcpy(dst, src, BYTES); else memset(dst, 0, BYTES);
    }
    inline void cp_async_commit() {}
    template <int N> void cp_async_wait() {}
    struct alignas(16) uint4 { unsigned x, y, z, w; };
    // Blocks along x; a caller with a y or z grid runs launch per (y, z), passing the grid's
    // y and z sizes for gridDim and setting blockIdx.y / .z in its lambda.
    template <typename F> void launch(int blocks, int threads, F f, int gy = 1, int gz = 1) {
      gridDim = {blocks, gy, gz}; blockDim = {threads, 1, 1};
      for (int b = 0; b < blocks; ++b) {
        std::barrier<> bb(threads); block_bar = &bb;
        for (int w = 0; w < threads / 32; ++w) warp_bar[w] = new std::barrier<>(32);
        for (int w = 0; w < threads / 128; ++w) wg_bar[w] = new std::barrier<>(128);  // warpgroups
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t) ts.emplace_back([=] { threadIdx = {t, 0, 0}; blockIdx = {b, 0, 0}; f(); });
        for (auto& t : ts) t.join();
        for (int w = 0; w < threads / 32; ++w) delete warp_bar[w];
        for (int w = 0; w < threads / 128; ++w) delete wg_bar[w];
      }
    }
    """


_ROPE_CASE = r"""
        {  // ROPE form: q|k|v before RoPE in; the token's K (rotated) and V into its slot
          constexpr int HS = KVH * GQA + 2 * KVH;
          std::vector<float> qkv(G * HS * D), qr(q.size()), kp2 = kp, vp2 = vp, kpw = kp, vpw = vp;
          std::vector<int> slots(G);
          for (auto& x : qkv) x = nd(rng);
          for (int i = 0; i < G; ++i) {
            slots[i] = tables[i * MAXB + qpos[i] / BS - kstart[i] / BS] * BS + qpos[i] % BS;
            for (int hs = 0; hs < HS; ++hs) for (int e = 0; e < D / 2; ++e) {
              double a = qkv[(i * HS + hs) * D + e], c = qkv[(i * HS + hs) * D + e + D / 2];
              double th = qpos[i] * pow(10000.0, -(double)e / (D / 2)), r1 = a, r2 = c;
              if (hs < KVH * GQA + KVH) { r1 = a * cos(th) - c * sin(th); r2 = a * sin(th) + c * cos(th); }
              float* dst = hs < KVH * GQA ? &qr[(i * KVH * GQA + hs) * D]
                         : &(hs < KVH * GQA + KVH ? kpw : vpw)[((long)slots[i] * KVH + (hs - KVH * GQA) % KVH) * D];
              dst[e] = r1; dst[e + D / 2] = r2; } }
          const std::vector<float> want = attend(qr, kpw, vpw);
          std::vector<float> out(want.size(), 0.f);
          launch(G * KVH, 32 * NW, [&] { ROPE_FN<float, D, BS, KVH, GQA, NW, UN>(qkv.data(), kp2.data(), vp2.data(), tables.data(), kstart.data(), qpos.data(), slots.data(), qshape, tshape, out.data()); });
          double err = 0; for (size_t e = 0; e < want.size(); ++e) err = std::max(err, (double)fabs(out[e] - want[e]));
          for (size_t e = 0; e < kp.size(); ++e) err = std::max(err, (double)std::max(fabs(kp2[e] - kpw[e]), fabs(vp2[e] - vpw[e])));
          printf("ROPE_LABEL window %2d splits 1: max err %.2e %s\n", window, err, err < 1e-4 ? "ok" : "FAIL");
          fails += err >= 1e-4;
        }
"""


def _warps(version: str) -> int:
    """Warps a block in the emulation: the engine's for v3 (STAGED_WARPS), else 4."""
    return pd.STAGED_WARPS if version == "v3" else 4


def source(versions: tuple[str, ...], v_batch: int = 0) -> str:
    """The C++ program: the kernels of `versions`, the merge kernel, a reference and cases;
    with v2 or v3, also its ROPE form (RoPE and the K/V write in the kernel) against RoPE in
    double precision, written pools included (cases "rope" and "ropev3")."""
    from engine.fused_ops import float_bits
    prelude = PRELUDE
    params = ("const T* queries, const T* k_pool, const T* v_pool, const int* block_tables, "
              "const int* key_start, const int* q_pos, const long* q_pos_shape, "
              "const long* block_tables_shape")
    src = prelude + pd.VEC_HEADER + "\n    int WINDOW = 0;  // a template argument on the GPU\n" \
        + f"    constexpr int V_BATCH = {v_batch}, STAGES = {pd.STAGES};\n" \
        + f"    constexpr int LOG2_BASE_BITS = {float_bits(math.log2(10000.0))};\n"
    ropes = [v for v in versions if v != "v1"]
    for v in ropes:
        rope_params = params.replace("const T* queries", "const T* qkv").replace(
            "const int* q_pos,", "const int* q_pos, const int* slots,")
        src += f"""
    template <typename T, int D, int BS, int KVH, int GQA, int NUM_WARPS, int UNROLL>
    void rope_{v}({rope_params}, T* out) {{ {_kernel_body(v, pd._FINAL, rope=True)} }}
    """
    for v in versions:
        src += f"""
    template <typename T, int D, int BS, int KVH, int GQA, int NUM_WARPS, int UNROLL>
    void part_{v}({params}, float* part_acc, float* part_m, float* part_l) {{ {_kernel_body(v, pd._PARTIAL)} }}
    template <typename T, int D, int BS, int KVH, int GQA, int NUM_WARPS, int UNROLL>
    void final_{v}({params}, T* out) {{ {_kernel_body(v, pd._FINAL)} }}
    """
    src += r"""
    template <typename T, int D, int GQA>
    void merge(const float* part_acc, const float* part_m, const float* part_l, const long* part_m_shape, T* out) {
    """ + pd._MERGE + r"""
    }
    constexpr int D = 64, BS = 4, KVH = 2, GQA = 3, NW = 4, UN = 4;
    int main() {
      std::mt19937 rng(1);
      std::normal_distribution<float> nd;
      const int lens[] = {1, 5, 4, 19, 170}; const int G = 5; const int MAXB = 50;
      int num_blocks = G * MAXB + 1;
      std::vector<float> kp(num_blocks * BS * KVH * D), vp(kp.size()), q(G * KVH * GQA * D);
      for (auto& x : kp) x = nd(rng); for (auto& x : vp) x = nd(rng); for (auto& x : q) x = nd(rng);
      std::vector<int> perm(num_blocks - 1); for (int i = 0; i < num_blocks - 1; ++i) perm[i] = i + 1;
      std::shuffle(perm.begin(), perm.end(), rng);
      int fails = 0;
      for (int window : {0, 7, 50}) {
        std::vector<int> tables(G * MAXB, 0), kstart(G), qpos(G);
        for (int i = 0; i < G; ++i) {
          int n = lens[i]; qpos[i] = n - 1;
          int first = window ? max(0, n - window) / BS : 0; kstart[i] = first * BS;
          int nb = (n + BS - 1) / BS - first;
          for (int j = 0; j < nb; ++j) tables[i * MAXB + j] = perm[i * MAXB + j];
        }
        auto attend = [&](const std::vector<float>& q, const std::vector<float>& kp, const std::vector<float>& vp) {
        std::vector<float> ref(G * KVH * GQA * D, 0.f);
        for (int i = 0; i < G; ++i) for (int g = 0; g < KVH; ++g) for (int h = 0; h < GQA; ++h) {
          int lo = kstart[i]; if (window) lo = max(lo, qpos[i] - window + 1);
          std::vector<double> s; double mx = -1e30;
          for (int p = lo; p <= qpos[i]; ++p) {
            int blk = tables[i * MAXB + p / BS - kstart[i] / BS];
            const float* k = &kp[((long)(blk * BS + p % BS) * KVH + g) * D];
            const float* qq = &q[((i * KVH + g) * GQA + h) * D];
            double d = 0; for (int e = 0; e < D; ++e) d += qq[e] * k[e]; d /= sqrt((double)D);
            s.push_back(d); mx = std::max(mx, d); }
          double den = 0; for (auto& x : s) { x = exp(x - mx); den += x; }
          for (int p = lo, j = 0; p <= qpos[i]; ++p, ++j) {
            int blk = tables[i * MAXB + p / BS - kstart[i] / BS];
            const float* v = &vp[((long)(blk * BS + p % BS) * KVH + g) * D];
            for (int e = 0; e < D; ++e) ref[((i * KVH + g) * GQA + h) * D + e] += s[j] / den * v[e]; }
        }
        return ref; };
        const std::vector<float> ref = attend(q, kp, vp);
        long qshape[1] = {G}, tshape[2] = {G, MAXB};
        WINDOW = window;
    """ + "".join(_ROPE_CASE.replace("ROPE_FN", f"rope_{v}").replace("NW", str(_warps(v))).replace(
        "ROPE_LABEL", "rope" if v == "v2" else f"rope{v}") for v in ropes) + "".join(f"""
        for (int splits : {{1, 3, 8}}) {{
          std::vector<float> out(ref.size(), 0.f);
          if (splits == 1) {{
            launch(G * KVH, 32 * {_warps(v)}, [&] {{ final_{v}<float, D, BS, KVH, GQA, {_warps(v)}, UN>(q.data(), kp.data(), vp.data(), tables.data(), kstart.data(), qpos.data(), qshape, tshape, out.data()); }});
          }} else {{
            long rows = (long)G * KVH * splits * GQA;
            std::vector<float> pa(rows * D), pm(rows), pl(rows);
            launch(G * KVH * splits, 32 * {_warps(v)}, [&] {{ part_{v}<float, D, BS, KVH, GQA, {_warps(v)}, UN>(q.data(), kp.data(), vp.data(), tables.data(), kstart.data(), qpos.data(), qshape, tshape, pa.data(), pm.data(), pl.data()); }});
            long pms[1] = {{rows}};
            launch(G * KVH * GQA, D, [&] {{ merge<float, D, GQA>(pa.data(), pm.data(), pl.data(), pms, out.data()); }});
          }}
          double err = 0; for (size_t e = 0; e < ref.size(); ++e) err = std::max(err, (double)fabs(out[e] - ref[e]));
          printf("{v} window %2d splits %d: max err %.2e %s\\n", window, splits, err, err < 1e-4 ? "ok" : "FAIL");
          fails += err >= 1e-4;
        }}""" for v in versions) + r"""
      }
      return fails ? 1 : 0;
    }
    """

    return src


# A program that starts with this line is built unoptimized: the qgemv and wgmma programs
# take longer to compile than to run (on the 2-core build machine, -O0 saves ~1.2 s of each,
# and their broken forms are ~35 programs a CI run); the others run faster at -O1.
UNOPTIMIZED = "// built with -O0\n"


def _compile_and_run(workdir: Path, name: str, program: str, *args: str) -> str:
    """Build a C++ emulation program with g++, run it with `args` and return what it prints."""
    cpp, exe = workdir / f"{name}.cpp", workdir / name
    cpp.write_text(program)
    opt = "-O0" if program.startswith(UNOPTIMIZED) else "-O1"
    subprocess.run(["g++", "-std=c++20", opt, "-pthread", "-w", "-o", str(exe), str(cpp)],
                   check=True, capture_output=True, text=True)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, errors="replace",
                          timeout=300).stdout


def mutants(module, attr: str, pairs, source_fn, count: int = 1) -> list[str]:
    """source_fn()'s program with module.attr broken by each (wrong, right) replacement in
    turn (`count` occurrences, -1: all; each `wrong` must be there); module.attr is restored
    after."""
    original = getattr(module, attr)
    programs = []
    try:
        for wrong, right in pairs:
            assert wrong in original, wrong
            setattr(module, attr, original.replace(wrong, right, count))
            programs.append(source_fn())
    finally:
        setattr(module, attr, original)
    return programs


def run_all(workdir: Path, programs: list[str], parse, args: tuple[str, ...] = ()) -> list[list]:
    """Compile and run the programs concurrently (with `args`), one per core (g++ and the
    emulation run outside the GIL); parse(output) of each, in order."""
    def one(item):
        i, program = item
        d = workdir / f"p{i}"
        d.mkdir()
        try:
            return parse(_compile_and_run(d, "p", program, *args))
        except subprocess.TimeoutExpired:  # a broken kernel that hangs: no results
            return parse("")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(one, enumerate(programs)))


def decode_errs(out: str) -> list[tuple[str, int, int, float]]:
    """(version, window, splits, max abs error) from run()'s programs."""
    pattern = r"(\w+) window +(\d+) splits (\d+): max err (\S+)"
    return [(v, int(w), int(s), float(e)) for v, w, s, e in re.findall(pattern, out)]


def max_errs(out: str) -> list[tuple[str, float]]:
    """(case, max abs error) from a program's "CASE: max err E" lines."""
    return [(case, float(e)) for case, e in re.findall(r"(.+): max err (\S+)", out)]


def rel_errs(out: str) -> list[tuple[str, float]]:
    """(case, relative error) from a program's "CASE: rel err E" lines."""
    return [(case, float(e)) for case, e in re.findall(r"(.+): rel err (\S+)", out)]


def run(workdir: Path, versions: tuple[str, ...] = ("v1",), v_batch: int = 0
        ) -> list[tuple[str, int, int, float]]:
    """Compile and run the emulation; (version, window, splits, max abs error) per case."""
    return decode_errs(_compile_and_run(workdir, "emu", source(versions, v_batch)))


def gemv_source(fast_unpack: bool = False) -> str:
    """The C++ program for engine/gemv.py's kernels: dense and 4/8-bit cases against a
    double-precision reference, with widths that leave lanes, unrolled loads and warps idle."""
    from engine import gemv
    src = PRELUDE + pd.VEC_HEADER + f"""
    constexpr bool FAST_UNPACK = {'true' if fast_unpack else 'false'};  // a template argument on the GPU
    """ + r"""
    template <typename T, int K, int M, int ROWS, int UNROLL, int NW>
    void dense(const T* x, const T* w, const long* w_shape, T* y) { """ + \
        gemv.kernel_source(gemv._DENSE) + r""" }
    template <typename T, int K, int M, int ROWS, int UNROLL, int NW, int BITS, int GS>
    void quant(const T* x, const unsigned* w, const T* scales, const T* biases, const long* w_shape,
               T* y) { """ + gemv.kernel_source(gemv._QUANT) + r""" }
    std::mt19937 rng(3);
    std::normal_distribution<float> nd;
    double rel_err(const std::vector<float>& y, const std::vector<double>& ref) {
      double err = 0, scale = 1e-9;
      for (size_t i = 0; i < y.size(); ++i) { err = max(err, fabs(y[i] - ref[i])); scale = max(scale, fabs(ref[i])); }
      return err / scale;
    }
    template <int K, int M, int ROWS, int UNROLL, int NW> void dense_case(int N) {
      std::vector<float> x(M * K), w((long)N * K), y(M * N, 0.f); std::vector<double> ref(M * N, 0.0);
      for (auto& v : x) v = nd(rng); for (auto& v : w) v = nd(rng);
      for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) for (int k = 0; k < K; ++k)
        ref[m * N + n] += (double)x[m * K + k] * w[(long)n * K + k];
      long shape[2] = {N, K};
      launch((N + ROWS - 1) / ROWS, NW * 32, [&] { dense<float, K, M, ROWS, UNROLL, NW>(x.data(), w.data(), shape, y.data()); });
      printf("dense K %d M %d N %d ROWS %d UNROLL %d NW %d: rel err %.2e\n", K, M, N, ROWS, UNROLL, NW, rel_err(y, ref));
    }
    template <int K, int M, int ROWS, int UNROLL, int NW, int BITS, int GS> void quant_case(int N) {
      constexpr int PER_WORD = 32 / BITS;
      std::vector<float> x(M * K), s((long)N * K / GS), c(s.size()), y(M * N, 0.f);
      std::vector<unsigned> w((long)N * K / PER_WORD, 0u); std::vector<double> ref(M * N, 0.0);
      for (auto& v : x) v = nd(rng); for (auto& v : s) v = nd(rng); for (auto& v : c) v = nd(rng);
      for (int n = 0; n < N; ++n) for (int k = 0; k < K; ++k) {
        unsigned q = rng() % (1u << BITS);
        w[((long)n * K + k) / PER_WORD] |= q << (BITS * (k % PER_WORD));
        double wf = (double)s[((long)n * K + k) / GS] * q + c[((long)n * K + k) / GS];
        for (int m = 0; m < M; ++m) ref[m * N + n] += wf * x[m * K + k];
      }
      long shape[2] = {N, K / PER_WORD};
      launch((N + ROWS - 1) / ROWS, NW * 32, [&] { quant<float, K, M, ROWS, UNROLL, NW, BITS, GS>(x.data(), w.data(), s.data(), c.data(), shape, y.data()); });
      printf("quant%d K %d M %d N %d ROWS %d UNROLL %d NW %d: rel err %.2e\n", BITS, K, M, N, ROWS, UNROLL, NW, rel_err(y, ref));
    }
    int main() {
      dense_case<96, 1, 2, 4, 1>(13); dense_case<1024, 3, 2, 4, 2>(13); dense_case<1024, 8, 4, 2, 4>(9);
      dense_case<2304, 2, 1, 2, 8>(5); dense_case<96, 8, 8, 1, 1>(13);  // 64 sums, 32 threads
      quant_case<2048, 1, 2, 4, 1, 4, 64>(13); quant_case<3072, 3, 4, 2, 2, 4, 32>(9);
      quant_case<512, 8, 2, 4, 4, 8, 64>(13); quant_case<1536, 2, 1, 2, 8, 8, 32>(3);
    }
    """
    return src


def run_gemv(workdir: Path, fast_unpack: bool = False) -> list[tuple[str, float]]:
    """Compile and run the gemv emulation; (case, relative error) per case."""
    out = _compile_and_run(workdir, "gemv", gemv_source(fast_unpack))
    return rel_errs(out)


def dequant_source() -> str:
    """The C++ program for engine/dequant.py's kernel: 4- and 8-bit cases against a
    double-precision reference, with chunk counts that leave the last block part idle."""
    from engine import dequant
    return PRELUDE + pd.VEC_HEADER + r"""
    template <typename T, int K, int BITS, int GS>
    void deq(const unsigned* w, const long* w_shape, const T* scales, const T* biases, T* out) { """ + \
        dequant.SOURCE + r""" }
    std::mt19937 rng(5);
    std::normal_distribution<float> nd;
    template <int K, int BITS, int GS> void dequant_case(int N) {
      constexpr int PER_WORD = 32 / BITS, VALS = 128 / BITS, THREADS = 64;
      std::vector<float> s((long)N * K / GS), c(s.size()), out((long)N * K, NAN);
      std::vector<unsigned> w((long)N * K / PER_WORD, 0u); std::vector<double> ref((long)N * K);
      for (auto& v : s) v = nd(rng); for (auto& v : c) v = nd(rng);
      for (int n = 0; n < N; ++n) for (int k = 0; k < K; ++k) {
        unsigned q = rng() % (1u << BITS);
        w[((long)n * K + k) / PER_WORD] |= q << (BITS * (k % PER_WORD));
        ref[(long)n * K + k] = (double)s[((long)n * K + k) / GS] * q + c[((long)n * K + k) / GS];
      }
      long shape[2] = {N, K / PER_WORD};
      long chunks = (long)N * K / VALS;
      launch((chunks + THREADS - 1) / THREADS, THREADS, [&] { deq<float, K, BITS, GS>(w.data(), shape, s.data(), c.data(), out.data()); });
      double err = 0, scale = 1e-9;
      for (size_t i = 0; i < out.size(); ++i) { err = max(err, std::isnan(out[i]) ? 1e9 : fabs(out[i] - ref[i])); scale = max(scale, fabs(ref[i])); }
      printf("dequant%d K %d GS %d N %d: rel err %.2e\n", BITS, K, GS, N, err / scale);
    }
    int main() {
      dequant_case<256, 4, 64>(5); dequant_case<128, 4, 32>(7);
      dequant_case<512, 8, 64>(3); dequant_case<384, 8, 128>(3);
    }
    """


def run_dequant(workdir: Path) -> list[tuple[str, float]]:
    """Compile and run the dequantize emulation; (case, relative error) per case."""
    out = _compile_and_run(workdir, "dequant", dequant_source())
    return rel_errs(out)


# bf16 as the GPU stores it (round to nearest even), and mma.sync m16n8k16 done by one warp:
# each lane posts its fragment registers, then computes its own four outputs from the whole
# A and B, rebuilt by the PTX ISA's fragment layout (engine/qgemm.py's comment gives it).
# cp.async copies at once (the emulation checks which stage is read, not when data lands);
# the paired bf16 ops compute in float and round once to bf16.
QGEMM_PRELUDE = r"""
    struct __nv_bfloat16 {
      unsigned short bits;
      __nv_bfloat16() = default;
      __nv_bfloat16(float f) { unsigned u; memcpy(&u, &f, 4); u += 0x7FFF + ((u >> 16) & 1); bits = u >> 16; }
      operator float() const { unsigned u = (unsigned)bits << 16; float f; memcpy(&f, &u, 4); return f; }
    };
    inline float bf16_half(unsigned reg, int hi) { __nv_bfloat16 h; h.bits = hi ? reg >> 16 : reg & 0xFFFF; return h; }
    inline unsigned bf16_pair(float lo, float hi) { return __nv_bfloat16(lo).bits | ((unsigned)__nv_bfloat16(hi).bits << 16); }
    unsigned mma_a[32][32][4], mma_b[32][32][2];
    template <bool BF16> void mma16816(float* c, const unsigned* a, const unsigned* b) {
      static_assert(BF16, "the emulation stores bf16 only");
      int w = threadIdx.x >> 5, l = threadIdx.x & 31;
      for (int i = 0; i < 4; ++i) mma_a[w][l][i] = a[i];
      for (int i = 0; i < 2; ++i) mma_b[w][l][i] = b[i];
      warp_bar[w]->arrive_and_wait();
      float A[16][16], B[16][8];
      for (int L = 0; L < 32; ++L) {
        int g = L >> 2, t = L & 3;
        for (int e = 0; e < 2; ++e) {
          A[g][2 * t + e] = bf16_half(mma_a[w][L][0], e);
          A[g + 8][2 * t + e] = bf16_half(mma_a[w][L][1], e);
          A[g][2 * t + 8 + e] = bf16_half(mma_a[w][L][2], e);
          A[g + 8][2 * t + 8 + e] = bf16_half(mma_a[w][L][3], e);
          B[2 * t + e][g] = bf16_half(mma_b[w][L][0], e);
          B[2 * t + 8 + e][g] = bf16_half(mma_b[w][L][1], e);
        }
      }
      int g = l >> 2, t = l & 3;
      for (int e = 0; e < 4; ++e) {
        int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
        float s = 0.f;
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        c[e] += s;
      }
      warp_bar[w]->arrive_and_wait();
    }
    inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
      unsigned long long pool = x | ((unsigned long long)y << 32); unsigned r = 0;
      for (int i = 0; i < 4; ++i) r |= (unsigned)((pool >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
      return r; }
    template <bool BF16> unsigned sub2(unsigned a, unsigned b) {
      return bf16_pair(bf16_half(a, 0) - bf16_half(b, 0), bf16_half(a, 1) - bf16_half(b, 1)); }
    template <bool BF16> unsigned fma2(unsigned a, unsigned b, unsigned c) {
      return bf16_pair(fmaf(bf16_half(a, 0), bf16_half(b, 0), bf16_half(c, 0)),
                       fmaf(bf16_half(a, 1), bf16_half(b, 1), bf16_half(c, 1))); }
    template <bool BF16> unsigned pack2(float lo, float hi) { return bf16_pair(lo, hi); }
    template <bool BF16> float half_bits_to_float(unsigned short h) { return __uint_as_float((unsigned)h << 16); }
    #define __device__
    #define __forceinline__ inline
    """

# A random bf16 problem for the tensor-core kernels (qgemm, qgemv): x (M, K), packed q (N, K)
# with group scales s and biases c, y to fill (NaN until written), and the reference x w^T in
# double, w as the kernels round it (one bf16 rounding of s * q + c).
QUANT_PROBLEM = r"""
    using bf = __nv_bfloat16;
    struct QuantProblem {
      std::vector<bf> x, s, c, y; std::vector<unsigned> w; std::vector<double> ref;
      std::vector<float> wf; int M, N, K;
      QuantProblem(std::mt19937& rng, int M, int N, int K, int BITS, int GS)
          : x((long)M * K), s((long)N * K / GS), c(s.size()), y((long)M * N, bf(NAN)),
            w((long)N * K * BITS / 32, 0u), ref((long)M * N, 0.0), wf((long)N * K), M(M), N(N), K(K) {
        std::normal_distribution<float> nd;
        const int PER_WORD = 32 / BITS;
        for (auto& v : x) v = bf(nd(rng)); for (auto& v : s) v = bf(0.1f * nd(rng)); for (auto& v : c) v = bf(0.1f * nd(rng));
        for (int n = 0; n < N; ++n) for (int k = 0; k < K; ++k) {
          unsigned q = rng() % (1u << BITS);
          long i = (long)n * K + k;
          w[i / PER_WORD] |= q << (BITS * (k % PER_WORD));
          wf[i] = bf((float)s[i / GS] * (float)q + (float)c[i / GS]);
        }
        reference();
      }
      void reference() {  // ref = x w^T (again, after x changes)
        std::fill(ref.begin(), ref.end(), 0.0);
        for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) for (int k = 0; k < K; ++k)
          ref[(long)m * N + n] += (double)(float)x[(long)m * K + k] * wf[(long)n * K + k];
      }
      void swiglu() {  // gate|up in runs of 8: ref and y become silu(gate) * up, N / 2 wide
        std::vector<double> r((long)M * N / 2);
        for (int m = 0; m < M; ++m) for (int j = 0; j < N / 2; ++j) {
          const long gi = (long)m * N + j / 8 * 16 + j % 8;
          const double g = (float)bf((float)ref[gi]), u = (float)bf((float)ref[gi + 8]);
          r[(long)m * N / 2 + j] = g / (1 + exp(-g)) * u; }
        ref = r; y.assign(r.size(), bf(NAN));
      }
      double rel_err() const {  // max |y - ref| over max |ref|; an unwritten (NaN) output fails
        double err = 0, scale = 1e-9;
        for (size_t i = 0; i < y.size(); ++i) { float v = y[i]; err = max(err, std::isnan(v) ? 1e9 : fabs(v - ref[i])); scale = max(scale, fabs(ref[i])); }
        return err / scale;
      }
    };
    """


def qgemm_source() -> str:
    """The C++ program for engine/qgemm.py's kernel (bf16) against a double-precision
    reference: every block height, 32 or 16 features a warp, 4 and 8 bits, group sizes 32-128 (a 128 group at an odd
    offset), features and rows that part-fill tiles, K splits, a pipeline ring that wraps, and
    both 4-bit unpack paths."""
    from engine import qgemm
    src = qgemm.SOURCE.replace("extern __shared__ __align__(16) unsigned char smem[];",
                               "alignas(16) static unsigned char smem[1 << 18];")
    assert src != qgemm.SOURCE
    consts = f"constexpr int BN = {qgemm.BN}, BK = {qgemm.BK}, STAGES = {qgemm.STAGES};\n"
    return PRELUDE + pd.VEC_HEADER + QGEMM_PRELUDE + QUANT_PROBLEM + qgemm.UNPACK + consts + r"""
    template <typename T, typename O, int K, int BITS, int GS, bool BF16, int BM, bool FAST, int KW, int WN>
    void qg(const T* x, const int* x_shape, const unsigned* w, const int* w_shape, const T* scales,
            const T* biases, O* y) { constexpr int THREADS = 32 * (BN / WN) * KW; """ + src + r""" }
    std::mt19937 rng(7);
    template <int K, int BITS, int GS, int BM, bool FAST = true, int KW = 1, int WN = 32> void qgemm_case(int M, int N, int S = 1) {
      constexpr int THREADS = 32 * (BN / WN) * KW;  // as qgemm.launch_for
      QuantProblem p(rng, M, N, K, BITS, GS);
      std::vector<float> parts((long)S * M * N, NAN);
      int xs[2] = {M, K}, ws[2] = {N, K * BITS / 32};
      const int gx = (N + BN - 1) / BN, gy = (M + BM - 1) / BM;
      for (int bz = 0; bz < S; ++bz)
        for (int by = 0; by < gy; ++by) {
          if (S == 1)
            launch(gx, THREADS, [&, by] { blockIdx.y = by; qg<bf, bf, K, BITS, GS, true, BM, FAST, KW, WN>(p.x.data(), xs, p.w.data(), ws, p.s.data(), p.c.data(), p.y.data()); }, gy, S);
          else
            launch(gx, THREADS, [&, by, bz] { blockIdx.y = by; blockIdx.z = bz; qg<bf, float, K, BITS, GS, true, BM, FAST, KW, WN>(p.x.data(), xs, p.w.data(), ws, p.s.data(), p.c.data(), parts.data()); }, gy, S);
        }
      if (S > 1)  // qgemm() sums the float partials of the splits
        for (long i = 0; i < (long)M * N; ++i) { float v = 0.f; for (int z = 0; z < S; ++z) v += parts[z * (long)M * N + i]; p.y[i] = bf(v); }
      printf("qgemm%d K %d GS %d BM %d WN %d fast %d kw %d M %d N %d splits %d: rel err %.2e\n", BITS, K, GS, BM, WN, (int)FAST, KW, M, N, S, p.rel_err());
    }
    int main() {
      qgemm_case<128, 4, 64, 64>(70, 136); qgemm_case<256, 4, 32, 16>(9, 128);
      qgemm_case<256, 8, 64, 32>(20, 40); qgemm_case<384, 8, 128, 64>(65, 8);
      qgemm_case<1024, 4, 128, 64>(33, 8); qgemm_case<256, 4, 64, 16, false>(12, 16);
      qgemm_case<512, 4, 64, 32>(20, 72, 2); qgemm_case<1024, 8, 64, 16>(16, 8, 4);
      qgemm_case<512, 4, 64, 64, true, 2>(70, 136); qgemm_case<384, 8, 128, 16, true, 2>(9, 40, 1);
      qgemm_case<512, 4, 32, 32, true, 2>(20, 8, 2);
      qgemm_case<256, 4, 64, 128, true, 1, 16>(130, 136); qgemm_case<256, 8, 64, 64, true, 1, 16>(70, 40, 2);
    }
    """


def run_qgemm(workdir: Path) -> list[tuple[str, float]]:
    """Compile and run the qgemm emulation; (case, relative error) per case."""
    out = _compile_and_run(workdir, "qgemm", qgemm_source())
    return rel_errs(out)


# wgmma (m64nNk16, A in registers, B by descriptor) done by each warpgroup of the block: each
# thread posts its A fragment and B's descriptor, then computes its own N / 2 outputs from its
# warpgroup's whole A (mma.m16n8k16's layout per warp, warp w of the group holding rows
# 16w..16w+15) and B, read from shared memory through the descriptor: K-major, 128-byte
# swizzle (rows 128 bytes apart from the start address, SBO between 8-row atoms, the 16-byte
# chunk bits 4-6 of each address XOR-ed with its bits 7-9; PTX ISA "Matrix Descriptor
# Format" and "Shared Memory Matrix Layout"). Asynchrony as late as the PTX rules allow: a
# wgmma only records its accumulator, A registers and descriptor; commit closes a group, and
# wait_group N runs the oldest groups until N are left, reading the A registers and shared
# memory then. So a kernel that rewrites a pending wgmma's A registers, or refills its stage
# of the ring, before waiting for it gets wrong outputs here, as it may on the GPU.
WGMMA_PRELUDE = r"""
    alignas(1024) unsigned char smem[1 << 18];
    inline unsigned long long __cvta_generic_to_shared(const void* p) { return (const unsigned char*)p - smem; }
    unsigned wg_a[1024][4]; unsigned long long wg_desc[1024];
    struct WgOp { float* d; const unsigned* a; unsigned long long desc; int n; };
    thread_local std::vector<WgOp> wg_open;
    thread_local std::vector<std::vector<WgOp>> wg_groups;
    void wgmma_run(const WgOp& op) {
      float* d = op.d; const unsigned* a = op.a; const unsigned long long desc = op.desc; const int N = op.n;
      const int tid = threadIdx.x, wg = tid / 128;
      for (int i = 0; i < 4; ++i) wg_a[tid][i] = a[i];
      wg_desc[tid] = desc;
      wg_bar[wg]->arrive_and_wait();
      if (wg_desc[128 * wg] != desc) { printf("wgmma: descriptors differ across the warpgroup\n"); abort(); }
      if (desc >> 62 != 1 || ((desc >> 49) & 7) || ((desc >> 16) & 0x3FFF) != 1) {
        printf("wgmma: not the 128-byte swizzle with base offset 0\n"); abort(); }
      const unsigned start = (desc & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
      auto A = [&](int row, int k) {  // the A fragment layout of mma.m16n8k16, per warp
        const int w = row / 16, r = row % 16, g = r % 8, t = (k % 8) / 2;
        const int reg = (r >= 8) + 2 * (k >= 8);
        return bf16_half(wg_a[128 * wg + 32 * w + 4 * g + t][reg], k % 2); };
      auto B = [&](int k, int n) {
        unsigned addr = start + (n / 8) * sbo + (n % 8) * 128 + k * 2;
        addr ^= ((addr >> 7) & 7) << 4;
        __nv_bfloat16 h; memcpy(&h, smem + addr, 2);
        return (float)h; };
      const int w = (tid >> 5) % 4, g = (tid & 31) >> 2, t = tid & 3;
      for (int j = 0; j < N / 8; ++j)
        for (int e = 0; e < 4; ++e) {
          const int row = 16 * w + g + (e >> 1) * 8, col = 8 * j + 2 * t + (e & 1);
          float s = 0.f;
          for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
          d[4 * j + e] += s;
        }
      wg_bar[wg]->arrive_and_wait();
    }
    template <int N, bool BF16> void wgmma(float* d, const unsigned* a, unsigned long long desc) {
      static_assert(BF16, "the emulation stores bf16 only");
      wg_open.push_back({d, a, desc, N});
    }
    inline void wgmma_fence() {}
    inline void wgmma_commit() { wg_groups.push_back(wg_open); wg_open.clear(); }
    template <int N> void wgmma_wait() {  // the whole block waits alike, so its barriers meet
      while (wg_groups.size() > N) {
        for (const WgOp& op : wg_groups.front()) wgmma_run(op);
        wg_groups.erase(wg_groups.begin());
      }
    }
    template <int N> void acc_fence(float*) {}
    inline void fence_async_smem() {}
    // mbarriers: bit 63 the phase, bits 32-62 the arrivals a phase needs, bits 0-31 those still
    // missing. Copies land at once here, so a cp.async arrival is an arrival.
    inline void mbar_init(unsigned long long* bar, unsigned count) {
      std::atomic_ref<unsigned long long>(*bar).store(((unsigned long long)count << 32) | count); }
    inline void mbar_arrive(unsigned long long* bar) {
      std::atomic_ref<unsigned long long> a(*bar);
      unsigned long long v = a.load(), nv;
      do {
        const unsigned long long left = (v & 0xFFFFFFFFull) - 1, count = (v >> 32) & 0x7FFFFFFFull;
        nv = left ? (v & ~0xFFFFFFFFull) | left : ((v ^ (1ull << 63)) & ~0xFFFFFFFFull) | count;
      } while (!a.compare_exchange_weak(v, nv));
    }
    inline void mbar_wait(unsigned long long* bar, unsigned parity) {  // until phase `parity` is over
      std::atomic_ref<unsigned long long> a(*bar);
      while ((a.load() >> 63) == parity) std::this_thread::yield();
    }
    inline void cp_async_mbar_arrive(unsigned long long* bar) { mbar_arrive(bar); }
    """


def qgemm_wgmma_source() -> str:
    """The C++ program for engine/qgemm_wgmma.py's kernel (bf16) against a double-precision
    reference: both block heights, two and four warpgroups, group sizes 32-128 (a 128 group
    at an odd offset), rows and features that part-fill a block, K splits and a ring that
    wraps; and each split case again through SOURCE_FUSED, twice on the same counters. Its
    argument "plain" or "fused" runs only that form (two warpgroups), "ws" only the cases with a
    producer warp (WS), for the broken forms."""
    from engine import qgemm, qgemm_wgmma
    src = qgemm_wgmma.SOURCE.replace("extern __shared__ __align__(1024) unsigned char smem[];", "")
    assert src != qgemm_wgmma.SOURCE
    fused = qgemm_wgmma.SOURCE_FUSED.replace("extern __shared__ __align__(1024) unsigned char smem[];", "")
    depth = " : ".join(f"bm == {bm} && wg == {wg} ? {n}" for (bm, wg), n in qgemm_wgmma.STAGES.items())
    consts = (f"constexpr int BK = {qgemm_wgmma.BK};\n"
              f"constexpr int stages(int bm, int wg) {{ return {depth} : 0; }}\n")
    return UNOPTIMIZED + PRELUDE + pd.VEC_HEADER + QGEMM_PRELUDE + WGMMA_PRELUDE + QUANT_PROBLEM + \
        qgemm.UNPACK + qgemm_wgmma.DESC + consts + r"""
    template <typename T, typename O, int K, int GS, bool BF16, int BM, bool FAST, int WG, int STAGES = stages(BM, WG), bool WS = false>
    void qw(const T* x, const int* x_shape, const unsigned* w, const int* w_shape, const T* scales,
            const T* biases, O* y) { """ + src + r""" }
    // The fused form's last-block sums: blocks run one after another here, so the
    // atomic and the fences only have to count.
    inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
    inline void __threadfence() {}
    inline float __ldcg(const float* p) { return *p; }
    struct alignas(16) float4 { float x, y, z, w; };
    inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
    inline float4 __ldcg(const float4* p) { return *p; }
    template <typename T, typename O, int K, int GS, bool BF16, int BM, bool FAST, int WG, int STAGES = stages(BM, WG), bool WS = false>
    void qwf(const T* x, const int* x_shape, const unsigned* w, const int* w_shape, const T* scales,
             const T* biases, const int* counters, O* y, float* parts) { """ + fused + r""" }
    std::mt19937 rng(11);
    // argv[1]: "plain" runs only SOURCE, "fused" only SOURCE_FUSED (both: two warpgroups), "ws"
    // only SOURCE with its producer warp (WS)
    int mode = 0;
    template <int K, int GS, int BM, int WG = 2, bool WS = false> void wgmma_case(int M, int N, int S = 1) {
      if (mode != 0 && (WS != (mode == 3) || (WG == 4 && mode != 3))) return;
      QuantProblem p(rng, M, N, K, 4, GS);
      std::vector<float> parts((long)S * M * N, NAN);
      int xs[2] = {M, K}, ws[2] = {N, K / 8};
      const int gx = (N + 64 * WG - 1) / (64 * WG), gy = (M + BM - 1) / BM;
      for (int bz = 0; bz < S && mode != 2; ++bz)
        for (int by = 0; by < gy; ++by) {
          if (S == 1)
            launch(gx, 128 * WG + 32 * WS, [&, by] { blockIdx.y = by; qw<bf, bf, K, GS, true, BM, true, WG, stages(BM, WG), WS>(p.x.data(), xs, p.w.data(), ws, p.s.data(), p.c.data(), p.y.data()); }, gy, S);
          else
            launch(gx, 128 * WG + 32 * WS, [&, by, bz] { blockIdx.y = by; blockIdx.z = bz; qw<bf, float, K, GS, true, BM, true, WG, stages(BM, WG), WS>(p.x.data(), xs, p.w.data(), ws, p.s.data(), p.c.data(), parts.data()); }, gy, S);
        }
      if (mode != 2) {
        if (S > 1)
          for (long i = 0; i < (long)M * N; ++i) { float v = 0.f; for (int z = 0; z < S; ++z) v += parts[z * (long)M * N + i]; p.y[i] = bf(v); }
        printf("wgmma%s WG %d BM %d K %d GS %d M %d N %d splits %d: rel err %.2e\n", WS ? " producer" : "", WG, BM, K, GS, M, N, S, p.rel_err());
      }
      if (S == 1 || mode == 1 || WS) return;
      // The fused form, launched twice on the same counters: the second launch is right only
      // if the first left every counter at 0. Blocks run z-major, so each tile's last block
      // is a different one from the first launch's when the splits run in reverse.
      std::vector<int> counters(gx * gy, 0);
      for (int run = 0; run < 2; ++run) {
        std::fill(p.y.begin(), p.y.end(), bf(NAN));
        std::fill(parts.begin(), parts.end(), NAN);
        for (int zz = 0; zz < S; ++zz) {
          const int bz = run ? S - 1 - zz : zz;
          for (int by = 0; by < gy; ++by)
            launch(gx, 128 * WG, [&, by, bz] { blockIdx.y = by; blockIdx.z = bz; qwf<bf, bf, K, GS, true, BM, true, WG>(p.x.data(), xs, p.w.data(), ws, p.s.data(), p.c.data(), counters.data(), p.y.data(), parts.data()); }, gy, S);
        }
        printf("wgmma fused run %d WG %d BM %d K %d GS %d M %d N %d splits %d: rel err %.2e\n", run, WG, BM, K, GS, M, N, S, p.rel_err());
      }
    }
    int main(int argc, char** argv) {
      if (argc > 1) mode = std::string(argv[1]) == "plain" ? 1 : std::string(argv[1]) == "fused" ? 2 : 3;
      wgmma_case<512, 64, 64>(40, 72); wgmma_case<256, 32, 128>(100, 200);
      wgmma_case<384, 128, 128>(128, 136); wgmma_case<1024, 64, 64>(64, 64, 2);
      wgmma_case<512, 128, 128>(70, 8, 4); wgmma_case<256, 64, 64>(100, 64);  // two row tiles
      wgmma_case<512, 64, 64>(100, 64, 2);  // two row tiles, split
      wgmma_case<512, 64, 128, 4>(100, 300); wgmma_case<1024, 32, 128, 4>(70, 256, 2);  // four warpgroups
      // a producer warp: rings that wrap, both heights, two row tiles, four warpgroups and a split
      wgmma_case<512, 64, 64, 2, true>(100, 72); wgmma_case<1024, 128, 128, 2, true>(128, 136);
      wgmma_case<1024, 32, 128, 4, true>(70, 256, 2);
    }
    """


def run_qgemm_wgmma(workdir: Path) -> list[tuple[str, float]]:
    """Compile and run the wgmma kernel's emulation; (case, relative error) per case."""
    out = _compile_and_run(workdir, "qgemm_wgmma", qgemm_wgmma_source())
    return rel_errs(out)


def qgemv_source() -> str:
    """The C++ program for engine/qgemv.py's kernel (bf16) against a double-precision
    reference: 1-8 rows, 4 and 8 bits, group sizes 32-128, features that part-fill a warp's
    16, and warp counts and unrolls that leave steps over (K steps not a multiple of NW * U)."""
    from engine import qgemm, qgemv
    staged = qgemv.SOURCE_STAGED.replace("extern __shared__ __align__(16) unsigned char smem[];",
                                         "alignas(16) static unsigned char smem[1 << 18];")
    assert staged != qgemv.SOURCE_STAGED
    return UNOPTIMIZED + PRELUDE + pd.VEC_HEADER + QGEMM_PRELUDE + QUANT_PROBLEM + qgemm.UNPACK + r"""
    template <typename T, int K, int BITS, int GS, bool BF16, int NW, int U, bool FAST, bool SWIGLU>
    void qv(const T* x, const int* x_shape, const unsigned* w, const int* w_shape, const T* scales, const T* biases,
            T* y) { """ + qgemv.SOURCE + r""" }
    std::mt19937 rng(11);
    template <int K, int M, int BITS, int GS, int NW, int U, bool FAST = true, bool SW = false> void qgemv_case(int N) {
      QuantProblem p(rng, M, N, K, BITS, GS);
      if (SW) p.swiglu();
      int xs[2] = {M, K}, ws[2] = {N, K * BITS / 32};
      launch((N + 15) / 16, NW * 32, [&] { qv<bf, K, BITS, GS, true, NW, U, FAST, SW>(p.x.data(), xs, p.w.data(), ws, p.s.data(), p.c.data(), p.y.data()); });
      printf("%sqgemv%d K %d M %d GS %d NW %d U %d fast %d N %d: rel err %.2e\n", SW ? "swiglu " : "", BITS, K, M, GS, NW, U, (int)FAST, N, p.rel_err());
    }
    template <typename T, int K, int BITS, int GS, bool BF16, int NW, int S, int XR, bool FAST, bool SWIGLU>
    void qvs(const T* x, const int* x_shape, const unsigned* w, const int* w_shape, const T* scales, const T* biases,
             T* y) { """ + staged + r""" }
    template <int K, int M, int BITS, int GS, int NW, int S, int XR, bool SW = false> void staged_case(int N) {
      QuantProblem p(rng, M, N, K, BITS, GS);
      if (SW) p.swiglu();
      int xs[2] = {M, K}, ws[2] = {N, K * BITS / 32};
      launch((N + 15) / 16, NW * 32, [&] { qvs<bf, K, BITS, GS, true, NW, S, XR, true, SW>(p.x.data(), xs, p.w.data(), ws, p.s.data(), p.c.data(), p.y.data()); });
      printf("%sstaged%d K %d M %d GS %d NW %d S %d XR %d N %d: rel err %.2e\n", SW ? "swiglu " : "", BITS, K, M, GS, NW, S, XR, N, p.rel_err());
    }
    int main() {
      staged_case<512, 1, 4, 64, 1, 2, 1>(40); staged_case<1024, 3, 4, 32, 2, 3, 4>(24);
      staged_case<2048, 8, 8, 128, 2, 2, 8>(16); staged_case<1536, 5, 4, 64, 2, 3, 0>(20);
      staged_case<1024, 2, 4, 64, 4, 2, 2>(17); staged_case<1024, 7, 8, 32, 2, 4, 8>(9);
      staged_case<4096, 1, 4, 64, 4, 3, 1>(32);
      qgemv_case<512, 1, 4, 64, 1, 4>(40); qgemv_case<640, 3, 4, 32, 2, 2>(24);
      qgemv_case<1024, 8, 4, 128, 4, 1>(16); qgemv_case<384, 5, 8, 64, 2, 4>(20);
      qgemv_case<896, 8, 8, 32, 4, 2>(9); qgemv_case<256, 2, 4, 64, 1, 1, false>(17);
      qgemv_case<1664, 7, 4, 32, 2, 2>(17); qgemv_case<2048, 1, 8, 64, 2, 4>(16);
      // SwiGLU epilogue (gate|up in runs of 8): one row staged, 1-8 rows direct
      staged_case<4096, 1, 4, 64, 4, 3, 1, true>(48); staged_case<1024, 1, 8, 32, 2, 2, 0, true>(32);
      qgemv_case<640, 3, 4, 32, 2, 2, true, true>(32); qgemv_case<1024, 8, 4, 64, 4, 1, true, true>(48);
    }
    """


def run_qgemv(workdir: Path) -> list[tuple[str, float]]:
    """Compile and run the qgemv emulation; (case, relative error) per case."""
    return rel_errs(_compile_and_run(workdir, "qgemv", qgemv_source()))


def fused_source() -> str:
    """The C++ program for engine/fused_ops.py's kernels against double-precision references,
    with shapes that leave threads of the last block idle."""
    from engine import fused_ops as fo
    return PRELUDE + pd.VEC_HEADER + f"""
    constexpr int EPS_BITS = {fo.float_bits(1e-5)}, LB_BITS = {fo.float_bits(math.log2(10000.0))};
    """ + r"""
    template <typename T, int H, int NT, int EPS_BITS>
    void add_rms_norm(const T* x, const T* y, const T* w, T* h, T* n) { """ + \
        fo.SOURCES["add_rms_norm"] + r""" }
    template <typename T, int NH, int KVH, int D, int HG, int LOG2_BASE_BITS>
    void qkv_rope(const T* qkv, const int* positions, const long* positions_shape,
                  T* q, T* k, T* v) { """ + fo.SOURCES["qkv_rope"] + r""" }
    template <typename T, int NH, int KVH, int D, int HG, int LOG2_BASE_BITS>
    void qkv_rope_store(const T* qkv, const int* positions, const long* positions_shape,
                        const int* slots, const T* k_pool, const T* v_pool, T* q) { """ + fo.SOURCES["qkv_rope_store"] + r""" }
    template <typename T, int I, int RUN>
    void swiglu(const T* gu, const long* gu_shape, T* out) { """ + fo.SOURCES["swiglu"] + r""" }
    std::mt19937 rng(5);
    std::normal_distribution<float> nd;
    double max_err(const float* y, const std::vector<double>& ref) {
      double e = 0; for (size_t i = 0; i < ref.size(); ++i) e = max(e, fabs(y[i] - ref[i])); return e; }
    template <int H> void norm_case(int rows) {
      std::vector<float> x(rows * H), y(rows * H), w(H), h(rows * H), n(rows * H); float eps = 1e-5f;
      for (auto& v : x) v = nd(rng); for (auto& v : y) v = nd(rng); for (auto& v : w) v = nd(rng);
      std::vector<double> rh(rows * H), rn(rows * H);
      for (int r = 0; r < rows; ++r) { double ss = 0;
        for (int i = 0; i < H; ++i) { rh[r * H + i] = (double)x[r * H + i] + y[r * H + i]; ss += rh[r * H + i] * rh[r * H + i]; }
        for (int i = 0; i < H; ++i) rn[r * H + i] = rh[r * H + i] / sqrt(ss / H + eps) * w[i]; }
      launch(rows, 256, [&] { add_rms_norm<float, H, 256, EPS_BITS>(x.data(), y.data(), w.data(), h.data(), n.data()); });
      printf("add_rms_norm H %d rows %d: max err %.2e\n", H, rows, max(max_err(h.data(), rh), max_err(n.data(), rn)));
    }
    template <int NH, int KVH, int D> void rope_case(int T_) {
      constexpr int HS = NH + 2 * KVH;
      std::vector<float> qkv(T_ * HS * D), q(T_ * NH * D), k(T_ * KVH * D), v(T_ * KVH * D);
      std::vector<int> pos(T_); long pshape[1] = {T_}; float lb = std::log2(10000.0);
      for (auto& x : qkv) x = nd(rng); for (int t = 0; t < T_; ++t) pos[t] = (t * 37) % 301;
      std::vector<double> rq(q.size()), rk(k.size()), rv(v.size());
      for (int t = 0; t < T_; ++t) for (int hs = 0; hs < HS; ++hs) for (int i = 0; i < D / 2; ++i) {
        const float* s = &qkv[(t * HS + hs) * D]; double a = s[i], b = s[i + D / 2];
        double th = pos[t] * pow(10000.0, -(double)i / (D / 2)), c = cos(th), sn = sin(th);
        if (hs >= NH + KVH) { rv[(t * KVH + hs - NH - KVH) * D + i] = a; rv[(t * KVH + hs - NH - KVH) * D + i + D / 2] = b; continue; }
        double* o = hs < NH ? &rq[(t * NH + hs) * D] : &rk[(t * KVH + hs - NH) * D];
        o[i] = a * c - b * sn; o[i + D / 2] = a * sn + b * c; }
      constexpr int HG = HS % 8 == 0 ? 8 : HS % 4 == 0 ? 4 : HS % 2 == 0 ? 2 : 1;  // rope_heads_per_thread
      int threads = T_ * (HS / HG) * (D / 4);
      launch((threads + 255) / 256, 256, [&] { qkv_rope<float, NH, KVH, D, HG, LB_BITS>(qkv.data(), pos.data(), pshape, q.data(), k.data(), v.data()); });
      printf("qkv_rope NH %d KVH %d D %d T %d: max err %.2e\n", NH, KVH, D, T_,
             max(max_err(q.data(), rq), max(max_err(k.data(), rk), max_err(v.data(), rv))));
      // In place: tokens' K/V go to scrambled pool rows; every other row keeps its value.
      const int rows = 2 * T_ + 3;
      std::vector<int> slots(T_); for (int t = 0; t < T_; ++t) slots[t] = (t * 5 + 2) % rows;
      std::vector<float> kp(rows * KVH * D), vp(rows * KVH * D), q2(q.size());
      for (auto& x : kp) x = nd(rng); for (auto& x : vp) x = nd(rng);
      std::vector<double> rkp(kp.begin(), kp.end()), rvp(vp.begin(), vp.end());
      for (int t = 0; t < T_; ++t) for (int j = 0; j < KVH * D; ++j) {
        rkp[slots[t] * KVH * D + j] = rk[t * KVH * D + j]; rvp[slots[t] * KVH * D + j] = rv[t * KVH * D + j]; }
      launch((threads + 255) / 256, 256, [&] { qkv_rope_store<float, NH, KVH, D, HG, LB_BITS>(qkv.data(), pos.data(), pshape, slots.data(), kp.data(), vp.data(), q2.data()); });
      printf("qkv_rope_store NH %d KVH %d D %d T %d: max err %.2e\n", NH, KVH, D, T_,
             max(max_err(q2.data(), rq), max(max_err(kp.data(), rkp), max_err(vp.data(), rvp))));
    }
    template <int I, int RUN = I> void swiglu_case(int rows) {
      std::vector<float> gu(rows * 2 * I), out(rows * I); std::vector<double> ref(rows * I); long shape[2] = {rows, 2 * I};
      for (auto& x : gu) x = nd(rng);
      for (int r = 0; r < rows; ++r) for (int j = 0; j < I; ++j) {
        const long gi = r * 2 * I + j / RUN * 2 * RUN + j % RUN;
        double g = gu[gi], u = gu[gi + RUN]; ref[r * I + j] = g / (1 + exp(-g)) * u; }
      int threads = rows * I / 4;
      launch((threads + 255) / 256, 256, [&] { swiglu<float, I, RUN>(gu.data(), shape, out.data()); });
      printf("swiglu I %d RUN %d rows %d: max err %.2e\n", I, RUN, rows, max_err(out.data(), ref));
    }
    int main() {
      norm_case<64>(3); norm_case<4096>(2); norm_case<1028>(1);
      rope_case<4, 2, 16>(5); rope_case<8, 2, 128>(3);  // 8 and 12 heads: 8 and 4 a thread
      rope_case<3, 1, 16>(4); rope_case<6, 2, 32>(3);   // 5 and 10 heads: 1 and 2 a thread
      swiglu_case<36>(3); swiglu_case<1024>(2); swiglu_case<40, 8>(3); swiglu_case<1024, 8>(2);
    }
    """


def run_fused(workdir: Path) -> list[tuple[str, float]]:
    """Compile and run the fused-op emulation; (case, max abs error) per case."""
    out = _compile_and_run(workdir, "fused", fused_source())
    return max_errs(out)


# ldmatrix by one warp: each lane posts its row address, then takes its fragment of the four
# 8x8 matrices (rows addressed by lanes 8i..8i+7): row l / 4, columns 2 (l % 4) and +1, or
# with .trans column l / 4, rows 2 (l % 4) and +1.
LDMATRIX_PRELUDE = r"""
    const unsigned short* ldsm_rows[32][32];
    template <bool TRANS> void ldsm(unsigned* r, const void* p) {
      int w = threadIdx.x >> 5, l = threadIdx.x & 31;
      if ((uintptr_t)p % 16) { printf("misaligned ldmatrix row\n"); abort(); }
      ldsm_rows[w][l] = (const unsigned short*)p; warp_bar[w]->arrive_and_wait();
      int g = l >> 2, t = l & 3;
      for (int i = 0; i < 4; ++i) {
        const unsigned short lo = TRANS ? ldsm_rows[w][8 * i + 2 * t][g] : ldsm_rows[w][8 * i + g][2 * t];
        const unsigned short hi = TRANS ? ldsm_rows[w][8 * i + 2 * t + 1][g] : ldsm_rows[w][8 * i + g][2 * t + 1];
        r[i] = lo | ((unsigned)hi << 16); }
      warp_bar[w]->arrive_and_wait();
    }
    inline void ldsm_x4(unsigned* r, const void* p) { ldsm<false>(r, p); }
    inline void ldsm_x4_t(unsigned* r, const void* p) { ldsm<true>(r, p); }
    """


def prefill_source() -> str:
    """The C++ program for engine/paged_prefill.py's kernel (bf16) against a double-precision
    reference: chunks of 1 to 150 queries (part-filled tiles and warps, several tiles of one
    chunk) with and without a cached past, over scrambled blocks, causal and windowed (a
    chunk longer than the window, live keys starting mid-table), GQA 2 and 4."""
    from engine import paged_prefill as pp
    src = pp.SOURCE.replace("extern __shared__ __align__(16) unsigned char smem[];",
                            "alignas(16) static unsigned char smem[1 << 18];")
    assert src != pp.SOURCE
    consts = f"constexpr int BKV = {pp.BKV};\n"
    return PRELUDE + QGEMM_PRELUDE + LDMATRIX_PRELUDE + consts + r"""
    using bf = __nv_bfloat16;
    template <typename T, bool BF16, int D, int KVH, int GQA, int BS, int WINDOW, int BQ, int STAGES>
    void pf(const T* q, const T* k_pool, const T* v_pool, const int* tables, const int* tables_shape,
            const int* seqs, const int* tiles, T* out) { """ + src + r""" }
    std::mt19937 rng(3);
    template <int D, int KVH, int GQA, int BS, int WINDOW, int BQ = 64, int STAGES = 2>
    void prefill_case(std::vector<int> qlens, std::vector<int> pos0) {
      constexpr int H = KVH * GQA;
      const int G = qlens.size();
      std::normal_distribution<float> nd;
      std::vector<int> kstart(G), nblocks(G), seqs(4 * G), tiles;
      int T_ = 0, W = 0, total = 0;
      for (int s = 0; s < G; ++s) {  // live keys from the block of the first query's window
        kstart[s] = WINDOW ? std::max(0, pos0[s] + 1 - WINDOW) / BS * BS : 0;
        nblocks[s] = (pos0[s] + qlens[s] - 1) / BS - kstart[s] / BS + 1;
        W = std::max(W, nblocks[s]); total += nblocks[s];
        seqs[4 * s] = T_; seqs[4 * s + 1] = qlens[s]; seqs[4 * s + 2] = pos0[s]; seqs[4 * s + 3] = kstart[s];
        for (int r = 0; r < qlens[s]; r += BQ) { tiles.push_back(s); tiles.push_back(r); }
        T_ += qlens[s];
      }
      const int nb = total + 3;  // scrambled: block ids 1.. in a random order, 0 unused
      std::vector<int> perm(nb - 1); for (int i = 0; i < nb - 1; ++i) perm[i] = i + 1;
      std::shuffle(perm.begin(), perm.end(), rng);
      std::vector<int> tables(G * W, 0); int used = 0;
      for (int s = 0; s < G; ++s) for (int b = 0; b < nblocks[s]; ++b) tables[s * W + b] = perm[used++];
      std::vector<bf> kp((long)nb * BS * KVH * D), vp(kp.size()), q((long)T_ * H * D), out(q.size(), bf(NAN));
      for (auto& x : kp) x = bf(nd(rng)); for (auto& x : vp) x = bf(nd(rng)); for (auto& x : q) x = bf(nd(rng));
      int tshape[2] = {G, W};
      const int nt = tiles.size() / 2;
      for (int hy = 0; hy < H; ++hy)
        launch(nt, 2 * BQ, [&, hy] { blockIdx.y = hy; pf<bf, true, D, KVH, GQA, BS, WINDOW, BQ, STAGES>(q.data(), kp.data(), vp.data(), tables.data(), tshape, seqs.data(), tiles.data(), out.data()); }, H);
      double err = 0;
      for (int s = 0; s < G; ++s) for (int r = 0; r < qlens[s]; ++r) for (int h = 0; h < H; ++h) {
        const int qp = pos0[s] + r, kv = h / GQA;
        std::vector<double> w; std::vector<long> rows; double mx = -1e300;
        for (int p = kstart[s]; p <= qp; ++p) {
          if (WINDOW && p <= qp - WINDOW) continue;
          const long row = ((long)tables[s * W + p / BS - kstart[s] / BS] * BS + p % BS) * KVH + kv;
          double d = 0; for (int e = 0; e < D; ++e) d += (double)(float)q[((long)(seqs[4 * s] + r) * H + h) * D + e] * (float)kp[row * D + e];
          w.push_back(d / sqrt((double)D)); rows.push_back(row); mx = std::max(mx, w.back()); }
        double sum = 0; for (auto& x : w) { x = exp(x - mx); sum += x; }
        for (int e = 0; e < D; ++e) {
          double o = 0; for (size_t i = 0; i < w.size(); ++i) o += w[i] / sum * (float)vp[rows[i] * D + e];
          const float got = out[((long)(seqs[4 * s] + r) * H + h) * D + e];
          err = std::max(err, std::isnan(got) ? 1e9 : fabs(got - o)); } }
      printf("prefill D %d KVH %d GQA %d BS %d window %d BQ %d stages %d chunks %d: max err %.2e\n", D, KVH, GQA, BS, WINDOW, BQ, STAGES, G, err);
    }
    int main(int argc, char** argv) {  // argv[1]: the digits of the cases to run (all if none)
      auto on = [&](char c) { return argc < 2 || strchr(argv[1], c) != nullptr; };
      if (on('0')) prefill_case<32, 2, 2, 16, 0>({70, 5, 1, 130}, {0, 37, 200, 16});
      if (on('1')) prefill_case<32, 2, 2, 16, 24>({70, 5, 1, 130}, {0, 37, 200, 90});
      if (on('2')) prefill_case<64, 1, 4, 8, 0>({64, 17}, {0, 100});
      if (on('3')) prefill_case<32, 1, 2, 16, 40>({150, 3}, {10, 300});
      if (on('4')) prefill_case<32, 2, 2, 16, 24, 128, 2>({70, 5, 1, 130}, {0, 37, 200, 90});
      if (on('5')) prefill_case<32, 1, 2, 16, 40, 64, 1>({150, 3}, {10, 300});
      // a window wider than a tile: whole tiles inside every row's window skip the mask
      if (on('6')) prefill_case<32, 1, 2, 16, 200>({40, 150}, {300, 10});
    }
    """


def run_prefill(workdir: Path, cases: str = "") -> list[tuple[str, float]]:
    """Compile and run the prompt-attention emulation; (case, max abs error) per case run
    (`cases`: the digits of those to run, as prefill_source's main numbers them; all if
    empty)."""
    out = _compile_and_run(workdir, "prefill", prefill_source(), *([cases] if cases else []))
    return max_errs(out)


def decode_tc_source() -> str:
    """The C++ program for engine/paged_decode.py's v4 (tensor cores, bf16) against a
    double-precision reference on bf16 data: one split (final), 3 and 8 splits (partials,
    then the merge kernel) and the ROPE form (its written K/V rows compared too), windows
    none / shorter than a tile / longer, sequences starting mid-table, GQA 1, 3, 4 and 8."""
    from engine.fused_ops import float_bits
    params = ("const T* queries, const T* k_pool, const T* v_pool, const int* block_tables, "
              "const int* key_start, const int* q_pos, const long* q_pos_shape, "
              "const long* block_tables_shape")
    rope_params = params.replace("const T* queries", "const T* qkv").replace(
        "const int* q_pos,", "const int* q_pos, const int* slots,")
    tmpl = "template <typename T, bool BF16, int D, int BS, int KVH, int GQA, int NUM_WARPS, int WINDOW>"
    return PRELUDE + QGEMM_PRELUDE + LDMATRIX_PRELUDE + pd.VEC_HEADER + f"""
    constexpr int STAGES = {pd.STAGES}, UNROLL = 4, V_BATCH = 0;
    constexpr int LOG2_BASE_BITS = {float_bits(math.log2(10000.0))};
    {tmpl}
    void final_v4({params}, T* out) {{ {_kernel_body("v4", pd._FINAL)} }}
    {tmpl}
    void part_v4({params}, float* part_acc, float* part_m, float* part_l) {{ {_kernel_body("v4", pd._PARTIAL)} }}
    {tmpl}
    void rope_v4({rope_params}, T* out) {{ {_kernel_body("v4", pd._FINAL, rope=True)} }}
    template <typename T, int D, int GQA>
    void merge(const float* part_acc, const float* part_m, const float* part_l, const long* part_m_shape, T* out) {{
    {pd._MERGE}
    }}
    """ + r"""
    using bf = __nv_bfloat16;
    std::mt19937 rng(5);
    template <int D, int BS, int KVH, int GQA, int NW, int WINDOW> void dcase() {
      std::normal_distribution<float> nd;
      const int lens[] = {1, 5, 4, 19, 170}; const int G = 5; const int MAXB = 50;
      const int num_blocks = G * MAXB + 1;
      std::vector<bf> kp((long)num_blocks * BS * KVH * D), vp(kp.size()), q(G * KVH * GQA * D);
      for (auto& x : kp) x = bf(nd(rng)); for (auto& x : vp) x = bf(nd(rng)); for (auto& x : q) x = bf(nd(rng));
      std::vector<int> perm(num_blocks - 1); for (int i = 0; i < num_blocks - 1; ++i) perm[i] = i + 1;
      std::shuffle(perm.begin(), perm.end(), rng);
      std::vector<int> tables(G * MAXB, 0), kstart(G), qpos(G);
      for (int i = 0; i < G; ++i) {
        int n = lens[i]; qpos[i] = n - 1;
        int first = WINDOW ? max(0, n - WINDOW) / BS : 0; kstart[i] = first * BS;
        int nb = (n + BS - 1) / BS - first;
        for (int j = 0; j < nb; ++j) tables[i * MAXB + j] = perm[i * MAXB + j];
      }
      auto attend = [&](const std::vector<bf>& q, const std::vector<bf>& kp, const std::vector<bf>& vp) {
        std::vector<double> ref(G * KVH * GQA * D, 0.0);
        for (int i = 0; i < G; ++i) for (int g = 0; g < KVH; ++g) for (int h = 0; h < GQA; ++h) {
          int lo = kstart[i]; if (WINDOW) lo = max(lo, qpos[i] - WINDOW + 1);
          std::vector<double> s; double mx = -1e30;
          for (int p = lo; p <= qpos[i]; ++p) {
            int blk = tables[i * MAXB + p / BS - kstart[i] / BS];
            const bf* k = &kp[((long)(blk * BS + p % BS) * KVH + g) * D];
            const bf* qq = &q[((i * KVH + g) * GQA + h) * D];
            double d = 0; for (int e = 0; e < D; ++e) d += (double)(float)qq[e] * (float)k[e];
            s.push_back(d / sqrt((double)D)); mx = std::max(mx, s.back()); }
          double den = 0; for (auto& x : s) { x = exp(x - mx); den += x; }
          for (int p = lo, j = 0; p <= qpos[i]; ++p, ++j) {
            int blk = tables[i * MAXB + p / BS - kstart[i] / BS];
            const bf* v = &vp[((long)(blk * BS + p % BS) * KVH + g) * D];
            for (int e = 0; e < D; ++e) ref[((i * KVH + g) * GQA + h) * D + e] += s[j] / den * (float)v[e]; }
        }
        return ref; };
      auto max_err = [](const std::vector<double>& want, const std::vector<bf>& got) {
        double err = 0;
        for (size_t e = 0; e < want.size(); ++e) { float v = got[e]; err = std::max(err, std::isnan(v) ? 1e9 : fabs(v - want[e])); }
        return err; };
      const std::vector<double> ref = attend(q, kp, vp);
      long qshape[1] = {G}, tshape[2] = {G, MAXB};
      for (int splits : {1, 3, 8}) {
        std::vector<bf> out(ref.size(), bf(NAN));
        if (splits == 1) {
          launch(G * KVH, 32 * NW, [&] { final_v4<bf, true, D, BS, KVH, GQA, NW, WINDOW>(q.data(), kp.data(), vp.data(), tables.data(), kstart.data(), qpos.data(), qshape, tshape, out.data()); });
        } else {
          long rows = (long)G * KVH * splits * GQA;
          std::vector<float> pa(rows * D), pm(rows), pl(rows);
          launch(G * KVH * splits, 32 * NW, [&] { part_v4<bf, true, D, BS, KVH, GQA, NW, WINDOW>(q.data(), kp.data(), vp.data(), tables.data(), kstart.data(), qpos.data(), qshape, tshape, pa.data(), pm.data(), pl.data()); });
          long pms[1] = {rows};
          launch(G * KVH * GQA, D, [&] { merge<bf, D, GQA>(pa.data(), pm.data(), pl.data(), pms, out.data()); });
        }
        printf("v4 D %d GQA %d window %d splits %d: max err %.2e\n", D, GQA, WINDOW, splits, max_err(ref, out));
      }
      {  // ROPE form: q|k|v before RoPE in; the token's K (rotated) and V written into its slot
        constexpr int HS = KVH * GQA + 2 * KVH;
        std::vector<bf> qkv(G * HS * D), qr(q.size()), kp2 = kp, vp2 = vp, kpw = kp, vpw = vp;
        std::vector<int> slots(G);
        for (auto& x : qkv) x = bf(nd(rng));
        for (int i = 0; i < G; ++i) {
          slots[i] = tables[i * MAXB + qpos[i] / BS - kstart[i] / BS] * BS + qpos[i] % BS;
          for (int hs = 0; hs < HS; ++hs) for (int e = 0; e < D / 2; ++e) {
            double a = (float)qkv[(i * HS + hs) * D + e], c = (float)qkv[(i * HS + hs) * D + e + D / 2];
            double th = qpos[i] * pow(10000.0, -(double)e / (D / 2)), r1 = a, r2 = c;
            if (hs < KVH * GQA + KVH) { r1 = a * cos(th) - c * sin(th); r2 = a * sin(th) + c * cos(th); }
            bf* dst = hs < KVH * GQA ? &qr[(i * KVH * GQA + hs) * D]
                    : &(hs < KVH * GQA + KVH ? kpw : vpw)[((long)slots[i] * KVH + (hs - KVH * GQA) % KVH) * D];
            dst[e] = bf((float)r1); dst[e + D / 2] = bf((float)r2); } }
        const std::vector<double> want = attend(qr, kpw, vpw);
        std::vector<bf> out(want.size(), bf(NAN));
        launch(G * KVH, 32 * NW, [&] { rope_v4<bf, true, D, BS, KVH, GQA, NW, WINDOW>(qkv.data(), kp2.data(), vp2.data(), tables.data(), kstart.data(), qpos.data(), slots.data(), qshape, tshape, out.data()); });
        double err = max_err(want, out);
        for (size_t e = 0; e < kp.size(); ++e)  // a rounding apart at most: both round a float rotation
          err = std::max(err, std::max(fabs((float)kp2[e] - (float)kpw[e]), fabs((float)vp2[e] - (float)vpw[e])) / 64);
        printf("ropev4 D %d GQA %d window %d splits 1: max err %.2e\n", D, GQA, WINDOW, err);
      }
    }
    int main() {
      dcase<64, 4, 2, 3, 2, 0>(); dcase<64, 4, 2, 3, 2, 7>(); dcase<64, 4, 2, 3, 2, 50>();
      dcase<32, 8, 1, 8, 2, 0>(); dcase<128, 16, 2, 4, 2, 40>(); dcase<32, 4, 3, 1, 4, 0>();
    }
    """


def run_decode_tc(workdir: Path) -> list[tuple[str, float]]:
    """Compile and run the v4 emulation; (case, max abs error) per case."""
    return max_errs(_compile_and_run(workdir, "decode_tc", decode_tc_source()))
