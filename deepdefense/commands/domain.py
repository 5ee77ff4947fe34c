"""``deepdefense domain``: fit a checkpoint's domain score, choose among candidate methods on training data
only, write the score beside the checkpoint, then measure every candidate on data none of them saw."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from deepdefense import flags
from deepdefense.defense.domain import METHODS
from deepdefense.defense.fitting.domain_choice import DEFAULT_METHOD

HELP = "fit and measure a checkpoint's domain score (flags out-of-domain queries); writes <checkpoint>.domain.*"
DESCRIPTION = (
    "Fits each candidate method on the victim's training split, honest variants of it (stroke width, small affine "
    "changes, blur, noise, faint ink, scans: defense/honest_variants.py) and synthetic outliers made from it, "
    "chooses thresholds on a held-out part of that split and its honest variants, compares the candidates there "
    "(never on test data), saves "
    "--method beside the checkpoint, then reports AUROC, false-positive and false-flag rates on the test split, "
    "a foreign data set, rendered symbols, drawn shapes and perturbed test digits (docs/results/domain-score.md)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="lenet-mnist", help="shipped checkpoint name or path to its metadata JSON")
    flags.add_data_root(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the synthetic outliers and the fit")
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=[*METHODS, "auto"],
        help=f"the method to save (default: {DEFAULT_METHOD}, what the measurement chose; auto: this run's choice)",
    )
    p.add_argument(
        "--fpr",
        type=float,
        default=0.004,
        help="in-domain false-positive rate of the threshold on held-out training images (0.4%%: a margin below the "
        "0.5%% target on unseen digits)",
    )
    p.add_argument(
        "--honest-variants",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit the in-domain side on honest variants of the training digits too, and hold the threshold to "
        "--variant-fpr on each family of them (default: on; --no-honest-variants: the score before issue 28)",
    )
    p.add_argument(
        "--variant-fpr",
        type=float,
        default=0.01,
        help="with --honest-variants: the most of each family of held-out honest variants (that the victim reads) "
        "the threshold may flag",
    )
    p.add_argument("--candidates", nargs="+", default=list(METHODS), choices=METHODS, help="methods compared")
    p.add_argument("--held-out", type=int, default=10_000, help="training images kept out of fitting (threshold)")
    p.add_argument("--ood-dataset", default="fashionmnist", help="foreign test images measured against (never fitted)")
    p.add_argument("--n-constructed", type=int, default=2000, help="rendered symbols and drawn shapes, each")
    flags.add_save(p, "the domain score", "<checkpoint>.domain beside it")
    flags.add_out(p, report="docs/results/domain-score.md")
    p.add_argument("--no-eval", action="store_true", help="fit, select and save only (no test data read)")
    flags.add_device(p)
    flags.add_quiet(p)


def run(args: argparse.Namespace) -> int:
    make(args)
    return 0


def make(args: argparse.Namespace) -> Path:
    """Fit, select, save and (unless --no-eval) measure the domain score the flags describe; returns the saved
    score's metadata path."""
    from deepdefense.common.device import resolve_device
    from deepdefense.defense.fitting.domain_choice import DomainFitConfig, fit_select_save
    from deepdefense.measure.domain import evaluate_domain

    started = time.time()
    cfg = DomainFitConfig(
        checkpoint=args.checkpoint,
        data_root=args.data_root,
        seed=args.seed,
        method=args.method,
        fpr=args.fpr,
        honest_variants=args.honest_variants,
        variant_fpr=args.variant_fpr,
        candidates=tuple(args.candidates),
        held_out=args.held_out,
        never=args.ood_dataset,
        save=args.save,
        device=resolve_device(args.device),
        progress=not args.quiet,
        command=args.command_line,
    )
    fit = fit_select_save(cfg)
    held = len(fit.held_x)
    print(f"fitted on {fit.fit_images} {fit.victim.dataset} training images, {held} held out (seed {args.seed})")
    for name, cand in fit.candidates.items():
        print(
            f"  {name:12s} held-out FPR {100 * cand.fpr_held_out:5.2f}%"
            f"  outliers caught {100 * cand.mean_detection:5.1f}%"
            f"  honest variation flagged {100 * cand.honest_false_flags:5.2f}%  utility {cand.utility:+.3f}"
        )
        if cand.variant_false_flags:
            print("      honest variants flagged: " + "  ".join(
                f"{k} {100 * v:.2f}%" for k, v in cand.variant_false_flags.items()))  # fmt: skip
    print(f"selected by measurement: {fit.selected}; saving: {fit.method}")
    print(f"wrote {fit.meta_path} and {fit.meta.weights} ({fit.method}, threshold {fit.meta.threshold:.6g})")
    record = fit.record(cfg)
    if not args.no_eval:
        evaluation = evaluate_domain(
            fit.model,
            fit.victim,
            fit.candidates,
            fit.held_x[: args.n_constructed],
            data_root=args.data_root,
            ood_dataset=args.ood_dataset,
            n_constructed=args.n_constructed,
            seed=args.seed,
            progress=not args.quiet,
        )
        for name, m in evaluation["methods"].items():
            aurocs = "  ".join(f"{k} {v:.4f}" for k, v in m["auroc"].items())
            print(f"  {name:12s} test FPR {100 * m['fpr_in_domain']:5.2f}%  AUROC: {aurocs}")
        record["evaluation"] = evaluation
    record["seconds"] = round(time.time() - started, 1)
    from deepdefense.measure.domain_report import markdown

    flags.write_outputs(args, record, markdown)
    return fit.meta_path
