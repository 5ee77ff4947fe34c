"""Files changed the way a tampered or corrupted artifact is: the tests of every verified file use this one."""

from __future__ import annotations

from pathlib import Path


def flip_last_byte(path: Path) -> None:
    """Change ``path``'s last byte (in a safetensors file: one byte of its last tensor), so its sha256 changes."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
