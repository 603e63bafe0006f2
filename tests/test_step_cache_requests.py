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


def test_a_job_sets_its_own_step_cache_threshold_on_the_servers_cache(tiny_checkpoint, tmp_path):
    """One server, whose --step-cache is the jobs' default: a job that leaves step_cache out skips
    forwards, one that sets 0 skips none, one that sets its own threshold runs and reports it; each
    job shows its threshold and its video's metadata what it skipped. A threshold no change reaches
    makes every forward the rules allow reuse the cache."""
    import io
    import json

    import av

    from server_process import Server

    server = Server(tiny_checkpoint, tmp_path / "state", "--steps", "5", "--step-cache", "1000", "--step-cache-max", "2").start()
    try:
        with server.client() as client:
            jobs = {name: server.submit(client, **fields).json() for name, fields in
                    (("default", {}), ("off", {"step_cache": 0}), ("own", {"step_cache": 500}))}  # fmt: skip
            assert {name: job["settings"]["step_cache"] for name, job in jobs.items()} == {"default": 1000, "off": 0, "own": 500}
            recorded = {}
            for name, job in jobs.items():
                assert server.wait_for(client, job["id"])["status"] == "completed"
                with av.open(io.BytesIO(client.get(f"/v1/videos/{job['id']}/content").content)) as container:
                    recorded[name] = json.loads(container.metadata["comment"]).get("step_cache")
            refused = server.submit(client, step_cache=-1)
    finally:
        assert server.stop() == 0
    assert recorded["off"] is None  # every forward whole, as without a cache
    for name, threshold in (("default", 1000), ("own", 500)):
        assert recorded[name]["threshold"] == threshold and recorded[name]["max_reuses"] == 2
        skipped, total = (sum(counts[i] for counts in recorded[name]["skipped"].values()) for i in (0, 1))
        assert total == 10 and skipped > 0  # 5 steps, two guidance branches each
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == f"step_cache=-1.0 {NOT_A_THRESHOLD}"  # (the command line's words, naming the field)


def test_a_job_cannot_turn_on_a_step_cache_the_server_did_not_load():
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.server import job_settings

    defaults = SamplingDefaults(size="32*48", frame_num=5, steps=1)
    assert "step_cache" not in job_settings({"prompt": "a boat"}, defaults)
    assert job_settings({"prompt": "a boat", "step_cache": "0"}, defaults)["step_cache"] == 0
    with pytest.raises(WanError) as refused:
        job_settings({"prompt": "a boat", "step_cache": "0.1"}, defaults)
    assert str(refused.value) == ("step_cache=0.1: this server runs without the step cache (leave step_cache out, or start the server "
                                  "with --step-cache (its threshold is then the jobs' default))")
