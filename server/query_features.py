"""What the extraction monitor keeps of a query: a coarse view of it, its near-duplicate fingerprints and
its distance to the key's earlier queries. Pure functions of tensors and bytes; the monitor
(``server/monitor.py``) stores what they return.

* **Coarse view** — the image averaged over channels and pooled to 14×14 cells (2×2-pixel blocks of a
  28×28 digit), one byte per cell: small enough to keep hundreds per key whatever the input size, fine
  enough to tell two digits apart.
* **Near-duplicate fingerprints** (Blacklight, Li et al., USENIX Security 2022, made simpler): the
  4×4-block means of the view quantised on ``HASHES`` grids, each shifted by offsets drawn from the
  server's secret, and hashed with it. A query one pixel (or a few) away from an earlier one lands in
  the same cell of at least one grid and so shares a fingerprint with it; two different digits rarely do
  (among the first 200 MNIST test digits, some pair shares one under about one secret in 230: the monitor's
  rules count many such matches per key, never one).
  Without the secret, a thief cannot place his twin on a cell border of every grid at once.
* **PRADA** (Juuti et al., EuroS&P 2019): the distance of each query to the nearest of the key's
  earlier queries. An honest user's digits are spread like natural data, so these distances are
  roughly normally distributed; a thief who grows his queries from earlier ones (JBDA's Jacobian
  steps, twins) adds a mass of tiny distances beside the natural ones, and the Shapiro–Wilk statistic W
  of the sample falls. ``spread_statistic`` is that W.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import shapiro
from torch import Tensor

#: The coarse view's side: VIEW_SIDE × VIEW_SIDE cells.
VIEW_SIDE = 14
#: Fingerprints per query: the shifted grids a near-duplicate is looked up on.
HASHES = 4
#: Cell size of a fingerprint grid, in units of pixel value (0–1), over 4×4-pixel means.
GRID_STEP = 0.125


def coarse_views(x: Tensor) -> np.ndarray:
    """(B, C, H, W) in [0, 1] → (B, VIEW_SIDE²) uint8: channel mean, pooled to VIEW_SIDE × VIEW_SIDE, ×255."""
    pooled = F.adaptive_avg_pool2d(x.detach().float().mean(1, keepdim=True).cpu(), VIEW_SIDE)
    return (pooled.flatten(1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def view_distances(view: np.ndarray, others: np.ndarray) -> np.ndarray:
    """L2 distances (pixel units, 0–1 per cell) from one coarse view to each row of ``others``."""
    diff = others.astype(np.float32) - view.astype(np.float32)[None]
    return np.sqrt((diff * diff).sum(1)) / 255.0


def fingerprints(views: np.ndarray, secret: bytes) -> list[list[str]]:
    """``HASHES`` hex fingerprints per coarse view: the view's 2×2-cell means (4×4 pixels) quantised on
    grids shifted by secret offsets, each grid's cells hashed with the secret."""
    cells = torch.from_numpy(views.astype(np.float32) / 255.0).reshape(-1, 1, VIEW_SIDE, VIEW_SIDE)
    blocks = F.avg_pool2d(cells, 2, ceil_mode=True).flatten(1).numpy()
    offsets = _offsets(secret, blocks.shape[1])
    out: list[list[str]] = []
    for row in blocks:
        prints = []
        for j in range(HASHES):
            cell = np.floor((row + offsets[j]) / GRID_STEP).astype(np.int16)
            h = hashlib.blake2b(cell.tobytes(), digest_size=10, key=secret[:32], person=b"dd-near-dup" + bytes([j]))
            prints.append(h.hexdigest())
        out.append(prints)
    return out


def exact_prints(x: Tensor, secret: bytes) -> list[str]:
    """One hex digest per query of its exact bytes (as float32), keyed with the secret: the same image again."""
    rows = x.detach().float().cpu().contiguous().numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=12, key=secret[:32], person=b"dd-exact").hexdigest() for r in rows]


def _offsets(secret: bytes, n: int) -> np.ndarray:
    """(HASHES, n) grid offsets in [0, GRID_STEP): the grids are shifted by staggered, secret amounts."""
    seed = int.from_bytes(hashlib.blake2b(secret, digest_size=8, person=b"dd-grid").digest(), "little")
    rng = np.random.default_rng(seed)
    stagger = (np.arange(HASHES)[:, None] + rng.random((HASHES, n))) / HASHES  # one grid per quarter of a step
    return (stagger % 1.0) * GRID_STEP


def spread_statistic(distances: np.ndarray) -> float:
    """PRADA's statistic: the Shapiro–Wilk W of a key's nearest-earlier-query distances (1: normal)."""
    if len(distances) < 3 or float(np.ptp(distances)) == 0.0:
        return 0.0 if len(distances) >= 3 else 1.0  # all equal: one point repeated, nothing natural about it
    return float(shapiro(distances.astype(np.float64)).statistic)
