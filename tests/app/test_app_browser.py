"""The real page in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by selenium):
upload -> overlay and table; threshold -> fewer segments without a new forward; pick a segment -> its
attention; download the JSON. The slow test takes docs/app.md's screenshot of the packaged start point
(``DETR_PANOPTIC_APP_SCREENSHOT=path`` keeps a copy)."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.timeout(480)  # bounds, not speed tests: a loaded 2-core machine is slow
WAIT = 120  # seconds any one thing may take to appear on a loaded machine


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("headless Chromium and its driver are not installed (Debian packages 'chromium' and "
                    "'chromium-driver'; .ci/run installs them where apt exists)")
    downloads = tmp_path_factory.mktemp("browser-downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1500", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        driver.downloads = downloads
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        shown = driver.find_elements(By.CSS_SELECTOR, "#status")
        raise AssertionError(f"gave up waiting {WAIT} s for {what}; the page says: "
                             f"{shown[0].text if shown else '(no status)'!r}") from None


def status(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#status").text


def segment_count(text: str) -> int | None:
    found = re.search(r"(\d+) segments? \(threshold", text)
    return int(found.group(1)) if found else None


def loaded(driver, selector: str) -> bool:
    """An <img> matching ``selector`` is there and decoded (its natural width is known)."""
    images = driver.find_elements(By.CSS_SELECTOR, selector)
    return bool(images) and driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0]) > 0


def table_rows(driver) -> int:
    """Data rows of the segment table (the grid's row count, header included, minus one)."""
    return int(driver.find_element(By.CSS_SELECTOR, "#segments [role=grid]").get_attribute("aria-rowcount")) - 1


def test_upload_threshold_attention_download(served, browser, street, tmp_path):
    browser.get(served.url)
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]"), "the upload input")
    before = served.counter.count
    browser.execute_script("arguments[0].style.display = 'block';", upload)
    upload.send_keys(str(street))
    wait_for(browser, lambda d: segment_count(status(d)) is not None, "the first result")
    first = segment_count(status(browser))
    assert served.counter.count == before + 1
    wait_for(browser, lambda d: loaded(d, "#overlay img"), "the overlay picture")
    wait_for(browser, lambda d: table_rows(d) == first, "the segment table")
    browser.save_screenshot(str(tmp_path / "app.png"))

    slider = browser.find_element(By.CSS_SELECTOR, "#threshold input[type=range]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", slider)
    # a click at 95% of the track: input then pointerup, which releases the slider (a new post-processing)
    ActionChains(browser).move_to_element_with_offset(slider, int(slider.size["width"] * 0.45), 0).click().perform()
    wait_for(browser, lambda d: float(slider.get_property("value")) > 0.8, "the slider to move")
    threshold = float(slider.get_property("value"))
    wait_for(browser, lambda d: f"threshold {threshold:.2f}" in status(d), f"the result at threshold {threshold:.2f}")
    second = segment_count(status(browser))
    assert 0 < second < first, status(browser)
    wait_for(browser, lambda d: table_rows(d) == second, "the shorter table")
    assert served.counter.count == before + 1  # post-processing only

    cell = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#segments [data-testid=cell-0-1]"),
                    "the first row's label")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", cell)
    cell.click()
    wait_for(browser, lambda d: loaded(d, "#attention img"), "the attention figure")
    assert served.counter.count == before + 2  # one forward with attention weights, on the first pick

    link = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#downloads a[download$='.json']"),
                    "the JSON download link")
    assert link.get_attribute("download") == f"{street.stem}.json"
    link.click()
    deadline = time.monotonic() + WAIT
    while not list(browser.downloads.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    downloaded = list(browser.downloads.glob("*.json"))
    assert downloaded, "the JSON was not downloaded"
    segments = json.loads(Path(downloaded[0]).read_text())["annotations"][0]["segments_info"]
    assert len(segments) == second


@pytest.mark.slow
def test_screenshot_of_the_packaged_start_point_on_an_example(browser, tmp_path):
    """What ``detr-panoptic app`` opens with nothing else at hand: the packaged start point and the bundled
    example scenes. Clicks the first example, picks a segment; the screenshot is the one in docs/app.md."""
    from detr_panoptic.app.page import build_app, launch
    from detr_panoptic.app.serve import default_checkpoint, example_scenes
    from detr_panoptic.inference import PanopticPredictor

    from .conftest import free_port

    source = default_checkpoint(tmp_path / "no-demo-run")
    predictor = PanopticPredictor.from_pretrained(source, device="cpu")
    page = build_app({Path(source).name: predictor}, examples=example_scenes(tmp_path / "examples"),
                     work_dir=tmp_path / "work")
    try:
        _, url, _ = launch(page, host="127.0.0.1", port=free_port(), block=False)
        browser.get(url)
        example = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".gallery-item, button.gallery"),
                           "the first example")
        example.click()
        wait_for(browser, lambda d: (segment_count(status(d)) or 0) > 0, "segments of the example")
        wait_for(browser, lambda d: loaded(d, "#overlay img"), "the overlay picture")
        cell = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#segments [data-testid=cell-0-1]"),
                        "the first row's label")
        cell.click()
        wait_for(browser, lambda d: loaded(d, "#attention img"), "the attention figure")
        height = browser.execute_script("return document.querySelector('#downloads').getBoundingClientRect().bottom"
                                        " + window.scrollY")
        browser.set_window_size(1400, int(height) + 200)  # the window includes what is not the page
        screenshot = tmp_path / "app.png"
        browser.save_screenshot(str(screenshot))
        if os.environ.get("DETR_PANOPTIC_APP_SCREENSHOT"):  # a small copy for the docs: 1000 wide, 256 colours
            from PIL import Image

            picture = Image.open(screenshot).convert("RGB")
            picture = picture.resize((1000, round(picture.height * 1000 / picture.width)), Image.Resampling.LANCZOS)
            picture.quantize(256).save(os.environ["DETR_PANOPTIC_APP_SCREENSHOT"], optimize=True)
    finally:
        page.close()
