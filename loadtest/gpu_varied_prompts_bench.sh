# gRPC serving with varied prompt lengths, the paged prompt kernel against gather + cuDNN SDPA
# (MISTRAL_SERVE_PREFILL_KERNEL=0), on the same 7B-shape random checkpoint and the same
# prompts: cuDNN builds a graph for every new prompt shape, which shows in time to first token.
#   OUT=results bash loadtest/gpu_varied_prompts_bench.sh     (needs the CUDA build of MLX; see README)
set -e
OUT=${OUT:-loadtest/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/proto
python3 -m service.cli demo-model --out /tmp/m7b --layers 32 --hidden 4096 --heads 32 --kv-heads 8 --intermediate 14336 --dtype bfloat16 > /dev/null
for K in 1 0; do
  MISTRAL_SERVE_PREFILL_KERNEL=$K python3 -m service.cli serve --model /tmp/m7b --port 50051 --metrics-port 9400 --max-num-seqs 128 --max-num-batched-tokens 4096 --kv-cache-memory 8 --max-waiting 4096 > /tmp/serve$K.log 2>&1 &
  for i in $(seq 1 120); do python3 -c "import grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')); assert c.Check(h.HealthCheckRequest(service=''), timeout=1).status==1" 2>/dev/null && break; sleep 1; done; echo "MISTRAL_SERVE_PREFILL_KERNEL=$K: server up after $i s"
  python3 -m loadtest.serve_bench --target 127.0.0.1:50051 --dataset random --random-input-len 256 --random-output-len 16 --num-prompts 8 --max-concurrency 8 --ignore-eos --no-progress > /dev/null
  python3 -m loadtest.serve_bench --target 127.0.0.1:50051 --metrics-url http://127.0.0.1:9400/metrics --dataset random --random-input-len 1024 --random-range-ratio 0.5 --random-output-len 128 --num-prompts 64 --max-concurrency 64 --request-rate 16 --ignore-eos --seed 1 --metric-percentiles 50,99 --no-progress --result-file $OUT/grpc_varied_prefill_kernel_$K.json
  kill %1; sleep 6; pkill -9 -f "service.cli serve" || true; sleep 1
  grep -i "prompt attention" /tmp/serve$K.log | head -1
done
