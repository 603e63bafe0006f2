"""The server's web page in a real headless Chromium (Debian's package), driven by Playwright:
submit from the page, watch the progress, play the result."""

from __future__ import annotations

import os
import shutil

import pytest

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
        asked = []
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept(server.token)))
        page.goto(server.url)  # the page asks for the token once, and keeps it (percent-encoded) in a cookie
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
        assert asked == ["This server needs its token:"]

        # A bad request shows the server's one-line message on the page.
        page.fill("#custom-size", "100*100")
        page.click("#submit")
        page.wait_for_function("() => document.querySelector('#message').textContent.includes('not a multiple of 16')")
    finally:
        server.stop()
