"""What a request to the OpenAI-compatible API must be before it costs the engine anything:
the body's size and JSON, every common field's type and range, chat messages against OpenAI's
schema, and the server's bounds (`http.max_n`, `http.max_prompts`, `http.max_body_bytes`).
Pure functions on the parsed JSON; serve/gate.py's `RequestGate` runs them (and the API-key check)
before FastAPI reads or validates a body. No Ray here: tests/test_api_checks.py.

    .venv/bin/pytest -q tests/test_api_checks.py

Every check answers with `Rejected` (a 4xx with its reason, OpenAI's error shape); each costs
microseconds on an ordinary request (a token-id prompt is checked in C: `set(map(type, ...))`).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

INT64_MAX = 2**63 - 1
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_STOP = 16  # stop sequences per request (OpenAI allows 4; vLLM any number)
MAX_NAME_CHARS = 256  # model, user, message name
# all headers of one request; a bearer key, a JWT or cookies fit many times over (uvicorn with
# httptools sets no bound of its own: 64 KiB headers were answered)
MAX_HEADER_BYTES = 32 * 1024
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MESSAGE_KEYS = frozenset(
    ("role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal")
    + ("reasoning", "reasoning_content")  # vLLM's, for reasoning models' earlier turns
)
MEDIA_PARTS = ("image_url", "input_image", "image", "input_audio", "audio_url", "video_url", "file")
# vLLM fields a public endpoint does not take from clients: engine-internal transfer state,
# tensors decoded from the request (prompt_embeds), multimodal payloads, and a Jinja chat template
# (vLLM's own server refuses it unless started with --trust-request-chat-template)
REFUSED_FIELDS = frozenset(
    (
        "prompt_embeds",
        "kv_transfer_params",
        "ec_transfer_params",
        "mm_payload",
        "mm_processor_kwargs",
        "media_io_kwargs",
        "return_mm_kwargs",
        "chat_template",
        "vllm_xargs",
        "request_id",
    )
)
# The body fields a client may send, named here: an allow-list, so a field a new vLLM adds (an
# engine control, a template, a transfer handle) is refused until someone puts it here. OpenAI's
# fields, and vLLM's sampling and decoding extras; never a Jinja template, an engine-internal
# handle, a scheduling priority or a cache salt. The ingress takes these less any its vLLM lacks.
COMMON_FIELDS = frozenset(
    ("model", "n", "stream", "stream_options", "stop", "max_tokens", "temperature", "top_p")
    + ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "seed", "user")
    + ("response_format", "echo", "top_k", "min_p", "repetition_penalty", "length_penalty")
    + ("min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output", "bad_words")
    + ("skip_special_tokens", "spaces_between_special_tokens", "allowed_token_ids")
    + ("prompt_logprobs", "truncate_prompt_tokens", "structured_outputs", "add_special_tokens")
    + ("return_tokens_as_token_ids", "return_token_ids")
)
ALLOWED_FIELDS = {
    "completions": COMMON_FIELDS | {"prompt", "suffix"},
    "chat": COMMON_FIELDS
    | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice"}
    | {"parallel_tool_calls", "reasoning_effort", "include_reasoning", "documents"}
    # template variables only (checked: never a template), and where the answer starts
    | {"chat_template_kwargs", "add_generation_prompt", "continue_final_message"},
}
# OpenAI fields that do not change an answer: OpenAI's SDKs and agents send them; vLLM ignores them
PASSED_FIELDS = frozenset(
    ("best_of", "service_tier", "store", "metadata", "prompt_cache_key", "safety_identifier")
)
GENERATE_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


class Rejected(Exception):
    """A request answered with `status` and an OpenAI-style error: why, and which field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


@dataclass(frozen=True)
class Limits:
    """The server's bounds on one request (from `http.*` in the serve config)."""

    max_body_bytes: int = 2 * 1024 * 1024
    max_n: int = 16
    max_prompts: int = 32


def error_body(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    """OpenAI's error object, as the ingress's own errors carry it."""
    error = {"message": message, "type": kind, "param": param, "code": status}
    return json.dumps({"error": error}).encode()


# --- the body ----------------------------------------------------------------------------------


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # json.loads(**kw) builds one a call


def parse_json(body: bytes) -> dict:
    """The body as a JSON object; 400 for anything else (not JSON, NaN/Infinity, nested past
    Python's recursion limit, a number of thousands of digits, an array)."""
    if not body:
        raise Rejected(400, "the body is empty: expected a JSON object")
    try:
        parsed = _DECODER.decode(body.decode())  # JSON is UTF-8 (RFC 8259)
    except RecursionError:
        raise Rejected(400, "the body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit, NaN
        raise Rejected(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise Rejected(400, f"expected a JSON object as the body, got {_kind(parsed)}")
    return parsed


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v!r}" if len(repr(v)) < 40 else "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


# --- fields ------------------------------------------------------------------------------------


def _int_in(problems: list, body: dict, key: str, lo: int, hi: int, why: str = "") -> None:
    v = body.get(key)
    if v is None:
        return
    if type(v) is not int:
        problems.append((key, f"{key} must be an integer, got {_kind(v)}"))
    elif not lo <= v <= hi:
        span = "a positive integer" if (lo, hi) == (1, INT64_MAX) else f"between {lo} and {hi}"
        problems.append((key, f"{key} must be {span}{why}, got {v}"))


def _number_in(problems: list, body: dict, key: str, lo: float, hi: float, open_lo=False) -> None:
    v = body.get(key)
    if v is None:
        return
    # (math.isfinite on an int of hundreds of digits raises OverflowError: ints are finite)
    if type(v) not in (int, float) or (type(v) is float and not math.isfinite(v)):
        problems.append((key, f"{key} must be a finite number, got {_kind(v)}"))
    elif v < lo or v > hi or (open_lo and v == lo):
        span = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        problems.append((key, f"{key} must be in {span}, got {v}"))


def _typed(problems: list, body: dict, key: str, types: tuple, what: str) -> bool:
    v = body.get(key)
    if v is None or type(v) in types:
        return v is not None
    problems.append((key, f"{key} must be {what}, got {_kind(v)}"))
    return False


def _text_problem(v: Any, where: str) -> str | None:
    """None for a string UTF-8 can carry; a JSON string may hold lone surrogates ("\\ud800"),
    which the tokenizer cannot encode."""
    if type(v) is not str:
        return f"{where} must be a string, got {_kind(v)}"
    if not v.isascii():
        try:
            v.encode()
        except UnicodeEncodeError:
            return f"{where} holds a lone UTF-16 surrogate, which is not text"
    return None


def _check_common(problems: list, body: dict, limits: Limits, allowed: Iterable[str]) -> None:
    """The fields completions and chat share: names, numbers, stop, stream, unknown fields."""
    model = body.get("model")
    if model is None:
        problems.append(("model", "`model` is required"))
    elif type(model) is not str or not model or len(model) > MAX_NAME_CHARS:
        problems.append(("model", f"model must be a non-empty string, got {_kind(model)}"))
    for key in ("max_tokens", "max_completion_tokens"):
        _int_in(problems, body, key, 1, INT64_MAX)
    _int_in(problems, body, "n", 1, limits.max_n, " (http.max_n)")
    _int_in(problems, body, "best_of", 1, limits.max_n, " (http.max_n)")
    if type(body.get("best_of")) is int and 1 < body["best_of"] <= limits.max_n:
        problems.append(("best_of", "best_of is not supported by vLLM's engine; use n"))
    _int_in(problems, body, "seed", -(2**63), INT64_MAX)
    _number_in(problems, body, "temperature", 0, 2)
    _number_in(problems, body, "top_p", 0, 1, open_lo=True)
    for key in ("presence_penalty", "frequency_penalty"):
        _number_in(problems, body, key, -2, 2)
    for key in ("stream", "echo"):
        _typed(problems, body, key, (bool,), "true or false")
    if _typed(problems, body, "user", (str,), "a string") and len(body["user"]) > MAX_NAME_CHARS:
        problems.append(("user", f"user must be at most {MAX_NAME_CHARS} characters"))
    _check_stop(problems, body.get("stop"))
    if _typed(problems, body, "stream_options", (dict,), "an object"):
        for k, v in body["stream_options"].items():
            if type(v) is not bool:
                problems.append(
                    ("stream_options", f"stream_options.{k[:64]} must be true or false")
                )
    if _typed(problems, body, "logit_bias", (dict,), "an object of token id -> bias"):
        for k, v in body["logit_bias"].items():
            if (
                not (k.isascii() and k.isdigit())
                or type(v) not in (int, float)
                or not -100 <= v <= 100
            ):
                problems.append(
                    ("logit_bias", "logit_bias maps token ids to numbers in [-100, 100]")
                )
                break
    _check_fields(problems, body, allowed)


def _check_stop(problems: list, stop: Any) -> None:
    if stop is None or type(stop) is str:
        return
    if type(stop) is not list or any(type(s) is not str for s in stop):
        problems.append(
            ("stop", f"stop must be a string or an array of strings, got {_kind(stop)}")
        )
    elif len(stop) > MAX_STOP:
        problems.append(("stop", f"stop holds at most {MAX_STOP} sequences, got {len(stop)}"))


def _check_fields(problems: list, body: dict, allowed: Iterable[str]) -> None:
    for key in body.keys() - allowed:
        if key in REFUSED_FIELDS:
            problems.append((key, f"{key} is not accepted by this server"))
        elif key not in PASSED_FIELDS:
            close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((key, f"unknown field {key[:64]!r}{hint}"))


def _raise(problems: list) -> None:
    if problems:
        raise Rejected(400, "; ".join(m for _, m in problems), problems[0][0])


def check_completion(body: dict, limits: Limits, allowed: Iterable[str]) -> None:
    """POST /v1/completions: 400 naming every problem (the first one's field as `param`)."""
    problems: list[tuple[str, str]] = []
    _check_common(problems, body, limits, allowed)
    _int_in(problems, body, "logprobs", 0, MAX_LOGPROBS)
    _check_prompt(problems, body.get("prompt"), limits)
    _typed(problems, body, "suffix", (str,), "a string")
    _raise(problems)


def _check_prompt(problems: list, prompt: Any, limits: Limits) -> None:
    if prompt is None:
        problems.append(("prompt", "`prompt` is required"))
        return
    if type(prompt) is str:
        bad = _text_problem(prompt, "prompt")
        if bad:
            problems.append(("prompt", bad))
        return
    if type(prompt) is not list or not prompt:
        problems.append(
            ("prompt", f"prompt must be a string or a non-empty array, got {_kind(prompt)}")
        )
        return
    kinds = set(map(type, prompt))
    if kinds == {int}:  # one prompt of token ids
        if min(prompt) < 0:
            problems.append(("prompt", "token ids must be >= 0"))
        return
    if len(prompt) > limits.max_prompts:
        problems.append(
            (
                "prompt",
                f"at most {limits.max_prompts} prompts a request (http.max_prompts), got {len(prompt)}",
            )
        )
    elif kinds == {str}:
        bad = next(
            filter(None, (_text_problem(p, f"prompt[{i}]") for i, p in enumerate(prompt))), None
        )
        if bad:
            problems.append(("prompt", bad))
    elif kinds == {list}:
        for i, ids in enumerate(prompt):
            if not ids or set(map(type, ids)) != {int} or min(ids) < 0:
                problems.append(
                    ("prompt", f"prompt[{i}] must be a non-empty array of token ids >= 0")
                )
                return
    else:
        problems.append(
            (
                "prompt",
                "prompt must be a string, an array of strings, an array of token ids, or an array of such arrays",
            )
        )


# --- chat --------------------------------------------------------------------------------------


def check_chat(body: dict, limits: Limits, allowed: Iterable[str]) -> None:
    """POST /v1/chat/completions: 400 naming every problem, messages included."""
    problems: list[tuple[str, str]] = []
    _check_common(problems, body, limits, allowed)
    _typed(problems, body, "logprobs", (bool,), "true or false")
    _int_in(problems, body, "top_logprobs", 0, MAX_LOGPROBS)
    _check_tools(problems, body)
    _check_template_kwargs(problems, body.get("chat_template_kwargs"))
    messages = body.get("messages")
    if messages is None:
        problems.append(("messages", "`messages` is required: an array of {role, content}"))
    elif type(messages) is not list:
        problems.append(("messages", f"messages must be an array, got {_kind(messages)}"))
    elif not messages:
        problems.append(("messages", "messages is an empty array: send at least one message"))
    else:
        for i, m in enumerate(messages):
            bad = message_problem(m, f"messages[{i}]")
            if bad:
                problems.append((f"messages[{i}]", bad))
                break  # one bad message says enough; the rest may all be bad the same way
    _raise(problems)


def _check_template_kwargs(problems: list, kwargs: Any) -> None:
    """chat_template_kwargs is an object of variables for the template, never a template (the
    engine trusts the templates the ingress sends: an adapter's recorded prompt format)."""
    if kwargs is None:
        return
    if type(kwargs) is not dict:
        problems.append(
            ("chat_template_kwargs", f"chat_template_kwargs must be an object, got {_kind(kwargs)}")
        )
    elif "chat_template" in kwargs:
        msg = "chat_template_kwargs.chat_template is not accepted by this server"
        problems.append(("chat_template_kwargs", msg))


def message_problem(m: Any, where: str) -> str | None:
    """Why one chat message is not OpenAI's shape, or None."""
    if type(m) is not dict:
        return f"{where} must be an object with role and content, got {_kind(m)}"
    role = m.get("role")
    if role not in ROLES:
        got = f"{role!r}" if type(role) is str and len(role) < 40 else _kind(role)
        return f"{where}.role must be one of {', '.join(ROLES)}, got {got}"
    # the openai SDK sends an earlier answer back whole: its null fields (annotations, audio) pass
    extra = {k for k in m.keys() - MESSAGE_KEYS if m[k] is not None}
    if extra:
        return f"{where} has unknown field {sorted(extra)[0][:64]!r}"
    if "name" in m and (type(m["name"]) is not str or not 0 < len(m["name"]) <= MAX_NAME_CHARS):
        return f"{where}.name must be a non-empty string, got {_kind(m['name'])}"
    content = m.get("content")
    if role == "assistant" and content is None:
        if m.get("tool_calls") is None and m.get("function_call") is None:
            return f"{where}: an assistant message needs content or tool_calls"
    elif role == "function" and content is None:
        pass
    else:
        bad = _content_problem(content, f"{where}.content", role)
        if bad:
            return bad
    if role == "tool" and type(m.get("tool_call_id")) is not str:
        return f"{where}.tool_call_id must be a string (the id of the call it answers)"
    if m.get("tool_calls") is not None:
        return _tool_calls_problem(m["tool_calls"], f"{where}.tool_calls", role)
    return None


def _content_problem(content: Any, where: str, role: str) -> str | None:
    if type(content) is str:
        return _text_problem(content, where)
    if type(content) is not list:
        return f"{where} must be a string or an array of content parts, got {_kind(content)}"
    if not content:
        return f"{where} is an empty array: send at least one part"
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if type(part) is dict else None
        if kind == "text":
            bad = _text_problem(part.get("text"), f"{at}.text")
        elif kind == "refusal" and role == "assistant":
            bad = _text_problem(part.get("refusal"), f"{at}.refusal")
        elif kind in MEDIA_PARTS:
            bad = f"{at}: {kind} parts are not supported: this server serves text models"
        elif type(part) is not dict:
            bad = f'{at} must be an object like {{"type": "text", "text": ...}}, got {_kind(part)}'
        else:
            got = f"{kind!r}" if type(kind) is str and len(kind) < 40 else _kind(kind)
            bad = f"{at}.type must be 'text', got {got}"
        if bad:
            return bad
    return None


def _tool_calls_problem(calls: Any, where: str, role: str) -> str | None:
    if role != "assistant":
        return f"{where}: only assistant messages carry tool_calls"
    if type(calls) is not list:
        return f"{where} must be an array, got {_kind(calls)}"
    for j, c in enumerate(calls):
        fn = c.get("function") if type(c) is dict else None
        if (
            type(fn) is not dict
            or type(c.get("id")) is not str
            or c.get("type", "function") != "function"
            or type(fn.get("name")) is not str
            or type(fn.get("arguments")) is not str
        ):
            return (
                f'{where}[{j}] must be {{"id": str, "type": "function", "function": '
                '{"name": str, "arguments": str (JSON)}}'
            )
    return None


def _check_tools(problems: list, body: dict) -> None:
    if not _typed(problems, body, "tools", (list,), "an array of tools"):
        return
    for j, t in enumerate(body["tools"]):
        fn = t.get("function") if type(t) is dict else None
        if type(fn) is not dict or type(fn.get("name")) is not str or t.get("type") != "function":
            problems.append(
                (
                    "tools",
                    f'tools[{j}] must be {{"type": "function", "function": {{"name": str, ...}}}}',
                )
            )
            return
        if fn.get("parameters") is not None and type(fn["parameters"]) is not dict:
            problems.append(
                ("tools", f"tools[{j}].function.parameters must be a JSON schema object")
            )
            return


# --- against the model -------------------------------------------------------------------------


def check_context(body: Any, model: str, max_model_len: int | None) -> None:
    """400 when the completion cannot fit the model's context: `max_tokens` (or
    `max_completion_tokens`) above `max_model_len`, or a token-id prompt plus `max_tokens` past
    it. A text prompt's length in tokens is vLLM's to count (it answers "maximum context
    length" for a prompt that alone is too long, and shortens the completion to the room left)."""
    if not max_model_len:
        return
    key = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    want = getattr(body, key, None)
    if want is None:
        return
    if want > max_model_len:
        raise Rejected(
            400,
            f"{key} {want} > max_model_len {max_model_len} of model {model!r}: prompt tokens and "
            f"{key} together must fit in it",
            key,
        )
    prompt = getattr(body, "prompt", None)
    if type(prompt) is list and prompt and type(prompt[0]) is int:
        prompts = [prompt]
    elif type(prompt) is list and prompt and type(prompt[0]) is list:
        prompts = prompt
    else:
        return
    longest = max(map(len, prompts))
    if longest + want > max_model_len:
        raise Rejected(
            400,
            f"prompt tokens {longest} + {key} {want} = {longest + want} > max_model_len "
            f"{max_model_len} of model {model!r}",
            key,
        )
