"""serve/api_checks.py without Ray: what a hostile or careless client sends to the
OpenAI-compatible API gets a 4xx with its reason, before FastAPI or the engine sees it; the
RequestGate in front of a real Starlette app refuses a missing key before reading any body, and
a body over the limit before reading it whole. (End to end, on the served app:
tests/test_serve.py -k hostile.)

    .venv/bin/pytest -q tests/test_api_checks.py
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from serve.api_checks import (
    Limits,
    Rejected,
    check_chat,
    check_completion,
    check_context,
    message_problem,
    parse_json,
)
from serve.gate import RequestGate, deadline_s

# a subset of vLLM's request fields (the ingress takes the whole set from vLLM's models)
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options"}
COMMON |= {"seed", "user", "logprobs", "logit_bias", "presence_penalty", "frequency_penalty"}
ALLOWED = {
    "completions": frozenset(COMMON | {"prompt", "echo", "suffix"}),
    "chat": frozenset(COMMON | {"messages", "max_completion_tokens", "tools", "top_logprobs"}),
}
LIMITS = Limits(max_body_bytes=4096, max_n=4, max_prompts=3)


def _completion(**fields) -> None:
    check_completion({"model": "tiny", "prompt": "hi", **fields}, LIMITS, ALLOWED["completions"])


def _chat(messages, **fields) -> None:
    body = {"model": "tiny", "messages": messages, **fields}
    check_chat(body, LIMITS, ALLOWED["chat"])


def _says(fn, *args, status=400, **kwargs) -> str:
    with pytest.raises(Rejected) as e:
        fn(*args, **kwargs)
    assert e.value.status == status, e.value.message
    return e.value.message


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "empty"),
        (b'{"model": "tiny", "prompt": ', "not valid JSON"),
        (b"[1, 2]", "got an array"),
        (b'"hi"', "got a string"),
        (b'{"temperature": NaN}', "NaN is not a JSON number"),
        (b'{"temperature": -Infinity}', "-Infinity is not a JSON number"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),  # past Python's int digit limit
        (b'{"prompt": "\xff\xfe"}', "not valid JSON"),  # not UTF-8
    ],
    ids=["empty", "truncated", "array", "string", "nan", "infinity", "deep", "huge-int", "bytes"],
)
def test_a_body_that_is_not_a_json_object_is_refused_with_the_reason(body, says):
    assert says in _says(parse_json, body)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"temperature": "hot"}, "temperature must be a finite number, got a string"),
        ({"temperature": 1e400}, "temperature must be a finite number"),  # json: inf
        ({"temperature": 7}, "temperature must be in [0, 2], got 7"),
        # an integer too big for a float (math.isfinite raised OverflowError: a 500)
        ({"temperature": int("1" + "0" * 400)}, "temperature must be in [0, 2], got 1000"),
        ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # '²'.isdigit(), but not a token id
        ({"max_tokens": -1}, "max_tokens must be a positive integer, got -1"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
        ({"max_tokens": 1e12}, "max_tokens must be an integer, got the number 1000000000000.0"),
        ({"max_tokens": "5"}, "max_tokens must be an integer, got a string"),
        ({"max_tokens": True}, "max_tokens must be an integer, got a boolean"),
        ({"top_p": 7}, "top_p must be in (0, 1], got 7"),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
        ({"n": 5}, "n must be between 1 and 4 (http.max_n), got 5"),
        ({"n": 0}, "n must be between 1 and 4"),
        ({"best_of": 50}, "best_of must be between 1 and 4 (http.max_n), got 50"),
        ({"best_of": 2}, "best_of is not supported"),
        ({"stop": ["x"] * 1000}, "stop holds at most 16 sequences, got 1000"),
        ({"stop": 5}, "stop must be a string or an array of strings"),
        ({"stop": [1, 2]}, "stop must be a string or an array of strings"),
        ({"logprobs": 10**6}, "logprobs must be between 0 and 20"),
        ({"seed": 2**70}, "seed must be between"),
        ({"model": ["tiny"]}, "model must be a non-empty string, got an array"),
        ({"model": ""}, "model must be a non-empty string"),
        ({"user": {"id": 1}}, "user must be a string, got an object"),
        ({"user": "u" * 1000}, "user must be at most 256 characters"),
        ({"stream": "yes"}, "stream must be true or false, got a string"),
        ({"stream_options": "junk"}, "stream_options must be an object, got a string"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage must be"),
        ({"logit_bias": {"x": 1}}, "logit_bias maps token ids to numbers in [-100, 100]"),
        ({"logit_bias": {"5": 1000}}, "logit_bias maps token ids"),
        ({"max_token": 5}, "unknown field 'max_token'; did you mean 'max_tokens'?"),
        ({"zzz": 1}, "unknown field 'zzz'"),
        ({"prompt_embeds": "AAAA"}, "prompt_embeds is not accepted by this server"),
        ({"prompt": None}, "`prompt` is required"),
        ({"prompt": []}, "prompt must be a string or a non-empty array, got an array"),
        ({"prompt": {"text": "hi"}}, "prompt must be a string or a non-empty array, got an object"),
        ({"prompt": ["a", "b", "c", "d"]}, "at most 3 prompts a request (http.max_prompts), got 4"),
        ({"prompt": [[1, 2], [3], [4], [5]]}, "at most 3 prompts a request"),
        ({"prompt": [1, -2, 3]}, "token ids must be >= 0"),
        ({"prompt": [[1, 2], []]}, "prompt[1] must be a non-empty array of token ids"),
        ({"prompt": [[1, [2]]]}, "prompt[0] must be a non-empty array of token ids"),
        ({"prompt": ["a", 1]}, "prompt must be a string, an array of strings, an array of token"),
        ({"prompt": [1.5, 2]}, "prompt must be a string, an array of strings"),
        ({"prompt": "bad \ud800 text"}, "prompt holds a lone UTF-16 surrogate"),
        ({"prompt": ["ok", "\udfff"]}, "prompt[1] holds a lone UTF-16 surrogate"),
    ],
)
def test_a_completion_field_of_the_wrong_type_or_range_is_refused_naming_it(fields, says):
    msg = _says(_completion, **fields)
    assert says in msg, msg


def test_every_problem_of_a_request_is_named_at_once_with_the_first_as_param():
    with pytest.raises(Rejected) as e:
        _completion(temperature="hot", n=99, stream="yes")
    assert e.value.param == "n" or e.value.param == "temperature"
    for says in ("temperature must be", "n must be between", "stream must be true or false"):
        assert says in e.value.message, e.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"prompt": ["a", "b", "c"], "n": 4, "max_tokens": 8, "temperature": 0, "top_p": 1},
        {"prompt": [1, 2, 3], "stop": ["\n", "."], "seed": 0, "logprobs": 5, "echo": True},
        {"prompt": [[1, 2], [3]], "stream": True, "stream_options": {"include_usage": True}},
        {"prompt": "NUL \x00 and émoji 😀", "user": "u1", "logit_bias": {"50256": -100}},
        {"temperature": None, "stop": None, "best_of": 1},
        {"store": False, "service_tier": "auto", "metadata": {"k": "v"}},  # OpenAI SDKs' extras
    ],
)
def test_well_formed_completions_pass(fields):
    _completion(**fields)


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        (None, "`messages` is required"),
        ([], "messages is an empty array: send at least one message"),
        ("hi", "messages must be an array, got a string"),
        ({"role": "user"}, "messages must be an array, got an object"),
        (["hi"], "messages[0] must be an object with role and content, got a string"),
        ([{"content": "hi"}], "messages[0].role must be one of system, developer, user"),
        ([{"role": "wizard", "content": "hi"}], "got 'wizard'"),
        ([{"role": "user", "content": {"text": "hi"}}], "messages[0].content must be a string"),
        ([{"role": "user", "content": 5}], "got the number 5"),
        ([{"role": "user"}], "messages[0].content must be a string or an array of content parts"),
        ([{"role": "user", "content": []}], "messages[0].content is an empty array"),
        ([{"role": "user", "content": ["hi"]}], "messages[0].content[0] must be an object"),
        ([{"role": "user", "content": [{"type": "text"}]}], "content[0].text must be a string"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "image_url parts are not supported",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            "input_audio parts are not supported",
        ),
        ([{"role": "user", "content": [{"type": "video"}]}], "content[0].type must be 'text'"),
        ([{"role": "user", "content": "hi", "name": 7}], "messages[0].name must be a non-empty"),
        ([{"role": "user", "content": "hi", "weight": 1}], "has unknown field 'weight'"),
        ([{"role": "assistant"}], "an assistant message needs content or tool_calls"),
        (
            [{"role": "assistant", "content": None, "tool_calls": {"id": 1}}],
            "messages[0].tool_calls must be an array",
        ),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}],
            'messages[0].tool_calls[0] must be {"id": str, "type": "function"',
        ),
        ([{"role": "user", "content": "x", "tool_calls": []}], "only assistant messages"),
        ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id must be a string"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": {}}], "messages[1]"),
        ([{"role": "user", "content": "\ud83d alone"}], "lone UTF-16 surrogate"),
    ],
)
def test_a_malformed_chat_message_is_refused_naming_where(messages, says):
    msg = _says(_chat, messages)
    assert says in msg, msg


def test_well_formed_chats_pass():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    _chat(
        [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "really"}]},
            {"role": "user", "content": "hi", "name": "ann"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
            # an earlier answer sent back whole by the openai SDK: its null fields pass
            {"role": "assistant", "content": "ok", "annotations": None, "audio": None},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ],
        max_completion_tokens=5,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        logprobs=True,
        top_logprobs=3,
    )


def test_chat_only_fields_are_checked_too():
    hi = [{"role": "user", "content": "hi"}]
    assert "logprobs must be true or false" in _says(_chat, hi, logprobs=5)
    assert "top_logprobs must be between 0 and 20" in _says(_chat, hi, top_logprobs=99)
    assert "tools[0] must be" in _says(_chat, hi, tools=[{"type": "function"}])
    assert "unknown field 'prompt'" in _says(_chat, hi, prompt="x")
    assert message_problem({"role": "user", "content": "x"}, "m") is None


class Body:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_max_tokens_beyond_the_context_is_refused_naming_both_numbers():
    msg = _says(check_context, Body(max_tokens=500, prompt="hi"), "tiny", 128)
    assert "max_tokens 500 > max_model_len 128 of model 'tiny'" in msg, msg
    msg = _says(check_context, Body(max_completion_tokens=129, max_tokens=None), "tiny", 128)
    assert "max_completion_tokens 129 > max_model_len 128" in msg, msg
    msg = _says(check_context, Body(max_tokens=100, prompt=[1] * 40), "tiny", 128)
    assert "prompt tokens 40 + max_tokens 100 = 140 > max_model_len 128" in msg, msg
    msg = _says(check_context, Body(max_tokens=100, prompt=[[1] * 10, [2] * 30]), "tiny", 128)
    assert "prompt tokens 30 + max_tokens 100" in msg, msg
    check_context(Body(max_tokens=88, prompt=[1] * 40), "tiny", 128)  # exactly fits
    check_context(Body(max_tokens=128, prompt="a text prompt: vLLM counts it"), "tiny", 128)
    check_context(Body(max_tokens=10**9, prompt="x"), "hub-model", None)  # unknown: vLLM's


def test_the_deadline_is_the_configured_one_or_a_shorter_one_the_client_asks_for():
    assert deadline_s(120, None) == 120
    assert deadline_s(120, "0.5") == 0.5
    assert deadline_s(120, "3600") == 120  # a client never extends the server's bound
    for bad in ("soon", "0", "-1", "nan", "inf"):
        assert "X-Lorafleet-Timeout-S" in _says(deadline_s, 120, bad)


# --- RequestGate in front of a real Starlette app ----------------------------------------------

KEY = "sk-gate"


class _Ingress:
    """The replica side RequestGate asks: keys, limits, allowed fields."""

    limits = LIMITS
    allowed = ALLOWED

    def check_key(self, scope) -> None:
        headers = dict(scope["headers"])
        if headers.get(b"authorization", b"") != f"Bearer {KEY}".encode():
            raise Rejected(401, "missing or invalid API key", kind="authentication_error")


def _app(seen: list):
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def echo(request):
        body = await request.body()
        seen.append(len(body))
        return JSONResponse({"got": len(body)})

    async def health(request):
        return PlainTextResponse("ok")

    routes = [
        Route("/v1/completions", echo, methods=["POST"]),
        Route("/v1/chat/completions", echo, methods=["POST"]),
        Route("/v1/feedback", echo, methods=["POST"]),
        Route("/v1/models", echo, methods=["GET"]),
        Route("/ui", health),
    ]
    return Starlette(routes=routes, middleware=[Middleware(RequestGate, gate=_Ingress)])


def _call(method, path, *, key=KEY, content=None, headers=None, seen=None):
    seen = [] if seen is None else seen
    h = {"content-type": "application/json", **(headers or {})}
    if key:
        h["authorization"] = f"Bearer {key}"

    async def go():
        transport = httpx.ASGITransport(app=_app(seen))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, content=content, headers=h)

    return asyncio.run(go())


def test_no_key_is_401_before_any_body_is_read_or_validated():
    seen: list = []
    for body in (b"{not json", b"[1]", json.dumps({"model": "tiny", "prompt": "hi"}).encode()):
        r = _call("POST", "/v1/completions", key=None, content=body, seen=seen)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error", r.text
    assert _call("GET", "/v1/models", key="sk-wrong").status_code == 401
    assert seen == []  # the app never ran
    assert _call("GET", "/ui", key=None).text == "ok"  # not an API path: untouched
    # a CORS preflight carries no key by design: it passes to the app's CORS handling
    assert _call("OPTIONS", "/v1/completions", key=None, seen=seen).status_code != 401
    r = _call("GET", "/v1/models", headers={"x-junk": "j" * 40_000})
    assert r.status_code == 431 and "request headers too large" in r.json()["error"]["message"]


def test_a_body_over_the_limit_is_413_before_it_is_read_whole():
    seen: list = []
    big = b'{"model": "tiny", "prompt": "' + b"x" * 5000 + b'"}'
    r = _call("POST", "/v1/completions", content=big, seen=seen)
    assert r.status_code == 413, r.text
    msg = r.json()["error"]["message"]
    assert f"request body too large: {len(big)} bytes > limit 4096" in msg, msg

    async def chunks():  # no Content-Length: refused once 4096 bytes have come
        for _ in range(100):
            yield b"x" * 1000

    r = _call("POST", "/v1/feedback", content=chunks(), seen=seen)
    assert r.status_code == 413 and "more than 4096 bytes" in r.json()["error"]["message"], r.text
    r = _call("POST", "/v1/completions", content=b"1", headers={"content-length": "-5"})
    assert r.status_code in (400, 413), r.text
    assert seen == []


def test_the_gate_answers_bad_bodies_and_passes_good_ones_whole():
    seen: list = []
    good = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    r = _call("POST", "/v1/completions", content=good, seen=seen)
    assert r.status_code == 200 and r.json() == {"got": len(good)}, r.text
    r = _call("POST", "/v1/completions", content=good, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
    r = _call("POST", "/v1/completions", content=b"[]")
    assert r.status_code == 400 and "got an array" in r.json()["error"]["message"], r.text
    chat = {"model": "tiny", "messages": [{"role": "user", "content": {"a": 1}}]}
    r = _call("POST", "/v1/chat/completions", content=json.dumps(chat).encode())
    err = r.json()["error"]
    assert r.status_code == 400 and "messages[0].content must be a string" in err["message"]
    assert err["param"] == "messages[0]" and err["type"] == "invalid_request_error", err
    r = _call("POST", "/v1/feedback", content=b'{"reward": 1}', seen=seen)  # not checked here
    assert r.status_code == 200
    assert seen == [len(good), len(b'{"reward": 1}')]


def test_checking_an_ordinary_request_costs_microseconds():
    """The gate runs on every request: a chat of a few turns is checked (parse included) in well
    under a millisecond on this 2-core machine (measured ~10 us; the bound leaves room for load)."""
    chat = {
        "model": "tiny:support",
        "messages": [
            {"role": "system", "content": "You are helpful. " * 10},
            {"role": "user", "content": "Where is my order 12345?"},
            {"role": "assistant", "content": "Let me check."},
            {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
        ],
        "max_tokens": 64,
        "temperature": 0.7,
        "stream": True,
        "user": "u-42",
    }
    raw = json.dumps(chat).encode()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        check_chat(parse_json(raw), LIMITS, ALLOWED["chat"])
    per_us = (time.perf_counter() - t0) / n * 1e6
    print(f"parse + check of a 4-message chat: {per_us:.1f} us")
    assert per_us < 500, per_us
