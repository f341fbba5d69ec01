"""`lorafleet demo`, shrunk to test size: the README's headline table (base against adapter,
exact match on held-out prompts) comes from `run_demo`, so its claim is tested here on the
demo's own base (`tiny://demo`, built and pretrained as `make demo` builds it).

Shrunk: the `last` task only (its 150 steps and 4000 rows as the demo trains it), 50
held-out prompts instead of 200. Measured here: base 16-17% -> adapter 98%. With 100 steps on
2000 rows the same adapter reached only 27% (eval loss 1.00 against 0.02 at 150 steps): this
task is learned late, so the test trains it as the demo does. The `swap` task is left to
`make demo`, whose table the README shows."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

# the adapter's exact match must beat the base's by this many points on the held-out prompts
MARGIN = 0.40


def test_the_demo_adapter_beats_the_base_by_a_margin(ray_local, session_dir):
    from train.demo import run_demo

    report = run_demo(
        "configs/demo.yaml",
        [
            f"storage.root={session_dir / 'demo'}",
        ],
        tasks=("last",),
        n_test=50,
        log=lambda *_: None,
    )
    (row,) = report["tasks"]
    assert row["held_out"] == 50
    assert row["adapter_exact_match"] >= row["base_exact_match"] + MARGIN, row
    assert report["passed"]
