"""A served teacher (teacher.server) under train.strategy=fsdp trains like it does under the plain path.

Here in a 1-process group (the FSDP wrapping, gathered heads); the 2-process equivalence of FSDP is
tests/scale/test_fsdp.py. Lives in recipes/ for the loopback-server fixture.
"""

import served_fixtures as sf
from alambic.config import DistillConfig
from alambic.training.loop import run_distillation


def test_served_teacher_under_fsdp_equals_the_plain_path(served_tiny, tmp_path):
    served_tiny.server.fail_from = None
    plain = sf.run_config(served_tiny, tmp_path / "plain")
    sharded = sf.run_config(served_tiny, tmp_path / "fsdp", strategy="fsdp")
    sf.assert_same_run(
        run_distillation(DistillConfig.model_validate(sharded), overwrite=True),
        run_distillation(DistillConfig.model_validate(plain), overwrite=True), atol=1e-5,
    )
