"""Turn validated instances into model inputs: (C, H, W) float tensors in [0, 1] at the model's size.

Images are checked before they are decoded: the base64 text and the decoded bytes against
``max_image_bytes``, the size declared in the header against ``max_image_pixels`` (decompression
bombs), and only PNG and JPEG decoders are tried. Every failure is an :class:`ApiError` naming the
instance's field.

What happens to an image, in order (the model card of ``/v1/models`` says the same, ``server/card.py``):
a ``data:image/…;base64,`` prefix (a data URL, as a browser's canvas gives it) dropped; decoded by Pillow;
an image with transparency composited onto the background that contrasts with its content (:func:`flattened`);
converted to ``MODES[C]`` (8-bit grayscale "L", ITU-R 601-2 luma, for one channel; "RGB" for three; 16-bit
images are clipped to 8 bits; EXIF orientation is not applied); resized to the model's W×H with Pillow's
bilinear filter when its size differs (aspect ratio not kept, nothing cropped, padded or centred); divided by
255. Pixels are used as sent. With the request's ``invert`` option, the values v of either become 1 − v;
nothing is inverted otherwise.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import ApiError
from .schemas import Instance

_FORMATS = ("PNG", "JPEG")
#: Pillow modes an image is converted to, by the model's channel count.
MODES = {1: "L", 3: "RGB"}
#: The filter of a resize to the model's input size.
RESAMPLE = Image.Resampling.BILINEAR
#: A data URL's header before the base64 text, dropped when present.
DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]{1,40};base64,")
#: Content darker than this (0–255 luma, weighted by opacity) is composited onto white, lighter onto black.
DARK_CONTENT = 128


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def instances_to_tensor(
    instances: list[Instance], shape: tuple[int, int, int], limits: ImageLimits, *, invert: bool = False
) -> Tensor:
    """Stack every instance into a (B, C, H, W) batch, or raise the first instance's error; with ``invert``
    (the request's option, never a guess), every value v becomes 1 − v."""
    x = torch.stack([to_tensor(inst, f"instances[{i}]", shape, limits) for i, inst in enumerate(instances)])
    return inverted(x) if invert else x


def inverted(x: Tensor) -> Tensor:
    """1 − x: light and dark swapped (a light background becomes dark); values in [0, 1] stay in [0, 1]."""
    return 1.0 - x


def to_tensor(instance: Instance, field: str, shape: tuple[int, int, int], limits: ImageLimits) -> Tensor:
    if instance.pixels is not None:
        return _pixels(instance.pixels, f"{field}.pixels", shape)
    assert instance.image_b64 is not None  # the schema demands exactly one of the two
    return _image(instance.image_b64, f"{field}.image_b64", shape, limits)


def _pixels(pixels: list[list[list[float]]], field: str, shape: tuple[int, int, int]) -> Tensor:
    try:
        x = torch.tensor(pixels, dtype=torch.float32)
    except ValueError:
        raise ApiError(
            422, "invalid_shape", "pixels must be a C×H×W array whose rows all have the same length", field=field
        ) from None
    if x.dim() != 3 or x.shape[0] != shape[0]:
        got = x.shape[0] if x.dim() == 3 else "?"
        raise ApiError(422, "wrong_channels", f"expected {shape[0]} channel(s), got {got}", field=field)
    if tuple(x.shape) != shape:
        raise ApiError(422, "invalid_shape", f"expected shape {list(shape)}, got {list(x.shape)}", field=field)
    return x


def _image(text: str, field: str, shape: tuple[int, int, int], limits: ImageLimits) -> Tensor:
    channels, height, width = shape
    if channels not in MODES:
        raise ApiError(422, "unsupported_input", f"this model takes {channels}-channel input; send pixels", field=field)
    if len(text) > 4 * (limits.max_bytes // 3 + 1):
        raise ApiError(413, "image_too_large", f"image is larger than {limits.max_bytes} bytes", field=field)
    prefix = DATA_URL.match(text)
    try:
        data = base64.b64decode(text[prefix.end() :] if prefix else text, validate=True)
    except (binascii.Error, ValueError):
        message = "image_b64 is not valid base64 (standard alphabet, padded)"
        if text.startswith("data:") and not prefix:
            message += "; a data URL is accepted only as 'data:image/<type>;base64,' then the base64 text"
        raise ApiError(422, "invalid_base64", message, field=field) from None
    if len(data) > limits.max_bytes:
        raise ApiError(413, "image_too_large", f"image is larger than {limits.max_bytes} bytes", field=field)
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as img:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise _too_many_pixels(field, limits)
            img = flattened(img).convert(MODES[channels])
            if img.size != (width, height):
                img = img.resize((width, height), RESAMPLE)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except Image.DecompressionBombError:
        raise _too_many_pixels(field, limits) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ApiError(
            422, "undecodable_image", "image_b64 is not a decodable PNG or JPEG image", field=field
        ) from None
    x = torch.from_numpy(array)
    return x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1).contiguous()


def flattened(img: Image.Image) -> Image.Image:
    """``img`` without transparency: composited onto white when its content (the mean luma of its pixels, each
    weighted by its opacity) is dark, onto black when it is light — the background against which the content
    shows, so black ink on a transparent page becomes black on white (as a viewer shows it) and white strokes
    on a transparent canvas white on black, never a blank image. Opaque images are returned as they are."""
    if img.mode not in ("RGBA", "LA", "PA") and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64)
    if alpha.min() == 255:
        return rgba.convert("RGB")
    luma = np.asarray(rgba.convert("RGB").convert("L"), dtype=np.float64)
    weight = alpha.sum()
    content = (luma * alpha).sum() / weight if weight > 0 else 0.0
    background = 255 if content < DARK_CONTENT else 0
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (background,) * 3 + (255,)), rgba).convert("RGB")


def _too_many_pixels(field: str, limits: ImageLimits) -> ApiError:
    return ApiError(413, "too_many_pixels", f"image declares more than {limits.max_pixels} pixels", field=field)
