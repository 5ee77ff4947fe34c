"""Where a result comes from: the commit of the code that measured it and when, written into every results
file (``deepdefense`` commands' ``--out``, ``deepdefense eval``'s record), so a figure quoted in the docs
can be dated and traced (README.md, "Measured so far")."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def provenance() -> dict[str, object]:
    """``{"commit", "dirty", "date"}``: the checkout's short commit and whether it had uncommitted changes
    (both None outside a git checkout, e.g. an installed wheel), and the UTC time of measuring."""
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        commit = _git("rev-parse", "--short=7", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "date": date}
    return {"commit": commit, "dirty": dirty, "date": date}


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()
