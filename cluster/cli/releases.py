"""`lorafleet release`: start a canary release on a running `lorafleet serve` and follow it.

    lorafleet release configs/serve-demo.yaml                   # the file's `release:` section
    lorafleet release configs/serve-demo.yaml release.version=20261202-003015-123-9f3a
    lorafleet release status configs/serve-demo.yaml [ADAPTER]
    lorafleet release abort configs/serve-demo.yaml ADAPTER
    lorafleet release pause configs/serve-demo.yaml ADAPTER    # hold its step and split
    lorafleet release resume configs/serve-demo.yaml ADAPTER   # its step again, on fresh counts

The release runs inside the Serve app (serve/release.py), not here: Ctrl-C, or this machine going
away, stops only the following; `lorafleet release status` picks it up again. Every call needs the
admin key ($LORAFLEET_ADMIN_KEYS, or http.admin_keys_file).
"""

from __future__ import annotations

import time

from cluster.cli.http_client import Client

DONE = ("promoted", "rolled_back")


def admin_client(cfg, url: str | None) -> Client:
    url = url or f"http://{cfg.http.host}:{cfg.http.port}"
    return Client(url, key=cfg.http.client_key(admin=True))


def _numbers(n: dict) -> str:
    parts = []
    if "candidate_requests" in n:
        parts.append(
            f"candidate {n['candidate_requests']} req, {n['candidate_error_rate']:.1%} errors; "
            f"control {n['control_requests']} req, {n['control_error_rate']:.1%} errors"
        )
    if n.get("candidate_p99_s") is not None:
        ctl = n.get("control_p99_s")
        parts.append(
            f"p99 {n['candidate_p99_s']:.3f} s vs {ctl:.3f} s"
            if ctl is not None
            else f"p99 {n['candidate_p99_s']:.3f} s"
        )
    if n.get("difference") is not None:
        parts.append(
            f"reward {n['candidate_mean']} vs {n['control_mean']} ({n['candidate_rewards']} and "
            f"{n['control_rewards']} rewards), difference {n['difference']:+.3f} in "
            f"[{n['difference_low']:+.3f}, {n['difference_high']:+.3f}], margin "
            f"-{n['max_reward_drop']:g}"
        )
    elif n.get("p_value") is not None:  # a release logged before the sequential gate
        parts.append(
            f"reward {n.get('candidate_mean')} vs {n.get('control_mean')}, p={n['p_value']:.3g}"
        )
    if n.get("shadow_compared"):
        parts.append(
            f"agreed with the control on {n['shadow_agreement']:.1%} of "
            f"{n['shadow_compared']} answers"
        )
    if n.get("control_score") is not None:
        parts.append(
            f"{n['metric']} {n['candidate_score']:.3f} vs control {n['control_score']:.3f} on "
            f"{n['eval_rows']} rows, max drop {n['max_drop']:g}"
        )
    if n.get("gate"):
        parts.append(f"failed gate: {n['gate']}")
    if n.get("on_timeout"):
        parts.append(f"waited {n['waited_s']:g} s: on_timeout {n['on_timeout']}")
    if n.get("paused_s") is not None:
        parts.append(f"paused {n['paused_s']:g} s")
    if n.get("by"):
        parts.append(f"by {n['by']}")
    return "; ".join(parts)


def log_line(release: dict, entry: dict) -> str:
    steps = release["steps"]
    phase = entry.get("phase")
    if phase == "eval":
        where = "eval"
    elif phase == "shadow":
        where = f"shadow ({entry.get('mirrored', 0):g}% mirrored)"
    else:
        where = f"step {entry['step'] + 1}/{steps} ({entry['percent']:g}%)"
    head = f"[release] {release['adapter']} {release['candidate']}: {where} {entry['decision']}"
    detail = _numbers(entry.get("numbers") or {})
    return f"{head} ({detail})" if detail else head


def follow(client: Client, adapter: str, out=print, poll_s: float = 1.0, shown: int = 0) -> int:
    """Print the release's decisions as they come; 0 when promoted, 1 when rolled back."""
    while True:
        release = client.request("GET", f"/v1/releases/{adapter}").json()
        for entry in release["log"][shown:]:
            out(log_line(release, entry))
        shown = len(release["log"])
        if release["state"] in DONE:
            return 0 if release["state"] == "promoted" else 1
        time.sleep(poll_s)


def start(cfg, spec: dict, url: str | None, wait: bool, out=print) -> int:
    client = admin_client(cfg, url)
    release = client.post("/v1/releases", spec).json()
    out(
        f"[release] {release['adapter']}: candidate {release['candidate']} against control "
        f"{release['control']}, {release['steps']} steps; it runs inside the app: "
        "`lorafleet release status` follows it from anywhere"
    )
    if not wait:
        return 0
    return follow(client, release["adapter"], out)


def status(cfg, adapter: str | None, url: str | None, wait: bool, out=print) -> int:
    client = admin_client(cfg, url)
    if adapter is None:
        releases = client.request("GET", "/v1/releases").json()["releases"]
        if not releases:
            out("no releases")
        for r in releases:
            pct = f", {r['percent']:g}% of users" if r["percent"] is not None else ""
            out(
                f"{r['adapter']}: {r['state']}{pct}; candidate {r['candidate']}, control {r['control']}"
            )
        return 0
    if wait:
        return follow(client, adapter, out)
    release = client.request("GET", f"/v1/releases/{adapter}").json()
    for entry in release["log"]:
        out(log_line(release, entry))
    out(f"{adapter}: {release['state']}")
    return 0


def abort(cfg, adapter: str, url: str | None, out=print) -> int:
    release = admin_client(cfg, url).post(f"/v1/releases/{adapter}/abort", {}).json()
    out(
        f"[release] {adapter}: {release['state']}; candidate {release['candidate']} gets no traffic"
    )
    return 0


def pause_or_resume(cfg, action: str, adapter: str, url: str | None, out=print) -> int:
    """POST /v1/releases/ADAPTER/pause (or /resume): print where the release now stands."""
    release = admin_client(cfg, url).post(f"/v1/releases/{adapter}/{action}", {}).json()
    pct = f" at {release['percent']:g}% of users" if release["percent"] is not None else ""
    step = f"step {release['step'] + 1}/{release['steps']}"
    out(f"[release] {adapter} {release['candidate']}: {release['state']}, {step}{pct}")
    return 0


def plan(
    spec, rewards_per_s: float | None, needed, out=print, power: float = 0.8, sd: float = 0.5
) -> int:
    """`lorafleet release plan CONFIG`: rewards each step needs before its outcome gate can decide,
    at the gates' alpha and `power`, for 0/1 rewards near 50% (sd 0.5, the most a reward in [0, 1]
    can vary: for others, scale by the sd squared). `needed(drop, margin, alpha, power)` is the
    information the gate needs (serve/sequential.py: `information_needed`; the CLI passes it)."""
    g = spec.gates
    m = g.max_reward_drop
    out(
        f"outcome gate: normal-mixture confidence sequence, alpha {g.alpha}, margin "
        f"max_reward_drop {m:g} (absolute), power {power:g}, reward sd {sd:g}"
    )
    head = "| candidate | decision | rewards per arm (even split) |"
    steps = [s.percent for s in spec.steps if s.percent < 100]
    head += "".join(f" total rewards at {p:g}% |" for p in steps)
    out(head)
    out("|---" * (3 + len(steps)) + "|")
    for drop, what in ((0.0, "passes the step"), (m, "rolled back"), (2 * m, "rolled back")):
        var_units = needed(drop or m, m, g.alpha, power) * sd * sd  # information x variance
        per_arm = 2 * var_units
        cells = []
        for p in steps:
            share = p / 100
            total = var_units / (share * (1 - share))
            when = f" ({total / rewards_per_s / 60:.0f} min)" if rewards_per_s else ""
            cells.append(f" {total:,.0f}{when} |")
        label = "identical" if not drop else f"worse by {drop:g}"
        out(f"| {label} | {what} | {per_arm:,.0f} |" + "".join(cells))
    if rewards_per_s:
        out(f"(min): at {rewards_per_s:g} rewards/s over both arms; a step also waits its hold_s")
    return 0
