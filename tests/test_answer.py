"""serve/answer.py's engine errors without a server: what the ingress answers when vLLM's
replicas are full (Serve's back-pressure), when the replica dies mid-request, and when vLLM cannot
load a version. (The served app's paths: tests/test_serve.py.)

    .venv/bin/pytest -q tests/test_answer.py
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from serve.answer import AnswerMixin
from serve.auth import ApiError


class _Engine(AnswerMixin):
    """The ingress's `_get_response` raising what Serve raises."""

    def __init__(self, error: BaseException):
        self.error = error

    async def _get_response(self, **kwargs):
        raise self.error
        yield  # an async generator, as Ray's is


def _answer(error: BaseException) -> tuple[ApiError, list]:
    done = []
    body = SimpleNamespace(model="tiny:t-last@20261202-003015-123-9f3a")
    call = _Engine(error)._first_chunk(body, "completions", None, lambda ok, *a: done.append(ok))
    with pytest.raises(ApiError) as e:
        asyncio.run(call)
    return e.value, done


def test_a_full_queue_is_503_with_retry_after_and_counted_as_an_error():
    from serve.ingress import _error_response

    error, done = _answer(BackPressureError(num_queued_requests=64, max_queued_requests=64))
    assert error.status == 503 and "at capacity" in error.message and done == [False]
    assert _error_response(error).headers["retry-after"] == "1"


def test_a_replica_that_died_mid_request_is_503_retry():
    error, done = _answer(RayActorError())
    assert error.status == 503 and "retry" in error.message and done == [False]


def test_a_version_vllm_cannot_load_is_400_naming_vllms_reason():
    why = "LoRA rank 16 is greater than max_lora_rank 8."
    trace = f"ValueError: Failed to load lora model: Worker failed with error '{why}', please check"
    error, done = _answer(RuntimeError(trace))
    assert error.status == 400 and why in error.message and done == [False]


def test_the_usage_block_the_ingress_asked_for_is_cut_from_batched_stream_chunks():
    """Ray batches a stream's events: the usage-only event the ingress asked vLLM for (to count
    tokens) arrives in one chunk with the last text. The client that did not ask gets the text,
    never the usage event; the tokens are still counted."""
    import json

    from serve.answer import _counted

    text = {"id": "c", "choices": [{"index": 0, "text": "gamma"}], "usage": None}
    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    batched = f"data: {json.dumps(text)}\n\ndata: {json.dumps(usage)}\n\n"
    chunks = [[f"data: {json.dumps(text)}\n\n"], [batched], "data: [DONE]\n\n"]

    async def stream():
        for c in chunks:
            yield c

    async def read(wants_usage: bool):
        done = []
        got = [c async for c in _counted(stream(), True, wants_usage, lambda *a: done.append(a))]
        return got, done

    got, done = asyncio.run(read(wants_usage=False))
    sent = json.dumps(got)
    assert "completion_tokens" not in sent and sent.count("gamma") == 2, got
    assert done == [(True, 7, 2)]
    got, done = asyncio.run(read(wants_usage=True))
    assert "completion_tokens" in json.dumps(got) and done == [(True, 7, 2)]


def test_the_usage_event_is_cut_from_a_chunk_with_crlf_separators():
    import json

    from serve.answer import _without_usage

    text = {"id": "c", "choices": [{"text": "g"}], "usage": None}
    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    chunk = f"data: {json.dumps(text)}\r\n\r\ndata: {json.dumps(usage)}\r\n\r\ndata: [DONE]\r\n\r\n"
    assert _without_usage(chunk) == f"data: {json.dumps(text)}\r\n\r\ndata: [DONE]\r\n\r\n"
    assert _without_usage(f"data: {json.dumps(usage)}\n\n") is None
