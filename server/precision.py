"""The precision of the numbers in an answer: probabilities and attribution maps are sent with
:data:`SIGNIFICANT_DIGITS` significant digits (a float32 carries about 7; the defense's answers are not
meant to be read closer than that), which halves an answer's size without changing what it says:
each value moves by at most half a unit in its 6th digit, so K probabilities still sum to 1 within
K × 5e-7."""

from __future__ import annotations

import numpy as np
from torch import Tensor

SIGNIFICANT_DIGITS = 6


def rounded(values: Tensor) -> list[float]:
    """``values`` flattened (row-major), each rounded to :data:`SIGNIFICANT_DIGITS` significant digits; the
    division by an exact power of ten gives the double nearest the decimal, so JSON writes it short."""
    a = values.detach().cpu().double().numpy().ravel()
    with np.errstate(divide="ignore"):
        magnitude = np.floor(np.log10(np.abs(a)))
    magnitude[~np.isfinite(magnitude)] = 0.0
    exponent = (SIGNIFICANT_DIGITS - 1 - magnitude).astype(np.int64)
    up = exponent >= 0  # multiply then divide by 10**e (exact for e ≤ 22); else the reverse
    scale = 10.0 ** np.abs(exponent)
    out = np.where(up, np.round(a * scale) / scale, np.round(a / scale) * scale)
    return out.tolist()
