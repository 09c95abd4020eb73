"""The page's style image (IP-Adapter, issue 22) in headless Chromium against the app on Ray Serve: the section
shows for a model GET /v1/models lists with ``style_image``; a reference chosen in the file picker, then another
dropped on the drop zone, and the strength slider go out as ``style_image`` / ``style_scale``; the gallery image is
the server's answer to that very request (equal to /v1/generate with the same style image), and removing the
image sends none. A bad scale from the server marks the slider."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import requests
from PIL import Image
from style_app import deployed

from page_helpers import artifacts_dir, by_id, decode_data_url, fill, wait

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def styled(cluster, cache_dir, tmp_path_factory):
    """An app served with its builtin IP-Adapter under a route prefix (tests/style_app.py)."""
    with deployed(cluster, cache_dir, tmp_path_factory) as url:
        yield url


def open_page(driver, url):
    """Load the page, record what it POSTs, and wait for the style section (it shows once /v1/models has said)."""
    driver.get(url + "/")
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
    wait(driver, lambda d: by_id(d, "style").is_displayed(), 30, "the style image section never showed")


def picture(path, colors) -> bytes:
    y, x = np.mgrid[0:40, 0:56]
    Image.fromarray(np.stack([x * colors[0], y * colors[1], (x + y) * colors[2]], axis=-1).astype(np.uint8)).save(path)
    return path.read_bytes()


def drop(driver, element_id: str, data: bytes, name: str) -> None:
    """A file dropped on the element, as a browser dispatches it (a DataTransfer holding a File)."""
    driver.execute_script(
        """
        const [id, b64, name] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        const target = document.getElementById(id);
        for (const type of ["dragenter", "dragover", "drop"]) {
          target.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }
        """,
        element_id,
        base64.b64encode(data).decode(),
        name,
    )


def set_slider(driver, element_id: str, value: str) -> None:
    driver.execute_script(
        "const s = document.getElementById(arguments[0]); s.value = arguments[1];"
        "s.dispatchEvent(new Event('input', {bubbles: true}));",
        element_id,
        value,
    )


def submit_and_get(driver, count: int) -> dict:
    by_id(driver, "submit").click()
    wait(driver, lambda d: d.execute_script("return window.sent.length") >= count, 30, "nothing was posted")
    return driver.execute_script("return window.sent")[count - 1]["body"]


def test_a_chosen_then_dropped_style_image_and_its_strength_reach_the_server(styled, browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser
    open_page(driver, styled)
    assert by_id(driver, "style_scale").get_attribute("value") == "0.6"
    assert by_id(driver, "style-scale-value").text == "0.6"
    chosen = picture(tmp_path / "chosen.png", (4, 6, 2))
    by_id(driver, "style_image").send_keys(str(tmp_path / "chosen.png"))
    wait(driver, lambda d: by_id(d, "style-preview").is_displayed(), 30, "no preview of the chosen style image")
    src = by_id(driver, "style-preview").get_attribute("src")
    assert src == "data:image/png;base64," + base64.b64encode(chosen).decode()
    assert by_id(driver, "style-name").text == "chosen.png (56×40)"
    dropped = picture(tmp_path / "dropped.png", (1, 6, 3))
    drop(driver, "style-drop", dropped, "dropped.png")
    wait(driver, lambda d: by_id(d, "style-name").text == "dropped.png (56×40)", 30, "the drop was not taken")
    set_slider(driver, "style_scale", "1.3")
    assert by_id(driver, "style-scale-value").text == "1.3"
    for element_id, value in (("prompt", "a harbour"), ("seed", 7), ("steps", 3), ("width", 64), ("height", 64)):
        fill(driver, element_id, value)

    body = submit_and_get(driver, 1)
    assert body["style_image"] == "data:image/png;base64," + base64.b64encode(dropped).decode()  # the last one
    assert body["style_scale"] == 1.3
    image = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery figure img"), message="no image")[0]
    assert "style image ×1.3" in driver.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    native = requests.post(
        styled + "/v1/generate",
        json={
            "prompt": "a harbour",
            "seed": 7,
            "steps": 3,
            "width": 64,
            "height": 64,
            "style_image": base64.b64encode(dropped).decode(),
            "style_scale": 1.3,
        },
        timeout=300,
    )
    assert native.status_code == 200, native.text
    styled = native.json()["images"][0]["b64"]
    assert image.get_attribute("src") == "data:image/png;base64," + styled
    assert decode_data_url(image.get_attribute("src")).size == (64, 64)
    driver.save_screenshot(str(artifacts_dir() / "page-style.png"))

    by_id(driver, "style-clear").click()  # removed: the same request goes without a style image
    assert not by_id(driver, "style-preview").is_displayed()
    body = submit_and_get(driver, 2)
    assert "style_image" not in body and "style_scale" not in body
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure img")) == 2, message="no 2nd image")
    plain = driver.find_elements(By.CSS_SELECTOR, "#gallery figure img")[0].get_attribute("src")
    assert plain != "data:image/png;base64," + styled  # the style image had moved pixels
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def test_a_style_error_marks_the_slider(styled, browser, tmp_path):
    driver = browser
    open_page(driver, styled)
    picture(tmp_path / "s.png", (2, 2, 2))
    by_id(driver, "style_image").send_keys(str(tmp_path / "s.png"))
    wait(driver, lambda d: by_id(d, "style-preview").is_displayed(), 30, "no preview")
    fill(driver, "prompt", "a harbour")
    fill(driver, "steps", 3)
    driver.execute_script(  # a scale past the slider's range, as a hand-edited page could send
        "const s = document.getElementById('style_scale'); s.max = '5'; s.value = '4';"
    )
    by_id(driver, "submit").click()
    wait(driver, lambda d: by_id(d, "form-error").is_displayed(), 60, "no error was shown")
    assert by_id(driver, "form-error").text == "style_scale must be in [0, 2.0], got 4.0"
    assert by_id(driver, "style_scale").get_attribute("aria-invalid") == "true"
