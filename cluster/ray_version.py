"""The one Ray release lorafleet's private Ray imports were read from, and the check each
package's shim runs before it touches them (serve/ray_internal.py, train/internals.py,
cluster/ray_connect.py): private modules and attributes change without notice between releases,
so another Ray fails at once, with what to do, rather than later, deep in a replica or a worker."""

from __future__ import annotations

from cluster.errors import LorafleetError

# the Ray release the private imports were read from (pyproject.toml pins the same one)
RAY_VERSION = "2.60.0"


class RayVersionError(LorafleetError):
    """The installed Ray (or DeepSpeed) lacks a private piece lorafleet was written against."""


def check_ray_version(found: str | None = None, who: str = "lorafleet") -> None:
    """Raise RayVersionError unless Ray `found` (default: the installed one) is RAY_VERSION."""
    if found is None:
        import ray

        found = ray.__version__
    if found != RAY_VERSION:
        raise RayVersionError(
            f"{who} needs Ray {RAY_VERSION} (it uses private Ray modules read from that release), "
            f"but Ray {found} is installed: run `pip install 'ray[serve]=={RAY_VERSION}'`, or "
            f"port the package's shim to Ray {found} and set RAY_VERSION in cluster/ray_version.py"
        )


def require(owner, attrs: tuple[str, ...], what: str, package: str, version: str) -> None:
    """Raise RayVersionError naming `package` `version` unless `owner` has every attribute in
    `attrs` (a private method or module attribute lorafleet calls or sets)."""
    missing = [a for a in attrs if not hasattr(owner, a)]
    if missing:
        raise RayVersionError(
            f"{package} {version}: {what} has no {', '.join(missing)}; lorafleet was written "
            f"against {package} {RAY_VERSION if package == 'Ray' else 'the pinned release'} "
            "(pyproject.toml): install that release"
        )


def require_in_source(owner, snippets: tuple[str, ...], what: str, version: str) -> None:
    """Raise RayVersionError unless `owner`'s source sets each instance attribute in `snippets`
    (`self._llm_config =`): private attributes made in __init__ cannot be checked on the class."""
    import inspect

    try:
        source = inspect.getsource(owner)
    except (OSError, TypeError):  # no source shipped: nothing to read, trust the version check
        return
    missing = [s for s in snippets if s not in source]
    if missing:
        raise RayVersionError(
            f"Ray {version}: {what} no longer sets {', '.join(missing)}; lorafleet was written "
            f"against Ray {RAY_VERSION}: install that release"
        )
