"""What to say when an image arrives in the wrong shape: the shape expected, the shape sent, and how to turn
the one into the other (the commonest mistakes: no channel dimension, a flat list, an extra batch dimension)."""

from __future__ import annotations

import math


def reshape_hint(got: list[int], want: tuple[int, ...], *, batch: bool) -> str:
    """The message for an image of shape ``got`` where ``want`` (C, H, W) is expected; ``batch``: the shape
    is a batch's, [B, C, H, W] (the Open Inference Protocol's ``image`` input), else one instance's."""
    c, h, w = want
    size = c * h * w
    if batch:
        b = got[0] if got else 1
        expected = f"[B, {c}, {h}, {w}]"
        if list(got) == list(want):
            fix = f"add the batch dimension: shape [1, {c}, {h}, {w}] for one image"
        elif c == 1 and len(got) == 3 and got[1:] == [h, w]:
            fix = f"add the channel dimension: shape [{b}, 1, {h}, {w}]"
        elif got and math.prod(got) % size == 0 and len(got) <= 2:
            fix = f"say shape [{math.prod(got) // size}, {c}, {h}, {w}]; the data may stay flat, in row-major order"
        else:
            fix = f"each image is {c}×{h}×{w}"
        return f"expected shape {expected}, got {got}: {fix}"
    expected = f"[{c}, {h}, {w}]"
    numpy = f"numpy: x.reshape({c}, {h}, {w}).tolist()"
    if c == 1 and got == [h, w]:
        fix = f"the channel dimension is missing; wrap the rows in one more list ([rows]; {numpy})"
    elif got == [size]:
        fix = f"a flat list of {size} values; nest it as {c}×{h}×{w} rows ({numpy})"
    elif len(got) == 4 and got[1:] == list(want):
        fix = "that is a batch; send each image as its own instance (numpy: x[0].tolist())"
    else:
        fix = f"pixels are C×H×W, nested three lists deep ({numpy} where x has {size} values)"
    return f"pixels must have shape {expected} (C×H×W), got {got}: {fix}"
