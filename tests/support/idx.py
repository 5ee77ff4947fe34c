"""Stand-in data sets in torchvision's raw MNIST layout (IDX files), for tests that must not need real data."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` (uint8 labels (N,) or images (N, H, W)) as an IDX file, the format of ``MNIST/raw``."""
    magic = 0x0801 if array.ndim == 1 else 0x0803
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def stand_in_mnist(root: Path, sizes: tuple[int, int], mark: Callable[[np.ndarray, int], None]) -> Path:
    """``sizes`` (train, test) noisy images in MNIST's raw layout under ``root``, class c drawn by ``mark(image, c)``
    into a seeded background."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in zip(("train", "t10k"), sizes, strict=True):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(labels):
            mark(images[i], int(c))
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


def _bar(image: np.ndarray, c: int) -> None:
    image[4:24, 2 + 2 * c : 4 + 2 * c] = 255


def bar_mnist(root: Path) -> Path:
    """A 256/64-image stand-in under ``root``: class c is a bright bar at position c."""
    return stand_in_mnist(root, (256, 64), _bar)
