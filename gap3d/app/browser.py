"""Drive ``gap3d app`` in a real headless browser (Debian's Chromium through Selenium).

Used by ``tests/test_app_browser.py`` and to take the README screenshot::

    python -m gap3d.app.browser http://127.0.0.1:7860/ --prompt "a red cube" --out docs/app.png

:func:`try_prompt` opens the page, types the prompt, presses *Generate*, waits until the 3D
viewer has drawn the GLB into its canvas and the summary line has appeared, and saves a
screenshot. Chromium has no GPU here: WebGL runs on SwiftShader (``--enable-unsafe-swiftshader``,
which Chromium >= 137 requires for software WebGL).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BrowserMissing", "find_browser", "make_driver", "try_prompt", "PromptOutcome"]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER_NAMES = ("chromedriver", "chromium-driver")


class BrowserMissing(RuntimeError):
    """No Chromium or chromedriver on this machine (``make setup`` installs Debian's)."""


def find_browser() -> tuple[str, str]:
    """``(chromium, chromedriver)`` paths: ``$GAP3D_CHROMIUM`` / ``$GAP3D_CHROMEDRIVER`` or
    the first found on ``PATH``."""
    browser = os.environ.get("GAP3D_CHROMIUM") or next(
        (p for p in map(shutil.which, CHROMIUM_NAMES) if p), None
    )
    driver = os.environ.get("GAP3D_CHROMEDRIVER") or next(
        (p for p in map(shutil.which, DRIVER_NAMES) if p), None
    )
    if not browser or not driver:
        raise BrowserMissing(
            "Chromium and chromedriver are needed for the browser test; `make setup` installs "
            "Debian's (apt-get install chromium chromium-driver), or set GAP3D_CHROMIUM and "
            "GAP3D_CHROMEDRIVER"
        )
    return browser, driver


def make_driver(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium WebDriver with software WebGL."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    opts = Options()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in containers
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--enable-unsafe-swiftshader",
        "--use-angle=swiftshader",
        "--ignore-gpu-blocklist",
        "--no-first-run",
        "--disable-extensions",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


@dataclass
class PromptOutcome:
    summary: str  # the summary line the page shows under the prompt
    canvas: tuple[int, int]  # size of the 3D viewer's canvas in CSS pixels
    n_previews: int
    has_pca: bool
    screenshot: Path
    seconds: float
    error: str | None = None  # the message of an error toast, if the page showed one


def _text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    els = driver.find_elements(By.CSS_SELECTOR, css)
    return els[0].text.strip() if els else ""


def try_prompt(
    url: str, prompt: str, screenshot: str | Path, timeout_s: float = 300.0, driver: Any = None
) -> PromptOutcome:
    """Type ``prompt`` on the page at ``url``, generate, wait for the 3D viewer, screenshot."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    own = driver is None
    driver = driver or make_driver()
    t0 = time.perf_counter()
    try:
        driver.get(url)
        box = WebDriverWait(driver, 60).until(
            ec.element_to_be_clickable((By.CSS_SELECTOR, "#gap3d-prompt textarea"))
        )
        box.send_keys(Keys.CONTROL, "a")  # replace any text (clear() fires no input event)
        box.send_keys(Keys.DELETE)
        box.send_keys(prompt)
        driver.find_element(By.CSS_SELECTOR, "#gap3d-generate").click()

        def done(d: Any) -> Any:
            err = d.find_elements(By.CSS_SELECTOR, ".toast-body, .error")
            if err and any(e.text.strip() for e in err):
                return "error"
            canvas = d.find_elements(By.CSS_SELECTOR, "#gap3d-model canvas")
            summary = _text(d, "#gap3d-summary")
            if canvas and canvas[0].size["width"] > 0 and prompt in summary:
                return "ok"
            return False

        try:
            state = WebDriverWait(driver, timeout_s, poll_frequency=0.5).until(done)
        except TimeoutException:
            state = "timeout"
        time.sleep(1.5)  # let the viewer finish drawing before the screenshot
        screenshot = Path(screenshot)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        canvas = driver.find_elements(By.CSS_SELECTOR, "#gap3d-model canvas")
        error = None
        if state != "ok":
            toasts = driver.find_elements(By.CSS_SELECTOR, ".toast-body, .error")
            error = " ".join(t.text.strip() for t in toasts if t.text.strip()) or state
        return PromptOutcome(
            summary=_text(driver, "#gap3d-summary"),
            canvas=(
                (int(canvas[0].size["width"]), int(canvas[0].size["height"])) if canvas else (0, 0)
            ),
            n_previews=len(driver.find_elements(By.CSS_SELECTOR, "#gap3d-previews img")),
            has_pca=bool(driver.find_elements(By.CSS_SELECTOR, "#gap3d-pca img")),
            screenshot=screenshot,
            seconds=time.perf_counter() - t0,
            error=error,
        )
    finally:
        if own:
            driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(description="Try one prompt in a running `gap3d app`.")
    p.add_argument("url", help="the app's address, e.g. http://127.0.0.1:7860/")
    p.add_argument("--prompt", default="a red cube")
    p.add_argument("--out", default="app.png", help="screenshot file")
    p.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args()
    out = try_prompt(a.url, a.prompt, a.out, a.timeout)
    print(out)
    raise SystemExit(0 if out.error is None else 1)


if __name__ == "__main__":
    main()
