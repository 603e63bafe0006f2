"""The step cache as Python code and a server's requests ask for it: refused with the command line's
one line when it is not a setting, and per job on a server."""

from __future__ import annotations

import pytest

from wan_i2v.errors import WanError
from wan_i2v.pipeline import I2VPipeline
from wan_i2v.transforms.step_cache_config import StepCacheConfig

NOT_A_THRESHOLD = "is not a threshold (give 0 (off) or a relative change such as 0.1)"


@pytest.mark.parametrize(("value", "written"), [("x", "'x'"), ("0.1", "'0.1'"), (True, "True"), ([0.1], "[0.1]"), (-1, "-1.0"), (float("nan"), "nan")])
def test_from_pretrained_refuses_a_step_cache_that_is_not_a_threshold_before_loading(value, written, tmp_path):
    """A string or a list reached the plan and failed there as an AttributeError traceback."""
    with pytest.raises(WanError) as refused:
        I2VPipeline.from_pretrained(tmp_path / "no checkpoint here", device="cpu", step_cache=value)
    assert str(refused.value) == f"step_cache={written} {NOT_A_THRESHOLD}"


@pytest.mark.parametrize(("fields", "message"), [
    ({"first_blocks": "2"}, "step_cache_blocks='2,0' is not F,B (give the first and the last blocks that always run, such as 1,0)"),
    ({"last_blocks": 0.5}, "step_cache_blocks='1,0.5' is not F,B (give the first and the last blocks that always run, such as 1,0)"),
    ({"max_reuses": 1.5}, "step_cache_max=1.5 is not a whole number (give 1 or more, or leave the cache off)"),
    ({"threshold": "0.1"}, f"step_cache='0.1' {NOT_A_THRESHOLD}"),
])  # fmt: skip
def test_a_step_cache_setting_of_the_wrong_type_is_one_line(fields, message):
    with pytest.raises(WanError) as refused:
        StepCacheConfig(**fields)
    assert str(refused.value) == message
