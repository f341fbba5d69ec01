"""`lorafleet submit`: run a lorafleet command on a Ray cluster as a Ray job.

    lorafleet submit train configs/demo.yaml training.max_steps=500 --address http://127.0.0.1:8265
    lorafleet submit tune configs/tune-demo.yaml --env WANDB_API_KEY

It wraps Ray's `JobSubmissionClient`: the job's working dir is this checkout (without what
`.gitignore`d run outputs and the venv), its entrypoint the same `lorafleet` command run from
that copy, and its environment the variables named here, passed through from the caller's own
environment (a hub token, cloud credentials): never written into the YAML. It prints the job
id and follows the job's logs; Ctrl-C stops following, not the job.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from cluster.errors import LorafleetError
from cluster.ray_connect import WORKER_ENV_VARS

COMMANDS = ("train", "tune", "serve")
# what a job may need from the caller's environment, when set there: hub and tracking tokens,
# lorafleet's own serving keys, and object-store credentials/endpoints for storage.root
PASS_THROUGH = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "MLFLOW_TRACKING_URI",
    "LORAFLEET_API_KEYS",
    "LORAFLEET_STORAGE_ROOT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
EXCLUDES = [".venv", ".git", "lorafleet-runs", "**/__pycache__", ".pytest_cache", ".ruff_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(LorafleetError):
    pass


def use_token_auth_if_available(environ=os.environ) -> bool:
    """Ray 2.60 heads started after `~/.ray/auth_token` exists require a token, but its job
    client sends one only under RAY_AUTH_MODE=token. Set that mode when a token is at hand (and
    the user chose no mode), so submitting needs no manual step."""
    if "RAY_AUTH_MODE" in environ:
        return environ["RAY_AUTH_MODE"].lower() == "token"
    token_file = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def job_env(extra_names: list[str], environ=os.environ) -> dict[str, str]:
    """The caller's values of PASS_THROUGH and of the names asked for; a name asked for but not
    set is an error (the job would fail later, far from here)."""
    missing = [n for n in extra_names if n not in environ]
    if missing:
        raise SubmitError(
            f"--env {' '.join(missing)}: not set in this environment; set it here, and it is "
            "passed to the job (never written into the config)"
        )
    names = dict.fromkeys([*PASS_THROUGH, *extra_names])
    return {n: environ[n] for n in names if n in environ}


def runtime_env(working_dir: str | Path, env_vars: dict[str, str]) -> dict:
    return {
        "working_dir": str(working_dir),
        "excludes": EXCLUDES,
        "env_vars": {**WORKER_ENV_VARS, **env_vars},
    }


def entrypoint(command: str, config: str, overrides: list[str]) -> str:
    """The job's command: lorafleet's CLI from the uploaded copy of this checkout."""
    if command not in COMMANDS:
        raise SubmitError(f"submit: expected one of {list(COMMANDS)}. Got {command!r}")
    return shlex.join(["python", "-m", "cluster.cli", command, config, *overrides])


def submit(
    command: str,
    config: str,
    overrides: list[str],
    address: str | None,
    env_names: list[str],
    follow: bool = True,
    working_dir: str | Path = ".",
    log=print,
) -> int:
    """Submit; print the job id; follow the logs until the job ends (exit 0 if it succeeded)."""
    if not Path(config).is_file():
        raise SubmitError(f"config file {config!r} does not exist (it is uploaded with the job)")
    env_vars = job_env(env_names)
    use_token_auth_if_available()
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        raise SubmitError(f"no Ray job server at {address}: {str(e).splitlines()[0]}") from None
    job_id = client.submit_job(
        entrypoint=entrypoint(command, config, overrides),
        runtime_env=runtime_env(working_dir, env_vars),
        metadata={"lorafleet_command": command, "lorafleet_config": config},
    )
    passed = f" (environment: {', '.join(sorted(env_vars))})" if env_vars else ""
    log(f"[submit] job {job_id} submitted to {address}{passed}")
    if not follow:
        log(f"[submit] follow it with: ray job logs --follow --address {address} {job_id}")
        return 0
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        log(
            f"\n[submit] stopped following; job {job_id} keeps running. "
            f"Logs: ray job logs --follow --address {address} {job_id}; "
            f"stop it: ray job stop --address {address} {job_id}"
        )
        return 130
    status = _wait_terminal(client, job_id)
    log(f"[submit] job {job_id} {status.lower()}")
    return 0 if status == "SUCCEEDED" else 1


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def _wait_terminal(client, job_id: str, timeout_s: float = 30) -> str:
    """The log stream can end a moment before the status turns terminal."""
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status.split(".")[-1]
