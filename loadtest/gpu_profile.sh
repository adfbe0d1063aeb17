# GPU measurements in few calls (needs the CUDA build of MLX; see ../shared/device/README.md):
#   OUT=results bash loadtest/gpu_profile.sh STEP...
# STEPs: diag tests ktests ftests ptests dtests qtests qkern q4deq q4qgemm ablate producer qvtests q4rep atrace fusedab trace why ops gemv splits qmm step overlap q4launch single w1 w2 q4 q4single grpc window (benchmarks run mlx-lm in the same process).
set -u
# 4-bit steps allow for start-up on a fresh machine: the self-checks compile every kernel
# variant a run can launch (49-76 s on an H200, tenth session; MLX caches only its own JIT
# kernels on disk, not mx.fast.cuda_kernel ones, so every fresh machine pays it).
OUT=${OUT:-loadtest/results}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/proto
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "card: $card"
case "$card" in *H200*) BW=4.8e12 ;; *) BW=3.35e12 ;; esac
B="python3 -m loadtest.offline_bench --shape 7b --dtype bfloat16"
for s in "$@"; do echo "== $s"; t0=$(date +%s); case $s in
  diag) python3 -m loadtest.gpu_diag ;;
  why) timeout 120 python3 -m pytest -q -x -p no:cacheprovider --tb=long tests/test_engine.py 2>&1 | grep -v "^\s*$" | tail -60 ;;
  grpc) OUT=$OUT timeout 300 bash loadtest/gpu_grpc_bench.sh 2>&1 | grep -v Warning | tail -40 ;;
  tests) timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=line tests/test_paged_kernel.py tests/test_gemv.py tests/test_fused_projections.py tests/test_engine.py 2>&1 | tail -8 ;;
  ftests) timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_fused_ops.py 2>&1 | tail -8 ;;
  fusedab) S="--bits 4 --num-prompts 1 --input-len 128 --output-len 256 --max-num-seqs 1 --no-peer"
           for v in "MISTRAL_SERVE_FUSED=1" "MISTRAL_SERVE_FUSED=0" "MLX_MAX_MB_PER_BUFFER=1000000" "MLX_USE_CUDA_GRAPHS=0"; do
             echo "bf16 single, $v"; env $v timeout 100 $B --num-prompts 1 --input-len 128 --output-len 256 --max-num-seqs 1 --no-peer | tail -1
             echo "4-bit single, $v"; env $v timeout 100 $B $S | tail -1; done ;;
  trace) timeout 200 python3 -m loadtest.gpu_trace --shape 7b --dtype bfloat16 --batch 1,64 --context 256 --steps 20
         timeout 240 python3 -m loadtest.gpu_trace --shape 7b --dtype bfloat16 --bits 4 --batch 1 --context 256 --steps 20 ;;
  ptests) timeout ${PTESTS_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_paged_kernel.py ${PTESTS_K:+-k "$PTESTS_K"} 2>&1 | tail -8 ;;
  atrace) T="python3 -m loadtest.gpu_trace --shape 7b --dtype bfloat16 --steps 20"
          timeout 200 $T --batch 1 --context 256 --variants chosen,unstaged ${ATRACE_B1---warps 4 --fused-ops 1,64}
          timeout 150 $T --batch 64 --context 1024 --variants ${ATRACE_B64:-chosen,unstaged,nofused} ;;
  dtests) timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_dequant.py 2>&1 | tail -5 ;;
  q4deq) timeout 240 python3 -m loadtest.gpu_trace --shape 7b --dtype bfloat16 --bits 4 --batch 64 --context 256 --steps 10 --variants chosen,dequant
         for v in 0 1; do echo "4-bit w1, MISTRAL_SERVE_DEQUANT_KERNEL=$v"; MISTRAL_SERVE_DEQUANT_KERNEL=$v timeout 240 $B --bits 4 --num-prompts 128 --input-len 256 --output-len 128 --max-num-seqs 128 --no-peer --json $OUT/w1_4bit_deq$v.json | tail -1; done ;;
  qkern) timeout 150 python3 -m loadtest.quant_kernels ;;
  qtests) timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_qgemm.py 2>&1 | tail -5 ;;
  q4qgemm) timeout 240 python3 -m loadtest.gpu_trace --shape 7b --dtype bfloat16 --bits 4 --batch 64,128 --context 256 --steps 10 --variants chosen,qgemm
         for v in 0 1; do echo "4-bit w1, MISTRAL_SERVE_QGEMM=$v"; MISTRAL_SERVE_QGEMM=$v timeout 240 $B --bits 4 --num-prompts 128 --input-len 256 --output-len 128 --max-num-seqs 128 --no-peer --json $OUT/w1_4bit_qgemm$v.json | tail -1; done ;;
  ablate) timeout 200 python3 -m loadtest.kernel_ablate --rows ${ABLATE_ROWS:-1,4,16,64,128} ;;
  # the wgmma GEMM's K-step phases, then its producer-warp form: correct (a broken mbarrier
  # hand-over hangs, hence the timeouts), profiled, and timed against the plain form ("WS")
  producer) timeout 150 python3 -m loadtest.wgmma_phases --rows 64,128 --shapes "gate|up,down"
            timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_qgemm.py -k producer 2>&1 | tail -5
            timeout 150 python3 -m loadtest.wgmma_phases --rows 64,128 --shapes "gate|up,down" --producer
            timeout 200 python3 -m loadtest.kernel_ablate --rows 64,128 --shapes "gate|up,down,qkv,o" --brief --sweep wgmma ;;
  ktests) timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_gemv.py 2>&1 | tail -8 ;;
  gemv) for bits in "" "--bits 4"; do timeout 200 python3 -m loadtest.op_profile --shape 7b --dtype bfloat16 $bits --gemv-rows 1,4 --bandwidth $BW; done ;;
  splits) timeout 100 python3 -m loadtest.op_profile --shape 7b --dtype bfloat16 --splits --batch 1,8,64 --context 1024 ;;
  ops) timeout 200 python3 -m loadtest.op_profile --shape 7b --dtype bfloat16 --batch 1,64 --context 1024 --bandwidth $BW ;;
  qmm) timeout 240 python3 -m loadtest.op_profile --shape 7b --dtype bfloat16 --bits 4 --qmm-rows 1,4,16,32,64,128,256,512,2048 ;;
  step) timeout 150 python3 -m loadtest.profile_step --shape 7b --dtype bfloat16 --batch 64 --context 1024 --steps 10 ;;
  overlap) timeout 150 python3 -m loadtest.profile_step --shape 7b --dtype bfloat16 --batch 1,64 --context 1024 --steps 40 --overlap
           timeout 240 python3 -m loadtest.profile_step --shape 7b --dtype bfloat16 --bits 4 --batch 1 --context 1024 --steps 40 --overlap ;;
  q4launch) for L in "2, 1, 4" "4, 1, 2"; do echo "QUANT_LAUNCH ($L)"; timeout 240 python3 -c "import sys, engine.gemv as g; g.QUANT_LAUNCH = ($L); from loadtest.offline_bench import main; sys.argv[1:] = '--shape 7b --dtype bfloat16 --bits 4 --num-prompts 1 --input-len 128 --output-len 256 --max-num-seqs 1 --no-peer'.split(); main()" | tail -2; done ;;
  single) timeout 120 $B --num-prompts 1 --input-len 128 --output-len 256 --max-num-seqs 1 --peer-batch-sizes 1 --json $OUT/single.json | tail -3 ;;
  w1) timeout 240 $B --num-prompts 128 --input-len 256 --output-len 128 --max-num-seqs 128 --peer-batch-sizes 64,128 --json $OUT/w1.json | tail -4 ;;
  w2) timeout 240 $B --num-prompts 64 --input-len 1024 --output-len 256 --max-num-seqs 64 --peer-batch-sizes 64 --json $OUT/w2.json | tail -3 ;;
  window) timeout 260 python3 -m loadtest.window_bench --shape 7b --dtype bfloat16 --num-seqs 32 --prompt-len ${WINDOW_PROMPT:-8192} --total-len 16384 | tail -14 ;;
  qvtests) timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_qgemv.py 2>&1 | tail -8 ;;
  q4rep) echo "4-bit, then bf16, single stream, 3 runs each (the 4-bit runs vary: host-paced)"
         timeout 240 $B --bits 4 --num-prompts 1 --input-len 128 --output-len 256 --max-num-seqs 1 --no-peer --repeat 3 --step-log | grep -v "^ *slowest" | tail -14
         timeout 80 $B --num-prompts 1 --input-len 128 --output-len 256 --max-num-seqs 1 --no-peer --repeat 3 | tail -3 ;;
  q4single) timeout 240 $B --bits 4 --num-prompts 1 --input-len 128 --output-len 256 --max-num-seqs 1 --no-peer --json $OUT/single_4bit.json | tail -2 ;;
  q4) timeout 300 $B --bits 4 --num-prompts 128 --input-len 256 --output-len 128 --max-num-seqs 128 --no-peer --json $OUT/w1_4bit.json | tail -2
      [ -n "${Q4_SINGLE:-}" ] && timeout 240 $B --bits 4 --num-prompts 1 --input-len 128 --output-len 256 --max-num-seqs 1 --no-peer --json $OUT/single_4bit.json | tail -2 ;;
esac; echo "   ($s: $(( $(date +%s) - t0 )) s)"; done
