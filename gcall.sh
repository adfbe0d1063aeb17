L=$OUT/log.txt
step() { echo "== $1 $(date +%T)" >> $L; }
step tests
timeout 150 python -m pytest tests/test_paged_kernel.py -k "staged" -q -x > $OUT/t1.txt 2>&1; tail -3 $OUT/t1.txt >> $L
step b64
timeout 170 python -m loadtest.gpu_trace --shape 7b --dtype bfloat16 --batch 64 --context 1024 --steps 20 --variants chosen --set paged_decode.STAGED=True --set "paged_decode.STAGED=True,paged_decode.STAGES=3" --set "paged_decode.STAGED=True,paged_decode.NUM_WARPS=8" > $OUT/b64.txt 2>&1; grep -E "^-- |paged_decode_att|after|Error|error" $OUT/b64.txt >> $L
step w2
timeout 120 python -m loadtest.offline_bench --shape 7b --dtype bfloat16 --num-prompts 64 --input-len 1024 --output-len 256 --max-num-seqs 64 --no-peer --step-log > $OUT/w2a.txt 2>&1; sed -n '/output tok/,$p' $OUT/w2a.txt >> $L; grep -E "Error|median|slowest" $OUT/w2a.txt >> $L
step w2staged
MISTRAL_SERVE_DECODE_STAGED=1 timeout 120 python -m loadtest.offline_bench --shape 7b --dtype bfloat16 --num-prompts 64 --input-len 1024 --output-len 256 --max-num-seqs 64 --no-peer --step-log > $OUT/w2b.txt 2>&1; sed -n '/output tok/,$p' $OUT/w2b.txt >> $L; grep -E "Error|median|slowest" $OUT/w2b.txt >> $L
step done
