"""The config reference rows of docs/reference.md, generated from the schemas (tests/test_docs.py
keeps them in sync).

python -m cluster.config.reference [serve] > /tmp/ref.md
python -m cluster.config.reference --update docs/reference.md   # rewrite the rows in place
"""

from __future__ import annotations

import sys

from pydantic import BaseModel

from cluster.config.job import JobConfig
from cluster.config.serve import ServeAppConfig


def config_reference(schema: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """Markdown rows `| key | default | description |` for docs/reference.md."""
    rows = []
    for name, f in schema.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(config_reference(ann, key + "."))
            continue
        item = getattr(ann, "__args__", (None,))[0]
        if (
            getattr(ann, "__origin__", None) is list
            and isinstance(item, type)
            and issubclass(item, BaseModel)
        ):
            rows.append(
                f"| `{key}` | {'required' if f.is_required() else '`[]`'} | {f.description or ''} |"
            )
            rows.extend(config_reference(item, key + "[]."))
            continue
        default = "required" if f.is_required() else f.get_default(call_default_factory=True)
        rows.append(f"| `{key}` | `{default}` | {f.description or ''} |")
    return rows


def _key(row: str) -> str:
    return row.split("|", 2)[1].strip()


def update(text: str, rows: list[str]) -> str:
    """`text` with each generated row in place of the row with its key, and a row whose key is
    new inserted after the row of the key before it in the schema."""
    lines = text.splitlines()
    where = {_key(x): i for i, x in enumerate(lines) if x.startswith("| `")}
    previous = None
    for row in rows:
        key = _key(row)
        if key in where:
            lines[where[key]] = row
        elif previous in where:
            at = where[previous] + 1
            lines.insert(at, row)
            where = {k: (i + 1 if i >= at else i) for k, i in where.items()}
            where[key] = at
        previous = key
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:
        from pathlib import Path

        path = Path(sys.argv[2])
        rows = config_reference() + config_reference(ServeAppConfig)
        path.write_text(update(path.read_text(), rows))
    else:
        print(
            "\n".join(config_reference(ServeAppConfig if sys.argv[1:] == ["serve"] else JobConfig))
        )
