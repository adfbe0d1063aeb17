L=$OUT/log.txt; s() { echo "== $1 $(date +%T)" >> $L; }
export MISTRAL_SERVE_LOG=info
s tests; timeout 120 python3 -m pytest -q tests/test_compiled_decode.py tests/test_sampling.py -p no:cacheprovider >> $L 2>&1
B="python3 -m loadtest.offline_bench --shape 7b --dtype bfloat16"
s w1; $B --num-prompts 128 --input-len 256 --output-len 128 --max-num-seqs 128 --peer-batch-sizes 128 --step-log --json $OUT/w1.json >> $L 2>&1
s w2; $B --num-prompts 64 --input-len 1024 --output-len 256 --max-num-seqs 64 --peer-batch-sizes 64 --step-log --json $OUT/w2.json >> $L 2>&1
s grpc; timeout 200 bash loadtest/gpu_grpc_bench.sh >> $L 2>&1
s done
