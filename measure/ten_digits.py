"""The ten-digit experiment of issue 18, repeatable: the digits 0–9 rendered with a system font into 200×200
PNGs, white on black and black on white, each sent as ``image_b64`` to ``deepdefense serve`` with its defaults
(README command 1: ``lenet-mnist``, DeepDefense, Grad-CAM, the misinformation gate on), without and with the
request's ``invert`` option. Records every label, its probability, and whether the gate answered it from the
misinformation model (the server's ``dd_misinformed_answers_total``, read before and after each request).

``python -m deepdefense.measure.ten_digits --out docs/results/ten-digits`` writes ``ten-digits.json`` and
``ten-digits.md``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw, ImageFont

from .formats import misinformed_answers
from .launcher import spawn_serve
from .markdown import document, made_by, module_command, row, table

SIZE = 200
#: The font's size in pixels: a digit's glyph is then about 110 of the 200 pixels tall (MNIST's digits fill
#: about 20 of 28, 143 of 200): chosen once, as a person would, not tuned on the answers.
FONT_SIZE = 150
FONT_FAMILY = "DejaVu Sans"
POLARITIES = {"white on black": (0, 255), "black on white": (255, 0)}  # (background, ink)


def system_font(family: str = FONT_FAMILY) -> Path:
    """The file of ``family`` as fontconfig resolves it (``fc-match``), else DejaVu Sans where Debian puts it."""
    if shutil.which("fc-match"):
        found = subprocess.run(["fc-match", "-f", "%{file}", family], capture_output=True, text=True, check=False)
        if found.returncode == 0 and found.stdout.strip() and Path(found.stdout.strip()).is_file():
            return Path(found.stdout.strip())
    fallback = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    if fallback.is_file():
        return fallback
    raise FileNotFoundError(f"no system font for {family!r}: install fonts-dejavu-core (apt-get)")


def render(digit: int, polarity: str, font: ImageFont.FreeTypeFont, size: int = SIZE) -> bytes:
    """``digit`` centred by its bounding box on a size×size 8-bit grayscale PNG of ``polarity``."""
    background, ink = POLARITIES[polarity]
    img = Image.new("L", (size, size), background)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), str(digit), fill=ink, font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def ask(client: httpx.Client, url: str, png: bytes, invert: bool) -> dict[str, Any]:
    """One ``/predict`` request; the label, its probability and whether the gate misinformed it (``client``
    sends the server's operator key, to which ``/metrics`` shows the gate's count)."""
    before = misinformed_answers(client.get(f"{url}/metrics").text)
    body = {"instances": [{"image_b64": base64.b64encode(png).decode()}], "explain": False, "invert": invert}
    r = client.post(f"{url}/predict", json=body)
    r.raise_for_status()
    (prediction,) = r.json()["predictions"]
    label = int(prediction["label"])
    misinformed = misinformed_answers(client.get(f"{url}/metrics").text) - before == 1
    return {"label": label, "probability": round(prediction["probabilities"][label], 4), "misinformed": misinformed}


def run_experiment(url: str, font: ImageFont.FreeTypeFont, operator: str) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {operator}"}) as client:
        for polarity in POLARITIES:
            for invert in (False, True):
                answers = [ask(client, url, render(d, polarity, font), invert) for d in range(10)]
                rows.append({"polarity": polarity, "invert": invert, "answers": answers,
                             "correct": sum(a["label"] == d for d, a in enumerate(answers))})  # fmt: skip
    return rows


def markdown(record: dict[str, Any]) -> str:
    out = [
        "# Ten digits rendered with a system font, sent as people send them",
        "",
        *made_by(
            f"`{record['font']['file']}`, {record['seconds']} s on this machine; deterministic: no randomness",
            record["command"],
        ),
        f"The digits 0–9 in {record['font']['family']} at {record['font']['size']} px, centred by their bounding box "
        f"on {SIZE}×{SIZE} 8-bit grayscale PNGs, white on black and black on white, each sent alone as `image_b64` to "
        f'`deepdefense serve` with its defaults ({record["server"]}), without and with `"invert": true`. '
        "*misinformed*: the gate answered from the misinformation model (the server's "
        "`dd_misinformed_answers_total` before and after the request).",
        "",
        *table("polarity | invert | right of 10 | labels for 0 1 2 3 4 5 6 7 8 9 | misinformed"),
    ]
    for r in record["rows"]:
        labels = " ".join(str(a["label"]) for a in r["answers"])
        misinformed = ", ".join(str(d) for d, a in enumerate(r["answers"]) if a["misinformed"]) or "none"
        out.append(row([r["polarity"], str(r["invert"]).lower(), f"**{r['correct']}**", labels, misinformed]))
    out += ["", "Probability of each answered label (digits 0–9):", ""]
    out += table(
        "polarity | invert | probabilities",
        (
            [r["polarity"], str(r["invert"]).lower(), " ".join(f"{a['probability']:.2f}" for a in r["answers"])]
            for r in record["rows"]
        ),
    )
    return document(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/results/ten-digits", help="path without suffix: .json and .md")
    args = parser.parse_args(argv)
    started = time.time()
    font_file = system_font()
    font = ImageFont.truetype(str(font_file), FONT_SIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DD_")}  # the defaults, as README command 1
    env["DD_LOG_LEVEL"] = "warning"
    env["DD_ADMIN_KEYS"] = operator = secrets.token_urlsafe(24)  # reads the gate's count in /metrics; not an API key
    with spawn_serve(env) as (url, _process, _shutdown):
        served = httpx.get(f"{url}/v1/models", timeout=30).json()["models"][0]
        rows = run_experiment(url, font, operator)
    settings = served["defense"]["settings"]
    record = {
        "command": module_command("deepdefense.measure.ten_digits", argv),
        "font": {"family": FONT_FAMILY, "file": str(font_file), "size": FONT_SIZE},
        "server": f"{served['name']}, defense {served['defense']['name']}, interpreter {served['interpreter']}, "
        f"gate {settings.get('gate', 'none')}",
        "rows": rows,
        "seconds": round(time.time() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    for r in rows:
        print(f"{r['polarity']:15s} invert {r['invert']!s:5s} right {r['correct']}/10")
    return 0


if __name__ == "__main__":
    sys.exit(main())
