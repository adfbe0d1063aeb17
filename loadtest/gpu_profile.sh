# One GPU call: kernel tests, where a decode step's device time goes, and the offline
# benchmarks against mlx-lm (needs the CUDA build of MLX; see ../shared/device/README.md).
#   OUT=results bash loadtest/gpu_profile.sh [tests] [ops] [bench] [step]
set -u
OUT=${OUT:-loadtest/results}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/proto
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "card: $card"
case "$card" in *H200*) BW=4.8e12 ;; *) BW=3.35e12 ;; esac
want() { [ $# -eq 0 ] || [[ " $* " == *" $1 "* ]]; }
steps=${*:-tests ops bench step}
for s in $steps; do case $s in
  tests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_paged_kernel.py tests/test_fused_projections.py tests/test_engine.py 2>&1 | tail -4 ;;
  ops) timeout 200 python3 -m loadtest.op_profile --shape 7b --dtype bfloat16 --batch 1,64,128 --context 1024 --bandwidth $BW
       timeout 150 python3 -m loadtest.op_profile --shape 7b --dtype bfloat16 --bits 4 --batch 1,128 --context 256 --bandwidth $BW ;;
  bench) timeout 200 python3 -m loadtest.offline_bench --shape 7b --dtype bfloat16 --num-prompts 128 --input-len 256 --output-len 128 --max-num-seqs 128 --peer-batch-sizes 128 --json $OUT/w1.json | tail -4
         timeout 120 python3 -m loadtest.offline_bench --shape 7b --dtype bfloat16 --num-prompts 1 --input-len 128 --output-len 256 --max-num-seqs 1 --peer-batch-sizes 1 --json $OUT/single.json | tail -4 ;;
  step) timeout 150 python3 -m loadtest.profile_step --shape 7b --dtype bfloat16 --batch 64 --context 1024 --steps 10 ;;
esac; done
