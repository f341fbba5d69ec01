"""The tests' toolbox, each helper written once: import it as `from tests.helpers.toolbox import
free_port` (conftest.py puts the repo root on sys.path)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick, released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_processes(
    *, groups: Iterable[int] = (), naming: Iterable[str] = (), timeout_s: float
) -> None:
    """Stop what a test started, by PID, never by name: every process in one of the process
    `groups` (a `start_new_session=True` child's group id is its PID) or whose command line
    names one of `naming` (a test's own temp dir: Ray's daemons may leave their group), with all
    their children; never this process. SIGTERM, up to `timeout_s` for them to exit, then
    SIGKILL to those left; `timeout_s=0`: SIGKILL at once."""
    import psutil

    groups, naming = set(groups), list(naming)
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if (groups and os.getpgid(p.pid) in groups) or any(d in cmd for d in naming):
                procs |= {q.pid: q for q in [p, *p.children(recursive=True)]}
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    procs.pop(os.getpid(), None)
    alive = list(procs.values())
    if timeout_s > 0:
        for p in alive:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def ask_in_subprocess(code: str, *args: str, env: dict, timeout_s: float) -> dict:
    """Run `code` (a Python script that prints one JSON line last) with `args` in a process of
    its own, and return that line's value. For asking a test's own cluster about its jobs,
    nodes or actors: this process's Ray client keeps the token of the session's own Ray, which
    the test's head refuses. Fails the test with the script's stderr if it exits non-zero."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_s3_server(bucket: str = "fleet"):
    """An S3-compatible server (moto) on a free loopback port, with `bucket` made:
    (the server, to `.stop()`; the environment a client needs to reach it: its endpoint as
    AWS_ENDPOINT_URL_S3 and test credentials). The caller puts that environment where its
    clients, Ray's workers among them, will find it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", **S3_CREDENTIALS}
    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=bucket)
    return server, env


def start_mlflow_server(folder) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a free 127.0.0.1 port, its SQLite store and artifacts in
    `folder`, its output in `folder`/server.log: (the process, in a session of its own, to stop
    with `stop_processes(groups=[proc.pid], ...)`; its URL). Returns at once: wait for it with
    `wait_mlflow_server`. The server's job runner (scorers, not needed here) is left off."""
    from pathlib import Path

    folder = Path(folder)
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    with open(folder / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [str(mlflow), *f"server --host 127.0.0.1 --port {port} --workers 1".split()]
            + ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
            + ["--artifacts-destination", str(folder / "artifacts")],
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    return proc, f"http://127.0.0.1:{port}"


def wait_mlflow_server(proc: subprocess.Popen, url: str, folder, timeout_s: float) -> None:
    """Until `url`/health answers 200; fails with the server's log if it exits or times out."""
    import time
    import urllib.request
    from pathlib import Path

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    log = (Path(folder) / "server.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"mlflow server at {url} not up (exit code {proc.poll()}):\n{log}")


@dataclass
class MlflowServer:
    """A started `mlflow server`: its process, URL and folder (store, artifacts, server.log)."""

    proc: subprocess.Popen
    url: str
    folder: Path

    @classmethod
    def start(cls, folder) -> MlflowServer:
        proc, url = start_mlflow_server(folder)
        return cls(proc, url, Path(folder))

    def wait(self, timeout_s: float = 300) -> None:
        wait_mlflow_server(self.proc, self.url, self.folder, timeout_s=timeout_s)


def read_wandb_run(path) -> list:
    """The records of a W&B run file (`run-<id>.wandb` in an offline run's folder), as wandb's
    own protobuf `Record`s (`record.history`, `.run`, `.summary`...). wandb 0.31 ships no Python
    reader (wandb-core writes the file); its format is LevelDB's log format (32 KiB blocks of
    CRC32-checked chunks) after a 7-byte `:W&B` header, with one `Record` per logical record."""
    import struct
    import zlib
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, hex(magic), version)
    block, header = 32768, 7
    records, pending, pos = [], b"", header
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if (crc, length, kind) == (0, 0, 0):  # zero padding to the block's end
            pos += left
            continue
        chunk = data[pos + header : pos + header + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad chunk at byte {pos} of {path}"
        pos += header + length
        pending += chunk
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE.../LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


class S3RequestLog:
    """The requests an in-process S3 server (start_s3_server) logs, as werkzeug writes them
    ('"GET /fleet/<key> HTTP/1.1" 200 -'), kept when they name `token` (a prefix of the caller's
    own, so other clients of the same server are not counted). Use as a context manager."""

    def __init__(self, token: str):
        import logging

        self.token = token
        self.lines: list[str] = []
        log = self

        class _Keep(logging.Handler):
            def emit(self, record):
                line = record.getMessage()
                if log.token in line:
                    log.lines.append(line)

        self._handler = _Keep(logging.INFO)
        self._logger = logging.getLogger("werkzeug")

    def __enter__(self):
        self._level = self._logger.level
        self._logger.setLevel(self._handler.level)
        self._logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)

    def count(self, fn) -> tuple[int, list[str]]:
        """(requests `fn()` made, their log lines). werkzeug logs a request as it sends the
        response's status line, so every request is logged before `fn` returns."""
        start = len(self.lines)
        fn()
        return len(self.lines) - start, self.lines[start:]


def fake_adapters(root: str, names: Iterable[str], version: str, index: bool = True) -> None:
    """Adapters at `root` (an adapters root, local or s3://) the cheap way, for scale tests and
    benches: each one version holding only its lorafleet.json (what the store's readers read), and
    its `current` pointer; with `index`, the store's index naming them all (else a root as an
    older lorafleet left it). Written 16 at a time, one PUT each on S3."""
    from concurrent.futures import ThreadPoolExecutor

    from cluster.store import index as store_index
    from cluster.store import storage, versions

    names = list(names)

    def put(uri: str, text: str) -> None:
        if storage.is_remote(uri):
            client, bucket, key = storage._s3(uri)
            client.put_object(Bucket=bucket, Key=key, Body=text.encode())
        else:
            storage.write_text(uri, text)

    def one(name: str) -> None:
        meta = {"name": name, "version": version, "base_model": "org/base", "fake": True}
        put(
            storage.join(versions.version_uri(root, name, version), "lorafleet.json"),
            json.dumps(meta),
        )
        pointer = {"version": version, "history": [], "rolled_back": [], "at": "", "by": "fake"}
        put(storage.join(root, name, versions.CURRENT), json.dumps(pointer))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, names))
    if index:
        put(store_index.index_uri(root), store_index._text(dict.fromkeys(names, version), 1))
