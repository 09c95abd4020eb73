"""The browser for the page's end-to-end tests: headless Debian chromium driven by Selenium, and the few
steps every page test takes (wait for a condition, find, fill, read an image back)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from PIL import Image

from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TIMEOUT_S = 120


def artifacts_dir() -> Path:
    """Where screenshots go: ``$LORAFLEET_ARTIFACTS_DIR``, default ``test-artifacts/`` in the repository."""
    path = Path(os.environ.get("LORAFLEET_ARTIFACTS_DIR") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_chromium():
    """A headless chromium (the caller quits it), its console kept for ``get_log("browser")``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait(driver, condition, timeout=TIMEOUT_S, message=""):
    """Poll ``condition(driver)`` until it is truthy (returns it); the deadline only turns a hang into a failure."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition, message)


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def fill(driver, element_id, value):
    element = by_id(driver, element_id)
    element.clear()
    element.send_keys(str(value))


def decode_data_url(src: str, mime: str = "image/png") -> Image.Image:
    prefix = f"data:{mime};base64,"
    assert src.startswith(prefix), src[:64]
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :])))
