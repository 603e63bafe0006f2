"""The server's request layer against hostile or odd requests: the app over a real job store, served
by uvicorn in a thread (no pipeline: the runner is a stand-in that counts notifications)."""

from __future__ import annotations

import contextlib
import contextvars
import io
import re
import threading
import time
from dataclasses import replace

import httpx2
import pytest
import uvicorn
from PIL import Image

from server_process import IdleRunner, free_port, png_bytes, wait_until
from wan_i2v.errors import on_the_command_line
from wan_i2v.config import SamplingDefaults
from wan_i2v.server.app import create_app
from wan_i2v.server.store import JobStore

LIMIT_MB = 1


class CountingRunner(IdleRunner):
    def __init__(self):
        self.notified = 0

    def notify(self):
        self.notified += 1


@contextlib.contextmanager
def serving(state_dir, max_queued: int, capacity=None):
    """The app over a real store in ``state_dir``, on a free port; yields its URL."""
    store = JobStore(state_dir, max_queued=max_queued)
    app = create_app(store, CountingRunner(), max_upload_bytes=LIMIT_MB * 2**20,
                     defaults=SamplingDefaults(size="96*160", frame_num=5, steps=2), capacity=capacity)  # fmt: skip
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    with on_the_command_line():  # as `wan-i2v serve` runs it: inside the command line's spelling of errors
        context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(server.run,), daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("requests") / "state"


@pytest.fixture(scope="module")
def base_url(state_dir):
    with serving(state_dir, max_queued=50) as url:
        yield url


@pytest.fixture()
def client(base_url):
    with httpx2.Client(base_url=base_url, timeout=30) as http:
        yield http


def submit(client, *, image: bytes | None = None, headers=None, **fields):
    data = {"prompt": "a boat", **{name: str(value) for name, value in fields.items()}}
    return client.post("/v1/videos", data=data, files={"input_reference": ("in.png", image or png_bytes(), "image/png")}, headers=headers)


def assert_error(answer, status: int, *words: str):
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["code"] == status
    for word in words:
        assert word in error["message"], error["message"]


# point 6: an idempotency key names one request
def test_an_idempotency_key_reused_with_another_body_is_422(client):
    first = submit(client, headers={"Idempotency-Key": "k-body"}, seed=3)
    assert first.status_code == 200
    again = submit(client, headers={"Idempotency-Key": "k-body"}, seed=3)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert_error(submit(client, headers={"Idempotency-Key": "k-body"}, seed=4), 422, "Idempotency-Key", first.json()["id"])
    other_image = submit(client, image=png_bytes(colour=(0, 0, 255)), headers={"Idempotency-Key": "k-body"}, seed=3)
    assert_error(other_image, 422, "another request")


def test_a_retry_without_a_seed_matches_its_drawn_seed(client):
    first = submit(client, headers={"Idempotency-Key": "k-drawn"})
    again = submit(client, headers={"Idempotency-Key": "k-drawn"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


def test_an_idempotency_key_over_255_characters_is_refused(client):
    assert submit(client, headers={"Idempotency-Key": "k" * 255}).status_code == 200
    assert_error(submit(client, headers={"Idempotency-Key": "k" * 256}), 400, "256 characters", "at most 255")


# point 7: text fields sent as files
@pytest.mark.parametrize("name", ["prompt", "seed", "size"])
def test_a_text_field_sent_as_a_file_is_400(client, name):
    files = {"input_reference": ("in.png", png_bytes(), "image/png"), name: ("field.png", png_bytes(), "image/png")}
    data = {} if name == "prompt" else {"prompt": "a boat"}
    assert_error(client.post("/v1/videos", data=data, files=files), 400, f"{name} must be a text field", f"-F {name}=VALUE")


# point 3: a chunked upload is cut at the limit
def test_a_chunked_upload_is_refused_at_the_limit_without_being_read_whole(client):
    import re

    body = (b"x" * 2**20 for _ in range(64))  # 64 MiB offered, with no Content-Length
    answer = client.post("/v1/videos", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert_error(answer, 413, "--max-upload-mb", "not read further")
    read_mib = float(re.search(r"after ([0-9.]+) MiB", answer.json()["error"]["message"]).group(1))
    assert LIMIT_MB <= read_mib <= LIMIT_MB + 1  # it stopped within a chunk or so of the limit (the message rounds to 0.1 MiB)


def test_a_chunked_upload_under_the_limit_still_works(client):
    import uuid

    boundary = uuid.uuid4().hex
    parts = [(b'Content-Disposition: form-data; name="prompt"\r\n\r\na boat'),
             (b'Content-Disposition: form-data; name="input_reference"; filename="in.png"\r\nContent-Type: image/png\r\n\r\n' + png_bytes())]  # fmt: skip
    payload = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + boundary.encode() + b"--\r\n"
    answer = client.post("/v1/videos", content=iter([payload[:100], payload[100:]]),
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert answer.status_code == 200, answer.text


# point 2: image size read from the header
def test_a_decompression_bomb_is_refused_from_its_header(client):
    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG")  # 100 MP in a few KiB
    assert len(buffer.getvalue()) < LIMIT_MB * 2**20
    assert_error(submit(client, image=buffer.getvalue()), 400, "10000x10000", "100 MP", "limit of 64 MP")
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")  # past Pillow's own refusal to open
    assert_error(submit(client, image=buffer.getvalue()), 400, "over the limit of 64 MP")


# point 8: OpenAI fields this server does not honour
def test_seconds_and_a_foreign_model_are_refused_not_ignored(client):
    assert_error(submit(client, seconds=4), 400, "seconds", "frame_num")
    assert_error(submit(client, model="sora-2"), 400, "sora-2")
    assert submit(client, model="wan2.2-i2v-a14b").status_code == 200


def test_a_thumbnail_variant_is_400(client):
    job = submit(client).json()
    assert_error(client.get(f"/v1/videos/{job['id']}/content", params={"variant": "thumbnail"}), 400, "variant", "thumbnail")


# point 12: one error shape, Retry-After, strict numbers
def test_404_and_405_have_the_error_shape(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.put("/v1/videos"), 405)
    assert_error(client.get("/v1/videos/video_missing"), 404, "no video video_missing")


def test_a_number_with_an_underscore_is_refused(client):
    assert_error(submit(client, frame_num="1_7"), 400, "frame_num", "1_7")


@pytest.mark.parametrize("field,value", [("frame_num", 8), ("frame_num", 1), ("frame_num", 10001), ("guide_scale", "1,2,3"),
                                         ("guide_scale", 99), ("guide_scale", "high"), ("size", "999P"), ("size", "1000*720"),
                                         ("steps", 0), ("shift", 0), ("solver", "heun"), ("seed", -5)])  # fmt: skip
def test_a_bad_field_is_named_as_the_api_names_it_not_as_a_flag(client, field, value):
    answer = submit(client, **{field: value})
    assert_error(answer, 400, field)
    assert not re.search(r"--[a-z]", answer.json()["error"]["message"]), answer.json()["error"]["message"]


def test_a_full_queue_is_429_with_retry_after(tmp_path):
    with serving(tmp_path / "state", max_queued=1) as url, httpx2.Client(base_url=url, timeout=30) as client:
        assert submit(client).status_code == 200
        full = submit(client)
        assert_error(full, 429, "try again later")
        assert int(full.headers["Retry-After"]) > 0


def test_eight_parallel_50_mp_uploads_leave_the_server_alive_and_small(client):
    import resource
    from concurrent.futures import ThreadPoolExecutor

    buffer = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buffer, format="PNG")  # 49 MP, a phone photo's size, in a few KiB
    photo = buffer.getvalue()
    resident_before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: submit(client, image=photo), range(8)))
    assert [answer.status_code for answer in answers] == [200] * 8, answers[0].text
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (the server runs in this process)
    assert peak - resident_before <= 2**30


def test_head_on_content_answers_like_get_without_a_body(state_dir, client):
    job = submit(client).json()
    assert client.head(f"/v1/videos/{job['id']}/content").status_code == 404  # queued: no content yet, as GET says
    worker = JobStore(state_dir)  # a second server of the same queue runs the job (this app's runner is a stand-in)
    while (claimed := worker.claim()) is not None and claimed.id != job["id"]:
        worker.finish(claimed.id, "failed", error="not this test's")
    worker.video_path(job["id"]).write_bytes(b"\x00" * 1234)
    assert worker.finish(job["id"], "completed")
    worker.close()
    head = client.head(f"/v1/videos/{job['id']}/content")
    assert head.status_code == 200 and head.headers["content-length"] == "1234" and head.content == b""
    assert head.headers["content-type"] == "video/mp4"


# point 1: the loaded plan's estimate decides what a request may ask
def test_a_request_beyond_the_plan_is_refused_and_models_says_what_fits(tiny_checkpoint, tmp_path):
    from wan_i2v.parallel.plan import model_sizes
    from wan_i2v.server.capacity import Capacity
    from wan_i2v.session import RunOptions, plan_for

    # The tiny model on the CPU, planned for 4 GiB of host memory (its own videos need about 2)
    options = RunOptions(ckpt_dir=tiny_checkpoint, device="cpu", dtype="fp32", host_memory=4)
    planned = plan_for(options, height=96, width=160, frame_num=5, device="cpu", world=1, ckpt_dir=tiny_checkpoint)
    capacity = Capacity(planned, model_sizes(tiny_checkpoint, 4))
    with serving(tmp_path / "state", max_queued=5, capacity=capacity) as url, httpx2.Client(base_url=url, timeout=30) as client:
        refused = submit(client, size="2048*2048", frame_num=321)
        assert_error(refused, 400, "does not fit the memory", "size", "frame_num", "/v1/models")
        assert "--" not in refused.json()["error"]["message"]
        assert submit(client, frame_num=321).status_code == 200  # its own size, every frame count: about 2 GiB
        model = client.get("/v1/models").json()["data"][0]
        assert model["id"] == "wan2.2-i2v-a14b" and model["max_frame_num"] == {"160x80": 321}  # (16:9 within 96*160, as the server plans)
    roomier = Capacity(plan_for(replace(options, host_memory=12), height=96, width=160, frame_num=5, device="cpu", world=1,
                                ckpt_dir=tiny_checkpoint), model_sizes(tiny_checkpoint, 4))  # fmt: skip
    largest = roomier.largest_frame_num(2048, 2048)  # 12 GiB: a few frames of 2048x2048, not 321
    assert 5 <= largest < 321 and roomier.fits(largest, 2048, 2048) and not roomier.fits(largest + 4, 2048, 2048)


class EventStream:
    """A job's event stream, read in a thread of its own: ``next()`` is its next event's (kind, job)."""

    def __init__(self, base_url: str, job_id: str):
        import queue

        self.events: queue.Queue = queue.Queue()
        self.url = f"{base_url}/v1/videos/{job_id}/events"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        import json

        with httpx2.Client(timeout=60) as http, http.stream("GET", self.url) as stream:
            kind = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    self.events.put((kind, json.loads(line[6:])))

    def next(self, timeout: float) -> tuple[str, dict]:
        return self.events.get(timeout=timeout)


def test_event_streams_get_this_servers_changes_at_once_and_read_the_queue_once_per_poll(state_dir, base_url, client, monkeypatch):
    from wan_i2v.server import events

    reads = []
    monkeypatch.setattr(JobStore, "get", lambda store, *args, _get=JobStore.get, **kwargs: reads.append("get") or _get(store, *args, **kwargs))
    monkeypatch.setattr(JobStore, "jobs", lambda store, ids, _jobs=JobStore.jobs: reads.append("jobs") or _jobs(store, ids))
    monkeypatch.setattr(events, "POLL_SECONDS", 0.25)
    ids = [submit(client).json()["id"] for _ in range(4)]
    streams = [EventStream(base_url, job_id) for job_id in ids]
    assert all(stream.next(timeout=10)[1]["status"] == "queued" for stream in streams)
    reads.clear()
    time.sleep(2)
    assert len(reads) <= 12  # one read of the four jobs per poll, not one per stream (4 streams x 8 polls)

    worker = JobStore(state_dir)  # another server of the queue runs a job: only a poll sees it
    while (claimed := worker.claim()).id != ids[0]:
        worker.finish(claimed.id, "failed", error="not this test's")
    worker.progress(ids[0], 1, 0.5)
    worker.close()
    kind, job = streams[0].next(timeout=10)
    if job["status"] == "in_progress" and job["step"] == 0:  # the claim and the step, read by two polls
        kind, job = streams[0].next(timeout=10)
    assert kind == "progress" and job["status"] == "in_progress" and job["step"] == 1

    monkeypatch.setattr(events, "POLL_SECONDS", 60)  # what follows comes sooner than any poll
    time.sleep(1)  # (the poll under way ends)
    started = time.monotonic()
    assert client.delete(f"/v1/videos/{ids[1]}").status_code == 200  # this server cancels it
    assert streams[1].next(timeout=10) == ("done", client.get(f"/v1/videos/{ids[1]}").json())
    assert time.monotonic() - started < 5

    for job_id in ids:
        client.delete(f"/v1/videos/{job_id}")


def test_a_jobs_text_fields_are_read_as_the_command_line_reads_its_flags():
    from wan_i2v.config import SamplingDefaults
    from wan_i2v.errors import WanError
    from wan_i2v.server.job_form import JobFields

    fields = JobFields.of({"prompt": "a boat", "frame_num": " 9 ", "steps": "", "guide_scale": "2,3", "seed": "-1", "size": " "})
    assert (fields.frame_num, fields.steps, fields.guide_scale, fields.seed_given, fields.size) == (9, None, (2.0, 3.0), False, None)
    settings = fields.settings(SamplingDefaults(steps=7, size="480P"))
    assert (settings["steps"], settings["size"], settings["max_area"], settings["frame_num"]) == (7, "480P", 832 * 480, 9)
    assert JobFields.of({"prompt": "", "seed": "12"}).seed_given
    for field, text, message in [("frame_num", "1_7", "frame_num must be a whole number, not '1_7'"), ("steps", "1.0", "steps must be a whole number, not '1.0'"),
                                 ("shift", "x", "shift must be a number, not 'x'"), ("guide_scale", "a,b", "guide_scale must be one number or two separated by a comma")]:  # fmt: skip
        with pytest.raises(WanError) as refused:
            JobFields.of({"prompt": "a boat", field: text})
        assert str(refused.value).startswith(message), refused.value
