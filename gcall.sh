L=$OUT/log.txt; s() { echo "== $1 $(date +%T)" >> $L; }
s w2prof; python3 -m loadtest.offline_bench --shape 7b --dtype bfloat16 --no-peer --num-prompts 64 --input-len 1024 --output-len 256 --max-num-seqs 64 --profile 45 >> $L 2>&1
s b64; python3 -m loadtest.gpu_trace --shape 7b --dtype bfloat16 --batch 64 --context 1024 --steps 20 --variants chosen >> $L 2>&1
s done
