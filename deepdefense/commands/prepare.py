"""``deepdefense prepare``: everything a trained checkpoint needs to be served defended, in order, resumable, with
a report of what each step measured and whether the misinformation gate can be turned on.

Each step is the subcommand of the same name, run through its own flags (so its defaults live there once and
the command it records in its artifact is the one a person would type): ``sensitivity``, ``warmstart``,
``domain``, ``misinfo``, and with ``--edm`` the ``edm`` baseline. A step is skipped when its artifact beside the
checkpoint loads as the server would load it (sha256 verified) and was made for the victim's current weights,
unless a step it depends on was made again in this run (``--redo`` forces a step and what depends on it).
With ``--from DESCRIPTION`` a model trained elsewhere is converted into the checkpoint first
(``models/external.py``); a changed description or weights file converts it again, which invalidates the rest.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from deepdefense import flags
from deepdefense.defense import domain as domain_score
from deepdefense.defense import misinformation, warm_start
from deepdefense.defense.baselines import edm as baseline_edm
from deepdefense.models.artifacts import beside
from deepdefense.models.checkpoint import CheckpointError

from . import domain, edm, misinfo, sensitivity, warmstart

HELP = (
    "make what a checkpoint needs to be served defended (sensitivity, warm start, domain score, misinformation model)"
)
DESCRIPTION = (
    "Runs, in order and only where its result is missing or stale: deepdefense sensitivity, warmstart, domain, "
    "misinfo (and edm with --edm), each with its own defaults and the flags below, writing what it makes beside "
    "the checkpoint as the standalone command would. A step's result is kept when it loads against the victim's "
    "current weights (sha256) and nothing it depends on was made again. Ends with a report (--out, default "
    "<checkpoint>.prepare/ beside it: report.json, report.md) of each step's figures and whether the "
    "misinformation gate can be turned on. --from converts a model trained elsewhere first (docs/own-model.md)."
)

#: The share of unseen in-domain images the domain score may flag: the target ``deepdefense domain --fpr`` keeps a
#: margin below (its help: 0.4%, a margin below the 0.5% target on unseen digits).
GATE_TEST_FPR = 0.005


@dataclass(frozen=True)
class Step:
    name: str
    module: ModuleType
    after: tuple[str, ...]  # steps whose result this one is made from: made again, this one is stale
    what: str


STEPS = (
    Step("sensitivity", sensitivity, (), "layer sensitivity S_ℓ (eq. 9) in the checkpoint's metadata"),
    Step("warmstart", warmstart, ("sensitivity",), "the engine's warm start, learnt on the selected layers"),
    Step("domain", domain, (), "the gate's domain score"),
    Step("misinfo", misinfo, (), "the gate's misinformation model (it ranks the classes of flagged answers)"),
    Step("edm", edm, (), "the EDM baseline's ensemble (--edm)"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="the victim: shipped name or path to its metadata JSON; with --from, where the converted checkpoint goes",
    )
    p.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="DESCRIPTION",
        help="a model trained elsewhere: its description (JSON or TOML naming the weights file; docs/own-model.md)",
    )
    flags.add_data_root(p, " (the victim's training split; its test split and --ood-dataset's for the figures)")
    p.add_argument("--seed", type=int, default=0, help="seed of every step")
    p.add_argument(
        "--serve-steps",
        type=int,
        default=None,
        help="the engine's steps from the warm start (deepdefense warmstart --serve-steps; default: its default); "
        "choose it with deepdefense fidelity (docs/performance.md)",
    )
    p.add_argument(
        "--ood-dataset",
        default=None,
        help="foreign test images the domain score and the ensemble are measured on, never fitted (default: the "
        "first other data set of the victim's input shape found under --data-root)",
    )
    p.add_argument("--edm", action="store_true", help="also train the EDM baseline's ensemble (--defense edm)")
    p.add_argument(
        "--redo", nargs="+", default=[], choices=STEP_NAMES, help="make these steps (and what depends on them) again"
    )
    flags.add_out_folder(p, "report folder", "<checkpoint>.prepare beside the checkpoint")
    flags.add_device(p)
    flags.add_quiet(p)


def run(args: argparse.Namespace) -> int:
    from deepdefense.measure.prepare_report import markdown
    from deepdefense.models.checkpoint import read_meta
    from deepdefense.models.data import foreign_dataset

    started = time.time()
    victim, converted = _victim(args)
    steps = [s for s in STEPS if s.name != "edm" or args.edm]
    out = Path(args.out) if args.out else victim.parent / f"{victim.stem}.prepare"
    out.mkdir(parents=True, exist_ok=True)
    ood = args.ood_dataset or foreign_dataset(read_meta(victim).dataset, args.data_root)
    made = {"import"} if converted else set()  # a model converted again may read its input otherwise: all is stale
    records = []
    for i, step in enumerate(steps, 1):
        stale = _stale(step, victim, set(args.redo), made)
        head = f"[{i}/{len(steps)}] {step.name} ({step.what})"
        if stale is None:
            print(f"{head}: done for these weights, kept", flush=True)
            records.append({"step": step.name, "status": "kept", "seconds": 0.0})
            continue
        print(f"{head}: {stale}; making it", flush=True)
        t0 = time.time()
        argv = _argv(step.name, args, victim, out, ood)
        step.module.make(_step_args(step, argv))
        made.add(step.name)
        seconds = round(time.time() - t0, 1)
        print(f"[{i}/{len(steps)}] {step.name}: made in {seconds:.0f} s", flush=True)
        records.append(
            {"step": step.name, "status": "made", "why": stale, "seconds": seconds, "command": _cmd(step, argv)}
        )
    report = _report(args, victim, out, records, time.time() - started)
    report["victim"]["converted_in_this_run"] = converted
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0


def _victim(args: argparse.Namespace) -> tuple[Path, bool]:
    """The victim's metadata path, converting ``--from`` first when it is given and not already converted (then
    True: every step is made again, since a changed description may change what the model reads)."""
    from deepdefense.models.artifacts import stem as pair_stem
    from deepdefense.models.checkpoint import read_meta, resolve_checkpoint
    from deepdefense.models.external import import_model, is_current, read_description

    if args.source is None:
        return resolve_checkpoint(args.checkpoint), False
    desc = read_description(args.source)
    stem = pair_stem(args.checkpoint)
    meta_path = stem.parent / f"{stem.name}.json"
    if is_current(meta_path, desc):
        print(f"[0] import: {meta_path} is converted from {desc.path.name} and {desc.weights.name}, kept", flush=True)
        return meta_path, False
    print(f"[0] import: converting {desc.weights.name} ({desc.arch}, {desc.format}) into {meta_path}", flush=True)
    path = import_model(desc, stem, data_root=args.data_root, command=args.command_line)
    print(f"[0] import: test accuracy on {desc.dataset} test {read_meta(path).test_accuracy:.2f}%", flush=True)
    return path, True


def _argv(name: str, args: argparse.Namespace, victim: Path, out: Path, ood: str) -> list[str]:
    """The step's own command line: what ``deepdefense <name>`` would be given to make the same artifact."""
    argv = ["--checkpoint", str(victim), "--data-root", str(args.data_root), "--seed", str(args.seed)]
    if name != "sensitivity":
        argv += ["--device", args.device] + (["--quiet"] if args.quiet else [])
    if name == "warmstart" and args.serve_steps is not None:
        argv += ["--serve-steps", str(args.serve_steps)]
    if name == "domain":
        argv += ["--ood-dataset", ood, "--out", str(out / "domain.json"), "--report", str(out / "domain.md")]
    if name == "misinfo":
        argv += ["--report", str(out / "misinformation.md")]
    if name == "edm":
        argv += ["--ood-dataset", ood]
    return argv


def _cmd(step: Step, argv: list[str]) -> str:
    return shlex.join(["deepdefense", step.name, *argv])


def _step_args(step: Step, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the step's own parser, as ``deepdefense <step>`` would parse it."""
    parser = argparse.ArgumentParser(prog=f"deepdefense {step.name}")
    step.module.add_arguments(parser)
    ns = parser.parse_args(argv)
    ns.command_line = _cmd(step, argv)
    return ns


def _stale(step: Step, victim: Path, redo: set[str], made: set[str]) -> str | None:
    """Why the step must be made (None: its artifact is there, loads, and was made for these weights)."""
    if step.name in redo:
        return "asked to redo it (--redo)"
    own = CHECKS[step.name](victim)
    remade = [s for s in ("import", *step.after) if s in made]
    if own is None and remade:
        return f"made from {', '.join(remade)}, made in this run"
    return own


def _victim_model(victim: Path) -> Any:
    from deepdefense.models.checkpoint import load_checkpoint

    return load_checkpoint(victim)[0]


def _check_sensitivity(victim: Path) -> str | None:
    from deepdefense.models.checkpoint import read_meta

    meta = read_meta(victim)
    stored = meta.extra.get("sensitivity")
    if not stored:
        return "not in the checkpoint's metadata"
    if stored.get("weights_sha256", meta.sha256) != meta.sha256:  # stored before it recorded its weights: these
        return "computed for other weights"
    return None


def _check_beside(
    suffix: str, what: str, load: Callable[[Path], Any], errors: tuple[type[Exception], ...]
) -> Callable[[Path], str | None]:
    """The check of an artifact beside the checkpoint (``models/artifacts.py``, its ``suffix``): there, and loaded
    as the server loads it (``load``), which verifies its sha256 and the victim's weights it was made for."""

    def check(victim: Path) -> str | None:
        if not beside(victim, suffix).is_file():
            return f"no {what} beside the checkpoint"
        try:
            load(victim)
        except errors as err:
            return str(err)
        return None

    return check


CHECKS: dict[str, Callable[[Path], str | None]] = {
    "sensitivity": _check_sensitivity,
    "warmstart": _check_beside(
        warm_start.SUFFIX,
        "warm start",
        lambda v: warm_start.load_warm_start(v, _victim_model(v)),
        (warm_start.WarmStartError,),
    ),
    "domain": _check_beside(
        domain_score.SUFFIX,
        "domain score",
        lambda v: domain_score.load_domain_score(v, _victim_model(v)),
        (domain_score.DomainScoreError,),
    ),
    "misinfo": _check_beside(
        misinformation.SUFFIX, "misinformation model", misinformation.load_misinformation, (CheckpointError,)
    ),
    "edm": _check_beside(
        baseline_edm.SUFFIX,
        "ensemble",
        lambda v: baseline_edm.load_ensemble(v, _victim_model(v)),
        (baseline_edm.EDMError,),
    ),
}


def _report(args: argparse.Namespace, victim: Path, out: Path, records: list[dict], seconds: float) -> dict[str, Any]:
    from deepdefense.common.provenance import provenance
    from deepdefense.measure.prepare_report import figures, gate_verdict
    from deepdefense.models.checkpoint import read_meta

    meta = read_meta(victim)
    steps = [{**r, "figures": figures(r["step"], victim, out)} for r in records]
    return {
        "command": args.command_line,
        "checkpoint": str(victim),
        "victim": {
            "arch": meta.arch,
            "dataset": meta.dataset,
            "test_accuracy": meta.test_accuracy,
            "sha256": meta.sha256,
            "imported": meta.extra.get("imported"),
        },
        "steps": steps,
        "gate": gate_verdict(victim, {s["step"]: s["figures"] for s in steps}, args.data_root, GATE_TEST_FPR),
        "seconds": round(seconds, 1),
        "measured": provenance(),
    }
