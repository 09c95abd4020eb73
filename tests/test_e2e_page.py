"""The browser page at ``/`` in headless Chromium (Debian's chromium + chromium-driver, via Selenium).

A person's path: type a prompt, pick a registered style, submit, watch progress, get an image; a bad
value or an unreachable server shows a message next to the form. Screenshots go to
``$LORAFLEET_ARTIFACTS_DIR`` (default: ``test-artifacts/`` in the repository).
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import HeldDenoiser
from lora_helpers import UNET_ATTN, make_peft_lora_file
from page_helpers import artifacts_dir, by_id, decode_data_url, fill, wait

pytestmark = pytest.mark.e2e

ADAPTER = "page-watercolor"
STEPS = 40


@pytest.fixture(scope="module")
def adapter(cluster, tiny, tmp_path_factory):
    """A style registered over HTTP with a description and trigger words, as tests/test_e2e_adapters.py does."""
    path = make_peft_lora_file(
        tiny, tmp_path_factory.mktemp("page-lora"), seed=31, rank=4, alpha=4, unet_targets=UNET_ATTN
    )
    with open(path, "rb") as f:
        r = requests.post(
            cluster.url + "/v1/adapters",
            files={"file": (path.name, f)},
            data={"name": ADAPTER, "description": "Soft watercolor washes", "trigger_words": "wc style"},
            headers=cluster.admin,
            timeout=120,
        )
    assert r.status_code == 201, r.text
    return r.json()


def open_page(driver, cluster):
    """Load ``/`` and wait until the adapter list has arrived from /sdapi/v1/loras."""
    driver.get(cluster.url + "/")
    wait(
        driver,
        # One script call: the options are replaced while the list loads (no stale element references).
        lambda d: (
            ADAPTER in d.execute_script("return [...document.getElementById('adapter-pick').options].map(o => o.value)")
        ),
        30,
        "the adapter picker never listed the registered adapter",
    )
    # Record every text the progress line shows, to check queue/step reporting afterwards.
    driver.execute_script(
        """
        window.statuses = [];
        const line = document.getElementById("job-status");
        new MutationObserver(() => window.statuses.push(line.textContent))
          .observe(line, {childList: true, characterData: true, subtree: true});
        """
    )


def error_text(driver):
    wait(driver, lambda d: by_id(d, "form-error").is_displayed(), 60, "no error was shown")
    return by_id(driver, "form-error").text


def test_prompt_and_style_to_an_image_in_the_gallery(cluster, browser, adapter):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    open_page(driver, cluster)
    assert driver.title == "lorafleet"
    assert "tiny-sd" in by_id(driver, "model-line").text

    fill(driver, "prompt", "a lighthouse at dusk")
    fill(driver, "negative_prompt", "blurry")
    for element_id, value in (("seed", 123), ("steps", STEPS), ("width", 64), ("height", 64)):
        fill(driver, element_id, value)
    Select(by_id(driver, "adapter-pick")).select_by_value(ADAPTER)
    assert "Soft watercolor washes" in by_id(driver, "adapter-info").text
    assert "wc style" in by_id(driver, "adapter-info").text
    by_id(driver, "adapter-add").click()
    item = driver.find_element(By.CSS_SELECTOR, "#adapter-list li")
    assert ADAPTER in item.text
    item.find_element(By.XPATH, ".//button[text()='Insert trigger words']").click()
    assert by_id(driver, "prompt").get_attribute("value") == "a lighthouse at dusk, wc style"
    fill(driver, f"scale-{ADAPTER}", "0.8")

    # The job waits behind a held batch until the page shows it queued (from the job's events), so the
    # progress line is seen at work however fast the machine finishes a job.
    with HeldDenoiser(cluster):
        by_id(driver, "submit").click()
        wait(
            driver,
            lambda d: any(s.startswith("Queued: 0 ahead of you") for s in d.execute_script("return window.statuses")),
            message="the page never showed the job queued",
        )
    image = wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery figure img"),
        message="no image reached the gallery",
    )[0]
    png = decode_data_url(image.get_attribute("src"))
    assert png.format == "PNG" and png.size == (64, 64)
    caption = driver.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert "Seed 123" in caption and "64×64" in caption
    assert f"{ADAPTER}@{adapter['version']} ×0.8" in caption
    download = driver.find_element(By.CSS_SELECTOR, "#gallery figcaption a")
    assert download.get_attribute("download") == "lorafleet-123.png"
    assert by_id(driver, "job-status").text == "Done."
    assert float(by_id(driver, "progress").get_attribute("value")) == 1.0
    assert not by_id(driver, "form-error").is_displayed()
    statuses = driver.execute_script("return window.statuses")
    # "Queued." is the page's own; "Queued: …" and "Running: step i of N." come from the job's events.
    progress = [s for s in statuses if re.fullmatch(rf"Running: step \d+ of {STEPS}\.", s) or s.startswith("Queued:")]
    assert any(s.startswith("Queued: 0 ahead of you, about ") for s in progress), statuses

    # The page sent exactly what the person chose: the same request through /v1/generate gives the same image.
    native = requests.post(
        cluster.url + "/v1/generate",
        json={
            "prompt": "a lighthouse at dusk, wc style",
            "negative_prompt": "blurry",
            "seed": 123,
            "steps": STEPS,
            "width": 64,
            "height": 64,
            "loras": [{"name": ADAPTER, "scale": 0.8}],
        },
        timeout=300,
    )
    assert native.status_code == 200, native.text
    assert image.get_attribute("src") == "data:image/png;base64," + native.json()["images"][0]["b64"]

    # Everything the page loaded came from this server (or is inline data).
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(r.endswith("/static/app.js") for r in resources)
    assert all(r.startswith(cluster.url) or r.startswith("data:") for r in resources), resources
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe

    shot = artifacts_dir() / "page.png"
    driver.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0


def test_api_errors_and_network_errors_are_shown_next_to_the_form(cluster, browser, adapter):
    driver = browser
    open_page(driver, cluster)
    fill(driver, "prompt", "a red boat")
    fill(driver, "steps", 999)
    by_id(driver, "submit").click()
    assert error_text(driver) == "steps must be in [1, 150], got 999"
    assert by_id(driver, "steps").get_attribute("aria-invalid") == "true"
    assert driver.find_elements("css selector", "#gallery figure") == []
    assert by_id(driver, "submit").is_enabled()
    driver.save_screenshot(str(artifacts_dir() / "page-error.png"))

    fill(driver, "steps", 4)
    fill(driver, "prompt", "a red boat <lora:no-such-style:1>")
    by_id(driver, "submit").click()
    wait(driver, lambda d: "no-such-style" in by_id(d, "form-error").text, 60, "the 404 was not shown")
    assert "unknown adapter 'no-such-style'" in by_id(driver, "form-error").text
    assert by_id(driver, "steps").get_attribute("aria-invalid") is None  # the old mark is cleared

    driver.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'));")
    fill(driver, "prompt", "a red boat")
    by_id(driver, "submit").click()
    wait(driver, lambda d: "Network error" in by_id(d, "form-error").text, 30, "the network error was not shown")
    assert by_id(driver, "form-error").text == "Network error: could not reach the server (Failed to fetch)."


def test_inpaint_mode_sends_the_image_and_the_painted_mask(cluster, browser, adapter, tmp_path):
    """Inpaint mode: a file, a mask painted on the canvas (white = repaint), strength; the POST /v1/jobs
    body carries them as data URLs, and the page shows the server's answer to exactly that body."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    source = np.zeros((72, 96, 3), np.uint8)
    source[:, :, 1] = 200
    path = tmp_path / "input.png"
    Image.fromarray(source).save(path)

    open_page(driver, cluster)
    driver.execute_script(
        """
        window.sent = [];
        const realFetch = window.fetch;
        window.fetch = (url, init) => {
          if (init && init.method === "POST") window.sent.push({url, body: JSON.parse(init.body)});
          return realFetch(url, init);
        };
        """
    )
    assert not by_id(driver, "panel-image").is_displayed()
    by_id(driver, "tab-txt2img").send_keys(Keys.ARROW_RIGHT)  # tabs answer to the keyboard too
    assert by_id(driver, "tab-img2img").get_attribute("aria-selected") == "true"
    assert by_id(driver, "panel-image").is_displayed() and not by_id(driver, "mask").is_displayed()
    assert by_id(driver, "strength").get_attribute("value") == "0.75"
    by_id(driver, "tab-inpaint").click()
    assert by_id(driver, "tab-inpaint").get_attribute("aria-selected") == "true"
    assert by_id(driver, "strength").get_attribute("value") == "1"
    by_id(driver, "image").send_keys(str(path))
    canvas = wait(driver, lambda d: by_id(d, "mask") if by_id(d, "mask").is_displayed() else None, 30)
    assert (by_id(driver, "width").get_attribute("value"), by_id(driver, "height").get_attribute("value")) == (
        "96",
        "72",
    )
    # A stroke across the left part of the canvas (offsets from its centre, in CSS pixels).
    box = canvas.size
    driver.execute_script("document.getElementById('brush').value = '40';")  # CSS pixels on the scaled canvas
    ActionChains(driver).move_to_element_with_offset(canvas, -box["width"] // 4, 0).click_and_hold().move_by_offset(
        box["width"] // 8, 0
    ).release().perform()
    fill(driver, "prompt", "a green field")
    fill(driver, "steps", 4)
    by_id(driver, "submit").click()
    wait(driver, lambda d: d.execute_script("return window.sent.length") >= 1, 30, "nothing was posted")
    sent = driver.execute_script("return window.sent")[0]
    assert sent["url"] == "/v1/jobs"
    body = sent["body"]
    assert body["image"] == "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    assert body["strength"] == 1 and (body["width"], body["height"]) == (96, 72)
    mask = np.asarray(decode_data_url(body["mask"]).convert("L"))
    assert mask.shape == (72, 96)
    assert set(np.unique(mask)) >= {0, 255}
    painted_columns = np.flatnonzero(mask[36] > 127)
    assert painted_columns.min() < 40 and painted_columns.max() < 56  # the stroke is on the left
    assert (mask[:, 72:] == 0).all()  # the right side is kept

    # The page shows the server's answer to that same body: an image, or the server's own error message.
    answer = requests.post(cluster.url + "/v1/jobs", json=body, timeout=60)
    if answer.status_code == 202:
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery figure img"), message="no inpainted image")
        src = driver.find_elements(By.CSS_SELECTOR, "#gallery figure img")[0].get_attribute("src")
        assert decode_data_url(src).size == (96, 72)
    else:
        assert error_text(driver) == answer.json()["error"]["message"]
    driver.save_screenshot(str(artifacts_dir() / "page-inpaint.png"))


def test_page_and_static_files_over_http(cluster):
    index = requests.get(cluster.url + "/", timeout=30)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    config = json.loads(re.search(r'<script type="application/json" id="config">(.*?)</script>', index.text).group(1))
    assert config["model"] == "tiny-sd" and config["max_steps"] == 150 and config["default_side"] == 256
    js = requests.get(cluster.url + "/static/app.js", timeout=30)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    again = requests.get(cluster.url + "/static/app.js", headers={"If-None-Match": js.headers["etag"]}, timeout=30)
    assert again.status_code == 304
    missing = requests.get(cluster.url + "/static/../ingress.py", timeout=30)
    assert missing.status_code == 404
    assert requests.get(cluster.url + "/static/nope.js", timeout=30).json()["error"]["code"] == "not_found"
