"""Where a result comes from: the commit of the code that measured it and when, written into every results
file (``deepdefense`` commands' ``--out``, ``deepdefense eval``'s record), so a figure quoted in the docs
can be dated and traced (README.md, "Measured so far"); and the machine that measured it (:func:`machine`)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

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


@dataclass(frozen=True)
class Machine:
    """What a measurement ran on. ``str()`` is the short form records and caches key on (host, architecture,
    cores, torch threads, the accelerator when used); :meth:`describe` adds the processor and the versions."""

    host: str
    arch: str
    cpu: str
    cores: int | None
    threads: int
    accelerator: str | None  # the GPU's name when the device is one
    cuda: str | None
    torch: str
    python: str

    def __str__(self) -> str:
        name = f"{self.host} {self.arch}, {self.cores} cores, {self.threads} threads"
        return name + (f", {self.accelerator}" if self.accelerator else "")

    def describe(self) -> str:
        cuda = f" (CUDA {self.cuda})" if self.accelerator else ""
        return f"{self}{cuda}; CPU {self.cpu}; torch {self.torch}, Python {self.python}"


def machine(device: str | torch.device = "cpu") -> Machine:
    """The machine measuring on ``device``: the one description every record and report uses."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = str(device).startswith("cuda") and torch.cuda.is_available()
    return Machine(
        host=platform.node(),
        arch=platform.machine(),
        cpu=cpu,
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        accelerator=torch.cuda.get_device_name(torch.device(device)) if gpu else None,
        cuda=torch.version.cuda,
        torch=torch.__version__,
        python=platform.python_version(),
    )
