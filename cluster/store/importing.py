"""Adapters lorafleet did not train: a PEFT folder (local, s3:// or gs://, or a hub id) checked
and published as a version of the store, with where it came from, then served like any other.

    lorafleet adapters import support-bot ./my-peft-adapter --base tiny://demo
    lorafleet adapters import support-bot s3://bucket/adapters/support-bot-v3
    POST /v1/adapters/support-bot/versions {"source": ..., "model": ...}   (admin)

Checked before anything is written, every problem named at once: the folder holds
adapter_config.json (a JSON object) and adapter_model.safetensors (only safetensors are loaded
from storage: a pickle-only `adapter_model.bin` folder is refused, with how to re-save it), every
tensor is finite, vLLM can serve it (cluster/store/servability.py), and it fits the base it will
be served on: the base it names (base_model_name_or_path) has the same fingerprint when it can
be read (cluster/store/fingerprint.py), and each LoRA matrix has the shape of its module in that
base's architecture (read from its config.json on the meta device: no weights loaded). Only the
adapter's own files are copied into the version.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import LorafleetError
from cluster.store import storage, versions
from cluster.store.fingerprint import base_fingerprint
from cluster.store.layout import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, tiny_dir, tiny_name
from cluster.store.servability import vllm_problems

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", re.ASCII)
PEFT_PREFIX = "base_model.model."
SHOWN = 5  # tensors named per problem


class ImportRefused(LorafleetError):
    """A folder that cannot be imported as an adapter version: every reason, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"cannot import {source}: {len(problems)} problem(s)\n{lines}")


@dataclass(frozen=True)
class Base:
    """The base an imported adapter must fit: as configured, a local directory holding its
    config.json (None: a hub id or bucket, shapes read from the adapter's own claim if local),
    and its fingerprint."""

    source: str
    local: Path | None
    fingerprint: str


def base_for(base: str, storage_root: str, revision: str | None = None) -> Base:
    """`--base` (a directory, tiny://<name>, an s3:// or gs:// copy, or a hub id) as a Base."""
    name = tiny_name(base)
    path = tiny_dir(name, storage_root) if name else None
    if path is None and not storage.is_remote(base) and Path(base).expanduser().is_dir():
        path = Path(base).expanduser().resolve()
    if name and not (path / "config.json").is_file():
        raise LorafleetError(f"--base {base}: not built (no model at {path})")
    return Base(base, path, base_fingerprint(str(path) if path else base, revision))


def fetch(source: str, log=print) -> Path:
    """A local folder with the adapter at `source`: the folder itself, a node-cache copy of an
    s3:// or gs:// one, or a hub download (adapter files only; needs the network)."""
    if storage.is_remote(source):
        return storage.local_copy(source.rstrip("/"), log=log)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not HUB_ID.fullmatch(source):
        raise ImportRefused(
            source, ["not a folder here, an s3:// or gs:// URI, or a hub id like org/name[@rev]"]
        )
    from huggingface_hub import snapshot_download

    repo, _, revision = source.partition("@")
    try:
        return Path(
            snapshot_download(repo, revision=revision or None, allow_patterns=list(ADAPTER_FILES))
        )
    except Exception as e:  # offline, unknown repo, gated: the hub's own reason
        why = f"cannot fetch it from the hub: {type(e).__name__}: {e}"
        raise ImportRefused(source, [why]) from None


def _read_config(folder: Path) -> tuple[dict | None, list[str]]:
    if not folder.is_dir():
        return None, [f"{folder} is not a folder"]
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        return None, [
            f"no {ADAPTER_CONFIG}: not a PEFT adapter folder (save it with PEFT's save_pretrained)"
        ]
    try:
        conf = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return None, [f"{ADAPTER_CONFIG} is not JSON: {e}"]
    if not isinstance(conf, dict):
        return None, [f"{ADAPTER_CONFIG}: expected a JSON object, got {type(conf).__name__}"]
    return conf, []


def _read_weights(folder: Path) -> tuple[dict | None, list[str]]:
    """{tensor name: shape} of adapter_model.safetensors, and problems (missing, pickle only,
    unreadable, empty, not finite)."""
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt")
        )
        if pickles:
            return None, [
                f"only {', '.join(pickles)} (a pickle), and lorafleet loads no pickle from storage: "
                f"expected {ADAPTER_WEIGHTS}; re-save it with save_pretrained(..., "
                "safe_serialization=True)"
            ]
        return None, [f"no {ADAPTER_WEIGHTS}: expected the adapter's weights in it"]
    import torch
    from safetensors import SafetensorError, safe_open

    shapes, bad = {}, []
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_tensor(key)
                shapes[key] = tuple(t.shape)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        return None, [f"{ADAPTER_WEIGHTS} cannot be read as safetensors: {e}"]
    if not shapes:
        return None, [f"{ADAPTER_WEIGHTS} holds no tensor"]
    if bad:
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        return shapes, [f"NaN or infinite values in {len(bad)} tensor(s): {bad[:SHOWN]}{more}"]
    return shapes, []


def _shape_problems(shapes: dict, base_dir: Path, label: str) -> list[str]:
    """Each LoRA matrix against its module in the base's architecture (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    except (ValueError, OSError, KeyError):  # an architecture transformers cannot build here:
        return []  # the fingerprint check stands alone, and vLLM's load says the rest
    modules = dict(model.named_modules())
    missing, misfit = [], []
    for key, shape in sorted(shapes.items()):
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", key.removeprefix(PEFT_PREFIX))
        if m is None:
            continue
        module = modules.get(m.group(1))
        if module is None:
            missing.append(m.group(1))
            continue
        if not hasattr(module, "in_features"):
            continue
        want = module.in_features if m.group(2) == "A" else module.out_features
        got = shape[1] if m.group(2) == "A" else shape[0]
        if got != want:
            misfit.append(f"{key}: {got}, the module's is {want}")
    problems = []
    if missing:
        problems.append(
            f"it adapts modules that base {label} does not have: {sorted(set(missing))[:SHOWN]}"
        )
    if misfit:
        problems.append(f"its matrices do not fit base {label}'s shapes: {misfit[:SHOWN]}")
    return problems


def _claimed_fingerprint(claim: str | None) -> str | None:
    """The fingerprint of the base the adapter names, when that base can be read here."""
    if not isinstance(claim, str) or not claim:
        return None
    if not (storage.is_remote(claim) or Path(claim).expanduser().is_dir()):
        return None
    try:
        return base_fingerprint(claim)
    except (OSError, FileNotFoundError):
        return None


def check(folder: Path, base: Base | None, max_rank: int | None = None) -> tuple[dict, list[str]]:
    """(adapter_config, every problem) for the PEFT folder `folder`, to be served on `base`
    (None: on the base it names) by a vLLM that takes LoRA ranks up to `max_rank`."""
    conf, problems = _read_config(folder)
    shapes, weight_problems = _read_weights(folder) if folder.is_dir() else (None, [])
    problems += weight_problems
    if conf is None:
        return {}, problems
    problems += [f"vLLM cannot serve it: {p}" for p in vllm_problems(conf)]
    rank = conf.get("r")
    if max_rank is not None and isinstance(rank, int) and rank > max_rank:
        problems.append(f"its rank r={rank} is over the served model's max_lora_rank {max_rank}")
    claim = conf.get("base_model_name_or_path")
    claimed = _claimed_fingerprint(claim)
    if base is not None and claimed is not None and claimed != base.fingerprint:
        problems.append(
            f"it was trained on base {claim!r} (fingerprint {claimed}), not on {base.source!r} "
            f"(fingerprint {base.fingerprint}): serve it on the base it was trained on"
        )
    shape_base = base.local if base is not None else None
    if shape_base is None and claimed is not None and not storage.is_remote(claim):
        shape_base = Path(claim).expanduser()
    if shapes and shape_base and (shape_base / "config.json").is_file():
        problems += _shape_problems(shapes, shape_base, repr(base.source if base else claim))
    return conf, problems


def import_adapter(
    name: str,
    source: str,
    root: str,
    base: Base | None = None,
    by: str = "cli",
    make_current: bool = True,
    max_rank: int | None = None,
    log=print,
) -> dict:
    """Check the adapter at `source` and publish it as a new version of `name` in the adapters
    root `root`; the version's lorafleet.json (as versions.read_meta returns it). ImportRefused
    with every problem, before anything is written."""
    problem = versions.name_error(name)
    if problem:
        raise ImportRefused(source, [problem])
    folder = fetch(source, log=log)
    conf, problems = check(folder, base, max_rank)
    if problems:
        raise ImportRefused(source, problems)
    claim = conf.get("base_model_name_or_path")
    fingerprint = base.fingerprint if base else _claimed_fingerprint(claim)
    if fingerprint is None and isinstance(claim, str) and HUB_ID.fullmatch(claim):
        fingerprint = base_fingerprint(claim)  # a hub id names itself (hub:<id>@main)
    digests = {}
    with tempfile.TemporaryDirectory(prefix="lorafleet-import-") as staging:
        for f in ADAPTER_FILES:  # the adapter's own files, nothing else the folder holds
            shutil.copy2(folder / f, Path(staging, f))
            digests[f] = hashlib.sha256(Path(staging, f).read_bytes()).hexdigest()
        meta = {
            "base_model": base.source if base else claim,
            "base_fingerprint": fingerprint,
            "source": {
                "kind": "import",
                "from": source,
                "by": by,
                "base_model_name_or_path": claim,
                "peft_type": conf.get("peft_type"),
                "r": conf.get("r"),
                "sha256": digests,
            },
        }
        version = versions.publish(staging, root, name, meta, make_current=make_current)
    log(f"[import] {source} -> adapter {name!r} version {version}")
    return versions.read_meta(root, name, version)
