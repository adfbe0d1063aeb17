# gRPC serving vs the offline engine on the same 7B-shape random checkpoint, one GPU run:
#   OUT=results [STREAM_INTERVAL=N] [ENGINE_THREAD=1] bash loadtest/gpu_grpc_bench.sh     (needs the CUDA build of MLX; see README)
set -e
OUT=${OUT:-loadtest/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/proto
python3 -c "import google.protobuf; print('protobuf', google.protobuf.__version__)"
t=$(date +%s); python3 -m service.cli demo-model --out /tmp/m7b --layers 32 --hidden 4096 --heads 32 --kv-heads 8 --intermediate 14336 --dtype bfloat16 > /dev/null; echo "wrote 7b demo in $(( $(date +%s) - t )) s"
python3 -m service.cli serve --model /tmp/m7b --port 50051 --metrics-port 9400 --max-num-seqs 128 --max-num-batched-tokens 4096 --kv-cache-memory 8 --max-waiting 4096 --stream-interval ${STREAM_INTERVAL:-1} ${ENGINE_THREAD:+--no-engine-process} > /tmp/serve.log 2>&1 &
for i in $(seq 1 120); do python3 -c "import grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')); assert c.Check(h.HealthCheckRequest(service=''), timeout=1).status==1" 2>/dev/null && break; sleep 1; done; echo "server up after $i s"
python3 -m loadtest.serve_bench --target 127.0.0.1:50051 --metrics-url http://127.0.0.1:9400/metrics --dataset random --random-input-len 256 --random-output-len 128 --num-prompts 16 --max-concurrency 16 --no-progress > /dev/null
python3 -m loadtest.serve_bench --target 127.0.0.1:50051 --metrics-url http://127.0.0.1:9400/metrics --dataset random --random-input-len 256 --random-output-len 128 --num-prompts 128 --max-concurrency 128 --request-rate inf --no-progress --result-file $OUT/grpc_w1.json
kill %1; sleep 2
timeout 150 python3 -m loadtest.offline_bench --model /tmp/m7b --dtype bfloat16 --num-prompts 128 --input-len 256 --output-len 128 --max-num-seqs 128 --no-peer --json $OUT/offline_w1_same_ckpt.json | tail -3
tail -5 /tmp/serve.log
