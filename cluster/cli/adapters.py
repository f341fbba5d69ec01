"""`lorafleet adapters list | show NAME | promote NAME VERSION | rollback NAME | reindex`: the
adapter store's versions, read and moved in storage itself (`cluster.store.versions`). A running
`lorafleet serve` polls the store's index (`cluster.store.index`) every second, so a promote or
rollback is served without a restart; `reindex` rebuilds that index from the pointers.

    lorafleet adapters list
    lorafleet adapters show demo-last --root s3://bucket/fleet
    lorafleet adapters promote demo-last 20261202-003015-123-9f3a
    lorafleet adapters rollback demo-last
    lorafleet adapters import support-bot ./peft-folder --base tiny://demo   (cluster/store/importing.py)
"""

from __future__ import annotations

import os

from cluster.store import layout, versions

DEFAULT_ROOT = "lorafleet-runs"


def storage_root(root: str | None, config: str | None) -> str:
    """--root, else the config's storage.root, else $LORAFLEET_STORAGE_ROOT, else the default."""
    if root:
        return root
    if config:
        from cluster.config.load import load_config, schema_for

        return load_config(config, [], schema_for(config)).storage.root
    return os.environ.get("LORAFLEET_STORAGE_ROOT") or DEFAULT_ROOT


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _source(meta: dict) -> str:
    src = meta.get("source") or {}
    kind = src.get("kind", "-")
    return f"{kind} {src.get('run') or src.get('trial') or src.get('from') or ''}".strip()


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def list_adapters(root: str, out=print) -> int:
    adapters = layout.adapters_root(root)
    listed = versions.listing(adapters)  # the index: one read for every name and version
    if not listed:
        out(f"no adapters in {adapters}")
        return 0
    rows = [["NAME", "CURRENT", "VERSIONS", "PUBLISHED", "EVAL_LOSS", "SOURCE"]]
    for name, cur in listed.items():
        meta = versions.read_meta(adapters, name, cur) or {}
        count = len(versions.versions(adapters, name))
        rows.append(
            [
                name,
                cur,
                str(count),
                _fmt(meta.get("published_at")),
                _fmt(meta.get("eval_loss")),
                _source(meta),
            ]
        )
    out(_table(rows))
    return 0


def reindex(root: str, out=print) -> int:
    """Rebuild the store's index from every pointer: for a root an older lorafleet moved
    pointers in after the index existed, or a move killed between its pointer and the index."""
    adapters = layout.adapters_root(root)
    found = versions.rebuild_index(adapters)
    out(f"[adapters] indexed {len(found)} adapter(s) in {adapters}")
    return 0


def show_adapter(root: str, name: str, out=print) -> int:
    adapters = layout.adapters_root(root)
    pointer = versions.pointer(adapters, name)
    if pointer is None:
        raise versions.VersionError(
            f"adapter {name!r} is not in {adapters} (lorafleet adapters list)"
        )
    out(
        f"adapter {name} in {adapters}: current {pointer['version']} (set by {pointer['by']} at {pointer['at']})"
    )
    rows = [["", "VERSION", "PUBLISHED", "SOURCE", "STEP", "EVAL_LOSS", "BASE"]]
    for meta in versions.versions(adapters, name):
        rows.append(
            [
                "*" if meta["version"] == pointer["version"] else "",
                meta["version"],
                _fmt(meta.get("published_at")),
                _source(meta),
                _fmt(meta.get("step")),
                _fmt(meta.get("eval_loss")),
                _fmt(meta.get("base_fingerprint")),
            ]
        )
    out(_table(rows))
    return 0


def move(root: str, name: str, version: str | None, out=print) -> int:
    """Promote `version`, or roll back (version None); say what is current now and what was."""
    adapters = layout.adapters_root(root)
    before = versions.current(adapters, name)
    if version is None:
        p = versions.rollback(adapters, name)
    else:
        p = versions.promote(adapters, name, version)
    verb = "rolled back" if version is None else "promoted"
    out(
        f"[adapters] {name}: {verb}; current {p['version']} (was {before}). A running "
        "`lorafleet serve` serves it within seconds."
    )
    return 0


def import_adapter(
    name: str,
    source: str,
    root: str | None,
    config: str | None,
    base: str | None,
    candidate: bool = False,
    out=print,
) -> int:
    """Check the PEFT folder at `source` and publish it as a version of `name`: fitted to
    `--base`, else to the --config serve file's one model, else to the base the adapter names."""
    from cluster.store.importing import base_for, import_adapter

    storage_root_ = storage_root(root, config)
    revision = None
    if base is None and config:
        from cluster.config.load import load_config, schema_for
        from cluster.config.serve import ServeAppConfig

        cfg = load_config(config, [], schema_for(config))
        if isinstance(cfg, ServeAppConfig) and len(cfg.models) == 1:
            base, revision = cfg.models[0].base, cfg.models[0].revision
    fit = base_for(base, storage_root_, revision) if base else None
    adapters = layout.adapters_root(storage_root_)
    meta = import_adapter(
        name, source, adapters, fit, by="cli", make_current=not candidate, log=out
    )
    now = versions.current(adapters, name)
    out(
        f"[adapters] {name}: imported {source} as version {meta['version']} (base "
        f"{meta['base_model']}, fingerprint {meta['base_fingerprint']}); current {now}."
        + ("" if now == meta["version"] else " Release it with `lorafleet release`.")
    )
    return 0
