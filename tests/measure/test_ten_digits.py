"""The ten-digit experiment (measure/ten_digits.py): the digits as a font renders them, both polarities, and — on
an undefended server on loopback — black on white sent with invert answered as white on black sent without."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont
from support.settings import loopback_settings

from deepdefense.defense import NoDefense
from deepdefense.measure.launcher import in_thread
from deepdefense.measure.ten_digits import FONT_SIZE, SIZE, markdown, render, run_experiment, system_font
from deepdefense.server.app import create_app


@pytest.fixture(scope="module")
def font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(system_font()), FONT_SIZE)


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.mode == "L" and img.size == (SIZE, SIZE)
        return np.asarray(img)


def test_the_two_polarities_are_each_others_negative(font: ImageFont.FreeTypeFont) -> None:
    for digit in range(10):
        light, dark = pixels(render(digit, "white on black", font)), pixels(render(digit, "black on white", font))
        assert light[0, 0] == 0 and dark[0, 0] == 255
        # exact: uint8 pixels, integer arithmetic
        assert np.array_equal(255 - light, dark)
        rows, cols = np.nonzero(light > 128)
        assert 80 < np.ptp(rows) < 160 and abs((rows.min() + rows.max()) / 2 - SIZE / 2) <= 2, "centred, ~110 px tall"
        assert abs((cols.min() + cols.max()) / 2 - SIZE / 2) <= 2


def test_invert_makes_ink_on_paper_the_digit_again(
    font: ImageFont.FreeTypeFont, tmp_path: Path, defense: NoDefense
) -> None:
    operator = "operator-key-for-metrics"
    with in_thread(create_app(loopback_settings(tmp_path, admin_keys=operator), defense)) as url:
        rows = {(r["polarity"], r["invert"]): r for r in run_experiment(url, font, operator)}
    labels = {k: [a["label"] for a in r["answers"]] for k, r in rows.items()}
    assert labels["black on white", True] == labels["white on black", False]
    assert labels["black on white", False] == labels["white on black", True]
    assert all(not a["misinformed"] for r in rows.values() for a in r["answers"]), "no gate in this server"
    font_info = {"family": "DejaVu Sans", "file": "f.ttf", "size": FONT_SIZE}
    record = {"command": "ten_digits", "seconds": 1.0, "server": "test", "font": font_info, "rows": list(rows.values())}
    text = markdown(record)
    correct = rows["white on black", False]["correct"]
    assert f"| white on black | false | **{correct}** | {' '.join(map(str, labels['white on black', False]))} |" in text
