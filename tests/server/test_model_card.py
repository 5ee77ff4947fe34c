"""The model card of ``GET /v1/models``: what each shipped model expects (from its data set's description in
``models/data.py``, overridden by a checkpoint's ``extra["card"]``), what the server does to an image — each
claim of the card checked against ``server/images.py`` — and docs/server.md saying the same."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.images import SHAPE
from support.servers import serving
from support.settings import make_settings

from deepdefense.defense import NoDefense
from deepdefense.defense.names import DEFENSES
from deepdefense.models.checkpoint import CheckpointError, CheckpointMeta, read_meta, resolve_checkpoint
from deepdefense.server.app import create_app
from deepdefense.server.card import ENGINE_NOTE, GATE_NOTE, HONEST_NOTES, dataset_look, model_card
from deepdefense.server.images import ImageLimits, to_tensor
from deepdefense.server.schemas import Instance, ModelCard

pytestmark = pytest.mark.usefixtures("no_server_env")

REPO = Path(__file__).resolve().parents[2]
LIMITS = ImageLimits(max_bytes=20_000, max_pixels=250_000)


def meta_of(name: str) -> CheckpointMeta:
    return read_meta(resolve_checkpoint(name))


def card_of(meta: CheckpointMeta, *, gated: bool = False) -> ModelCard:
    """The card of ``meta`` served undefended (the ``client`` fixture's defense ``none``)."""
    card = model_card(meta, dataset_look(meta), LIMITS, defense="none", gated=gated)
    assert card is not None
    return card


@pytest.fixture
def client(tmp_path: Path, defense: NoDefense) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, max_image_bytes=LIMITS.max_bytes, max_image_pixels=LIMITS.max_pixels)
    with serving(create_app(settings, defense)) as c:
        yield c


def test_v1_models_has_the_card_of_lenet_mnist(client: TestClient) -> None:
    (model,) = client.get("/v1/models").json()["models"]
    card = ModelCard.model_validate(model["card"])  # the typed schema, field for field
    assert card == card_of(meta_of("lenet-mnist"))
    expects = card.expects
    assert (expects.shape, expects.colour, expects.value_range, expects.background) == (
        [1, 28, 28],
        "grayscale",
        [0.0, 1.0],
        "dark",
    )
    assert expects.polarity.startswith("light strokes on a dark background")
    assert expects.normalisation == {"mean": [0.1307], "std": [0.3081]}
    assert card.test_accuracy == 99.51
    assert any("several digits" in s for s in card.not_meant_for)
    assert any("photos" in s for s in card.not_meant_for)
    assert any("letters" in s for s in card.not_meant_for)
    invert = card.preprocessing.invert
    assert invert.default is False and '"invert": true' in invert.predict and "ink on white paper" in invert.when
    steps = " ".join(card.preprocessing.image_b64)
    assert f"at most {LIMITS.max_bytes} bytes" in steps and f"at most {LIMITS.max_pixels} pixels" in steps
    assert GATE_NOTE not in card.answers, "the gate is off in this server"


def test_the_card_names_the_gate_when_it_is_on() -> None:
    assert GATE_NOTE in card_of(meta_of("lenet-mnist"), gated=True).answers


def test_the_card_says_what_the_defense_does_to_honest_answers(tmp_path: Path, defense: NoDefense) -> None:
    meta = meta_of("lenet-mnist")
    for name in ("deepdefense", "dd-s", "dd-i"):
        card = model_card(meta, dataset_look(meta), LIMITS, defense=name, gated=False)
        assert card is not None and ENGINE_NOTE in card.answers
    assert "top-1 class" in ENGINE_NOTE and "probabilities" in ENGINE_NOTE and "p ≈ 0.75" in ENGINE_NOTE
    assert set(HONEST_NOTES) == set(DEFENSES), "every defense says what it does to an honest answer"
    with serving(create_app(make_settings(tmp_path), defense)) as client:  # defense none, as served
        (model,) = client.get("/v1/models").json()["models"]
    assert HONEST_NOTES["none"] in model["card"]["answers"] and ENGINE_NOTE not in model["card"]["answers"]


def test_lenet_fashionmnist_expects_a_light_item_on_a_dark_background() -> None:
    card = card_of(meta_of("lenet-fashionmnist"))
    assert card.expects.background == "dark"
    assert card.expects.polarity.startswith("a light item on a dark background")
    assert "fashion product" in card.expects.subject
    assert card.trained_on == "the fashionmnist training split"


def test_a_checkpoint_overrides_its_data_sets_description() -> None:
    meta = meta_of("lenet-mnist")
    override = {"background": "light", "polarity": "dark strokes on a light background", "not_for": ["colour"]}
    card = card_of(replace(meta, extra={**meta.extra, "card": override}))
    assert card.expects.background == "light" and card.expects.polarity == "dark strokes on a light background"
    assert card.not_meant_for == ["colour"]
    assert "light content on a dark background" in card.preprocessing.invert.when
    assert card.expects.subject == "one handwritten digit, 0 to 9", "fields not overridden come from the data set"


def test_a_malformed_card_override_stops_the_checkpoint() -> None:
    meta = meta_of("lenet-mnist")
    with pytest.raises(CheckpointError, match="extra\\['card'\\] is malformed"):
        dataset_look(replace(meta, extra={"card": {"colour": "blue"}}))


def test_a_data_set_nobody_described_has_no_card() -> None:
    meta = replace(meta_of("lenet-mnist"), dataset="somewhere-else")
    assert model_card(meta, dataset_look(meta), LIMITS, defense="deepdefense", gated=False) is None


# -- the card's claims about images, against server/images.py ---------------------------------------------------


def decoded(img: Image.Image) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    instance = Instance(image_b64=base64.b64encode(buf.getvalue()).decode())
    return to_tensor(instance, "instances[0].image_b64", SHAPE, LIMITS).numpy()[0]


def strokes(ink: int, background: int, alpha: int) -> Image.Image:
    """A 28×28 RGBA drawing: a cross of colour ``ink`` (opaque) on ``background`` with opacity ``alpha``."""
    img = Image.new("RGBA", (28, 28), (background, background, background, alpha))
    for i in range(4, 24):
        img.putpixel((i, 14), (ink, ink, ink, 255))
        img.putpixel((14, i), (ink, ink, ink, 255))
    return img


def test_claim_transparency_is_composited_onto_the_background_the_content_shows_against() -> None:
    black_on_transparent = decoded(strokes(ink=0, background=0, alpha=0))  # a pen tool's black ink, no page
    assert black_on_transparent[14, 10] == 0.0 and black_on_transparent[0, 0] == 1.0, "black ink shows on white"
    # exact: PIL composites and converts in integers; the same /255 on the same uint8 values
    np.testing.assert_array_equal(black_on_transparent, decoded(strokes(ink=0, background=255, alpha=255)))
    white_on_transparent = decoded(strokes(ink=255, background=255, alpha=0))  # a canvas's white strokes
    assert white_on_transparent[14, 10] == 1.0 and white_on_transparent[0, 0] == 0.0, "white strokes show on black"
    np.testing.assert_array_equal(white_on_transparent, decoded(strokes(ink=255, background=0, alpha=255)))
    half = decoded(strokes(ink=0, background=0, alpha=128))  # a half-transparent black page behind black ink
    assert 0.45 < half[0, 0] < 0.55 and half[14, 10] == 0.0  # composited (onto white), not dropped
    grey_l = Image.new("L", (28, 28), 40)
    grey_l.paste(200, (10, 10, 18, 18))  # light content on grey, the grey transparent (PNG tRNS, no alpha channel)
    grey_l.info["transparency"] = 40
    x = decoded(grey_l)
    assert x[0, 0] == 0.0 and x[14, 14] == 200 / 255


def test_claim_the_aspect_ratio_is_not_kept() -> None:
    wide = Image.new("L", (112, 28), 0)
    wide.paste(255, (0, 0, 56, 28))  # the left half white
    x = decoded(wide)
    assert x[:, :13].min() == 1.0 and x[:, 15:].max() == 0.0, "squeezed to 28×28, not padded or cropped"


def test_claim_16_bit_images_are_clipped_to_8_bits() -> None:
    deep = Image.fromarray(np.full((28, 28), 1000, dtype=np.uint16))
    assert (decoded(deep) == 1.0).all()


def test_docs_say_what_the_cards_say() -> None:
    docs = (REPO / "docs" / "server.md").read_text()
    for name in ("lenet-mnist", "lenet-fashionmnist"):
        card = card_of(meta_of(name))
        assert card.expects.polarity in docs, f"docs/server.md does not give {name}'s polarity as its card does"
        for item in card.not_meant_for:
            assert item in docs, f"docs/server.md does not list {item!r} for {name}"
    assert '"invert": true' in docs and '"parameters": {"invert": true}' in docs
