"""What `deepdefense prepare` made from lenet-fashionmnist's weights alone (run.sh's work folder) next to the
companions shipped in models/checkpoints/, as Markdown: ``python compare.py /tmp/prep-fmnist``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "checkpoints"
NAME = "lenet-fashionmnist"


def main(work: Path) -> None:
    ours, shipped = (json.loads((d / f"{NAME}.json").read_text()) for d in (work, SHIPPED))
    rows = [
        ("weights sha256", shipped["sha256"][:12], ours["sha256"][:12]),
        ("test accuracy (%)", shipped["test_accuracy"], ours["test_accuracy"]),
    ]
    s_ours, s_shipped = (m["extra"]["sensitivity"]["scores"] for m in (ours, shipped))
    rows += [(f"S_ℓ {layer}", f"{s_shipped[layer]:.4f}", f"{s_ours[layer]:.4f}") for layer in s_shipped]

    w_ours, w_shipped = (json.loads((d / f"{NAME}.warm.json").read_text()) for d in (work, SHIPPED))
    for key in ("layers", "images", "steps", "serve_steps", "rank"):
        rows.append((f"warm start {key}", w_shipped[key], w_ours[key]))
    t_ours, t_shipped = (load_file(str(d / f"{NAME}.warm.safetensors")) for d in (work, SHIPPED))
    for key in sorted(t_shipped):
        gap = float((t_ours[key] - t_shipped[key]).norm() / t_shipped[key].norm())
        rows.append((f"warm start `{key}`", "", "identical" if gap == 0 else f"relative L2 difference {gap:.1e}"))

    e_ours, e_shipped = (json.loads((d / f"{NAME}.edm.json").read_text())["measured"] for d in (work, SHIPPED))
    for part, keys in (
        ("held_out", ("member_accuracy", "served_accuracy")),
        ("test", ("victim_accuracy", "member_accuracy", "served_accuracy", "served_agreement_with_victim",
                  "coherence_mean", "members_disagree_top1_pct")),
        ("foreign_test", ("coherence_mean", "members_disagree_top1_pct", "served_agreement_with_victim")),
    ):  # fmt: skip
        rows += [(f"EDM {part} {key}", e_shipped[part][key], e_ours[part][key]) for key in keys]
    rows.append(
        ("EDM held-out outlier coherence", e_shipped["held_out"]["outliers"]["coherence_mean"],
         e_ours["held_out"]["outliers"]["coherence_mean"])
    )  # fmt: skip
    print("| figure | shipped | prepared |\n| --- | --- | --- |")
    for what, a, b in rows:
        print(f"| {what} | {a} | {b} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
