"""The page in a real browser: `diffuse serve` on a tiny trained model, driven by Playwright through
Debian's Chromium (`apt-get install chromium`, which .ci/run does; Playwright's own browser download
needs the internet). Sets the sliders, generates, follows the progress bar, checks the grid's pixel
size and the downloads, that nothing is fetched from elsewhere, and the phone-width layout."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path(os.environ.get("DIFFUSE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
if not CHROMIUM.is_file():
    pytest.skip(f"Chromium not found at {CHROMIUM}: " + os.environ.get(
        "DIFFUSE_CHROMIUM_MISSING", "install it with apt-get install chromium (.ci/run does)"), allow_module_level=True)


@pytest.fixture(scope="module")
def server(served_runs):
    """`diffuse serve RUN --port 0` as a user starts it; yields its URL from the line it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "diffuse", "serve", str(served_runs["cond"]), "--port", "0",
                             "--max-steps", "50", "--max-images", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, lines, deadline = None, [], time.monotonic() + 180
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            lines.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
    if url is None:
        proc.kill()
        pytest.fail("diffuse serve did not start:\n" + "".join(lines) + (proc.stdout.read() or ""))
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert proc.returncode == 0, "".join(lines)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001 - a browser that cannot start is a skip with its reason
            pytest.skip(f"Chromium at {CHROMIUM} did not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


def test_generate_and_download_in_the_page(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server)
    page.wait_for_selector("#model option", state="attached")
    assert page.locator("#model").input_value() == "cond"
    assert page.locator("#cond").is_visible()                            # class + guidance for a conditional model
    page.locator("#steps").fill("6")
    page.locator("#n").fill("4")
    page.locator("#guidance").fill("2")
    page.select_option("#class", "3")
    page.fill("#seed", "42")
    assert page.locator("#steps-num").input_value() == "6" and page.locator("#n-out").text_content() == "4"
    assert page.locator("#guidance-out").text_content() == "2.0"
    # record every progress text the page shows (the run may be over before a poll would see it)
    # (each text the script sets is one added text node; events that arrive together are set in one task,
    # so read the mutation records, not the element's text when the observer runs)
    page.evaluate("""() => { window.__steps = [];
        new MutationObserver((records) => { for (const r of records) for (const n of r.addedNodes)
            window.__steps.push(n.textContent); })
          .observe(document.getElementById('progress-text'), {childList: true}); }""")
    page.click("#generate")
    page.wait_for_selector("#progress-box", state="visible")
    page.wait_for_selector("#result", state="visible", timeout=120_000)
    steps = page.evaluate("window.__steps")
    assert steps == [f"step {i} of 6" for i in range(1, 7)], steps
    assert "Done" in page.locator("#status").text_content()
    # 4 images of 16 px in a 2x2 grid with 2 px padding, upscaled 4x (as diffuse sample writes it)
    size = page.evaluate("[document.getElementById('grid').naturalWidth, document.getElementById('grid').naturalHeight]")
    assert size == [(2 * 18 + 2) * 4] * 2
    assert page.locator("#images a").count() == 4 and page.locator("#history li").count() == 1
    assert "class 3, guidance 2" in page.locator("#result-info").text_content()

    with page.expect_download() as d:
        page.click("#download-grid")
    grid = tmp_path / d.value.suggested_filename
    d.value.save_as(grid)
    assert grid.name == "diffuse-cond-seed42.png" and Image.open(grid).size == (152, 152)
    with page.expect_download() as d:
        page.locator("#images a").nth(3).click()
    one = tmp_path / d.value.suggested_filename
    d.value.save_as(one)
    assert one.name == "diffuse-cond-seed42-3.png" and Image.open(one).size == (16, 16)

    page.click("#random-seed")
    assert page.locator("#seed").input_value() != "42"
    assert all(u.startswith(server) or u.startswith(("data:", "blob:")) for u in requested), requested
    page.close()


def test_phone_width_layout_has_no_sideways_scroll(server, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page.goto(server)
    page.wait_for_selector("#model option", state="attached")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#generate").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    page.close()
