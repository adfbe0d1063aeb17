"""--stream-interval N: the first token at once, then one message per N tokens, nothing lost."""

import asyncio

from mistral_serve.v1 import generation_pb2_grpc as pb_grpc
from tests.test_service_e2e import joined, request, start_server, stream_all


def test_stream_interval_groups_tokens_after_the_first(model_dir, tmp_path):
    server = start_server(model_dir, tmp_path, "--stream-interval", "4")
    try:
        async def main():
            async with server.channel() as ch:
                stub = pb_grpc.GenerationStub(ch)
                streams = await asyncio.gather(*[
                    stream_all(stub, request(f"Tell me about the number {i}.", max_tokens=n))
                    for i, n in enumerate((13, 1, 4, 9))])
                unary = await stub.Generate(request("Tell me about the number 0.", max_tokens=13))
                return streams, unary

        streams, unary = asyncio.run(main())
    finally:
        assert server.stop() == 0, server.log()
    for msgs, n in zip(streams, (13, 1, 4, 9)):
        counts = [len(m.token_ids) for m in msgs]
        assert sum(counts) == n, counts
        # After the first, every message but the last holds at least 4 tokens (more when the
        # client fell behind); the last holds what is left.
        assert all(c >= 4 for c in counts[1:-1]), counts
        assert len(msgs) <= 1 + -(-(n - 1) // 4), counts
        assert msgs[-1].usage.completion_tokens == n
    assert joined(streams[0])[0] == list(unary.token_ids)


def test_stream_interval_must_be_positive(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--stream-interval", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "stream_interval must be >= 1" in out.stderr
