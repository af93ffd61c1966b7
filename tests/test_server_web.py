"""The web page at /, driven in a real headless Chromium (Debian's /usr/bin/chromium via Playwright)."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server_harness import API_KEY, prompt_files

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip)")
if not CHROMIUM.is_file():
    pytest.skip(f"the browser test needs Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page()
        page.set_default_timeout(120_000)
        yield page
        browser.close()


def test_page_is_served_without_a_key(server):
    response = httpx.get(server.url + "/")
    assert response.status_code == 200 and '<h1 id="generation"' in response.text


def test_page_uploads_a_voice_and_plays_streamed_speech(server, page, fixture_dir):
    prompt_wav, transcript = prompt_files(fixture_dir)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('generation').textContent === 'CosyVoice2'")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelectorAll('#voice option').length > 0")

    page.click("summary")
    page.fill("#new-name", "web-voice")
    page.fill("#new-text", transcript)
    page.set_input_files("#new-audio", str(prompt_wav))
    page.click("#upload")
    page.wait_for_function("document.getElementById('status').textContent.includes('is ready')")
    assert page.input_value("#voice") == "web-voice"

    for mode in ("auto", "cross_lingual"):
        page.select_option("#mode", mode)
        page.fill("#text", "Hello from the browser.")
        page.click("#speak")
        page.wait_for_function("['done', 'error'].includes(document.getElementById('status').dataset.state)")
        assert page.get_attribute("#status", "data-state") == "done", page.text_content("#status")
        assert int(page.get_attribute("#status", "data-samples")) > 0
        assert page.text_content("#first-chunk").endswith(" ms")
        assert page.text_content("#rtf").startswith("RTF: ") and "–" not in page.text_content("#rtf")

    deleted = httpx.delete(server.url + "/api/voices/web-voice", headers={"X-API-Key": API_KEY})
    assert deleted.status_code == 200
