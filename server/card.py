"""The model card of ``GET /v1/models``: what the served model expects, what the server does to an input
(``server/images.py``, described from its own constants), the ``invert`` option, and what the model is not
meant for.

What the images of the model's data set look like comes from ``models.data.look_of``: the data set's spec,
overridden field by field by the checkpoint's metadata (``extra["card"]``); nothing here is written per model.
"""

from __future__ import annotations

from deepdefense.models.checkpoint import CheckpointError, CheckpointMeta
from deepdefense.models.data import DatasetLook, look_of

from .images import MODES, RESAMPLE, ImageLimits
from .schemas import ExpectedInput, InvertOption, ModelCard, Preprocessing

_COLOURS = {1: "grayscale", 3: "RGB"}
_MODE_STEP = {
    "L": "converted to 8-bit grayscale (Pillow's mode 'L', ITU-R 601-2 luma: L = 0.299 R + 0.587 G + 0.114 B)",
    "RGB": "converted to 8-bit RGB (Pillow's mode 'RGB')",
}
_WHEN = {
    "dark": "set it for an image with dark content on a light background (ink on white paper, a scan, a photo of "
    "a page), so that the background reaches the model as 0, as in its training images; leave it unset for "
    "light content on a dark background",
    "light": "set it for an image with light content on a dark background, so that the background reaches the "
    "model light, as in its training images; leave it unset for dark content on a light background",
    "any": "do not set it: this model's training images are natural photos, and inverting one makes a negative",
}
#: What each defense does to an honest answer, for the model card (defense/names.py lists the defenses).
ENGINE_NOTE = (
    "Answers are changed on purpose, honest ones too: each comes from a misdirection model optimised for that query "
    "(DeepDefense), which keeps only the victim's top-1 class and the order of the attribution map's values; the "
    "probabilities and the map's values are not the victim's. A clean digit the victim reads at p = 1.000 may come "
    "back at p ≈ 0.75 (lenet-mnist: a quarter of 1,000 MNIST test digits at p ≤ 0.753, docs/results/"
    "honest-answers.json). Read the label; do not threshold on the probability or compare it across answers."
)
HONEST_NOTES = {
    "deepdefense": ENGINE_NOTE,
    "dd-s": ENGINE_NOTE,
    "dd-i": ENGINE_NOTE,
    "pp": "Answers are changed on purpose, honest ones too (Prediction Poisoning): the probabilities are moved within "
    "an L1 distance of the victim's, keeping its top-1 class; the attribution map is the victim's.",
    "edm": "Each answer comes from one member of an ensemble, picked by a hash of the query: its label is the "
    "member's, which may differ from the victim's on honest inputs too, and so are its probabilities and map.",
    "none": "Answers are the undefended victim's, unchanged.",
}
GATE_NOTE = (
    "The misinformation gate is on: an input its domain score judges out of domain is answered from a "
    "misinformation model, wrong on purpose and not marked as such. Its domain score is fitted to keep honest "
    "variants in domain (thicker or thinner strokes, small rotations and shifts, noise, blur, faint ink, scans), "
    "yet they are flagged more often than clean digits, and photographs of a page most "
    "(docs/results/format-variants.md)."
)


def dataset_look(meta: CheckpointMeta) -> DatasetLook | None:
    """What the checkpoint's training images look like; a malformed ``extra["card"]`` is a :class:`CheckpointError`
    (raised when the app is created, before the server listens)."""
    try:
        return look_of(meta.dataset, meta.extra.get("card"))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint metadata extra['card'] is malformed: {err}") from None


def model_card(
    meta: CheckpointMeta, look: DatasetLook | None, limits: ImageLimits, *, defense: str, gated: bool
) -> ModelCard | None:
    """The card of a model trained on images that look like ``look`` (None: no card), served with ``limits``
    through ``defense`` (its note says what it does to honest answers); ``gated``: the misinformation gate answers
    the queries its domain score flags."""
    if look is None:
        return None
    c, h, w = meta.input_shape
    colour = _COLOURS.get(c)
    invert = InvertOption(
        predict='"invert": true in the request body, beside "instances" (it applies to every instance)',
        open_inference_protocol='"parameters": {"invert": true} in the infer request',
        default=False,
        effect="every value v (pixels, or an image once decoded, converted and resized) becomes 1 − v before the "
        "model sees it; the server never inverts on its own",
        when=_WHEN.get(look.background, _WHEN["any"]),
    )
    normalise = "the model itself then subtracts the mean and divides by the std of normalisation (do not normalise)"
    image_steps = [
        "base64-decoded (standard alphabet; a data URL's 'data:image/…;base64,' header is dropped); at most "
        f"{limits.max_bytes} bytes once decoded (else 413 "
        f"image_too_large) and at most {limits.max_pixels} pixels, width × height as the header declares them "
        "(else 413 too_many_pixels)",
        "decoded by Pillow as PNG or JPEG, nothing else (else 422 undecodable_image)",
        (_MODE_STEP[MODES[c]] if c in MODES else f"refused: a {c}-channel model takes pixels only (422)")
        + "; an image with transparency is first composited onto white when its content (mean luma weighted "
        "by opacity) is dark and onto black when it is light, so that the content shows (black ink on a transparent "
        "page becomes black on white, which then needs invert as any ink on paper); 16-bit images are clipped to "
        "8 bits; EXIF orientation is not applied",
        f"resized to {w}×{h} with Pillow's {RESAMPLE.name.lower()} filter when its size differs (shrinking "
        f"filters over the whole source area); the aspect ratio is not kept and nothing is cropped, padded or "
        "centred: the whole image is squeezed to the model's size, margins included",
        "divided by 255: values in [0, 1]",
        "with invert: true, every value v becomes 1 − v",
        normalise,
    ]
    pixel_steps = [
        f"used as sent: exactly {c}×{h}×{w} finite values in [0, 1] (else 422); nothing is resized, rescaled or "
        "centred",
        "with invert: true, every value v becomes 1 − v",
        normalise,
    ]
    answers = [
        "Every answer names one of the model's classes with probabilities that sum to 1, whatever the input: "
        "nothing in it says that an input is unlike the training images, so a confident answer to an input listed "
        "under not_meant_for means nothing.",
    ]
    if defense in HONEST_NOTES:
        answers.append(HONEST_NOTES[defense])
    if gated:
        answers.append(GATE_NOTE)
    subject = look.subject or f"one image of the {meta.num_classes} classes of {meta.dataset}"
    return ModelCard(
        summary=f"Reads {subject} from a {colour or f'{c}-channel'} {w}×{h} image; expects {look.polarity}.",
        trained_on=f"the {meta.dataset} training split",
        test_accuracy=meta.test_accuracy,
        expects=ExpectedInput(
            subject=subject,
            shape=list(meta.input_shape),
            colour=colour,  # type: ignore[arg-type]
            value_range=[0.0, 1.0],
            background=look.background,  # type: ignore[arg-type]
            polarity=look.polarity,
            appearance=look.appearance,
            normalisation={"mean": list(meta.mean), "std": list(meta.std)},
        ),
        preprocessing=Preprocessing(image_b64=image_steps, pixels=pixel_steps, invert=invert),
        not_meant_for=list(look.not_for),
        answers=answers,
    )
