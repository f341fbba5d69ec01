"""Who may do what (serve/auth.py), without Ray: keys and roles, the loopback default, the
refusal to serve an exposed host without keys, cross-site requests, rate limits, rewards that
count once, the store's containment, the allow-list of request fields, and every admin route
carrying the one admin dependency. End to end on the served app: tests/test_serve.py -k admin.

    .venv/bin/pytest -q tests/test_auth.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from starlette.requests import Request

from serve.auth import Access, ApiError, RateLimits

API, ADMIN = "sk-api", "sk-root"


def _hashes(keys: list[str]) -> list[str]:
    return [hashlib.sha256(k.encode()).hexdigest() for k in keys]


def _request(method="POST", key=None, headers=None, basic=None) -> Request:
    h = dict(headers or {})
    if key:
        h["authorization"] = f"Bearer {key}"
    if basic:
        import base64

        h["authorization"] = "Basic " + base64.b64encode(f"u:{basic}".encode()).decode()
    h.setdefault("host", "127.0.0.1:8000")
    scope = {
        "type": "http",
        "method": method,
        "scheme": "http",
        "path": "/v1/x",
        "headers": [(k.lower().encode(), v.encode()) for k, v in h.items()],
        "client": ("127.0.0.1", 5555),
    }
    return Request(scope)


def _status(access: Access, request: Request, admin: bool) -> int:
    try:
        access.check(request, admin)
    except ApiError as e:
        return e.status
    return 0


def test_with_no_key_at_all_reads_and_inference_are_open_and_admin_is_closed():
    """The loopback default: anyone on this machine may read and generate; changing what is
    served needs an admin key, or `http.open_admin_on_loopback: true`, and the 403 says both."""
    closed = Access([], [])
    assert _status(closed, _request("GET"), admin=False) == 0
    assert _status(closed, _request("POST"), admin=False) == 0  # completions, feedback
    # the openai SDK always sends a key, often a dummy: ignored where none is configured
    assert _status(closed, _request("POST", key="EMPTY"), admin=False) == 0
    with pytest.raises(ApiError) as e:
        closed.check(_request("POST"), admin=True)
    assert e.value.status == 403
    assert "LORAFLEET_ADMIN_KEYS" in e.value.message
    assert "http.open_admin_on_loopback: true" in e.value.message
    opened = Access([], [], open_admin=True)
    assert _status(opened, _request("POST"), admin=True) == 0


def test_roles_api_keys_pass_reads_and_admin_keys_pass_everything():
    both = Access(_hashes([API]), _hashes([ADMIN]), open_admin=True)  # keys set: open_admin moot
    assert _status(both, _request(key=ADMIN), admin=True) == 0
    assert _status(both, _request(key=ADMIN), admin=False) == 0  # admin keys pass as API keys
    assert _status(both, _request(key=API), admin=False) == 0
    assert _status(both, _request(key=API), admin=True) == 403
    assert _status(both, _request(), admin=True) == 401
    assert _status(both, _request(), admin=False) == 401
    assert _status(both, _request(key="nope"), admin=True) == 401
    with pytest.raises(ApiError, match="LORAFLEET_ADMIN_KEYS"):  # API keys, no admin key
        Access(_hashes([API]), []).check(_request(key=API), admin=True)
    # admin keys only (on loopback): inference open, admin needs the admin key
    only_admin = Access([], _hashes([ADMIN]))
    assert _status(only_admin, _request(), admin=False) == 0
    assert _status(only_admin, _request(), admin=True) == 401
    assert _status(only_admin, _request(key=ADMIN), admin=True) == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example", "sec-fetch-site": "cross-site"},
        {"origin": "http://evil.example"},  # an older browser: Origin alone
        {"sec-fetch-site": "same-site"},  # another port or subdomain is another site
    ],
)
def test_a_cross_site_form_cannot_change_an_open_local_server(headers):
    """A page the user visits can post a form to 127.0.0.1: without a key, a change from another
    site is refused (feedback and admin alike), while curl, the SDK and the page itself pass."""
    opened = Access([], [], open_admin=True)
    assert _status(opened, _request("POST", headers=headers), admin=True) == 403
    assert _status(opened, _request("POST", headers=headers), admin=False) == 403
    assert _status(opened, _request("GET", headers=headers), admin=False) == 0  # reads: CORS's
    same = {"origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}
    assert _status(opened, _request("POST", headers=same), admin=True) == 0
    assert _status(opened, _request("POST"), admin=True) == 0  # no browser headers: curl


def test_basic_credentials_from_another_site_or_without_the_page_header_are_no_key():
    keyed = Access(_hashes([API]), _hashes([ADMIN]))
    ui = {"x-lorafleet-ui": "1", "sec-fetch-site": "same-origin"}
    assert _status(keyed, _request("POST", basic=ADMIN, headers=ui), admin=True) == 0
    assert _status(keyed, _request("POST", basic=ADMIN), admin=True) == 401  # no page header
    cross = {**ui, "sec-fetch-site": "cross-site"}
    assert _status(keyed, _request("GET", basic=API, headers=cross), admin=False) == 401


def test_an_exposed_host_without_api_keys_is_refused_before_anything_starts():
    """Any host but loopback, in any mode, needs API keys: the error names the setting."""
    from cluster.config.serve import ServeAppConfig
    from cluster.errors import LorafleetError
    from serve.app import resolve

    for host, mode in (("0.0.0.0", "throughput"), ("10.1.2.3", "proxy"), ("::", "throughput")):
        cfg = ServeAppConfig.model_validate(
            {"models": [{"id": "m", "base": "org/m"}], "http": {"host": host, "mode": mode}}
        )
        with pytest.raises(LorafleetError) as e:
            resolve(cfg, {})
        assert f"http.host: {host!r} is reachable" in str(e.value), e.value
        assert "$LORAFLEET_API_KEYS" in str(e.value)
        with pytest.raises(LorafleetError):  # admin keys alone would leave inference open
            resolve(cfg, {"LORAFLEET_ADMIN_KEYS": ADMIN})
        assert resolve(cfg, {"LORAFLEET_API_KEYS": API}).key_hashes == _hashes([API])
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        cfg = ServeAppConfig.model_validate(
            {"models": [{"id": "m", "base": "org/m"}], "http": {"host": host}}
        )
        assert not cfg.http.exposed(), host


def test_a_bad_rate_limit_names_the_key_and_what_it_expects():
    from cluster.config.load import load_config
    from cluster.config.serve import ServeAppConfig
    from cluster.errors import ConfigError

    raw = {"models": [{"id": "m", "base": "org/m"}], "http": {"feedback_rate_limit": "fast"}}
    with pytest.raises(ConfigError) as e:
        load_config(None, raw, ServeAppConfig)
    assert "feedback_rate_limit" in str(e.value) and "'200/second'" in str(e.value)


def test_rate_limits_answer_429_with_retry_after_per_caller():
    limits = RateLimits({"feedback": "3/second", "admin": "1/minute"})
    for _ in range(3):
        limits.hit("feedback", "key-a")
    with pytest.raises(ApiError) as e:
        limits.hit("feedback", "key-a")
    assert e.value.status == 429 and 0 < e.value.retry_after_s <= 1.0
    assert "http.feedback_rate_limit" in e.value.message
    limits.hit("feedback", "key-b")  # another caller has its own window
    limits.hit("admin", "key-a")  # another kind too
    with pytest.raises(ApiError) as e:
        limits.hit("admin", "key-a")
    assert 1 < e.value.retry_after_s <= 60

    from serve.ingress import _error_response

    assert _error_response(e.value).headers["retry-after"] == str(
        int(-(-e.value.retry_after_s // 1))
    )


def test_replaying_one_response_id_a_thousand_times_moves_the_outcome_by_one_reward():
    from serve.experiments import ExperimentState

    exp = {"name": "e", "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]}
    state = ExperimentState([exp])
    state.remember("cmpl-1", "e", "a", ["bot", "candidate"])
    first = state.feedback({"response_id": "cmpl-1", "reward": 0})
    assert first["variant"] == "a" and first["release"] == ["bot", "candidate"]
    replays = [state.feedback({"response_id": "cmpl-1", "reward": 0}) for _ in range(1000)]
    assert {r["status"] for r in replays} == {409}
    assert "already rewarded" in replays[0]["error"] and "first reward" in replays[0]["error"]
    assert state.outcomes["e"]["a"] == {"n": 1, "sum": 0.0, "sumsq": 0.0, "nonbinary": 0}
    assert state.feedback({"response_id": "cmpl-2", "reward": 1})["status"] == 404


# --- the store contains every path it builds -------------------------------------------------

HOSTILE_PARTS = ["..", "../x", "a/../../b", "/etc", "/", "\\\\server\\share", "C:/x", "C:\\x"]
HOSTILE_PARTS += ["", "x\0y", "a/..", "../" * 8 + "etc/passwd"]


@pytest.mark.parametrize("part", HOSTILE_PARTS)
def test_storage_join_refuses_any_part_that_leaves_its_root(part, tmp_path):
    from cluster.store import storage

    for root in (str(tmp_path / "root"), "s3://fleet/root"):
        with pytest.raises(storage.UnsafePath):
            storage.join(root, "adapters", part)
        with pytest.raises(storage.UnsafePath):
            storage.join(root, part, "current")
    assert storage.join("s3://fleet/root", "a", "versions") == "s3://fleet/root/a/versions"
    assert storage.join(str(tmp_path), "a", ".b.tmp") == str(Path(tmp_path, "a", ".b.tmp"))


# --- what a request may carry -------------------------------------------------------------------


def test_request_fields_are_an_allow_list_a_new_vllm_field_is_refused():
    """Only the fields named in api_checks.ALLOWED_FIELDS pass; `priority` and `cache_salt`
    (vLLM takes both: a client could jump the queue or pick a cache) and `chat_template` get 400,
    and every allowed field is one this vLLM knows."""
    from serve.api_checks import ALLOWED_FIELDS, Limits, Rejected, check_chat, check_completion
    from serve.ingress import _allowed_fields
    from serve.ray_internal import ChatCompletionRequest, CompletionRequest

    allowed = _allowed_fields()
    assert allowed == ALLOWED_FIELDS, "an allowed field is missing from this vLLM"
    engine = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
    for endpoint, model in engine.items():
        extra = set(model.model_fields) - allowed[endpoint]
        assert {"priority", "cache_salt", "kv_transfer_params", "vllm_xargs"} <= extra
    body = {"model": "m", "prompt": "hi", "priority": -100}
    with pytest.raises(Rejected, match="priority"):
        check_completion(body, Limits(), allowed["completions"])
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for field, value in (("chat_template", "{{ x }}"), ("cache_salt", "s"), ("session_id", "s")):
        with pytest.raises(Rejected, match=field):
            check_chat({**chat, field: value}, Limits(), allowed["chat"])
    check_chat({**chat, "top_k": 5, "chat_template_kwargs": {"x": 1}}, Limits(), allowed["chat"])


# --- every admin route, and only those, has the one admin check -------------------------------


def test_every_state_changing_route_but_inference_carries_the_admin_dependency():
    """A route added to ROUTES is admin unless it is a safe method or named in INFERENCE_WRITES,
    and FastAPI runs `require_admin` before it; the module docstring lists every route."""
    from fastapi.routing import APIRoute

    import serve.ingress as ingress
    from serve.ray_internal import make_fastapi_ingress

    assert ingress.INFERENCE_WRITES == {"completions", "chat", "feedback"}
    app = ingress.make_app()
    make_fastapi_ingress(ingress.FleetIngress, endpoint_map=ingress.ENDPOINTS, app=app)
    routes = {r.name: r for r in app.routes if isinstance(r, APIRoute)}
    assert set(routes) == set(ingress.ROUTES)
    admin = set()
    for name, route in routes.items():
        calls = {d.call for d in route.dependant.dependencies}
        method = next(iter(route.methods))
        if ingress.is_admin_route(name, method):
            admin.add(name)
            assert ingress.require_admin in calls, name
            # FastAPI hands it the request (unannotated, it would be a required query parameter)
            dep = next(d for d in route.dependant.dependencies if d.call is ingress.require_admin)
            assert dep.request_param_name == "request" and not dep.query_params, name
        else:
            assert ingress.require_admin not in calls, name
        assert f"{method:4} {route.path.replace(':path', '')}" in ingress.__doc__, route.path
    assert admin == {
        "set_weights",
        "start_release",
        "abort_release",
        "pause_release",
        "resume_release",
        "move_adapter",
        "import_version",
    }


# --- the review's user-facing bug ----------------------------------------------------------------


def test_release_start_without_a_release_section_is_one_clear_problem(tmp_path, capsys):
    from cluster.cli import main as cli

    cfg = tmp_path / "s.yaml"
    cfg.write_text("models: [{id: m, base: org/m}]\n")
    assert cli.main(["release", "start", str(cfg), "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and "release: missing" in err, err


def test_the_name_rule_matches_the_whole_name():
    """`$` matches before a trailing newline: the rule must hold for every character."""
    from cluster.config.base import is_valid_name, name_problem

    for bad in ("x\n", "ok\n", "a\r", "../x", "x/..", ""):
        assert name_problem(bad) is not None, repr(bad)
    assert is_valid_name("support-bot.v2_1")


def test_a_reused_response_id_never_clears_its_reward_or_takes_its_variant():
    """A client can make vLLM reuse an id (X-Request-ID becomes the response id): the state keeps
    the first answer's entry and says so, so the ingress names the new answer anew."""
    from serve.experiments import ExperimentState

    exp = {"name": "e", "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]}
    state = ExperimentState([exp])
    assert state.remember("chatcmpl-foo", "e", "a") is True
    assert state.feedback({"response_id": "chatcmpl-foo", "reward": 1})["variant"] == "a"
    assert state.remember("chatcmpl-foo", "e", "b") is False  # the same id again
    assert state.feedback({"response_id": "chatcmpl-foo", "reward": 1})["status"] == 409
    assert state.outcomes["e"]["a"]["n"] == 1 and not state.outcomes["e"]["b"]


def test_a_made_up_key_on_an_open_server_gets_no_fresh_rate_window():
    opened = Access([], [], open_admin=True)
    ids = {opened.identity(_request(key=f"made-up-{i}")) for i in range(5)}
    assert ids == {"addr:127.0.0.1"}
    keyed = Access(_hashes([API]), _hashes([ADMIN]))
    assert keyed.identity(_request(key=API)) != keyed.identity(_request(key=ADMIN))
    assert keyed.identity(_request(key="nope")) == "addr:127.0.0.1"


@pytest.mark.parametrize("rate", ["0/second", "10/second;100/minute", "fast", "-1/minute"])
def test_a_rate_limit_that_would_not_do_what_it_says_is_refused(rate):
    from cluster.config.serve import HttpConfig

    with pytest.raises(ValueError, match="expected one rate of at least 1 per period"):
        HttpConfig(feedback_rate_limit=rate)


def test_a_state_changing_route_on_an_open_router_stops_the_app_from_starting():
    from fastapi import APIRouter

    import serve.ingress as ingress

    assert ingress.check_admin_routes(ingress.ROUTERS) == len(ingress.ROUTES)
    stray = APIRouter()

    @stray.post("/v1/adapters/{name}/delete")
    async def delete_adapter(name: str):
        return {}

    with pytest.raises(RuntimeError, match="changes the server but is not on an admin router"):
        ingress.check_admin_routes([*ingress.ROUTERS, stray])


# --- the ingress's own FastAPI app over real HTTP, without keys --------------------------------


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """The ingress's real app (serve/ingress.make_app: the request gate, every router,
    require_admin, a real FleetIngress with its AdapterStore) served by uvicorn on 127.0.0.1
    without keys and with http.open_admin_on_loopback, adapter `ab` at two versions in its store.
    No Ray Serve and no vLLM (none of these routes calls an engine): the routes find their
    FleetIngress through Serve's replica context, which here names the one built in this process.
    The served app with Serve and vLLM: tests/test_serve.py."""
    import threading
    import time
    from types import SimpleNamespace

    import ray.serve
    import uvicorn

    from cluster.config.serve import ServeAppConfig
    from cluster.store import layout, versions
    from serve.ingress import FleetIngress, make_app
    from tests.helpers.toolbox import free_port

    tmp = tmp_path_factory.mktemp("open-server")
    root = layout.adapters_root(str(tmp / "store"))
    folder = tmp / "plain"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    first = versions.publish(folder, root, "ab", {"source": {"kind": "test"}})
    second = versions.publish(folder, root, "ab", {"source": {"kind": "test"}})
    from cluster.store.fingerprint import base_fingerprint

    base = _llama_base(tmp / "base", width=64)
    cfg = ServeAppConfig.model_validate(
        {
            "models": [{"id": "m", "base": str(base), "max_lora_rank": 8}],
            "http": {"host": "127.0.0.1", "open_admin_on_loopback": True},
            "storage": {"root": str(tmp / "store")},
        }
    )
    ingress = FleetIngress(
        {},
        {},
        app_config=cfg.model_dump(mode="json"),
        adapter_root=root,
        key_hashes=[],
        state=None,
        base_ids={"m": base_fingerprint(str(base))},
    )
    replica = SimpleNamespace(servable_object=ingress)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(make_app(), host="127.0.0.1", port=port, lifespan="off", log_level="error")
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray.serve, "get_replica_context", lambda: replica)
        # no Ray here: a route that asked Ray for something would otherwise start one (on the
        # outward address, from this thread), and its death 60 s later takes the process with it
        mp.setattr("ray._private.auto_init_hook.enable_auto_connect", False)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield {
            "url": f"http://127.0.0.1:{port}",
            "port": port,
            "root": root,
            "versions": (first, second),
            "ingress": ingress,
            "base": base,
            "tmp": tmp,
        }
        server.should_exit = True
        thread.join(timeout=10)


def _llama_base(out: Path, width: int) -> Path:
    """A random Llama-shaped base (no tokenizer: nothing here generates)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=259,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(conf).save_pretrained(out)
    return out


def _current(open_server, name="ab") -> str:
    from cluster.store import versions

    return versions.current(open_server["root"], name)


def test_a_cross_origin_form_post_over_http_is_403_and_changes_nothing(open_server):
    """What a page on another site can make a browser send to 127.0.0.1: a form POST (urlencoded,
    Origin: that site). Refused with the reason, and `current` does not move; the same rollback
    from curl or lorafleet's CLI (no browser headers) and from the /ui page (same origin, JSON)
    goes through."""
    import requests

    url = open_server["url"] + "/v1/adapters/ab/rollback"
    first, second = open_server["versions"]
    assert _current(open_server) == second
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    attacks = [
        {**form, "Origin": "http://evil.example"},
        {**form, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        {**form, "Origin": "null"},  # a sandboxed frame or a file:// page
        form,  # a browser that sends no Origin: the form's content type gives it away
        # DNS rebinding: the page's own name re-pointed at 127.0.0.1 is same-origin to the browser
        {
            "Host": f"evil.example:{open_server['port']}",
            "Origin": f"http://evil.example:{open_server['port']}",
            "Sec-Fetch-Site": "same-origin",
            "Content-Type": "application/json",
        },
    ]
    for headers in attacks:
        r = requests.post(url, data="x=1", headers=headers, timeout=30)
        assert r.status_code == 403, (headers, r.status_code, r.text)
        said = r.json()["error"]["message"]
        why = ("without a key", "what another site's form can send", "not this machine's loopback")
        assert any(w in said for w in why), said
        assert _current(open_server) == second, headers
    # the same-origin page (serve/ui/static/app.js: its own origin, JSON when it sends a body)
    own = {"Origin": open_server["url"], "Sec-Fetch-Site": "same-origin", "X-Lorafleet-UI": "1"}
    r = requests.post(url, headers=own, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == first, r.text
    # the CLI's client (cluster/cli/http_client.py) and curl: no browser headers
    from cluster.cli.http_client import Client

    r = Client(open_server["url"]).post("/v1/adapters/ab/promote", {"version": second})
    assert r.json()["version"] == second and _current(open_server) == second


def test_the_exposure_check_reads_the_mode_the_running_ray_uses():
    """A YAML at `throughput` on loopback without keys passes on its own, and is refused once the
    running Ray is in HAProxy mode (its processes' environment: cluster.ray_connect.mode_of);
    keys make either fine. On a joined cluster: tests/test_job_submit.py -k haproxy."""
    from cluster.config.serve import HttpConfig
    from cluster.errors import LorafleetError
    from cluster.ray_connect import mode_of
    from serve.app import check_exposed

    assert mode_of({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}) == (
        "haproxy"
    )
    assert mode_of({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "0"}) == (
        "throughput"
    )
    assert mode_of({}) == "proxy"
    http = HttpConfig(host="127.0.0.1", mode="throughput")
    check_exposed(http, [])
    check_exposed(http, [], running_mode="throughput")
    with pytest.raises(LorafleetError, match="runs Serve in HAProxy mode") as e:
        check_exposed(http, [], running_mode="haproxy")
    assert "http.mode says 'throughput'" in str(e.value) and "$LORAFLEET_API_KEYS" in str(e.value)
    check_exposed(http, _hashes([API]), running_mode="haproxy")


def test_an_admin_imports_a_plain_peft_folder_over_http_and_bad_ones_get_400(open_server):
    """POST /v1/adapters/{name}/versions: a folder PEFT wrote on the served base is published
    (201, its provenance), listed by GET /v1/adapters/{name} and current; a folder without a
    config, one made on another base, a rank over the model's max_lora_rank, an unknown model or
    a bad name get 400 naming the problem, and nothing is published for them."""
    import requests
    from test_store import _plain_peft

    url, tmp = open_server["url"], open_server["tmp"]
    good = tmp / "import-good"
    _plain_peft(open_server["base"], good)
    r = requests.post(f"{url}/v1/adapters/imp/versions", json={"source": str(good)}, timeout=60)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["current"] == out["version"] and out["source"]["kind"] == "import", out
    assert out["source"]["by"] == "http" and out["source"]["from"] == str(good)
    listed = requests.get(f"{url}/v1/adapters/imp", timeout=30).json()
    assert listed["current"] == out["version"]
    assert listed["versions"][0]["source"]["kind"] == "import"
    assert listed["versions"][0]["base_fingerprint"] == out["base_fingerprint"]

    wrong = tmp / "import-wrong-base"
    _plain_peft(_llama_base(tmp / "other-base", width=32), wrong)
    no_config = tmp / "import-no-config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes(
        (good / "adapter_model.safetensors").read_bytes()
    )
    big = tmp / "import-big-rank"
    big.mkdir()
    conf = json.loads((good / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**conf, "r": 32}))
    (big / "adapter_model.safetensors").write_bytes(
        (good / "adapter_model.safetensors").read_bytes()
    )
    for name, body, says in [
        ("bad", {"source": str(wrong)}, "its matrices do not fit base"),
        ("bad", {"source": str(no_config)}, "no adapter_config.json"),
        ("bad", {"source": str(big)}, "r=32 is over the served model's max_lora_rank 8"),
        ("bad", {"source": str(good), "model": "nope"}, "model: expected one of ['m']"),
        ("bad", {}, "source: expected"),
        ("..evil", {"source": str(good)}, "invalid"),
    ]:
        r = requests.post(f"{url}/v1/adapters/{name}/versions", json=body, timeout=60)
        assert r.status_code == 400 and says in r.json()["error"]["message"], (body, r.text)
    assert requests.get(f"{url}/v1/adapters/bad", timeout=30).status_code == 404
