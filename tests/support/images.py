"""Queries for the lenet-mnist victim: random pixel lists and a PNG decompression bomb."""

from __future__ import annotations

import base64
import struct
import zlib

import torch

SHAPE = (1, 28, 28)


def pixels(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> list:
    """A random image in [0, 1) as nested lists (the ``pixels`` field of an instance), fixed by ``seed``."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).tolist()


def queries(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random images (no data set needed) whose first pixel is 0: the fault-injecting fakes mark a query by its
    first pixel, so none is marked unless a test marks it."""
    x = torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0, 0] = 0.0
    return x


def png_bomb(width: int, height: int) -> str:
    """A tiny PNG (base64) whose header declares width × height; its pixel data would inflate to gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(1 << 16))
    return base64.b64encode(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    ).decode()
