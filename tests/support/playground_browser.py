"""Driving the playground page (``GET /``) in a real browser: headless Chromium from Debian's ``chromium`` and
``chromium-driver`` packages through Selenium (the ``dev`` extra), never a browser downloaded at run time.
Used by ``tests/server/test_playground_browser.py`` and by ``python tests/support/playground_browser.py`` (the
screenshot of ``docs/playground.png``: a server with the defaults on loopback, a 7 drawn with the mouse, its answer).

Every wait has a deadline (Selenium's ``WebDriverWait``); nothing sleeps for a fixed time."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: A 7 in the canvas's pixels (280×280; the dashed guide box is 40..240): a bar, then a diagonal stroke down.
SEVEN = [(70.0, 65.0), (205.0, 65.0), (170.0, 130.0), (125.0, 225.0)]
WINDOW = (1000, 800)


class BrowserMissing(AssertionError):
    """Chromium, its driver or Selenium is not installed; the message says how to install them."""


def executables() -> tuple[str, str]:
    """The paths of Chromium and chromedriver (Debian's ``chromium`` and ``chromium-driver``)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise BrowserMissing(
            "the playground's browser test needs Chromium and its driver: apt-get install chromium chromium-driver "
            "(.ci/run installs them when missing)"
        )
    return browser, driver


@contextmanager
def chromium(window: tuple[int, int] = WINDOW) -> Iterator[Any]:
    """A headless Chromium under Selenium, quit at the end (``webdriver.Chrome``)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserMissing("selenium is not installed: pip install -e '.[dev]'") from None
    browser, driver_path = executables()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager downloads nothing: Debian's browser and driver
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--force-device-scale-factor=1", f"--window-size={window[0]},{window[1]}",
                "--disable-extensions", "--no-first-run", "--disable-background-networking"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def draw(driver: Any, points: Sequence[tuple[float, float]], canvas_id: str = "pad", pointer: str = "mouse") -> None:
    """One stroke through ``points`` (canvas pixels): press, move, release, as a person draws — with the mouse,
    or with a finger (``pointer="touch"``: WebDriver's touch pointer, which the browser delivers as touch
    pointer events, as on a phone)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, canvas_id)
    size = canvas.size
    scale_x, scale_y = size["width"] / 280.0, size["height"] / 280.0
    centre = (size["width"] / 2, size["height"] / 2)

    def offset(p: tuple[float, float]) -> tuple[int, int]:  # from the element's centre (Selenium 4)
        return round(p[0] * scale_x - centre[0]), round(p[1] * scale_y - centre[1])

    device = PointerInput(pointer, pointer)
    chain = (
        ActionChains(driver, duration=10, devices=[device])
        .move_to_element_with_offset(canvas, *offset(points[0]))
        .click_and_hold()
    )
    here = points[0]
    for target in points[1:]:
        for k in range(1, 9):  # small moves, so that pointermove fires along the way
            t = k / 8
            p = (here[0] + t * (target[0] - here[0]), here[1] + t * (target[1] - here[1]))
            chain = chain.move_to_element_with_offset(canvas, *offset(p))
        here = target
    chain.release().perform()


def predict_and_wait(driver: Any, timeout_s: float = 60.0) -> str:
    """Click Predict and wait (at most ``timeout_s``) for the answer's label or an error; the label's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "predict").click()

    def answered(d: Any) -> bool:
        return (
            bool(d.find_element(By.ID, "label").get_attribute("data-label"))
            or d.find_element(By.ID, "error").is_displayed()
        )

    WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(answered)
    error = driver.find_element(By.ID, "error")
    if error.is_displayed():
        raise AssertionError(f"the page shows an error instead of an answer: {error.text}")
    return driver.find_element(By.ID, "label").text


def wait_for_model(driver: Any, timeout_s: float = 30.0) -> None:
    """Wait until the page has read ``/v1/models`` (it names the defense and the interpreter)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(
        lambda d: d.find_element(By.ID, "served").get_attribute("data-defense")
    )


def painted_pixels(driver: Any, canvas_id: str) -> int:
    """How many pixels of a canvas are not fully transparent."""
    script = (
        "const c = document.getElementById(arguments[0]);"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;"
    )
    return int(driver.execute_script(script, canvas_id))


def bright_pixels(driver: Any, canvas_id: str = "pad") -> int:
    """How many pixels of a canvas are brighter than mid-grey (the drawn ink on the black pad)."""
    script = (
        "const c = document.getElementById(arguments[0]);"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 128) n++; return n;"
    )
    return int(driver.execute_script(script, canvas_id))


def screenshot(url: str, out: Path) -> str:
    """Load the playground at ``url``, draw a 7, predict, and save the window as a PNG at ``out``; the label."""
    with chromium() as driver:
        driver.get(url + "/")
        wait_for_model(driver)
        draw(driver, SEVEN)
        label = predict_and_wait(driver, timeout_s=120)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    return label


def main(argv: Sequence[str] | None = None) -> int:
    """``python tests/support/playground_browser.py --out docs/playground.png``: ``deepdefense serve`` with its
    defaults (``lenet-mnist``, DeepDefense, Grad-CAM, the gate) on loopback, and the screenshot of its playground."""
    from deepdefense.measure.launcher import spawn_serve

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", default="docs/playground.png")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DD_")} | {"DD_LOG_LEVEL": "warning"}
    with spawn_serve(env) as (url, _process, _shutdown):
        label = screenshot(url, Path(args.out))
    print(f"wrote {args.out} (label {label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
