"""Each package's private Ray and DeepSpeed pieces are checked where they are used, and a
missing one is a clear error naming the version found (cluster/ray_version.py, the shims
serve/ray_internal.py and train/internals.py, cluster/ray_connect.py).

    .venv/bin/pytest -q tests/test_shims.py
"""

from __future__ import annotations

import pytest

from cluster.ray_version import RAY_VERSION, RayVersionError, require, require_in_source


def test_the_pinned_ray_has_every_private_piece_the_shims_use():
    import ray

    assert ray.__version__ == RAY_VERSION
    import serve.ray_internal  # noqa: F401  (its import runs every check)
    from train.internals import quiet_report_logger

    quiet_report_logger()


def test_a_missing_private_attribute_names_the_package_and_its_version():
    class Moved:
        def _kept(self):
            pass

    require(Moved, ("_kept",), "Moved", "Ray", "2.61.0")
    with pytest.raises(RayVersionError) as e:
        require(Moved, ("_kept", "_load_model"), "Moved", "Ray", "2.61.0")
    assert "Ray 2.61.0: Moved has no _load_model" in str(e.value)
    with pytest.raises(RayVersionError, match="no longer sets self._llm_config"):
        require_in_source(Moved, ("self._llm_config",), "Moved", "2.61.0")


def test_deepspeed_zero3_private_methods_are_checked_on_the_optimizer():
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from train.internals import ZERO3_PRIVATE, check_zero3_optimizer

    assert all(callable(getattr(DeepSpeedZeroOptimizer_Stage3, m)) for m in ZERO3_PRIVATE)
    with pytest.raises(RayVersionError) as e:
        check_zero3_optimizer(object())
    assert f"DeepSpeed {deepspeed.__version__}" in str(e.value)
    assert "_set_fp32_optimizer_param_groups" in str(e.value)


def test_local_ray_refuses_a_ray_whose_private_constant_moved(monkeypatch):
    from ray._private import ray_constants

    from cluster import ray_connect

    monkeypatch.delattr(ray_constants, "ENABLE_RAY_CLUSTER")
    with pytest.raises(
        RayVersionError, match="ray._private.ray_constants has no ENABLE_RAY_CLUSTER"
    ):
        ray_connect._stay_on_loopback()
