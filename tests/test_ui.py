"""The /ui page in a real browser: Debian's Chromium, driven by Selenium through Debian's
chromium-driver (`make browser` installs both), against a real `lorafleet serve` app (Ray Serve,
vLLM on CPU, the tiny base) started by `lorafleet serve CONFIG` itself, in its own process, on the
session's Ray; the last test stops it with SIGTERM, as `kill`, Docker and systemd do. The page gets
the key the way a browser does after its Basic prompt (credentials on the first navigation);
everything it shows comes from polling the app's JSON.

    .venv/bin/pytest -q tests/test_ui.py
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from cluster.store import layout, versions
from tests.helpers.toolbox import free_port

# the tests on the app (a real Ray Serve app with a vLLM replica, and a browser) are `slow`:
# minutes, not the quick tier; the first three here need neither

KEY = "sk-ui-" + "0123456789abcdef"  # an inference key (http.api_keys_env)
ADMIN_KEY = "sk-ui-admin-" + "fedcba9876543210"  # an admin key (http.admin_keys_env)
APP = "t-ui"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# the share a variant got must be within this of its weight's share: with 160 users at 80/20 one
# standard deviation is 3.2 points, so 0.12 is over 3.5 of them
SHARE_TOLERANCE = 0.12
USERS = 160
ROOT = Path(__file__).resolve().parents[1]
# LORAFLEET_UI_SHOTS=docs also copies the release test's screenshot to docs/ui.png (the README's,
# from a real run of this file); by default screenshots stay in the test's tmp dir
SHOTS_ENV = "LORAFLEET_UI_SHOTS"


def _publish(base: Path, root: str, name: str, seed: int, current: bool = True) -> str:
    """A LoRA adapter for the tiny base (PEFT, random weights: the page shows versions, not
    answers), published as a new version of `name` the way training publishes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cluster.store.fingerprint import base_fingerprint

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, lora)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        meta = {
            "base_model": str(base),
            "base_fingerprint": base_fingerprint(str(base)),
            "step": 10 * (seed + 1),
            "eval_loss": round(2.0 - 0.1 * seed, 3),
            "metrics": {"eval_loss": round(2.0 - 0.1 * seed, 3)},
            "source": {"kind": "test"},
        }
        return versions.publish(tmp, root, name, meta, make_current=current)


def _serve_config(port: int, base: str, storage_root: str):
    from cluster.config.load import load_config
    from cluster.config.serve import ServeAppConfig

    raw = {
        "name": APP,
        "models": [
            {
                "id": "tiny",
                "base": base,
                "dtype": "float32",
                "max_model_len": 128,
                "max_lora_rank": 8,
                "max_loras_per_replica": 3,
                "engine_kwargs": {"enforce_eager": True, "seed": 0},
                "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            }
        ],
        "experiments": [
            {
                "name": "bot",
                "variants": [
                    {"name": "a", "model": "tiny", "adapter": "ui-a", "weight": 80},
                    {"name": "b", "model": "tiny", "adapter": "ui-b", "weight": 20},
                ],
            }
        ],
        "http": {"host": "127.0.0.1", "port": port},
        "storage": {"root": storage_root},
    }
    return load_config(None, raw, ServeAppConfig)


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory, tiny_base):
    """`lorafleet serve CONFIG` (a subprocess, joined to the session's Ray as a cluster's job
    would be) on the tiny base: an inference key and an admin key, experiment `bot` (80/20
    between adapters ui-a and ui-b) and adapter ui-rel with a candidate version. ui-b is
    published only once the app is up: the command warns that it is missing, and the running
    app then finds it in the store."""

    from ray import serve

    from cluster.config.load import dump_config

    tmp = tmp_path_factory.mktemp("ui")
    store = tmp / "store"
    root = layout.adapters_root(str(store))
    for i, name in enumerate(("ui-a", "ui-b", "ui-rel")):
        if name != "ui-b":
            _publish(tiny_base, root, name, seed=i)
    cfg = _serve_config(free_port(), str(tiny_base), str(store))
    cfg.ray.address = ray_local.get_runtime_context().gcs_address
    cfg_path = tmp / "serve.yaml"
    cfg_path.write_text(dump_config(cfg))
    log = tmp / "serve.log"
    t0 = time.monotonic()
    proc = _start_serve(cfg, cfg_path, log)
    url = f"http://127.0.0.1:{cfg.http.port}"
    try:
        _wait_ready(proc, log)
        said = log.read_text()
        assert (
            "[serve] warning: experiment 'bot' variant 'b' names adapter 'ui-b', which is not in "
            f"{root} yet" in said
        ), said[-3000:]
        _publish(tiny_base, root, "ui-b", seed=1)
        # the running app finds the adapter published after it started (its store refresh)
        _wait_for(lambda: "tiny:ui-b" in _model_ids(url), 60, "ui-b in /v1/models")
        print(f"app up in {time.monotonic() - t0:.1f} s")
        yield {
            "url": url,
            "cfg": cfg,
            "cfg_path": cfg_path,
            "root": root,
            "base": tiny_base,
            "shots": tmp / "screenshots",
            "proc": proc,
            "log": log,
        }
    finally:
        if proc.poll() is None:  # the last test stops it; a test that failed first may not have
            proc.kill()
            proc.wait(timeout=30)
        if APP in serve.status().applications:
            serve.delete(APP)
        serve.shutdown()


def _start_serve(cfg, cfg_path: Path, log: Path):
    """`lorafleet serve CONFIG` in a subprocess joined to the session's Ray, its output in `log`."""
    import subprocess
    import sys

    from cluster.ray_connect import state_api_address

    environ = {cfg.http.api_keys_env: KEY, cfg.http.admin_keys_env: ADMIN_KEY}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", str(cfg_path)],
            cwd=ROOT,
            env=os.environ | environ | {"RAY_API_SERVER_ADDRESS": state_api_address()},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_ready(proc, log: Path) -> None:
    # a vLLM replica starting beside a busy suite on 2 cores took minutes
    deadline = time.monotonic() + 500
    while "[serve] ready at" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def _model_ids(url: str) -> set[str]:
    r = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    return {m["id"] for m in r.json()["data"]} if r.status_code == 200 else set()


def _wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


# --- the browser ---------------------------------------------------------------------------------


def _browser(url: str, key: str | None, width=1280, height=800):
    """Headless Debian Chromium at `url`/ui, given `key` the way a browser is after its Basic
    prompt: as credentials on the first navigation, which it then keeps for the origin."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are missing: run `make browser` (as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run "
        "--disable-background-networking --disable-component-update --disable-sync "
        "--disable-dev-shm-usage"
    ).split():
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="lorafleet-ui-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.profile_dir = profile
    _viewport(driver, width, height)
    host = url.split("://", 1)[1]
    driver.get(f"http://ui:{key}@{host}/ui" if key else f"{url}/ui")
    return driver


def _close(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def _viewport(driver, width: int, height: int) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )


def _wait(driver_or_fn, what: str, timeout_s=60.0, poll_s=0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = driver_or_fn()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _polls(driver) -> int:
    return int(driver.execute_script("return document.body.dataset.polls || 0"))


def _next_poll(driver, timeout_s=30.0) -> None:
    """Wait for two more polls: the one in flight may have started before what the test did."""
    start = _polls(driver)
    _wait(lambda: _polls(driver) >= start + 2, "two more polls of the page", timeout_s)


def _table(driver, selector: str, cell: str, attr: str = "textContent") -> dict[str, str]:
    """{variant: value of `cell` in that variant's row} of the first table matching `selector`."""
    return driver.execute_script(
        """const [sel, cell, attr] = arguments; const out = {};
        for (const tr of document.querySelectorAll(sel + ' tbody tr')) {
          const td = tr.querySelector(cell);
          if (td) out[tr.dataset.variant] = attr === 'textContent' ? td.textContent : td.dataset[attr];
        }
        return out;""",
        selector,
        cell,
        attr,
    )


def _click_and_confirm(driver, selector: str) -> str:
    """Click the button and accept the confirmation it asks; the question it asked."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, selector).click()
    alert = _wait(lambda: _alert(driver), f"the confirmation of {selector}", 10)
    text = alert.text
    alert.accept()
    return text


def _alert(driver):
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return driver.switch_to.alert
    except NoAlertPresentException:
        return None


def _shoot(driver, path: Path, width: int, height: int, full: bool = False) -> Path:
    """A screenshot at `width` x `height` (`full`: the whole page's height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if full:
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    _viewport(driver, width, height)
    time.sleep(0.5)  # Chart.js redraws on resize
    driver.save_screenshot(str(path))
    return path


# --- traffic ----------------------------------------------------------------------------------


def _ask(app, model: str, user: str, key=KEY) -> requests.Response:
    body = {"model": model, "prompt": "hi", "max_tokens": 1, "user": user}
    return requests.post(
        f"{app['url']}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def _traffic(app, users: list[str], reward=None) -> Counter:
    """Each user asks experiment `bot` once (and, with `reward(variant)`, posts feedback for the
    answer): how many answers each variant gave."""

    def one(user):
        r = _ask(app, "bot", user)
        assert r.status_code == 200, r.text
        variant = r.headers["X-Lorafleet-Variant"]
        if reward is not None:
            fb = requests.post(
                f"{app['url']}/v1/feedback",
                json={
                    "response_id": r.headers["X-Lorafleet-Response-Id"],
                    "reward": reward(variant),
                },
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=60,
            )
            assert fb.status_code == 200, fb.text
        return variant

    with ThreadPoolExecutor(4) as pool:
        return Counter(pool.map(one, users))


def _basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"anyone:{key}".encode()).decode()


# --- without a server ----------------------------------------------------------------------------


def _request(method: str, authorization: str | None, ui_header: bool = False, **more):
    from starlette.requests import Request

    headers = [(b"authorization", authorization.encode())] if authorization else []
    if ui_header:
        headers.append((b"x-lorafleet-ui", b"1"))
    headers += [(k.replace("_", "-").encode(), v.encode()) for k, v in more.items()]
    headers.append((b"host", b"127.0.0.1:8000"))
    scope = {"type": "http", "method": method, "path": "/v1/x", "headers": headers}
    return Request({**scope, "scheme": "http", "server": ("127.0.0.1", 8000)})


def test_the_key_comes_as_bearer_or_as_the_basic_password():
    from serve.auth import credentials

    assert credentials(_request("GET", f"Bearer {KEY}")) == ("Bearer", KEY)
    assert credentials(_request("GET", _basic(KEY))) == ("bearer", KEY)
    assert credentials(_request("GET", "Basic !!not-base64")) == ("", "")
    assert credentials(_request("GET", None)) == ("", "")
    # a changing request on a browser's Basic credentials needs the page's own header (another
    # site's form cannot set it); with a Bearer key it does not
    assert credentials(_request("PUT", _basic(ADMIN_KEY))) == ("", "")
    assert credentials(_request("PUT", _basic(ADMIN_KEY), ui_header=True)) == ("bearer", ADMIN_KEY)
    assert credentials(_request("PUT", f"Bearer {ADMIN_KEY}")) == ("Bearer", ADMIN_KEY)
    # another site's script reading with the browser's saved login gets no key (Ray's CORS
    # middleware would let it read the answer); the page itself and a Bearer caller do
    evil = {"origin": "https://evil.example"}
    assert credentials(_request("GET", _basic(KEY), sec_fetch_site="cross-site")) == ("", "")
    assert credentials(_request("GET", _basic(KEY), **evil)) == ("", "")
    assert credentials(_request("GET", _basic(KEY), sec_fetch_site="same-origin")) == (
        "bearer",
        KEY,
    )
    assert credentials(_request("GET", _basic(KEY), origin="http://127.0.0.1:8000")) == (
        "bearer",
        KEY,
    )
    assert credentials(_request("GET", f"Bearer {KEY}", **evil)) == ("Bearer", KEY)


def test_latency_counters_fold_into_a_histogram_with_p50_and_p99():
    from serve.release import latency_bucket
    from serve.ui import LATENCY_BOUNDS_S, fold_latency

    variant = {"requests": 100, "latency_s_sum": 9.0}
    for latency_s in [0.05] * 98 + [2.0] * 2:
        key = latency_bucket(latency_s)
        variant[key] = variant.get(key, 0) + 1
    fold_latency(variant)
    assert not [k for k in variant if k.startswith("lat_")] and variant["requests"] == 100
    assert sum(variant["latency_buckets"].values()) == 100
    # each quantile is its bucket's upper bound: within 25% above the true value
    assert 0.05 <= variant["p50_s"] < 0.05 * 1.25 and 2.0 <= variant["p99_s"] < 2.0 * 1.25
    assert LATENCY_BOUNDS_S == sorted(LATENCY_BOUNDS_S)


def test_the_page_and_its_files_are_where_the_installed_package_serves_them():
    """`make setup` copied Chart.js from npm (serve/ui/package-lock.json) beside the page's own
    files, and pyproject.toml ships all of them with the package."""
    import tomllib

    from serve.ui import STATIC, UI_DIR, static_file

    assert (UI_DIR / "index.html").is_file()
    for name in STATIC:
        r = static_file(name)
        assert r.status_code == 200, f"{name}: {r.body[:200]!r} (run `make setup`)"
    assert b"Chart.js v4" in static_file("chart.umd.min.js").body[:300]
    assert static_file("../ui.py").status_code == 404
    lock = json.loads((UI_DIR / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/chart.js"]["version"].startswith("4.")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["serve"]
    assert {"ui/index.html", "ui/static/*"} <= set(shipped)


def test_the_page_gets_a_95_interval_for_any_reward():
    """GET /v1/experiments gives each variant's 95% interval, which the page shows: Wilson's for
    0/1 rewards, Student's t for others, checked against hand-computed values."""
    from serve.outcomes import add_reward, summarize

    thumbs, scores = {}, {}
    for r in [1.0] * 8 + [0.0] * 2:
        add_reward(thumbs, r)
    for r in (0.2, 0.4, 0.9):
        add_reward(scores, r)
    out = summarize({"a": thumbs, "b": scores, "c": {}}, "a", 100)
    # 8 of 10: Wilson's (p + z^2/2n)/(1 + z^2/n) +- z sqrt(p(1-p)/n + z^2/4n^2)/(1 + z^2/n)
    wilson = out["a"]["interval_95"]
    assert wilson["method"] == "wilson"
    assert wilson["low"] == pytest.approx(0.4902, abs=1e-4)
    assert wilson["high"] == pytest.approx(0.9433, abs=1e-4)
    # 0.2, 0.4, 0.9: mean 0.5, s^2 = (0.09 + 0.01 + 0.16) / 2 = 0.13, t(0.975, 2) = 4.3027,
    # half-width 4.3027 * sqrt(0.13 / 3) = 0.8957
    t = out["b"]["interval_95"]
    assert t["method"] == "t"
    assert (t["low"], t["high"]) == pytest.approx((0.5 - 0.8957, 0.5 + 0.8957), abs=1e-4)
    assert out["c"]["interval_95"] is None  # no rewards: no interval
    one = {}
    add_reward(one, 0.3)
    assert summarize({"a": one}, "a", 1)["a"]["interval_95"] is None  # one non-0/1: no variance


# --- on a live app ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_without_a_key_the_page_is_refused(app):
    url = app["url"]
    for path in ("/ui", "/ui/static/app.js", "/ui/static/chart.umd.min.js"):
        r = requests.get(url + path, timeout=30)
        assert r.status_code == 401, (path, r.status_code)
        assert r.headers["WWW-Authenticate"].startswith('Basic realm="lorafleet"'), r.headers
    assert requests.get(url + "/ui", headers={"Authorization": _basic("wrong")}).status_code == 401
    # with a key, the page and Chart.js (from npm, copied by `make setup`) come from the app itself
    r = requests.get(url + "/ui/static/chart.umd.min.js", headers={"Authorization": _basic(KEY)})
    assert r.status_code == 200 and "Chart.js v4" in r.text[:300], r.text[:300]
    # what a browser shows if its user cancels the key prompt: the refusal, none of the data
    r = requests.get(url + "/ui", timeout=30)
    assert "401: key needed" in r.text and "as the password" in r.text and "bot" not in r.text


@pytest.mark.slow
def test_shown_shares_and_outcomes_match_the_traffic(app):
    """The page is open while users ask: the share each variant got in the window, as the page
    shows it, is its weight's share within SHARE_TOLERANCE, and the feedback counts are exact.
    Variant a gets thumbs, b scores: the page shows a Wilson interval for a, a t interval for b."""
    driver = _browser(app["url"], ADMIN_KEY)
    try:
        _wait(lambda: _polls(driver) >= 1, "the page's first poll")
        weights = {
            v: float(s) for v, s in _table(driver, "table.shares", ".weight-share", "share").items()
        }
        before = {
            v: int(n) for v, n in _table(driver, "table.outcome-table", ".feedback-count").items()
        }
        t0 = time.monotonic()
        scores = itertools.cycle([0.25, 0.75])
        sent = _traffic(
            app,
            [f"share-{i}" for i in range(USERS)],
            reward=lambda v: "up" if v == "a" else next(scores),
        )
        print(f"{USERS} requests and feedback in {time.monotonic() - t0:.1f} s: {dict(sent)}")
        _next_poll(driver)
        requests_seen = {
            v: int(n or 0)
            for v, n in _table(driver, "table.shares", ".observed-share", "requests").items()
        }
        shown = _table(driver, "table.shares", ".observed-share", "share")
        assert requests_seen == {v: sent.get(v, 0) for v in weights}, (requests_seen, sent)
        for v, share in weights.items():
            assert abs(float(shown[v]) - share) < SHARE_TOLERANCE, (v, shown, weights)
        after = {
            v: int(n) for v, n in _table(driver, "table.outcome-table", ".feedback-count").items()
        }
        assert {v: after[v] - before[v] for v in weights} == {v: sent.get(v, 0) for v in weights}
        methods = _table(driver, "table.outcome-table", ".interval", "method")
        assert methods == {"a": "wilson", "b": "t"}, methods
        shown_b = _table(driver, "table.outcome-table", ".interval")["b"]
        assert shown_b.startswith("[") and shown_b.endswith("(t)"), shown_b
        _shoot(driver, app["shots"] / "ui-1280x800.png", 1280, 800)
        _shoot(driver, app["shots"] / "ui-phone-390x844.png", 390, 844)
    finally:
        _close(driver)


@pytest.mark.slow
def test_a_reweight_from_the_page_changes_the_split_new_users_get(app):
    driver = _browser(app["url"], ADMIN_KEY)
    try:
        _wait(lambda: _polls(driver) >= 1, "the page's first poll")
        now = {
            v: float(s) for v, s in _table(driver, "table.shares", ".weight-share", "share").items()
        }
        want = {"a": 20, "b": 80} if now["a"] > 0.5 else {"a": 80, "b": 20}
        for v, w in want.items():
            box = driver.find_element(
                "css selector", f'#exp-bot .actions input[data-variant="{v}"]'
            )
            box.clear()
            box.send_keys(str(w))
        question = _click_and_confirm(driver, '#exp-bot button.reweight[data-experiment="bot"]')
        assert f"a={want['a']}, b={want['b']}" in question, question
        said = _wait(
            lambda: driver.find_element("id", "message").text, "the page to say the outcome", 30
        )
        assert said.startswith("re-weighted bot"), said
        _next_poll(driver)
        shown = _table(driver, "table.shares", ".weight-share", "share")
        assert {v: round(float(s), 2) for v, s in shown.items()} == {
            v: w / 100 for v, w in want.items()
        }
    finally:
        _close(driver)
    sent = _traffic(app, [f"new-user-{i}" for i in range(USERS)])
    for v, w in want.items():
        assert abs(sent[v] / USERS - w / 100) < SHARE_TOLERANCE, (sent, want)


def _release_traffic(app, stop: threading.Event) -> None:
    """Rounds of 8 users asking the adapter under release, and the experiment (the page's charts
    in the README's screenshot), until `stop`."""
    i = 0
    while not stop.is_set():
        asks = [(m, f"rel-{i}-{j}") for j in range(8) for m in ("tiny:ui-rel", "bot")]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda a: _ask(app, *a), asks))
        i += 1


@pytest.mark.slow
def test_a_release_started_from_the_cli_appears_and_advances(app, monkeypatch, capsys):
    from cluster.cli import main as cli
    from cluster.config.load import dump_config
    from cluster.config.release import ReleaseConfig

    candidate = _publish(app["base"], app["root"], "ui-rel", seed=7, current=False)
    release = ReleaseConfig.model_validate(
        {
            "adapter": "ui-rel",
            "version": candidate,
            "steps": [{"percent": p, "hold_s": 3} for p in (25, 50, 100)],
            "gates": {"min_requests": 3, "max_p99_ratio": 50},
        }
    )
    cfg_path = app["cfg_path"].with_name("release.yaml")
    cfg_path.write_text(dump_config(app["cfg"].model_copy(update={"release": release})))
    driver = _browser(app["url"], ADMIN_KEY)
    stop = threading.Event()
    traffic = threading.Thread(target=_release_traffic, args=(app, stop))
    try:
        _wait(lambda: _polls(driver) >= 1, "the page's first poll")
        monkeypatch.setenv(app["cfg"].http.admin_keys_env, ADMIN_KEY)
        assert cli.main(["release", str(cfg_path), "--no-follow"]) == 0, capsys.readouterr()
        traffic.start()
        card = f'.release[data-adapter="ui-rel"][data-candidate="{candidate}"]'
        state = lambda: driver.execute_script(  # noqa: E731
            "const c = document.querySelector(arguments[0]); "
            "return c && [c.dataset.state, +c.dataset.step]",
            card,
        )
        first = _wait(state, "the release on the page", 30)
        assert first[0] == "running", first
        assert driver.find_element("css selector", f"{card} button.abort").is_displayed()
        # paused from the page: the card says so, and the step stays past its 3 s hold while
        # users keep asking; resumed, it goes on (below)
        question = _click_and_confirm(driver, f"{card} button.pause")
        assert "Pause the release of ui-rel" in question, question
        paused = _wait(lambda: state()[0] == "paused" and state(), "the card to say paused", 30)
        badge = driver.find_element("css selector", f"{card} h3 .state").text
        assert badge == "paused", badge
        assert driver.find_element("css selector", f"{card} button.resume").is_displayed()
        held_at = requests.get(
            f"{app['url']}/v1/releases/ui-rel",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        ).json()
        time.sleep(8)  # over two holds of asking
        _next_poll(driver)
        assert state() == paused, (state(), paused)
        now = requests.get(
            f"{app['url']}/v1/releases/ui-rel",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        ).json()
        assert (now["state"], now["step"]) == ("paused", paused[1]), now
        served = [sum(r["total"][a].get("requests", 0) for a in r["total"]) for r in (held_at, now)]
        assert served[1] > served[0], served  # users were served all along
        question = _click_and_confirm(driver, f"{card} button.resume")
        assert "Resume the release of ui-rel" in question, question
        _wait(lambda: state()[0] != "paused", "the card to say running again", 30)
        first = paused
        # it advances: a later step, or promoted, with the decision in the log on the page
        _wait(lambda: state()[1] > first[1] or state()[0] == "promoted", "a step", 60)
        decisions = driver.execute_script(
            "return [...document.querySelectorAll(arguments[0] + ' .decision-name')]"
            ".map(x => x.textContent)",
            card,
        )
        assert {"started", "paused", "resumed", "advanced"} <= set(decisions), decisions
        _shoot(driver, app["shots"] / "ui-release-1280.png", 1280, 800, full=True)
        if os.environ.get(SHOTS_ENV):
            to = ROOT / os.environ[SHOTS_ENV]
            to.mkdir(parents=True, exist_ok=True)
            shutil.copy(app["shots"] / "ui-release-1280.png", to / "ui.png")
        _wait(lambda: state()[0] == "promoted", "the release to be promoted", 60)
        assert versions.current(app["root"], "ui-rel") == candidate
        # `lorafleet release pause` reaches the same endpoint: an ended release is refused, why said
        capsys.readouterr()
        assert cli.main(["release", "pause", str(cfg_path), "ui-rel"]) == 1
        err = capsys.readouterr().err
        assert "409" in err and "has ended (promoted)" in err, err
    finally:
        stop.set()
        if traffic.is_alive():
            traffic.join()
        _close(driver)
        # a failed run leaves no release behind (404: none runs, as when it was promoted)
        requests.post(
            f"{app['url']}/v1/releases/ui-rel/abort",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
        )


@pytest.mark.slow
def test_promote_and_roll_back_from_the_page(app):
    root = app["root"]
    old = versions.current(root, "ui-a")
    new = _publish(app["base"], root, "ui-a", seed=11, current=False)
    driver = _browser(app["url"], ADMIN_KEY)
    try:
        card = '.adapter[data-adapter="ui-a"]'
        _wait(
            lambda: driver.find_elements(
                "css selector", f'{card} button.promote[data-version="{new}"]'
            ),
            "the new version's promote button",
            30,
        )
        question = _click_and_confirm(driver, f'{card} button.promote[data-version="{new}"]')
        assert new in question, question
        _wait(lambda: versions.current(root, "ui-a") == new, "the promote", 30)
        _wait(
            lambda: driver.find_elements("css selector", f"{card} button.rollback"), "roll back", 30
        )
        question = _click_and_confirm(driver, f"{card} button.rollback")
        assert old in question, question
        _wait(lambda: versions.current(root, "ui-a") == old, "the roll back", 30)
    finally:
        _close(driver)


@pytest.mark.slow
def test_an_inference_key_sees_the_page_read_only(app):
    driver = _browser(app["url"], KEY)
    try:
        _wait(lambda: _polls(driver) >= 1, "the page's first poll")
        assert driver.find_element("id", "role").text == "read-only"
        assert driver.find_elements("css selector", "#exp-bot table.shares")  # it sees the data
        buttons = (
            "button.reweight, button.abort, button.pause, button.resume, button.promote, "
            "button.rollback, .actions input"
        )
        assert driver.find_elements("css selector", buttons) == []
        # and the server refuses what the buttons would send, from the page itself
        status = driver.execute_async_script(
            """const done = arguments[arguments.length - 1];
            fetch(new URL('/v1/experiments/bot', location.origin), {method: 'PUT',
              credentials: 'same-origin',
              headers: {'Content-Type': 'application/json', 'X-Lorafleet-UI': '1'},
              body: JSON.stringify({weights: {a: 1, b: 99}})})
              .then(r => done(r.status), e => done(String(e)));"""
        )
        assert status == 403, status
    finally:
        _close(driver)
    url = app["url"]
    for method, path, body in (
        ("PUT", "/v1/experiments/bot", {"weights": {"a": 1, "b": 99}}),
        ("POST", "/v1/adapters/ui-a/rollback", None),
        ("POST", "/v1/releases/ui-rel/abort", None),
        ("POST", "/v1/releases/ui-rel/pause", None),
        ("POST", "/v1/releases/ui-rel/resume", None),
    ):
        r = requests.request(
            method,
            url + path,
            data=json.dumps(body) if body else None,
            headers={"Authorization": _basic(KEY), "X-Lorafleet-UI": "1"},
            timeout=30,
        )
        assert r.status_code == 403, (path, r.status_code, r.text)
    # an admin key's Basic credentials without the page's header (another site's form): refused
    r = requests.put(
        url + "/v1/experiments/bot",
        data=json.dumps({"weights": {"a": 1, "b": 99}}),
        headers={"Authorization": _basic(ADMIN_KEY)},
        timeout=30,
    )
    assert r.status_code == 401, r.text


def _vllm_replicas() -> set[str]:
    """The running vLLM replicas' ids, each asked of its replica actor (its routing stats,
    serve/server.py): what the page's "loaded on" must name."""
    import ray
    from ray.util.state import list_actors

    from cluster.ray_connect import state_api_address

    found = set()
    for a in list_actors(
        address=state_api_address(), filters=[("state", "=", "ALIVE")], detail=True
    ):
        if a.class_name.startswith(f"ServeReplica:{APP}:LoraStoreServer"):
            stats = ray.get(ray.get_actor(a.name, namespace="serve").record_routing_stats.remote())
            found.add(stats["lorafleet"]["replica"])
    return found


def _loaded_on(app, name: str):
    r = requests.get(
        f"{app['url']}/v1/adapters/{name}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()["loaded_on"]


@pytest.mark.slow
def test_an_adapter_shows_the_replicas_that_loaded_it(app):
    """An adapter no request named (and no experiment preloads) is on no replica; a request for a
    pinned version, then for the current one, puts each on the replica that answered, and the page
    names that replica beside each version it holds (and beside no other version)."""
    root, base = app["root"], app["base"]
    old = _publish(base, root, "ui-cold", seed=21)
    new = _publish(base, root, "ui-cold", seed=22)
    unused = _publish(base, root, "ui-cold", seed=23, current=False)
    (replica,) = _vllm_replicas()  # max_replicas: 1
    assert _loaded_on(app, "ui-cold") == []
    card = '.adapter[data-adapter="ui-cold"]'
    driver = _browser(app["url"], KEY)
    try:
        shown = lambda: driver.execute_script(  # noqa: E731
            """const c = document.querySelector(arguments[0]);
            const p = c && c.querySelector('.loaded-on');
            if (!p || !c.querySelector('tr[data-version="' + arguments[1] + '"]')) return null;
            const cells = {};
            for (const tr of c.querySelectorAll('tr[data-version]'))
              cells[tr.dataset.version] = tr.querySelector('td.replicas').dataset.replicas;
            return {known: p.dataset.known, text: p.textContent, cells,
              replicas: [...p.querySelectorAll('.replica')].map(
                (s) => [s.dataset.replica, s.dataset.versions])};""",
            card,
            unused,
        )
        before = _wait(shown, "ui-cold's card with its versions", 60)
        assert before["known"] == "true" and before["replicas"] == [], before
        assert set(before["cells"].values()) == {""}, before
        assert "no replica" in before["text"], before

        r = _ask(app, f"tiny:ui-cold@{old}", "cold-1")
        assert r.status_code == 200, r.text
        want = [{"model": "tiny", "replica": replica, "versions": [old]}]
        _wait(lambda: _loaded_on(app, "ui-cold") == want, f"ui-cold@{old} on {replica}", 30)
        assert _ask(app, "tiny:ui-cold", "cold-2").status_code == 200
        want = [{"model": "tiny", "replica": replica, "versions": sorted([old, new])}]
        _wait(lambda: _loaded_on(app, "ui-cold") == want, f"both versions on {replica}", 30)

        _next_poll(driver)
        after = shown()
        assert after["replicas"] == [[replica, " ".join(sorted([old, new]))]], after
        assert replica in after["text"] and "1 replica" in after["text"], after
        assert after["cells"] == {old: replica, new: replica, unused: ""}, after
    finally:
        _close(driver)


# --- last: the command stops --------------------------------------------------------------------


@pytest.fixture(scope="module")
def answered(app) -> list[tuple[str, str]]:
    """(response id, variant) of answers experiment `bot` gave, not yet rewarded."""
    out = []
    for i in range(4):
        r = _ask(app, "bot", f"before-restart-{i}")
        assert r.status_code == 200, r.text
        out.append((r.headers["X-Lorafleet-Response-Id"], r.headers["X-Lorafleet-Variant"]))
    return out


@pytest.mark.slow
def test_lorafleet_serve_stops_on_sigterm_and_takes_its_app_with_it(app, answered):
    """SIGTERM (what `kill`, `docker stop` and systemd send) stops `lorafleet serve` the way
    Ctrl-C does: it deletes its app, says so, and exits 0; the cluster it joined stays up. (That
    a command that started its own Ray leaves none of its processes behind is the Ctrl-C test's
    in tests/test_cli.py: the same `main`.)"""
    from ray import serve

    proc = app["proc"]
    assert proc.poll() is None, app["log"].read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    said = app["log"].read_text()
    assert rc == 0, said[-3000:]
    assert f"[serve] stopping '{APP}'" in said and "[serve] stopped" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert APP not in serve.status().applications
    r = requests.get(f"{app['url']}/v1/models", timeout=30)
    assert r.status_code == 404, r.text  # Serve's proxy is up; the app behind it is gone


def _outcome_counts(app) -> dict[str, int]:
    r = requests.get(
        f"{app['url']}/v1/experiments", headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert r.status_code == 200, r.text
    variants = r.json()["experiments"]["bot"]["variants"]
    return {v: s["outcome"]["count"] for v, s in variants.items()}


def _send_feedback(app, response_id: str, reward: float) -> requests.Response:
    return requests.post(
        f"{app['url']}/v1/feedback",
        json={"response_id": response_id, "reward": reward},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )


@pytest.mark.slow
def test_feedback_on_answers_given_before_a_lorafleet_serve_restart_is_counted(app, answered):
    """The command stopped above (SIGTERM) and started again on the same storage: feedback for
    the answers the first run gave is counted (the signed ids need no record of them, the secret
    comes back from storage), a tampered id gets 400, a second reward 409. The second start
    scales its model to zero (`min_replicas: 0`): feedback and the experiment counts are the
    ingress's and the experiment state's, so no vLLM engine starts for them."""
    from cluster.config.load import dump_config

    cfg = app["cfg"].model_copy(deep=True)
    cfg.models[0].autoscaling.min_replicas = cfg.models[0].autoscaling.initial_replicas = 0
    cfg_path = app["cfg_path"].with_name("serve-again.yaml")
    cfg_path.write_text(dump_config(cfg))
    log = app["log"].with_name("serve-again.log")
    proc = _start_serve(cfg, cfg_path, log)
    try:
        _wait_ready(proc, log)
        before = _outcome_counts(app)
        for rid, _ in answered:
            r = _send_feedback(app, rid, 1)
            assert r.status_code == 200, r.text
        after = _outcome_counts(app)
        for variant in {v for _, v in answered}:
            n = sum(v == variant for _, v in answered)
            assert after[variant] == before.get(variant, 0) + n, (before, after, answered)
        rid = answered[0][0]
        assert _send_feedback(app, rid, 0).status_code == 409  # rewarded once
        head, payload, mac = rid.split(".")
        tampered = f"{head}.{payload}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}"
        r = _send_feedback(app, tampered, 1)
        assert r.status_code == 400, r.text
        assert _outcome_counts(app) == after
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
