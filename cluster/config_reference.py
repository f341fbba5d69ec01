"""The README's config reference rows, generated from the schemas (a test keeps them in sync).

python -m cluster.config_reference [serve] > /tmp/ref.md
"""

from __future__ import annotations

import sys

from pydantic import BaseModel

from cluster.job_config import JobConfig
from cluster.serve_config import ServeAppConfig


def config_reference(schema: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """Markdown rows `| key | default | description |` for the README's config reference."""
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


if __name__ == "__main__":
    print("\n".join(config_reference(ServeAppConfig if sys.argv[1:] == ["serve"] else JobConfig)))
