"""Stand-in data sets in torchvision's raw MNIST layout (IDX files), for tests that must not need real data."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` (uint8 labels (N,) or images (N, H, W)) as an IDX file, the format of ``MNIST/raw``."""
    magic = 0x0801 if array.ndim == 1 else 0x0803
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        fh.write(array.astype(np.uint8).tobytes())
