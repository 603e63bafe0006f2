"""The server's web page in a real headless Chromium (Debian's package), driven by Playwright:
submit from the page, watch the progress, play the result."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from urllib.parse import quote

import httpx2
import pytest
from PIL import Image

from server_process import Server, png_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# CI installs Chromium (.ci/run): there a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="Chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "Chromium is not installed (apt-get install chromium)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield launched
        launched.close()


def test_submit_from_the_page_see_progress_and_play_the_video(browser, tiny_checkpoint, tmp_path):
    server = Server(tiny_checkpoint, tmp_path / "state").start()
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(320, 192))
    try:
        page = browser.new_page()
        page.goto(server.url)  # the page asks for the token in a field, and keeps it (percent-encoded) in a cookie
        page.wait_for_function("() => document.querySelector('#message').textContent.includes('needs its token')")
        page.fill("#token", server.token)
        page.click("#token-save")
        page.wait_for_function("() => document.cookie.includes('wan_i2v_token=')")
        page.set_input_files("#image", str(image))
        page.locator("#preview").wait_for(state="visible")  # the chosen image, shown
        page.fill("#prompt", "a paper boat on a pond")
        page.select_option("#size", "custom")
        page.fill("#custom-size", "96*160")
        page.fill("#frames", "5")
        page.fill("#steps", "300")
        page.fill("#seed", "11")
        page.click("#submit")

        row = page.locator(".job").first
        row.locator("progress").wait_for(state="visible")
        page.wait_for_function("() => document.querySelector('.job progress')?.value > 0", timeout=60_000)
        assert "step" in row.locator(".status").inner_text()
        page.wait_for_selector(".job[data-status=completed] video", timeout=120_000)
        assert row.locator("progress").is_hidden()
        playable = page.wait_for_function(
            "() => { const v = document.querySelector('.job video'); return v.readyState >= 1 && v.duration > 0 && v.videoWidth; }",
            timeout=30_000,
        )
        assert playable.json_value() == 160
        page.evaluate("() => document.querySelector('.job video').play()")
        page.wait_for_function("() => document.querySelector('.job video').currentTime > 0", timeout=30_000)
        settings = row.locator(".settings").inner_text()
        assert "seed: 11" in settings and "steps: 300" in settings and "frame_num: 5" in settings
        assert row.locator("a[download]").get_attribute("href").endswith("/content")

        # A bad request shows the server's one-line message on the page.
        page.fill("#custom-size", "100*100")
        page.click("#submit")
        page.wait_for_function("() => document.querySelector('#message').textContent.includes('not a multiple of 16')")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_server(tiny_checkpoint, tmp_path_factory):
    """One server for the page's smaller checks (the tests below run in file order: the first sees an empty queue)."""
    server = Server(tiny_checkpoint, tmp_path_factory.mktemp("page") / "state").start()
    yield server
    server.stop()


def page_with_token(browser, server, token: str | None = None, **options):
    context = browser.new_context(**options)
    context.add_cookies([{"name": "wan_i2v_token", "value": quote(token or server.token, safe=""), "url": server.url}])
    return context.new_page()


def test_an_empty_queue_says_so(browser, shared_server):
    page = page_with_token(browser, shared_server)
    page.goto(shared_server.url)
    page.locator("#empty").wait_for(state="visible")
    assert "empty" in page.locator("#empty").inner_text()


def test_fields_show_the_servers_defaults(browser, shared_server):
    page = page_with_token(browser, shared_server)
    page.goto(shared_server.url)
    # the server was started with --size 96*160 --frame-num 5 --steps 2 (server_process.JOB_OPTIONS)
    page.wait_for_function("() => document.querySelector('#steps').placeholder === '2'")
    assert page.locator("#frames").get_attribute("placeholder") == "5"
    assert "96*160" in page.locator("#size-default").inner_text()
    assert page.locator("#guide-low").get_attribute("placeholder") == "3.5"
    assert page.locator("#guide-high").get_attribute("placeholder") == "3.5"
    assert "unipc" in page.locator("#solver-default").inner_text()


def test_every_sampling_field_and_a_seed_above_2_53_reach_the_job_exactly(browser, shared_server, tmp_path):
    image, last = tmp_path / "photo.png", tmp_path / "last.png"
    image.write_bytes(png_bytes(160, 96))
    last.write_bytes(png_bytes(160, 96, colour=(10, 40, 220)))
    seed = "9223372036854775807"  # 2**63-1: a JavaScript number would make it ...775808
    page = page_with_token(browser, shared_server)
    page.goto(shared_server.url)
    page.set_input_files("#image", str(image))
    page.set_input_files("#last-image", str(last))
    page.fill("#prompt", "a kite")
    page.fill("#seed", seed)
    page.fill("#negative", "blurry")
    page.fill("#guide-low", "2.5")
    page.fill("#guide-high", "4")
    page.fill("#shift", "7")
    page.select_option("#solver", "euler")
    page.click("#submit")
    page.wait_for_selector(".job[data-status=completed] .settings", timeout=120_000)
    assert page.locator("#empty").is_hidden()
    settings = page.locator(".job .settings").first.inner_text()
    assert f"seed: {seed}" in settings

    with shared_server.client() as client:
        job = client.get("/v1/videos").json()["data"][0]
    assert str(job["settings"]["seed"]) == seed
    assert job["settings"]["negative_prompt"] == "blurry"
    assert job["settings"]["guide_scale"] == [2.5, 4.0]
    assert job["settings"]["shift"] == 7.0
    assert job["settings"]["solver"] == "euler"
    assert job["settings"]["last_image_file_sha256"] == hashlib.sha256(last.read_bytes()).hexdigest()


def test_a_wrong_token_says_so_and_waits_for_the_right_one(browser, shared_server):
    page = page_with_token(browser, shared_server, token="not the token")
    dialogs, listings = [], []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("request", lambda request: listings.append(request.url) if "/v1/videos" in request.url else None)
    page.goto(shared_server.url)
    page.wait_for_function("() => document.querySelector('#message').textContent.includes('wrong token')")
    page.wait_for_timeout(2500)  # the page polls every second: a wrong token must not be retried or asked for again
    assert dialogs == [] and len(listings) == 1
    assert page.locator("#token-box").is_visible()

    page.fill("#token", shared_server.token)
    page.click("#token-save")
    page.locator(".job").first.wait_for()
    assert page.locator("#message").inner_text() == ""
    assert page.locator("#token-box").is_hidden()


def test_a_stale_error_is_cleared_once_the_server_answers_again(browser, shared_server):
    page = page_with_token(browser, shared_server)
    page.route("**/v1/videos?*", lambda route: route.abort())
    page.goto(shared_server.url)
    page.wait_for_function("() => document.querySelector('#message').textContent !== ''")
    page.unroute("**/v1/videos?*")
    page.wait_for_function("() => document.querySelector('#message').textContent === ''")
    page.locator(".job").first.wait_for()


def test_the_page_fits_400_pixels_wide(browser, shared_server):
    page = page_with_token(browser, shared_server, viewport={"width": 400, "height": 800})
    page.goto(shared_server.url)
    page.locator(".job").first.wait_for()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 400
    for control in ["#prompt", "#seed", "#solver", "#submit", ".job button"]:
        box = page.locator(control).first.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 400, control


def test_favicon_is_an_icon(shared_server):
    response = httpx2.get(f"{shared_server.url}/favicon.ico")  # no token: the browser asks before the page has one
    assert response.status_code == 200 and response.headers["content-type"] == "image/x-icon"
    icon = Image.open(io.BytesIO(response.content))
    assert icon.format == "ICO" and icon.size == (32, 32)
