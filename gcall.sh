L=$OUT/log.txt; s() { echo "== $1 $(date +%T)" >> $L; }
s tests; timeout 150 python3 -m pytest -q tests/test_decode_carry.py tests/test_compiled_decode.py -p no:cacheprovider >> $L 2>&1
B="python3 -m loadtest.offline_bench --shape 7b --dtype bfloat16"
s w2; $B --num-prompts 64 --input-len 1024 --output-len 256 --max-num-seqs 64 --peer-batch-sizes 64 --step-log --json $OUT/w2.json >> $L 2>&1
s w1; $B --num-prompts 128 --input-len 256 --output-len 128 --max-num-seqs 128 --peer-batch-sizes 128 --step-log --set sampling.ARGMAX_CHUNK=1024 --json $OUT/w1.json >> $L 2>&1
s trace128; python3 -m loadtest.gpu_trace --shape 7b --dtype bfloat16 --batch 128 --context 320 --steps 20 --variants chosen --set sampling.ARGMAX_CHUNK=1024 >> $L 2>&1
s done
