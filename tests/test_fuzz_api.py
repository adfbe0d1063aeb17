"""Hypothesis-generated requests against a real server: bad input is refused, never fatal.

Every GenerateRequest / TokenizeRequest that protobuf can carry (huge, negative, NaN and
infinite numbers, empty and unicode text, random token ids, many stop strings, long ids,
random chat roles) gets either a well-formed answer or INVALID_ARGUMENT with a message;
never INTERNAL, never a dead server. Examples come in small concurrent batches, so bad and
good requests share the engine. MISTRAL_SERVE_LONG=1 runs ten times more examples.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_serve.v1 import generation_pb2 as pb
from mistral_serve.v1 import generation_pb2_grpc as pb_grpc
from tests.test_service_e2e import request, start_server

LONG = os.environ.get("MISTRAL_SERVE_LONG") == "1"
EXAMPLES = 600 if LONG else 60
MAX_TOKENS_CAP = 24  # kept small so valid requests finish in milliseconds
MAX_PROMPT_TOKENS = 300
VOCAB = 32768
Code = grpc.StatusCode
ALLOWED = {Code.OK, Code.INVALID_ARGUMENT}
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- strategies ----------------------------------------------------------------------------
INT32 = st.integers(-2**31, 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
SPECIAL_FLOATS = [0.0, -0.0, 1.0, 0.5, 2.0, -1.0, 1e-45, 1e-30, 3.4e38, -3.4e38, 1e300,
                  math.nan, math.inf, -math.inf]
FLOATS = st.one_of(st.floats(width=32), st.sampled_from(SPECIAL_FLOATS),
                   st.floats(0, 2, width=32))
TRICKY = ["[INST]", "[/INST]", "</s>", "<s>", "<unk>", "\x00", "\n\n", "\u200b", "\ufeff",
          "é", "😀", "👩‍👩‍👧", "\u202e", "e\u0301", "中文", "\U0010ffff", " ", "\t"]
TEXT = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(TRICKY) | st.text(max_size=5), max_size=20).map("".join),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(50, 6000)),
)
TOKEN_ID = st.one_of(st.integers(0, 200), st.integers(0, VOCAB - 1), UINT32,
                     st.sampled_from([0, 1, 2, 3, VOCAB - 1, VOCAB, 2**32 - 1]))
ROLE = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=10),
                 st.sampled_from(["User", "tool", "", " user", "x" * 20000]))
CHAT = st.lists(st.tuples(ROLE, TEXT), max_size=6).map(
    lambda ms: pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in ms]))
REQUEST_ID = st.one_of(st.just(""), st.text(max_size=40), st.text(min_size=100, max_size=300))


def maybe(strategy):
    return st.none() | strategy


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    sp = pb.SamplingParams()
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        value = draw(maybe(FLOATS))
        if value is not None:
            setattr(sp, name, value)
    for name, strategy in (("top_k", INT32 | st.integers(0, 50)), ("seed", UINT64),
                           ("max_tokens", INT32 | st.integers(-1, MAX_TOKENS_CAP + 1)),
                           ("logprobs", INT32 | st.integers(-1, 25)),
                           ("ignore_eos", st.booleans())):
        value = draw(maybe(strategy))
        if value is not None:
            setattr(sp, name, value)
    sp.stop.extend(draw(st.lists(st.text(max_size=4) | TEXT, max_size=20)
                        | st.lists(st.text(min_size=1, max_size=3), min_size=10, max_size=40)))
    sp.stop_token_ids.extend(draw(st.lists(TOKEN_ID, max_size=40)))
    return sp


F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.float32(1e-45))  # the smallest positive (denormal) float32


def _edge_floats(lo: float, hi: float, *extra: float):
    """Floats in [lo, hi] with the ends, and a few awkward values, drawn often."""
    edges = [v for v in (lo, hi, F32_TINY, 1e-30, 1e-7, 0.5, 1.0, 2.0, 1e6, F32_MAX, *extra)
             if lo <= v <= hi]
    return st.sampled_from(edges) | st.floats(lo, hi, width=32)


@st.composite
def valid_sampling_params(draw) -> pb.SamplingParams:
    """Parameters the server must accept, at the edges of their ranges."""
    sp = pb.SamplingParams(
        top_k=draw(st.sampled_from([0, 1, 2, VOCAB - 1, VOCAB, 2**31 - 1]) | st.integers(0, 100)),
        min_p=draw(_edge_floats(0, 1)),
        presence_penalty=draw(_edge_floats(-2, 2, -F32_TINY)),
        frequency_penalty=draw(_edge_floats(-2, 2, -F32_TINY)),
        max_tokens=draw(st.integers(1, MAX_TOKENS_CAP)), ignore_eos=draw(st.booleans()))
    for name, strategy in (("temperature", _edge_floats(0, F32_MAX)),
                           ("top_p", _edge_floats(F32_TINY, 1)),
                           ("repetition_penalty", _edge_floats(F32_TINY, F32_MAX)),
                           ("seed", UINT64), ("logprobs", st.integers(0, 20))):
        value = draw(maybe(strategy))
        if value is not None:
            setattr(sp, name, value)
    sp.stop.extend(draw(st.lists(st.text(min_size=1, max_size=3)
                                 | st.text(min_size=1, max_size=256), max_size=16)))
    sp.stop_token_ids.extend(draw(st.lists(st.integers(0, VOCAB - 1), max_size=40)))
    return sp


PRINTABLE_ID = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl",
                                                           "Zp", "Zs")), max_size=100)
VALID_CHAT = st.tuples(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), TEXT),
                                max_size=4), TEXT).map(
    lambda t: pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in t[0]]
                              + [pb.ChatMessage(role="user", content=t[1])]))
_ids = iter(range(10**9))


@st.composite
def valid_generate_requests(draw) -> pb.GenerateRequest:
    """Well-formed requests with awkward content: most must be answered."""
    rid = draw(st.just("") | PRINTABLE_ID.map(lambda t: f"{t}#{next(_ids)}"))
    req = pb.GenerateRequest(request_id=rid, priority=draw(INT32))
    which = draw(st.sampled_from(["prompt", "chat", "token_ids"]))
    if which == "prompt":
        req.prompt = draw(TEXT.filter(bool))
    elif which == "chat":
        req.chat.CopyFrom(draw(VALID_CHAT))
    else:
        req.token_ids.ids.extend(draw(st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                               max_size=MAX_PROMPT_TOKENS)))
    if draw(st.booleans()):
        req.sampling.CopyFrom(draw(valid_sampling_params()))
    add_bos = draw(maybe(st.booleans()))
    if add_bos is not None:
        req.add_bos = add_bos
    return req


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    """Anything protobuf can carry."""
    req = pb.GenerateRequest(request_id=draw(REQUEST_ID), priority=draw(INT32))
    which = draw(st.sampled_from(["prompt", "chat", "token_ids", None]))
    if which == "prompt":
        req.prompt = draw(TEXT)
    elif which == "chat":
        req.chat.CopyFrom(draw(CHAT))
    elif which == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(TOKEN_ID, max_size=400)))
    if draw(st.booleans()):
        req.sampling.CopyFrom(draw(sampling_params()))
    add_bos = draw(maybe(st.booleans()))
    if add_bos is not None:
        req.add_bos = add_bos
    return req


@st.composite
def tokenize_requests(draw) -> pb.TokenizeRequest:
    req = pb.TokenizeRequest()
    which = draw(st.sampled_from(["text", "chat", None]))
    if which == "text":
        req.text = draw(TEXT)
    elif which == "chat":
        req.chat.CopyFrom(draw(CHAT))
    add_bos = draw(maybe(st.booleans()))
    if add_bos is not None:
        req.add_bos = add_bos
    return req


GENERATE = st.sampled_from(["Generate", "GenerateStream"])
CALLS = st.one_of(st.tuples(GENERATE, valid_generate_requests()),
                  st.tuples(GENERATE, generate_requests()),
                  st.tuples(st.just("Tokenize"), tokenize_requests()))


# ---- server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = start_server(model_dir, tmp_path_factory.mktemp("fuzz"), "--max-tokens-cap",
                     str(MAX_TOKENS_CAP), "--default-max-tokens", "8", "--max-prompt-tokens",
                     str(MAX_PROMPT_TOKENS))
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationStub(channel)


class Tally:
    """Status codes (and the start of each refusal message) seen over the fuzz run."""
    codes: dict[str, int] = {}
    raw: dict[str, int] = {}
    why: dict[str, int] = {}


# ---- checks --------------------------------------------------------------------------------
def _effective_max_tokens(req: pb.GenerateRequest) -> int:
    return req.sampling.max_tokens if req.sampling.HasField("max_tokens") else 8


def check_answer(method: str, req, answer) -> None:
    """What an OK answer must look like."""
    if method == "Tokenize":
        assert len(answer.token_ids) == len(answer.pieces) > 0
        assert all(t < VOCAB for t in answer.token_ids)
        return
    if method == "GenerateStream":
        assert answer, "a stream with no message"
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in answer[:-1])
        last = answer[-1]
        ids = [t for m in answer for t in m.token_ids]
        text = "".join(m.text for m in answer)
        logprobs = [lp for m in answer for lp in m.logprobs]
        usage, finish, request_id = last.usage, last.finish_reason, last.request_id
        assert len({m.request_id for m in answer}) == 1
    else:
        ids, text, logprobs = list(answer.token_ids), answer.text, list(answer.logprobs)
        usage, finish, request_id = answer.usage, answer.finish_reason, answer.request_id
    assert finish in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH,
                      pb.FINISH_REASON_STOP_SEQUENCE), finish
    assert request_id and (not req.request_id or request_id == req.request_id)
    assert usage.completion_tokens == len(ids) <= _effective_max_tokens(req)
    assert usage.prompt_tokens > 0 and all(t < VOCAB for t in ids)
    if finish == pb.FINISH_REASON_LENGTH:
        assert len(ids) == _effective_max_tokens(req)
    if finish == pb.FINISH_REASON_STOP_SEQUENCE:
        assert not any(s in text for s in req.sampling.stop)
    if req.sampling.HasField("logprobs"):
        assert [lp.token_id for lp in logprobs] == ids
        assert all(lp.logprob <= 1e-3 and len(lp.top) == req.sampling.logprobs for lp in logprobs)
    else:
        assert not logprobs


def send(stub, method: str, req):
    """Start the call; returns a function that waits for (code, details, answer)."""
    if method == "GenerateStream":
        call = stub.GenerateStream(req, timeout=60)

        def result():
            try:
                return Code.OK, "", list(call)
            except grpc.RpcError as e:
                return e.code(), e.details(), None
        return result
    future = getattr(stub, method).future(req, timeout=60)

    def result():
        e: Optional[grpc.RpcError] = future.exception()
        if e is not None:
            return e.code(), e.details(), None
        return Code.OK, "", future.result()
    return result


# ---- tests ---------------------------------------------------------------------------------
@SETTINGS
@given(batch=st.lists(CALLS, min_size=1, max_size=6))
def test_fuzzed_requests_get_an_answer_or_invalid_argument(stub, batch):
    results = [send(stub, method, req) for method, req in batch]  # all in flight at once
    for (method, req), result in zip(batch, results):
        code, details, answer = result()
        Tally.codes[code.name] = Tally.codes.get(code.name, 0) + 1
        if details:
            Tally.why[details[:30]] = Tally.why.get(details[:30], 0) + 1
        assert code in ALLOWED, f"{method} -> {code.name}: {details!r}\n{req}"
        if code == Code.OK:
            check_answer(method, req, answer)
        else:
            assert details and details.strip(), f"{method}: empty status message"
            assert len(details) < 1000, f"{method}: status message of {len(details)} chars"


@settings(max_examples=EXAMPLES, deadline=None, database=None)
@given(raw=st.binary(max_size=300),
       method=st.sampled_from(["Generate", "GenerateStream", "Tokenize", "GetModelInfo",
                               "/grpc.health.v1.Health/Check"]))
def test_undecodable_bytes_do_not_hurt_the_server(server, stub, raw, method):
    """Bytes that may not parse as the method's message: INVALID_ARGUMENT, never a traceback
    in the log (grpc.aio alone answers UNKNOWN and logs one: service/decode.py)."""
    with grpc.insecure_channel(server.target) as channel:
        path = method if method.startswith("/") else f"/mistral_serve.v1.Generation/{method}"
        if method == "GenerateStream":
            call = channel.unary_stream(path)(raw, timeout=30)
        else:
            call = channel.unary_unary(path).future(raw, timeout=30)
        try:
            list(call) if method == "GenerateStream" else call.result()
            code, details = Code.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
    Tally.raw[code.name] = Tally.raw.get(code.name, 0) + 1
    assert code in ALLOWED, (code, details)
    assert code == Code.OK or details


def test_huge_values_are_refused_with_short_messages(stub):
    """Regression: a 100,000-character chat role was echoed whole into the status message,
    which overflowed gRPC's 16 KiB trailer limit (the client saw RESOURCE_EXHAUSTED "Stream
    removed" instead of INVALID_ARGUMENT) and put the text in the log twice."""
    huge = "r" * 100_000
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role=huge, content="hi")])
    calls = [
        ("Generate", pb.GenerateRequest(chat=chat)),
        ("Tokenize", pb.TokenizeRequest(chat=chat)),
        ("Generate", pb.GenerateRequest(request_id=huge, prompt="hi")),
        ("Generate", pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=[huge]))),
        ("Generate", pb.GenerateRequest(prompt=huge)),
        ("Generate", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7] * 100_000))),
        ("Generate", pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(
            stop=["s"] * 100_000))),
        ("Generate", pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(
            stop_token_ids=[2**32 - 1] * 100_000))),
    ]
    for method, req in calls:
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, method)(req, timeout=60)
        code, details = err.value.code(), err.value.details()
        assert code == Code.INVALID_ARGUMENT and 0 < len(details) < 1000, (method, code,
                                                                             details[:200])


def test_server_is_healthy_after_the_fuzz(server, stub):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    out = stub.Generate(request("A good request after the fuzz", max_tokens=5), timeout=30)
    assert len(out.token_ids) == 5 and out.finish_reason == pb.FINISH_REASON_LENGTH
    stream = list(stub.GenerateStream(request("and a stream", max_tokens=5), timeout=30))
    assert stream[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert "Traceback" not in server.log(), server.log()[-3000:]
    reasons = sorted(Tally.why.items(), key=lambda kv: -kv[1])[:6]
    print(f"\nfuzz: {sum(Tally.codes.values())} calls, status codes "
          f"{dict(sorted(Tally.codes.items()))}; top refusals {reasons}; "
          f"undecodable bytes: {dict(sorted(Tally.raw.items()))}")
