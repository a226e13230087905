"""On PYTHONPATH of the launch-cluster tests only: with DTR_TEST_HOOKS=1, every Python process the launchers
start (on every "node") loads tests/dtr_scale_testhooks.py, whose hooks (kill after a step, per-rank parameter
checksums) then apply to `-m dtr_scale train` run by an unmodified launch script."""

import os

if os.environ.get("DTR_TEST_HOOKS") == "1":
    import dtr_scale_testhooks  # noqa: F401
