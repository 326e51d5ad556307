"""``gap3d app`` in a real headless browser: Debian's Chromium driven by Selenium.

Opens the page, types a prompt, generates, waits for the 3D viewer to draw the GLB, checks
the summary, previews and PCA map, and saves a screenshot under the test's output folder
(``GAP3D_SCREENSHOT_DIR`` set: a copy goes there too). Then an empty prompt must show the
app's error message in the page. Needs ``chromium`` + ``chromium-driver`` (``make setup``);
skipped without them unless ``GAP3D_REQUIRE_BROWSER=1`` (CI sets it), where it fails.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from _inference_fixtures import tiny_setup

from gap3d.app.backend import AppBackend
from gap3d.app.browser import BrowserMissing, find_browser, make_driver, try_prompt
from gap3d.pipeline.server import free_port


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    try:
        find_browser()
    except BrowserMissing as e:
        if os.environ.get("GAP3D_REQUIRE_BROWSER") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    from gap3d.app.ui import launch

    setup = tiny_setup(tmp_path_factory)
    backend = AppBackend(setup.cfg("sample.steps=3"), out_root=tmp_path_factory.mktemp("app_out"))
    port = free_port()
    ui = launch(backend, "127.0.0.1", port, block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        ui.close()


def test_prompt_to_3d_viewer_in_chromium(app_url, tmp_path):
    driver = make_driver()
    try:
        shot = tmp_path / "app.png"
        out = try_prompt(app_url, "a red square", shot, timeout_s=240, driver=driver)
        assert out.error is None, out.error
        assert "a red square" in out.summary and "best asset" in out.summary
        assert out.canvas[0] > 100 and out.canvas[1] > 100  # the viewer drew into its canvas
        assert out.n_previews >= 1 and out.has_pca
        assert shot.stat().st_size > 20_000
        if os.environ.get("GAP3D_SCREENSHOT_DIR"):
            dest = Path(os.environ["GAP3D_SCREENSHOT_DIR"])
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, dest / "app_test.png")

        # an empty prompt: the app's message shows up in the page, nothing crashes
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = driver.find_element(By.CSS_SELECTOR, "#gap3d-prompt textarea")
        box.send_keys(Keys.CONTROL, "a")  # clear() fires no input event for Gradio to see
        box.send_keys(Keys.DELETE)
        driver.find_element(By.CSS_SELECTOR, "#gap3d-generate").click()
        deadline = time.time() + 30
        text = ""
        while time.time() < deadline and "Type a prompt first" not in text:
            time.sleep(0.3)
            text = driver.find_element(By.TAG_NAME, "body").text
        assert "Type a prompt first" in text
    finally:
        driver.quit()
