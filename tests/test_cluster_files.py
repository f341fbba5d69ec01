"""The files that start a cloud cluster, checked offline: every cluster YAML against Ray's own
autoscaler schema (what `ray up` validates first), and the images both name against the Ray
version pyproject.toml pins. `ray up` has no dry run and docker cannot run here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = [ROOT / "cluster.yaml", *sorted((ROOT / "cluster").glob("*.yaml"))]


def pinned_ray_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    return ray.split("==")[1]


def prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(cfg)
    return cfg


def test_there_is_an_aws_file_and_a_gcp_variant():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in CLUSTER_FILES}
    assert providers == {"aws", "gcp"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_schema_and_keeps_the_house_rules(path):
    cfg = prepared(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    # the head takes no training or serving work
    assert head["resources"].get("CPU") == 0
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    spot = [n for n, t in workers.items() if _is_spot(t["node_config"])]
    on_demand = [n for n in workers if n not in spot]
    assert spot and on_demand, f"{path.name}: want spot and on-demand GPU workers"
    for name, t in workers.items():
        assert t["min_workers"] <= t["max_workers"], name
        assert t.get("idle_timeout_s"), f"{name}: no idle timeout"
    # a Ray GPU image at the pinned version, lorafleet with its gpu extra
    assert cfg["docker"]["image"] == f"rayproject/ray:{pinned_ray_version()}-py311-gpu"
    assert any("[gpu]" in c for c in cfg["setup_commands"])
    # the bucket is named once; the dashboard stays on the head's loopback
    text = path.read_text()
    buckets = set(re.findall(r"\b(?:s3|gs)://[\w.-]+", text))
    assert len(buckets) == 1 and text.count(next(iter(buckets))) == 1, buckets
    starts = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "0.0.0.0" not in text
    # every node's Ray starts in http.mode haproxy (Serve reads its mode at start): the fastest,
    # and a cluster's nodes sit on a private network, where its all-interfaces binds belong
    from cluster.config.serve import SERVE_MODES

    want = " ".join(f"{var}={value}" for var, value in SERVE_MODES["haproxy"].items())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert f"export {want};" in " ".join(cfg[key]), (path.name, key, want)


def _is_spot(node_config: dict) -> bool:
    aws = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    gcp = any(
        s.get("provisioningModel") == "SPOT" or s.get("preemptible")
        for s in node_config.get("scheduling", [])
    )
    return aws or gcp


def test_rays_schema_check_catches_a_typo():
    # the check above can fail: a misspelt node-type key is refused by Ray's schema
    import jsonschema

    bad = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    bad["available_node_types"]["gpu-spot"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(bad))


def test_dockerfile_builds_on_the_pinned_ray_gpu_image_with_the_gpu_extra():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert base == f"rayproject/ray:{pinned_ray_version()}-py311-gpu"
    assert re.search(r"pip install .*'\.\[gpu\]'", text)
    # every package the project ships is copied in
    for pkg in ("cluster", "train", "tune", "serve"):
        assert re.search(rf"^COPY .*\b{pkg}\b", text, re.M), pkg
