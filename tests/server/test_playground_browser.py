"""The playground in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``, through
Selenium) loads ``GET /`` from a server on loopback, a stroke is drawn with the mouse (and once with a finger,
as touch pointer events), Predict is clicked, and the page shows a label, the probabilities and an attribution
map; with API keys, the key typed into the page opens the API and a wrong one is shown as the server's 401.
No skip: like the Redis tests, these need the real thing and fail without it (``.ci/run`` installs Chromium
and its driver when missing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.playground_browser import (
    SEVEN,
    bright_pixels,
    chromium,
    draw,
    painted_pixels,
    predict_and_wait,
    wait_for_model,
)
from support.settings import loopback_settings

from deepdefense.defense import NoDefense
from deepdefense.measure.launcher import in_thread
from deepdefense.server.app import create_app

KEY = "playground-key-0123"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, defense: NoDefense) -> Iterator[str]:
    with in_thread(create_app(loopback_settings(tmp_path_factory.mktemp("playground")), defense)) as base:
        yield base


def test_a_drawn_digit_gets_a_label_bars_and_a_map(browser, url: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url + "/")
    wait_for_model(browser)
    served = browser.find_element(By.ID, "served")
    assert served.get_attribute("data-defense") == "none" and served.get_attribute("data-interpreter") == "gradcam"
    assert not browser.find_element(By.ID, "model-row").is_displayed(), "one model: nothing to pick"
    assert painted_pixels(browser, "map") == 0, "no map before an answer"
    draw(browser, SEVEN)
    assert bright_pixels(browser) > 1000, "the stroke was drawn on the pad"
    label = predict_and_wait(browser)
    assert label in [str(d) for d in range(10)]
    assert painted_pixels(browser, "map") > 0, "the attribution map was drawn over the input"
    widths = [e.get_attribute("style") for e in browser.find_elements(By.CSS_SELECTOR, "#bars .fill")]
    assert len(widths) == 10 and any("width: 0%" not in w for w in widths)
    browser.find_element(By.ID, "clear").click()
    assert bright_pixels(browser) == 0 and painted_pixels(browser, "map") == 0
    assert browser.find_element(By.ID, "label").text == "–"


def test_a_digit_drawn_with_a_finger_is_answered_too(browser, url: str) -> None:
    browser.get(url + "/")
    wait_for_model(browser)
    draw(browser, SEVEN, pointer="touch")
    assert bright_pixels(browser) > 1000, "the touch stroke was drawn on the pad"
    assert predict_and_wait(browser) in [str(d) for d in range(10)]
    assert painted_pixels(browser, "map") > 0


def test_with_keys_the_page_asks_for_one_and_shows_401_readably(browser, tmp_path: Path, defense: NoDefense) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with in_thread(create_app(loopback_settings(tmp_path, api_keys=KEY), defense)) as base:
        browser.get(base + "/")
        error = browser.find_element(By.ID, "error")
        WebDriverWait(browser, 30, poll_frequency=0.05).until(lambda d: error.is_displayed())
        assert "401" in error.text and "unauthorized" in error.text
        key = browser.find_element(By.ID, "api-key")
        assert key.is_displayed()
        key.send_keys("wrong-key")
        draw(browser, SEVEN)
        with pytest.raises(AssertionError, match="401"):
            predict_and_wait(browser)
        key.clear()
        key.send_keys(KEY)
        browser.find_element(By.TAG_NAME, "h1").click()  # the key field's change event: /v1/models again
        wait_for_model(browser)
        assert predict_and_wait(browser) in [str(d) for d in range(10)]
        assert painted_pixels(browser, "map") > 0


def test_a_picked_image_with_invert_ticked_is_read_as_its_negative(browser, url: str, tmp_path: Path) -> None:
    """Ink on paper with "invert light background" ticked gets the answer of the same digit white on black."""
    from PIL import ImageFont
    from selenium.webdriver.common.by import By

    from deepdefense.measure.ten_digits import FONT_SIZE, render, system_font

    font = ImageFont.truetype(str(system_font()), FONT_SIZE)
    labels = {}
    for polarity, tick in (("white on black", False), ("black on white", True)):
        path = tmp_path / f"{polarity.replace(' ', '-')}.png"
        path.write_bytes(render(3, polarity, font))
        browser.get(url + "/")
        wait_for_model(browser)
        invert = browser.find_element(By.ID, "invert")
        if invert.is_selected() != tick:
            invert.click()
        browser.find_element(By.ID, "file").send_keys(str(path))
        labels[polarity] = predict_and_wait(browser)
        assert 1000 < bright_pixels(browser) < 280 * 280 // 3, "shown as the model sees it: a light digit on dark"
    assert labels["black on white"] == labels["white on black"]


def test_the_user_picks_the_model_and_the_answer_is_that_models(browser, tmp_path: Path) -> None:
    """A server of two models: the picker lists both, the default first; picking lenet-fashionmnist shows its
    classes, and a drawing is answered by it (a class name of Fashion-MNIST), then by lenet-mnist again."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    from deepdefense.models.checkpoint import read_meta, resolve_checkpoint

    fashion = read_meta(resolve_checkpoint("lenet-fashionmnist")).classes
    settings = loopback_settings(tmp_path, checkpoint=["lenet-mnist", "lenet-fashionmnist"])
    with in_thread(create_app(settings)) as base:
        browser.get(base + "/")
        wait_for_model(browser)
        assert browser.find_element(By.ID, "model-row").is_displayed()
        picker = Select(browser.find_element(By.ID, "model"))
        assert [o.get_attribute("value") for o in picker.options] == ["lenet-mnist", "lenet-fashionmnist"]
        served = browser.find_element(By.ID, "served")
        assert served.get_attribute("data-model") == "lenet-mnist"
        picker.select_by_value("lenet-fashionmnist")
        assert served.get_attribute("data-model") == "lenet-fashionmnist" and "fashionmnist" in served.text
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .name")]
        assert names == fashion, "the bars are the picked model's classes"
        draw(browser, SEVEN)
        label = browser.find_element(By.ID, "label")
        assert predict_and_wait(browser) in fashion and label.get_attribute("data-model") == "lenet-fashionmnist"
        picker.select_by_value("lenet-mnist")
        assert label.text == "–", "the other model's answer is cleared"
        assert predict_and_wait(browser) in [str(d) for d in range(10)]
        assert label.get_attribute("data-model") == "lenet-mnist"
